"""Model architectures fastctx serves through the engines' model registries."""
