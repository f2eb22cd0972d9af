"""Where a run keeps what its stages write: ``runs/<name>/data``, ``cache``, ``cache_<split>``.

One home for the layout that several stages read: prepare writes data/, the cache stage the
caches; train and eval read both (in another run with run.inputs_from), status lists them.
"""

from __future__ import annotations

from pathlib import Path


def data_dir(run_dir: Path) -> Path:
    """The prepared splits (data/<split>) and their manifest (data/manifest.json)."""
    return Path(run_dir) / "data"


def cache_dir(run_dir: Path, split: str) -> Path:
    """The cache of a prepared split: cache/ for train, cache_<split>/ for the others."""
    return Path(run_dir) / ("cache" if split == "train" else f"cache_{split}")


def split_of(directory: Path) -> str:
    """The split a cache directory holds (the inverse of ``cache_dir``)."""
    return "train" if directory.name == "cache" else directory.name[len("cache_"):]


def cache_dirs(run_dir: Path) -> list[Path]:
    """Every cache directory of a run; not the ones set aside by --force (``<name>.old-…``)."""
    found = [p for p in Path(run_dir).glob("cache*") if p.is_dir() and (p.name == "cache" or p.name.startswith("cache_"))]
    return sorted(p for p in found if ".old-" not in p.name)
