"""The test support's own guarantees that the suite's stability rests on."""

from __future__ import annotations

from tests.support.procs import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    # A gateway's listener and admin ports are both picked before the gateway binds either.
    # bind(0) alone picks at random among about 14,000 ports here: two picks in a row are the
    # same port once in 14,000, and 1,000 picks repeat a port about 35 times.
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
