"""A run directory and the state of each stage in it.

``runs/<name>/state/<stage>.json`` records status (running | done), the stage's input
fingerprint and its progress. Re-running skips a done stage with unchanged inputs,
resumes a running one, and refuses (unless ``--force``) when inputs changed under it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cache.schema import write_json_atomic
from pipeline.config import ConfigError

STAGES = ("prepare", "init", "cache", "train", "evaluate")


def state_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "state" / f"{stage}.json"


def read_state(run_dir: Path, stage: str) -> dict | None:
    path = state_path(run_dir, stage)
    return json.loads(path.read_text()) if path.exists() else None


def write_state(run_dir: Path, stage: str, status: str, inputs: str, **progress) -> None:
    path = state_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"stage": stage, "status": status, "inputs": inputs, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
             **progress}
    write_json_atomic(path, json.dumps(state, indent=1, sort_keys=True))


def begin(run_dir: Path, stage: str, inputs: str, outputs: list[Path], force: bool) -> bool:
    """True if the stage must run; False if it is done with these inputs.

    With changed inputs: refuse, unless the stage stopped before writing any output. With
    ``force``: set the old outputs aside (renamed, never deleted) and start afresh, whatever
    the inputs (e.g. to rebuild a damaged cache).
    """
    state = read_state(run_dir, stage)
    if state is None:
        return True
    if state["inputs"] == inputs and not force:
        return state["status"] != "done"
    if outputs and state["status"] != "done" and not any(path.exists() for path in outputs):
        state_path(run_dir, stage).unlink()  # stopped before writing anything: nothing to protect
        return True
    if not force:
        raise ConfigError(
            f"stage '{stage}' in {run_dir} was {state['status']} with other inputs; re-run with --force "
            f"to set its outputs aside and start again, or pick another run.name"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in outputs:
        if path.exists():
            path.rename(path.with_name(f"{path.name}.old-{stamp}"))
    state_path(run_dir, stage).unlink()
    return True


def begin_on_all_ranks(run_dir: Path, stage: str, inputs: str, outputs: list[Path], force: bool,
                       is_main: bool, barrier) -> bool:
    """Rank 0 decides (and sets old outputs aside on --force) before the other ranks look."""
    must_run = begin(run_dir, stage, inputs, outputs, force) if is_main else False
    barrier()
    return must_run if is_main else begin(run_dir, stage, inputs, [], False)
