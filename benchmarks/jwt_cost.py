"""The jwt plugin's own per-request cost, with timeit (no sockets, no event loop):

* ``on_request`` on a verified-token cache hit (plain, and forwarding two claims);
* ``on_request`` with the cache disabled (a full verification) for RS256 and ES256;
* ``jwt.decode`` (pyjwt) on the same tokens with the same checks, the reference for the cold path.

    python -m benchmarks.jwt_cost [--number N]   # timeit: µs per call, best of 5 repeats
    python -m benchmarks.jwt_cost --callgrind    # instructions per call under valgrind

The timeit figures are wall clock: run them on a quiet machine and compare the lines with
each other. The callgrind figures (each loop run with N calls minus the same run with none)
repeat to a fraction of a percent whatever the machine does.
"""

from __future__ import annotations

import argparse
import time
import timeit
from types import SimpleNamespace
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from benchmarks import jwt_bench
from gateway.http.headers import Headers
from gateway.proxy.exchange import Exchange
from plugins.jwt import JwtPlugin
from plugins.jwt.config import JwtConfig

ISS = "https://idp.example/"


def _jwk(private: Any, kid: str) -> dict[str, Any]:
    pub = private.public_key()
    algo: Any = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
    return {**algo.to_jwk(pub, as_dict=True), "kid": kid}


def _plugin(keys: list[dict[str, Any]], cache: int, forward: bool) -> JwtPlugin:
    conf: dict[str, Any] = {
        "issuer": ISS,
        "audience": "api",
        "keys": [{"jwk": k} for k in keys],
        "cache": {"max_entries": cache},
    }
    if forward:
        conf["forward_claims"] = {"sub": "x-user-id", "tenant": "x-tenant"}
    return JwtPlugin(JwtConfig.model_validate(conf))


def _exchange(token: str) -> tuple[Exchange, list[tuple[bytes, bytes, bytes]]]:
    ex = Exchange(SimpleNamespace(client_ip="127.0.0.1", tls_client=None))  # type: ignore[arg-type]
    ex.method = b"GET"
    ex.route = SimpleNamespace(name="bench")  # type: ignore[assignment]
    items = [
        (b"host", b"Host", b"localhost"),
        (b"user-agent", b"User-Agent", b"wrk"),
        (b"authorization", b"Authorization", b"Bearer " + token.encode()),
    ]
    ex.headers = Headers(list(items))
    return ex, items


def _best(fn: Any, number: int) -> float:
    """Microseconds per call, best of 5."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def measure(number: int) -> dict[str, float]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    claims = {"iss": ISS, "aud": "api", "sub": "alice", "tenant": "t1", "iat": now}
    claims["exp"] = now + 3600
    rs = pyjwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "r"})
    es = pyjwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "e"})
    keys = [_jwk(rsa_key, "r"), _jwk(ec_key, "e")]
    out: dict[str, float] = {}

    def hook_loop(p: JwtPlugin, token: str) -> Any:
        ex, items = _exchange(token)

        def run() -> None:
            ex.headers.items = list(items)  # undo the previous call's edits
            ex.vars = ex.notes = None
            ex.user = None
            if p.on_request(ex) is not None:
                raise AssertionError("refused")

        return run

    def baseline(token: str) -> Any:
        ex, items = _exchange(token)

        def run() -> None:
            ex.headers.items = list(items)
            ex.vars = ex.notes = None
            ex.user = None

        return run

    base = _best(baseline(rs), number)
    out["loop overhead (reset the exchange)"] = base
    for forward in (False, True):
        p = _plugin(keys, 10_000, forward)
        run = hook_loop(p, rs)
        run()  # fill the cache
        label = "cached hit" + (", 2 claims forwarded" if forward else "")
        out[f"on_request {label}"] = _best(run, number) - base
    cold_number = max(number // 20, 50)
    for alg, token in (("RS256", rs), ("ES256", es)):
        p = _plugin(keys, 0, False)
        out[f"on_request cold {alg} (cache off)"] = _best(hook_loop(p, token), cold_number) - base
        key = (rsa_key if alg == "RS256" else ec_key).public_key()

        def decode(token: str = token, key: Any = key, alg: str = alg) -> None:
            pyjwt.decode(token, key, algorithms=[alg], audience="api", issuer=ISS)

        out[f"pyjwt.decode {alg}"] = _best(decode, cold_number)
    return out


LOOPS = ("cached", "cold_RS256", "cold_ES256", "pyjwt_RS256", "pyjwt_ES256")


def loop(what: str, n: int) -> None:
    """Run one measured operation ``n`` times (for callgrind; no timing)."""
    rsa_key, ec_key = jwt_bench.RSA_PRIVATE, jwt_bench.EC_PRIVATE
    alg = "ES256" if what.endswith("ES256") else "RS256"
    token = jwt_bench.token(alg)
    if what.startswith("pyjwt"):
        key = (ec_key if alg == "ES256" else rsa_key).public_key()
        for _ in range(n):
            pyjwt.decode(
                token, key, algorithms=[alg], audience=jwt_bench.AUDIENCE, issuer=jwt_bench.ISSUER
            )
        return
    p = JwtPlugin(JwtConfig.model_validate(jwt_bench.plugin_config(what == "cached")["jwt"]))
    ex, items = _exchange(token)
    if what == "cached":
        p.on_request(ex)
    for _ in range(n):
        ex.headers.items = list(items)
        ex.vars = ex.notes = None
        if p.on_request(ex) is not None:
            raise AssertionError("refused")


def _instructions(what: str, n: int) -> int:
    from benchmarks.hotpath import callgrind_total

    return callgrind_total(["benchmarks.jwt_cost", "--loop", what, "--number", str(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--number", type=int, default=20_000, help="calls per repeat (cached path)")
    ap.add_argument("--callgrind", action="store_true", help="instructions per call (valgrind)")
    ap.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop:
        loop(args.loop, args.number)
        return
    if args.callgrind:
        for what in LOOPS:
            n = 2000 if what == "cached" else 200
            per_call = (_instructions(what, n) - _instructions(what, 0)) / n
            print(f"{what:12s} {per_call:12,.0f} instructions per call", flush=True)
        return
    for name, us in measure(args.number).items():
        print(f"{name:45s} {us:8.2f} µs")


if __name__ == "__main__":
    main()
