"""The ``gateway`` command: ``run``, ``check``, ``version``."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.resources import files
from pathlib import Path

from gateway import __version__
from gateway.config.compile import CompileError, Runtime, compile_config
from gateway.config.load import ConfigError, load_file, load_text
from gateway.plugin import Registry, default_registry

EXIT_CONFIG = 2


def example_config_text() -> str:
    return files("gateway").joinpath("example.yaml").read_text(encoding="utf-8")


def _load(path: str | None, registry: Registry) -> Runtime:
    if path is None:
        config, source = load_text(example_config_text(), registry, "<bundled example>")
    else:
        config, source = load_file(path, registry)
    return compile_config(config, source)


def _registry() -> Registry:
    registry = default_registry()
    for problem in registry.load_entry_points():
        logging.getLogger("gateway").warning(problem)
    return registry


def cmd_check(args: argparse.Namespace) -> int:
    name = args.config or "<bundled example>"
    try:
        runtime = _load(args.config, _registry())
    except (ConfigError, CompileError) as exc:
        for issue in exc.issues:
            print(f"{name}: {issue}", file=sys.stderr)
        print(f"{name}: {len(exc.issues)} error(s); config rejected", file=sys.stderr)
        return EXIT_CONFIG
    c = runtime.config
    print(
        f"{name}: ok: {len(c.listeners)} listener(s), {len(c.upstreams)} upstream(s), "
        f"{len(c.routes)} route(s), {len(runtime.plugins)} plugin instance(s)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import log as gateway_log

    gateway_log.setup(args.log_level or "info", args.log_format or "json")
    logger = logging.getLogger("gateway")
    try:
        runtime = _load(args.config, _registry())
    except (ConfigError, CompileError) as exc:
        for issue in exc.issues:
            logger.error("config error: %s", issue, extra={"config": args.config})
        return EXIT_CONFIG
    cfg = runtime.config
    gateway_log.setup(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    if cfg.workers > 1:
        logger.warning(
            "workers: %d requested; this version runs a single worker process", cfg.workers
        )
    import uvloop

    from gateway.server import run_worker

    logger.info(
        "starting",
        extra={
            "version": __version__,
            "config": str(Path(args.config)) if args.config else "example",
        },
    )
    try:
        uvloop.run(run_worker(runtime))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"gateway {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="API gateway / edge proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", help="config file (default: the bundled example)")
    run.add_argument("--log-format", choices=["json", "text"], default=None)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", help="config file (default: the bundled example)")
    check.set_defaults(func=cmd_check)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
