"""Stage state: skip, resume, refuse, and the case of a stage that stopped before writing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import state
from pipeline.config import ConfigError


def test_done_is_skipped_running_is_resumed(tmp_path):
    state.write_state(tmp_path, "cache", "done", "A")
    assert state.begin(tmp_path, "cache", "A", [tmp_path / "cache"], force=False) is False
    state.write_state(tmp_path, "cache", "running", "A")
    assert state.begin(tmp_path, "cache", "A", [tmp_path / "cache"], force=False) is True


def test_other_inputs_refused_while_outputs_exist(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard").write_text("data")
    for status in ("running", "done"):
        state.write_state(tmp_path, "cache", status, "A")
        with pytest.raises(ConfigError, match="other inputs; re-run with --force"):
            state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False)
    assert (tmp_path / "cache" / "shard").read_text() == "data"


def test_stopped_before_writing_needs_no_force(tmp_path):
    """A run stopped before its first output (e.g. interrupted while loading the model) with
    other settings next time: nothing to set aside, so the new settings simply start."""
    state.write_state(tmp_path, "cache", "running", "A")
    assert state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False) is True
    assert state.read_state(tmp_path, "cache") is None
    state.write_state(tmp_path, "cache", "done", "A")  # a done stage with no outputs left is still refused
    with pytest.raises(ConfigError):
        state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False)


def test_force_sets_outputs_aside(tmp_path):
    (tmp_path / "cache").mkdir()
    state.write_state(tmp_path, "cache", "done", "A")
    assert state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=True) is True
    assert not (tmp_path / "cache").exists()
    assert len(list(tmp_path.glob("cache.old-*"))) == 1


# --- one process per stage of a run (issue 16 item 15) -------------------------------------------

HOLD = """
import sys, time
from pipeline.state import stage_lock
with stage_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _python(*args: str, **kwargs):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.fixture
def holder(tmp_path):
    """A live process holding the 'prepare' lock of tmp_path/runs/demo."""
    run_dir = tmp_path / "runs" / "demo"
    proc = _python("-c", HOLD, str(run_dir), "prepare")
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_live_lock_refuses_the_second_process_with_one_line(tmp_path, holder):
    run_dir = tmp_path / "runs" / "demo"
    with pytest.raises(ConfigError, match=f"pid {holder.pid} on .*lock {run_dir / 'state' / 'prepare.lock'}"):
        with state.stage_lock(run_dir, "prepare"):
            raise AssertionError("the body must not run while another process holds the lock")
    assert state.lock_holder(run_dir, "prepare")["pid"] == holder.pid
    assert state.lock_holder(run_dir, "cache") is None


def test_cli_refused_while_a_stage_runs(tmp_path, holder):
    """The real CLI: exit 2, one line naming the pid and the lock file, no traceback, nothing written."""
    proc = _python("run_pipeline.py", "prepare", f"run.root={tmp_path / 'runs'}")
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "prepare.lock" in lines[0]
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").rglob("*")) == ["prepare.lock", "state"]


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    import json
    import socket

    dead = _python("-c", "pass")
    dead.wait()
    path = state.lock_path(tmp_path, "cache")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # killed: never released
    with state.stage_lock(tmp_path, "cache"):
        assert state.lock_holder(tmp_path, "cache") is not None
        assert json.loads(path.read_text())["pid"] == os.getpid()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"taking over the lock {path} of pid {dead.pid}" in out
    assert not path.exists() and state.lock_holder(tmp_path, "cache") is None, "released cleanly"
    with state.stage_lock(tmp_path, "cache"):
        pass
    assert capsys.readouterr().out == "", "a cleanly released lock is no takeover"


FORK_AND_HOLD = """
import os, sys, time
from pipeline.state import stage_lock
with stage_lock(sys.argv[1], "train"):
    child = os.fork()
    if child == 0:  # a DataLoader worker, say: it outlives its killed parent for a while
        time.sleep(60)
        os._exit(0)
    print("locked", child, flush=True)
    time.sleep(120)
"""


def test_a_killed_holder_with_a_live_child_releases_the_lock(tmp_path, capsys):
    """The lock is the process's, not its forked children's: killing the holder frees it at once."""
    import signal

    proc = _python("-c", FORK_AND_HOLD, str(tmp_path))
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        with state.stage_lock(tmp_path, "train"):
            pass
        assert f"taking over the lock {state.lock_path(tmp_path, 'train')} of pid {proc.pid}" in capsys.readouterr().out
    finally:
        os.kill(int(child), signal.SIGKILL)


def test_released_lock_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    with pytest.raises(ConfigError):
        with state.stage_lock(run_dir, "prepare"):
            assert state.lock_path(run_dir, "prepare").exists()
            raise ConfigError("a check failed")
    assert not run_dir.exists(), "a refused stage leaves no folder and no lock file"
    with state.stage_lock(tmp_path, "prepare"):
        state.write_state(tmp_path, "prepare", "done", "A")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["prepare.json"]


def test_only_the_main_rank_takes_the_lock(tmp_path):
    with state.stage_lock(tmp_path, "train", is_main=True):
        with state.stage_lock(tmp_path, "train", is_main=False):  # another rank of the same job
            pass
    assert not state.lock_path(tmp_path, "evaluate").exists()


# --- a failed check leaves nothing that blocks the corrected command (issue 16 item 17) ----------

@pytest.mark.parametrize("bad, words", [("student.path=/no/such/student", "/no/such/student"),
                                        ("train.batch_size=100000", "lower train.batch_size")])
def test_failed_train_check_then_corrected_run_needs_no_force(train_config, capsys, bad, words):
    import run_pipeline

    cfg, overrides = train_config(with_overrides=True)
    capsys.readouterr()
    assert run_pipeline.main(["train", *overrides, bad]) == 2
    assert words in capsys.readouterr().err
    assert state.read_state(cfg.run_dir, "train") is None and not (cfg.run_dir / "train").exists()
    assert run_pipeline.main(["train", *overrides]) == 0, "the corrected command runs without --force"
    assert state.read_state(cfg.run_dir, "train")["status"] == "done"


def _cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def _two_at_once(args: list[str]) -> list[tuple[int, str]]:
    """Start two identical CLI processes together; (exit code, stderr) of each."""
    procs = [_python("run_pipeline.py", *args, env=_cli_env()) for _ in range(2)]
    return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]


def _assert_one_ran(results: list[tuple[int, str]]) -> None:
    """Either the second was refused by the lock (one line), or it came after the first finished
    and skipped the done stage: never a crash, never two at work."""
    for code, err in results:
        assert "Traceback" not in err, err[-3000:]
        if code != 0:
            line = err.rsplit("error: ", 1)[1].strip()
            assert code == 2 and "is running in another process" in line and ".lock" in line, err[-2000:]
    assert any(code == 0 for code, _ in results)


@pytest.mark.slow
def test_two_cache_processes_at_once(tmp_path, text_jsonl, tokenizer_dir, make_model):
    from cache_helpers import assert_same_cache, by_sample

    import run_pipeline

    args = [f"run.root={tmp_path / 'runs'}", f"data.source={text_jsonl}", f"data.tokenizer={tokenizer_dir}",
            f"teacher.path={make_model('qwen3_moe')}", "data.max_samples=200", "data.max_length=48",
            "data.eval_fraction=0", "cache.splits=[train]", "cache.k=8", "cache.batch_size=2", "cache.shard_tokens=200"]
    for name in ("reference", "demo"):
        assert run_pipeline.main(["prepare", *args, f"run.name={name}"]) == 0
    assert run_pipeline.main(["cache", *args, "run.name=reference"]) == 0
    _assert_one_ran(_two_at_once(["cache", *args, "run.name=demo"]))
    assert_same_cache(by_sample(tmp_path / "runs" / "demo" / "cache"), by_sample(tmp_path / "runs" / "reference" / "cache"))


@pytest.mark.slow
def test_two_trainers_at_once(train_config):
    import json

    cfg, overrides = train_config("train.steps=6", with_overrides=True)
    _assert_one_ran(_two_at_once(["train", *overrides]))
    steps = [json.loads(line)["step"] for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)), "one trainer's metrics, each step once"
    assert state.read_state(cfg.run_dir, "train")["status"] == "done"


def test_status_tells_a_running_stage_from_an_interrupted_one(tmp_path, holder):
    from stages import status

    run_dir = tmp_path / "runs" / "demo"
    state.write_state(run_dir, "prepare", "running", "A")
    state.write_state(run_dir, "cache", "running", "B")  # no process holds its lock: interrupted
    text = status.format_status(run_dir, status.status(run_dir))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert f"running (pid {holder.pid} on" in rows["prepare"]
    assert "interrupted" in rows["cache"] and "pid" not in rows["cache"]


# --- a forced command that fails a check sets nothing aside (deferred --force) ---------------------

def test_deferred_force_sets_aside_at_the_first_record(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "shard").write_text("old")
    state.write_state(tmp_path, "cache", "done", "A")
    assert state.begin(tmp_path, "cache", "B", [out], force=True, defer=True) is True
    assert (out / "shard").read_text() == "old", "nothing moves before the stage's checks passed"
    assert state.begin(tmp_path, "cache", "A", [out], force=False) is False, "the old state still stands"
    with pytest.raises(ConfigError, match="--force"):
        state.begin(tmp_path, "cache", "C", [out], force=False)
    state.write_state(tmp_path, "cache", "running", "B")  # the checks passed: now the old cache goes aside
    aside = list(tmp_path.glob("cache.old-*"))
    assert not out.exists() and len(aside) == 1 and (aside[0] / "shard").read_text() == "old"
    assert state.read_state(tmp_path, "cache")["inputs"] == "B" and "aside_for" not in state.read_state(tmp_path, "cache")


def test_other_ranks_follow_a_deferred_force(tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    state.write_state(tmp_path, "train", "done", "A")
    assert state.begin_on_all_ranks(tmp_path, "train", "B", [out], True, True, lambda: None, defer=True)
    assert state.begin_on_all_ranks(tmp_path, "train", "B", [out], True, False, lambda: None, defer=True), \
        "a non-main rank runs what rank 0 forced"
    assert out.exists()


# --- start afresh when nothing was committed; fingerprints of an older rule (issue 17) -----------

def test_uncommitted_outputs_are_set_aside_without_force(tmp_path, capsys):
    """The rule looks at committed outputs, not folders: a folder holding no finished work (a journal
    only) is set aside and the stage starts afresh; deferred, at the first record."""
    (tmp_path / "cache" / "journal").mkdir(parents=True)
    state.write_state(tmp_path, "cache", "running", "A")
    manifest = tmp_path / "cache" / "manifest.json"
    assert state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False, committed=[manifest]) is True
    assert "committed no output" in capsys.readouterr().out
    assert state.read_state(tmp_path, "cache") is None and len(list(tmp_path.glob("cache.old-*"))) == 1
    (tmp_path / "cache" / "journal").mkdir(parents=True)
    state.write_state(tmp_path, "cache", "running", "A")
    assert state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], False, defer=True, committed=[manifest]) is True
    assert (tmp_path / "cache").exists(), "deferred: nothing moves before the stage's first record"
    state.write_state(tmp_path, "cache", "running", "B")
    assert not (tmp_path / "cache").exists() and len(list(tmp_path.glob("cache.old-*"))) >= 1
    manifest.parent.mkdir()
    manifest.write_text("{}")  # committed work is protected as before
    state.write_state(tmp_path, "cache", "running", "A")
    with pytest.raises(ConfigError, match="running with other inputs"):
        state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False, committed=[manifest])


def test_inputs_recorded_under_an_alias_are_unchanged_and_re_recorded(tmp_path):
    state.write_state(tmp_path, "train", "done", "old", steps=4)
    inputs = state.Inputs("new", aliases=("old",), changes=lambda: "train.lr 1 → 2")
    assert state.begin(tmp_path, "train", inputs, [tmp_path / "train"], force=False) is False
    recorded = state.read_state(tmp_path, "train")
    assert recorded["inputs"] == "new" and recorded["steps"] == 4 and recorded["status"] == "done"
    other = state.Inputs("other", changes=lambda: "train.lr 1 → 2 (against x)")
    with pytest.raises(ConfigError, match=r"done with other inputs: train.lr 1 → 2 \(against x\); re-run with --force"):
        state.begin(tmp_path, "train", other, [tmp_path / "train"], force=False)
