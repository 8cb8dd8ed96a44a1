"""Retrieval-based classification and re-identification: the importable parts the notebooks call."""
