"""Build hook: the optional C fast paths (``gateway/_speedups.c``). Everything else about the
package is in pyproject.toml. Without a C compiler (or Python's headers) the extension is
skipped with a warning and the gateway runs the pure-Python versions of the same functions."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gateway._speedups", ["gateway/_speedups.c"], optional=True)])
