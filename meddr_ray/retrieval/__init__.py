"""Retrieval-augmented diagnosis without Ray: FAISS index files, their versioned store, and the search + context
+ voting that evaluation and Serve share."""
