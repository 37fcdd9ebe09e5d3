"""YAML loading: `base:` inheritance, `--set key=value` overrides, one-line errors.

A config file may name `base: other.yaml` (relative to itself, recursive); the child is deep-merged over its base
(mappings merge key by key, everything else is replaced). Files are read with `yaml.safe_load`, so nothing in a config
can construct Python objects, and `--set` values are parsed the same way (`--set train.max_steps=20` gives an int).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from mona_dist.config.schema import combination_errors

if TYPE_CHECKING:
    from mona_dist.config.root import Config


class ConfigError(ValueError):
    """A bad configuration; the message is one line starting with `config:` and naming the key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"config: {key}: {reason}" if key else f"config: {reason}")
        self.key = key


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: nested mappings merge, other values (lists included) replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one config file and, recursively, the `base:` files it names."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError("base", f"inheritance cycle: {chain}")
    if not path.is_file():
        raise ConfigError("", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError("", f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"{path}: expected a relative file path, got {base!r}")
    return deep_merge(read_yaml(path.parent / base, (*_seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings in order; values go through yaml.safe_load (`1e-3`, `[1, 2]`, `null`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(key, f"--set value {raw!r} is not valid YAML") from None
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents[: i + 1]), f"is a {type(child).__name__}, cannot set {key}")
            node = child
        node[leaf] = value
    return data


def validate(data: dict[str, Any]) -> "Config":
    """Dict -> Config; the first problem becomes one ConfigError line naming its key."""
    from mona_dist.config.root import Config  # pulls in the data package; see mona_dist/config/__init__.py

    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "missing":
            msg = "required key is missing"
        elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {first['input']!r})"
        raise ConfigError(key, msg.removeprefix("Value error, ")) from None
    errors = combination_errors(cfg.engine, cfg.train)
    if errors:
        raise ConfigError(*errors[0])
    check_backbone(cfg.model.backbone)
    check_method(cfg.model.method, cfg.model.method_options)
    return cfg


def check_backbone(name: str) -> None:
    """`model.backbone` is one of ours or a timm name of a supported family (models/names.py), asked of timm
    without building the model: a typo or an unsupported family fails at start-up, in one line."""
    from mona_dist.models.names import check_backbone_name

    try:
        check_backbone_name(name)
    except ValueError as err:
        raise ConfigError("model.backbone", str(err)) from None


def check_method(method: str, options: dict[str, Any]) -> None:
    """`model.method` is a registered method and its options fit its signature (types, bounds): one line each."""
    from mona_dist.adapters import METHODS, MethodOptionError, check_method_options

    if method not in METHODS.names():
        raise ConfigError("model.method", f"unknown method {method!r}; valid: {', '.join(METHODS.names())}")
    try:
        check_method_options(method, options)
    except MethodOptionError as err:
        raise ConfigError(f"model.method_options.{err.option}", err.reason) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> "Config":
    """Read, merge, override and validate; the single entry point used by `mona-dist train`."""
    return validate(apply_overrides(read_yaml(path), overrides or []))


def dump_config(cfg: "Config", path: str | Path) -> None:
    """Write the resolved config (every default spelled out) so a run directory documents itself."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
