"""Stage 6, probe: retrieval methods compared per backbone (features, local matching, re-ranking, fusion, figures)."""
