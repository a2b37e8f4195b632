"""The data plane: client protocol, exchanges, plugin chains, routing."""
