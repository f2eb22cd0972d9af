"""Prepared splits on disk: ``runs/<name>/data/<split>`` (a ``datasets`` Dataset of sample_id,
input_ids, loss_mask) and ``data/manifest.json`` (each split's size and fingerprint, the tokenizer).

The prepare stage writes them (``save_split``); the cache, train and eval stages read them
(``load_split``), as does PreparedSource for training without a teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data import sequences_fingerprint
from pipeline.run_paths import data_dir

SPLITS = ("train", "eval")
COLUMNS = ("sample_id", "input_ids", "loss_mask")


def save_split(out_dir: Path, rows: dict[str, list]) -> dict:
    """``rows`` (a list per column) saved as a Dataset; returns the split's entry of the data manifest."""
    import datasets  # heavy (pyarrow, fsspec): loaded by the stages that read or write data only

    features = datasets.Features({
        "sample_id": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("uint8")),
    })
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out_dir))
    return {
        "sequences": len(rows["sample_id"]),
        "tokens": int(sum(len(x) for x in rows["input_ids"])),
        "trained_tokens": int(sum(int(m.sum()) for m in rows["loss_mask"])),
        "fingerprint": sequences_fingerprint(rows["sample_id"], rows["input_ids"], rows["loss_mask"]),
    }


def read_data_manifest(run_dir: Path) -> dict:
    """data/manifest.json of a run, or one line saying prepare has not run."""
    path = data_dir(run_dir) / "manifest.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} has no prepared data; run the 'prepare' stage first")
    return json.loads(path.read_text())


def load_split(run_dir: Path, split: str, allow_empty: bool = False):
    """A prepared split as a datasets.Dataset in numpy format, plus the data manifest.

    An empty split (data.eval_fraction=0 leaves 'eval' empty) is an empty Dataset with
    ``allow_empty``, else one line: ``datasets`` cannot load back the empty split it saved.
    """
    import datasets

    manifest = read_data_manifest(run_dir)
    if manifest["splits"][split]["sequences"] == 0:
        if not allow_empty:
            raise ConfigError(f"the prepared '{split}' split of {run_dir} holds no sequences; set data.eval_fraction "
                              f"> 0 and re-run prepare with --force, or set eval.split=train")
        return datasets.Dataset.from_dict({k: [] for k in COLUMNS}), manifest
    ds = datasets.load_from_disk(str(data_dir(run_dir) / split)).with_format("numpy")
    return ds, manifest
