"""Config: the YAML model, loading and validation, compiling into a runtime."""
