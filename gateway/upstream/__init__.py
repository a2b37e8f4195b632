"""Upstreams: targets, the balancer seam, per-target connection pools, the upstream protocol."""
