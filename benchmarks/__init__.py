"""Benchmarks: the peak harness (``python -m benchmarks``), stub upstreams, the fake LLM and
the Locust scenarios. Method and usage: benchmarks/README.md."""
