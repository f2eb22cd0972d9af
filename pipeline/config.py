"""Typed configs: dataclasses with defaults in code, YAML overrides, dotted CLI overrides.

Each component owns its dataclass (``DataConfig`` in pipeline/data.py, ``CacheConfig`` in
stages/cache_teacher.py, ...). This module only loads, validates and saves them:
``load_config(PipelineConfig, ["configs/x.yaml"], ["cache.k=32"])``.

A field with a closed set of values is declared with ``choice(default, allowed)``; an
unknown key or a bad value is a one-line ``ConfigError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value the user must fix."""


def choice(default: Any, allowed: tuple) -> Any:
    """A dataclass field whose value must be one of ``allowed``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(allowed)})


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
            if not Path(path).exists():
                raise ConfigError(f"config file {path} does not exist; pass a YAML file from configs/")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(parse_overrides(list(overrides))))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _one_line(schema_cls, err) from None
    validate(cfg)
    return cfg


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every ``choice`` field recursively, then the dataclass's own ``validate()``."""
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        key = f"{prefix}{fld.name}"
        allowed = fld.metadata.get("choices")
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{key}.")
    if hasattr(cfg, "validate"):
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
