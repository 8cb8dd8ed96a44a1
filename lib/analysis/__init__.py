"""Stage 5, analysis: confusion tables, every figure of notebooks 01-05, the retrieval gallery and widget browser."""
