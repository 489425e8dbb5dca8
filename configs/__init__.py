"""Configs as code: each file has `get_config()` returning an `ml_collections.ConfigDict`."""
