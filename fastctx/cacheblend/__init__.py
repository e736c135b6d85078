"""CacheBlend KV fusion: reuse stored KV of chunks that are not a prefix, recompute the tokens that deviate."""
