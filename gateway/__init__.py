"""An API gateway / edge reverse proxy on uvloop + httptools with a plugin pipeline."""

__version__ = "0.1.0"
