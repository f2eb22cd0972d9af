"""Where a run stands: each stage's recorded state, and how far its caches got.

    python run_pipeline.py status runs/demo

A stage's state file (pipeline/state.py) says running while its process works and done at the
end; a killed process leaves it at running, and the stage's lock tells the two apart (a live
process holds it: "running (pid N on host)"; nobody does: "running (no process: interrupted)"). For the cache stage the journals under each cache
directory tell how many shards were committed, so a running or killed cache shows its progress
(a re-run resumes from there), and manifest.json says whether the cache is complete. A run on
another run's data and caches (run.inputs_from, read from its saved train or eval config)
shows that run's caches.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cache.location import Location
from cache.schema import MANIFEST_NAME
from cache.writer import committed_shards
from pipeline.config import ConfigError
from pipeline.run_paths import cache_locations, data_dir, split_of
from pipeline.state import STAGES, lock_holder, read_state

RECORD_KEYS = ("stage", "status", "inputs", "updated", "aside_for", "aside")


def prepared_tokens(run_dir: Path) -> dict[str, int]:
    path = data_dir(run_dir) / "manifest.json"
    if not path.exists():
        return {}
    return {split: info["tokens"] for split, info in json.loads(path.read_text())["splits"].items()}


def cache_progress(cache_dir: Location, expected_tokens: int | None) -> dict:
    shards = committed_shards(cache_dir)
    return {"split": split_of(cache_dir), "shards": len(shards), "tokens": sum(s.n_tokens for s in shards),
            "sequences": sum(s.n_seqs for s in shards), "expected_tokens": expected_tokens,
            "complete": cache_dir.exists(MANIFEST_NAME)}


def latest_checkpoint_step(run_dir: Path) -> int | None:
    from pipeline import checkpoint  # lazy: it imports torch, which `status` needs for nothing else (~1 s)

    latest = checkpoint.latest(run_dir / "train" / "checkpoints")
    return int(latest.name.split("-")[1]) if latest else None


def inputs_from(run_dir: Path) -> str:
    """run.inputs_from in the run's saved train (or eval) config: '' when it reads its own data and caches."""
    for name in ("train", "eval"):
        path = run_dir / name / "config.yaml"
        if path.exists():
            return ((yaml.safe_load(path.read_text()) or {}).get("run") or {}).get("inputs_from") or ""
    return ""


def status(run_dir: str | Path) -> dict:
    """{"stages": {stage: state dict or None}, "caches": {dir name: progress}, "checkpoint_step": ...,
    "inputs_from": the run whose data and caches it reads, or ''}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} does not exist; pass a run directory such as runs/<run.name>")
    if not (run_dir / "state").is_dir():
        raise ConfigError(f"{run_dir} holds no state/ folder: not a kdcache run directory (runs/<run.name>)")
    source = inputs_from(run_dir)
    inputs_dir = Path(source) if source else run_dir
    tokens = prepared_tokens(inputs_dir)
    return {"stages": {stage: read_state(run_dir, stage) for stage in STAGES},
            "locks": {stage: holder for stage in STAGES if (holder := lock_holder(run_dir, stage))},
            "caches": {p.name: cache_progress(p, tokens.get(split_of(p))) for p in cache_locations(inputs_dir)},
            "checkpoint_step": latest_checkpoint_step(run_dir), "inputs_from": source}


def progress_text(state: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(state.items()) if k not in RECORD_KEYS)


def status_text(status: str, holder: dict | None) -> str:
    """'running' says whether a process still holds the stage's lock (pipeline/state.py)."""
    if status != "running":
        return status
    return f"running (pid {holder['pid']} on {holder['host']})" if holder else "running (no process: interrupted)"


def stage_rows(report: dict) -> list[tuple[str, str, str, str]]:
    rows = [("stage", "status", "updated", "progress")]
    for stage, state in report["stages"].items():
        if state is None:
            rows.append((stage, "not started", "-", ""))
            continue
        progress = progress_text(state)
        step = report["checkpoint_step"]
        if stage == "train" and step is not None:
            progress = ", ".join(filter(None, [progress, f"last complete checkpoint: step {step}"]))
        rows.append((stage, status_text(state["status"], report["locks"].get(stage)), state["updated"], progress))
    return rows


def cache_line(name: str, c: dict) -> str:
    of = f" of {c['expected_tokens']:,}" if c["expected_tokens"] else ""
    done = "complete (manifest.json written)" if c["complete"] else "incomplete (no manifest.json yet)"
    return (f"  {name + '/':<14} split {c['split']}: {c['shards']} shard{'s' if c['shards'] != 1 else ''} committed, "
            f"{c['tokens']:,}{of} tokens, {c['sequences']:,} sequences; {done}")


def format_status(run_dir, report: dict) -> str:
    rows = stage_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"run {run_dir}"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
                                  for r in rows]
    lines = [line.rstrip() for line in lines]
    if report.get("inputs_from"):
        lines += ["", f"data/, cache/, cache_eval/: read in place from {report['inputs_from']} (run.inputs_from)"]
    if report["caches"]:
        lines += ["", f"caches{' of ' + report['inputs_from'] if report.get('inputs_from') else ''} "
                      f"(from the shard journals)"]
        lines += [cache_line(name, c) for name, c in report["caches"].items()]
    if any(s and s["status"] == "running" and stage not in report["locks"] for stage, s in report["stages"].items()):
        lines += ["", "an interrupted stage resumes where it stopped when it is re-run"]
    return "\n".join(lines)


def main(run_dir: str) -> dict:
    report = status(run_dir)
    print(format_status(run_dir, report), flush=True)
    return report
