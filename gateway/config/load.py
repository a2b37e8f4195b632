"""Load a config file: YAML (with line numbers), ``${ENV}`` interpolation, validation.

Every problem is collected, not just the first, as ``path.to.key: message (line N)``, so that
``gateway check`` can list them all like ``nginx -t`` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.model import GatewayConfig
from gateway.plugin import Plugin, PluginConfig, Registry

Loc = tuple[str | int, ...]

try:  # libyaml when available: about 10x faster than the pure-Python loader
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"{self.path}: {self.message}{where}" if self.path else f"{self.message}{where}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """A validated plugin entry: which class, with which config, where in the file."""

    name: str
    cls: type[Plugin]
    config: PluginConfig
    path: str


@dataclass(slots=True)
class Source:
    """Where the config came from, and the line of every key, for error messages."""

    name: str
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _record_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*loc, key_node.value)
                _record_lines(value_node, child, lines)
                lines[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*loc, i), lines)


def _duplicate_keys(node: yaml.Node, loc: Loc) -> list[ConfigIssue]:
    """YAML keeps the last of two equal keys, silently: in a config that is a typo or a
    bad merge (a second ``routes:`` drops the first), so it is an error."""
    found: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*loc, key_node.value)
                if key_node.value in seen:
                    line = key_node.start_mark.line + 1
                    found.append(ConfigIssue(format_loc(child), "duplicate key", line))
                seen.add(key_node.value)
                found += _duplicate_keys(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, (*loc, i))
    return found


def _interpolate(
    value: Any, loc: Loc, env: Mapping[str, str], issues: list[ConfigIssue], source: Source
) -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            issues.append(
                ConfigIssue(
                    format_loc(loc), f"environment variable {name} is not set", source.line_of(loc)
                )
            )
            return ""

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), env, issues, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), env, issues, source) for i, v in enumerate(value)]
    return value


_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown key",
}


def _pydantic_issues(exc: ValidationError, prefix: Loc, source: Source) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        loc: Loc = (*prefix, *err["loc"])
        msg = _MESSAGES.get(err["type"], err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        issues.append(ConfigIssue(format_loc(loc), msg, source.line_of(loc)))
    return issues


def _plugin_specs(
    entries: list[Any], loc: Loc, registry: Registry, source: Source, issues: list[ConfigIssue]
) -> list[PluginSpec]:
    specs = []
    for i, entry in enumerate(entries):
        here: Loc = (*loc, i)
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            issues.append(
                ConfigIssue(
                    format_loc(here),
                    "a plugin entry is a mapping of one plugin name to its config",
                    source.line_of(here),
                )
            )
            continue
        ((name, conf),) = entry.items()
        cls = registry.get(str(name))
        if cls is None:
            issues.append(
                ConfigIssue(
                    format_loc((*here, name)),
                    f"unknown plugin (known: {', '.join(registry.names())})",
                    source.line_of((*here, name)),
                )
            )
            continue
        try:
            config = cls.Config.model_validate(conf if conf is not None else {})
        except ValidationError as exc:
            issues.extend(_pydantic_issues(exc, (*here, name), source))
            continue
        specs.append(PluginSpec(str(name), cls, config, format_loc((*here, name))))
    return specs


def parse_yaml(text: str, source: Source) -> Any:
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _record_lines(node, (), source.lines)
            duplicates = _duplicate_keys(node, ())
            if duplicates:
                raise ConfigError(duplicates)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"invalid YAML: {problem}", line)]) from None


def load_text(
    text: str, registry: Registry, name: str = "<config>", env: Mapping[str, str] | None = None
) -> tuple[GatewayConfig, Source]:
    """Validate config text into a frozen ``GatewayConfig`` whose plugin lists hold
    ``PluginSpec`` objects. Raises ``ConfigError`` with every problem found."""
    source = Source(name)
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", "the config must be a mapping of keys", 1)])
    issues: list[ConfigIssue] = []
    data = _interpolate(data, (), os.environ if env is None else env, issues, source)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, (), source))
        # Plugin configs are checked too, so that one run reports every error it can.
        if isinstance(data.get("plugins"), list):
            _plugin_specs(data["plugins"], ("plugins",), registry, source, issues)
        routes_data = data.get("routes")
        for i, route in enumerate(routes_data if isinstance(routes_data, list) else ()):
            if isinstance(route, dict) and isinstance(route.get("plugins"), list):
                _plugin_specs(route["plugins"], ("routes", i, "plugins"), registry, source, issues)
        raise ConfigError(issues) from None

    global_specs = _plugin_specs(config.plugins, ("plugins",), registry, source, issues)
    routes = []
    for i, route in enumerate(config.routes):
        specs = _plugin_specs(route.plugins, ("routes", i, "plugins"), registry, source, issues)
        routes.append(route.model_copy(update={"plugins": specs}))
    if issues:
        raise ConfigError(issues)
    return config.model_copy(update={"plugins": global_specs, "routes": routes}), source


def load_file(path: str | os.PathLike[str], registry: Registry) -> tuple[GatewayConfig, Source]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue("", f"{p} is not UTF-8 text")]) from None
    return load_text(text, registry, str(p))
