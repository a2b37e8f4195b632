"""The ``gateway`` command: ``run``, ``check``, ``version``, ``keys``."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
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
        from gateway.supervisor import check_runtime

        check_runtime(runtime)
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
    """The supervisor: validates the config, binds the listeners, runs the workers."""
    from gateway import log as gateway_log

    # Until the handlers are installed, a reload or logrotate signal must not kill us; the
    # workers inherit the ignored dispositions and install their own handlers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    gateway_log.setup(args.log_level or "info", args.log_format or "json")
    logger = logging.getLogger("gateway")
    from gateway.supervisor import prepare_run_dir

    run_dir = prepare_run_dir()
    try:
        return _supervise(args, logger, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _supervise(args: argparse.Namespace, logger: logging.Logger, run_dir: str) -> int:
    from gateway import log as gateway_log
    from gateway.supervisor import Supervisor, check_runtime

    registry = _registry()
    try:
        if args.config is None:
            text = example_config_text()
        else:
            text = Path(args.config).read_text(encoding="utf-8")
        config, source = load_text(text, registry, args.config or "<bundled example>")
        runtime = compile_config(config, source)
        check_runtime(runtime)
    except OSError as exc:
        logger.error("cannot read the config: %s", exc, extra={"config": args.config})
        return EXIT_CONFIG
    except (ConfigError, CompileError) as exc:
        for issue in exc.issues:
            logger.error("config error: %s", issue, extra={"config": args.config})
        return EXIT_CONFIG
    cfg = runtime.config
    level = args.log_level or cfg.log.level
    fmt = args.log_format or cfg.log.format
    gateway_log.setup(level, fmt)
    import uvloop

    config_path = str(Path(args.config).resolve()) if args.config else None
    supervisor = Supervisor(
        config_path, text, runtime, registry, ["--log-level", level, "--log-format", fmt], run_dir
    )
    try:
        return int(uvloop.run(supervisor.run()))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker process, started by the supervisor (not meant to be run by hand)."""
    import socket

    from gateway import log as gateway_log

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    gateway_log.setup(args.log_level, args.log_format)
    logger = logging.getLogger("gateway.worker")
    try:
        text = Path(args.snapshot).read_text(encoding="utf-8")
        config, source = load_text(text, _registry(), args.config_name)
        runtime = compile_config(config, source)
    except (OSError, ConfigError, CompileError) as exc:
        logger.error("worker cannot load the config: %s", exc)
        return EXIT_CONFIG
    sockets = {}
    for item in args.listen_fds.split(","):
        if item:
            name, _, fd = item.partition("=")
            sockets[name] = socket.socket(fileno=int(fd))
    control = socket.socket(fileno=args.control_fd)
    import uvloop

    from gateway.server import run_worker

    uvloop.run(run_worker(runtime, sockets, control, args.generation))
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
    worker = sub.add_parser("worker")  # started by `run`; not listed in the help
    worker.add_argument("--snapshot", required=True)
    worker.add_argument("--config-name", required=True)
    worker.add_argument("--generation", type=int, default=0)
    worker.add_argument("--listen-fds", default="")
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--log-format", choices=["json", "text"], default="json")
    worker.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info"
    )
    worker.set_defaults(func=cmd_worker)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    from plugins.jwt.tool import add_parser as add_keys_parser

    add_keys_parser(sub)  # gateway keys generate | mint: test JWTs for the jwt plugin
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
