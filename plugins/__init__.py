"""Built-in plugins, one package each, registered by name (see gateway.plugin)."""
