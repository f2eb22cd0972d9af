"""Typed configs: dataclasses with defaults in code, YAML overrides, dotted CLI overrides.

Each component owns its dataclass (``DataConfig`` in pipeline/data.py, ``CacheConfig`` in
stages/cache_teacher.py, ...). This module only loads, validates and saves them:
``load_config(PipelineConfig, ["configs/x.yaml"], ["cache.k=32"])``.

A field with a closed set of values is declared with ``choice(default, allowed)``, a number
(or a list/dict of numbers) with a range with ``ranged(default, min=..., above=..., ...)``;
an unknown key or a bad value is a one-line ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value the user must fix."""


def choice(default: Any, allowed: tuple) -> Any:
    """A dataclass field whose value must be one of ``allowed``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(allowed)})


def ranged(default: Any, *, min: float | None = None, max: float | None = None,
           above: float | None = None, below: float | None = None) -> Any:
    """A numeric field (or list/dict of numbers: every element) in [min, max], or (above, below) for open ends."""
    bounds = {"range": (min if above is None else above, above is not None,
                        max if below is None else below, below is not None)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=bounds)
    return dataclasses.field(default=default, metadata=bounds)


def describe_range(bounds: tuple) -> str:
    """(lo, lo_open, hi, hi_open) → '>= 1', '> 0', 'in [0, 1)'."""
    lo, lo_open, hi, hi_open = bounds
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def in_range(value: float, bounds: tuple) -> bool:
    """Inside the bounds, and finite (an inf or nan learning rate, weight or length is never meant)."""
    lo, lo_open, hi, hi_open = bounds
    return math.isfinite(value) and ((lo is None or value > lo or (value == lo and not lo_open))
            and (hi is None or value < hi or (value == hi and not hi_open)))


def check_range(key: str, value: Any, bounds: tuple) -> None:
    """Every number in ``value`` (a number, a list or a dict's values) must lie in ``bounds``."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
    for sub, number in items:
        if not in_range(number, bounds):
            name = key if sub is None else f"{key}[{sub!r}]" if isinstance(value, dict) else f"{key}[{sub}]"
            raise ConfigError(f"{name}={number!r} is out of range; allowed: {describe_range(bounds)}"
                              + ("" if math.isfinite(number) else " (and finite)"))


def _allowed_keys(schema_cls: type, dotted: str) -> list[str]:
    node = schema_cls()
    for part in dotted.split(".")[:-1]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return []
    return [f.name for f in dataclasses.fields(node)]


def _field_type(schema_cls: type, dotted: str) -> str:
    node = schema_cls()
    for part in dotted.split(".")[:-1]:
        node = getattr(node, part, None)
    fields = {f.name: f.type for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
    kind = fields.get(dotted.rsplit(".", 1)[-1], "")
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def _one_line(schema_cls: type, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        allowed = _allowed_keys(schema_cls, key)
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return ConfigError(f"unknown config key '{key}'; allowed in {section}: {', '.join(allowed)}")
    first = str(err).splitlines()[0]
    kind = _field_type(schema_cls, key) if key else ""
    return ConfigError(f"bad value for config key '{key}': {first}" + (f"; expected {kind}" if kind else ""))


def parse_overrides(overrides: list[str]) -> list[str]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
    return overrides


def load_config(schema_cls: type[T], yaml_paths: list[str | Path] = (), overrides: list[str] = ()) -> T:
    """Defaults from ``schema_cls``, then each YAML file, then the dotted overrides."""
    try:
        merged = OmegaConf.structured(schema_cls)
        for path in yaml_paths:
            merged = OmegaConf.merge(merged, _sections(schema_cls, load_yaml(path), f"config file {path}"))
        merged = OmegaConf.merge(merged, _sections(schema_cls, parse_dotlist(list(overrides)), "the overrides"))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _one_line(schema_cls, err) from None
    validate(cfg)
    return cfg


def parse_dotlist(overrides: list[str]) -> DictConfig:
    parse_overrides(overrides)
    for item in overrides:  # one at a time, to name the one that is not valid YAML
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r} is not valid YAML ({getattr(err, 'problem', None) or err}); "
                              f"quote or fix its value") from None
    return OmegaConf.from_dotlist(overrides)


def _sections(schema_cls: type, node: DictConfig, source: str) -> DictConfig:
    """A section given a plain value (``train: 5``) is one line naming it, not a merge error without a key."""
    defaults = schema_cls()
    for key, value in node.items():
        if dataclasses.is_dataclass(getattr(defaults, str(key), None)) and not isinstance(value, DictConfig):
            raise ConfigError(f"{source}: '{key}' is a section and needs keys (e.g. {key}.<key>=value), "
                              f"not {value!r}")
    return node


def load_yaml(path: str | Path) -> DictConfig:
    """One YAML override file; a missing file, a syntax error or a non-mapping is a one-line ConfigError."""
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file from configs/")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}; "
                          f"fix the syntax") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(loaded).__name__.replace('Config', '').lower()} at the "
                          f"top level; it must map sections to keys, e.g. 'train:' then '  lr: 1.0e-4'")
    return loaded


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every ``choice`` and ``ranged`` field recursively, then the dataclass's own ``validate()``."""
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        key = f"{prefix}{fld.name}"
        allowed = fld.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        if "range" in fld.metadata:
            check_range(key, value, fld.metadata["range"])
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, prefix=f"{key}[{i}].")
    if hasattr(cfg, "validate"):  # a section's own cross-field checks; most need only choice() and ranged()
        cfg.validate()


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def save_config(cfg: Any, path: Path) -> None:
    """The resolved config, saved beside what a run produces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def _non_default(cfg: Any) -> dict:
    """The fields of a config that differ from their defaults (recursively).

    Hashing only these keeps a finished stage's fingerprint stable when a new field with a
    default is added to a config class.
    """
    out = {}
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        if dataclasses.is_dataclass(value):
            nested = _non_default(value)
            if nested:
                out[fld.name] = nested
            continue
        default = fld.default_factory() if fld.default_factory is not dataclasses.MISSING else fld.default
        if value != default:
            out[fld.name] = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value] if isinstance(value, list) else value
    return out


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs by their non-default fields, other fingerprints)."""
    text = json.dumps([_non_default(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
