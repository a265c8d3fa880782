"""Bundled training configs: demo.yaml is what `velotune train --demo` (and `make demo`) runs."""
