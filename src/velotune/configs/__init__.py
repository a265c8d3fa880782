"""Bundled training configs: demo.yaml is what `velotune train` runs without a config."""
