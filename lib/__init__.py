"""Retrieval-based classification and re-identification, as stage packages that import only earlier stages:
core -> data -> retrieval -> train -> evaluate -> analysis -> probe (tests/test_layers.py holds that order)."""
