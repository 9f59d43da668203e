"""Encoder runtimes besides sentence-transformers' own (`load_encoder(backend=...)`)."""
