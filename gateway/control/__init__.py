"""Control plane: the small non-blocking HTTP client for JWKS, discovery, health checks."""
