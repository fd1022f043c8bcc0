"""Training configs: one file per experiment, each with `get_config()` building on `base`."""
