"""model_shards package."""
