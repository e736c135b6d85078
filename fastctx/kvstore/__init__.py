"""Chunk-KV storage (content-addressed, tiered, crash-safe). Arrives with the CacheBlend work."""
