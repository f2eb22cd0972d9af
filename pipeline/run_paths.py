"""Where a run keeps what its stages write: ``runs/<name>/data``, ``cache``, ``cache_<split>``.

One home for the layout that several stages read: prepare writes data/, the cache stage the
caches; train and eval read both (in another run with run.inputs_from), status lists them.
"""

from __future__ import annotations

from pathlib import Path

from cache.location import Location
from pipeline.state import read_state


def data_dir(run_dir: Path) -> Path:
    """The prepared splits (data/<split>) and their manifest (data/manifest.json)."""
    return Path(run_dir) / "data"


def cache_dir(run_dir: Path, split: str) -> Path:
    """The cache of a prepared split: cache/ for train, cache_<split>/ for the others."""
    return Path(run_dir) / cache_name(split)


def cache_name(split: str) -> str:
    return "cache" if split == "train" else f"cache_{split}"


def cache_location(cfg, split: str, run_dir: Path | None = None) -> Location:
    """Where a split's cache lives: under cache.dir (a folder or an fsspec URL) when set, else under
    ``run_dir`` (default cfg.run_dir; readers pass cfg.inputs_dir)."""
    base = cfg.cache.dir or str(run_dir or cfg.run_dir)
    return Location(base, cfg.cache.storage_options) / cache_name(split)


def cache_locations(run_dir: Path) -> list[Location]:
    """The caches ``status`` shows: under the cache.dir the cache stage recorded (a folder or a URL, reached
    with the environment's credentials), else the run's own ``cache_dirs``."""
    base = (read_state(run_dir, "cache") or {}).get("cache_dir")
    if not base:
        return [Location(p) for p in cache_dirs(run_dir)]
    location = Location(base)
    found = {name.split("/")[0] for name in location.names("cache*/journal/rank*.json")}
    return [location / name for name in sorted(found) if name == "cache" or name.startswith("cache_")]


def split_of(directory: Path | Location) -> str:
    """The split a cache directory holds (the inverse of ``cache_dir``)."""
    return "train" if directory.name == "cache" else directory.name[len("cache_"):]


def cache_dirs(run_dir: Path) -> list[Path]:
    """Every cache directory of a run; not the ones set aside by --force (``<name>.old-…``)."""
    found = [p for p in Path(run_dir).glob("cache*") if p.is_dir() and (p.name == "cache" or p.name.startswith("cache_"))]
    return sorted(p for p in found if ".old-" not in p.name)
