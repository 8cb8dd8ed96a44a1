"""Stage 2, retrieval: embeddings (cached), the Faiss index, ranking metrics, and from neighbours to a decision."""
