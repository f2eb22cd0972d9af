"""Several students from one cache (run.inputs_from): the source checked by identity, read in place.

Every case goes through ``run_pipeline.main([...])``, the CLI's own entry point, on a copy of a
session-built prepared + cached run (tests/conftest.py ``train_config``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import run_pipeline
from pipeline import state

QUICK = ["eval.before=false", "eval.rouge_samples=0"]


def tree(run_dir: Path) -> dict[str, int]:
    """Every file under a run with its size and mtime: to prove a student run changed nothing in its source."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file()}


def refusal(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert run_pipeline.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


@pytest.fixture
def source(train_config):
    """(source run dir, the overrides that built it): prepared and cached, nothing trained."""
    cfg, overrides = train_config(*QUICK, name="base", with_overrides=True)
    return cfg.run_dir, overrides


def test_two_students_train_and_evaluate_on_one_cache(source, capsys):
    src, overrides = source
    before = tree(src)
    for name, lr in (("student_a", "1e-3"), ("student_b", "3e-3")):
        argv = ["run", *overrides, f"run.name={name}", f"run.inputs_from={src}", f"train.lr={lr}"]
        assert run_pipeline.main(argv) == 0
        out = capsys.readouterr().out
        assert f"prepare and cache: done in {src} (run.inputs_from)" in out
        run_dir = src.parent / name
        assert (run_dir / "train" / "final" / "config.json").exists()
        results = json.loads((run_dir / "eval" / "results.json").read_text())["after"]
        assert "kl_to_teacher" in results and "kl_topk_bucket_lower_bound" in results, "eval read the source's cache"
        assert not any((run_dir / d).exists() for d in ("data", "cache", "cache_eval")), "nothing copied or linked"
        assert state.read_state(run_dir, "prepare") is None and state.read_state(run_dir, "cache") is None
        assert state.read_state(run_dir, "train")["status"] == "done"
    assert tree(src) == before, "the source run is read, never written"
    capsys.readouterr()
    assert run_pipeline.main(["status", str(src.parent / "student_b")]) == 0
    shown = capsys.readouterr().out
    assert f"read in place from {src} (run.inputs_from)" in shown and f"caches of {src}" in shown
    assert "cache/" in shown and "complete (manifest.json written)" in shown

    finished = tree(src.parent / "student_a")
    assert run_pipeline.main(["run", *overrides, "run.name=student_a", f"run.inputs_from={src}", "train.lr=1e-3"]) == 0
    assert tree(src.parent / "student_a") == finished, "a finished student is skipped"


def test_source_with_other_settings_is_one_line_naming_them(source, capsys):
    src, overrides = source
    base = ["train", *overrides, "run.name=student", f"run.inputs_from={src}"]
    err = refusal(capsys, base + ["data.max_length=48"])
    assert "its prepare stage ran with other inputs" in err and "data.max_length 32 → 48" in err
    assert str(src / "data" / "config.yaml") in err
    err = refusal(capsys, base + ["cache.k=4"])
    assert "its cache stage ran with other inputs" in err and "cache.k 8 → 4" in err
    assert not (src.parent / "student").exists(), "a refused command writes nothing"
    # keys that cannot change a cache (batch size, kernel) do not make it another one
    assert run_pipeline.main(base + ["cache.batch_size=2", "cache.extract_kernel=torch", "train.log_every=2"]) == 0


def test_source_not_done_or_not_a_run(source, capsys, tmp_path):
    src, overrides = source
    base = ["train", *overrides, "run.name=student"]
    err = refusal(capsys, base + [f"run.inputs_from={tmp_path / 'nowhere'}"])
    assert "is not a run directory" in err
    recorded = state.read_state(src, "cache")
    state.write_state(src, "cache", "running", recorded["inputs"])  # a source whose cache was interrupted
    err = refusal(capsys, base + [f"run.inputs_from={src}"])
    assert "its cache stage is running; finish it there first" in err
    assert refusal(capsys, base + [f"run.inputs_from={src.parent / 'student'}"]).endswith(
        "is this run itself; name another run's directory or leave it empty")


def test_source_cached_from_another_teacher(source, capsys, tmp_path, teacher_path):
    """The teacher directory replaced in place after the cache (same path, another model): refused by
    the cache's identity, which its fingerprint (the path) cannot see."""
    import shutil

    _, overrides = source
    teacher = shutil.copytree(teacher_path, tmp_path / "teacher")
    own = [*overrides, f"teacher.path={teacher}", "run.name=other"]
    assert run_pipeline.main(["prepare", *own]) == 0 and run_pipeline.main(["cache", *own]) == 0
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    src = tmp_path / "runs" / "other"
    err = refusal(capsys, ["train", *own, "run.name=student", f"run.inputs_from={src}"])
    assert f"{src / 'cache'} was cached from another teacher" in err and "teacher_config" in err


@pytest.mark.parametrize("command", ["prepare", "cache"])
def test_prepare_and_cache_of_a_run_on_another_runs_inputs_are_refused(source, capsys, command):
    src, overrides = source
    err = refusal(capsys, [command, *overrides, "run.name=student", f"run.inputs_from={src}"])
    assert f"run `{command}` for {src}" in err


def test_a_source_recorded_by_the_previous_fingerprint_rule_is_accepted(train_config):
    """A source cached before NO_EFFECT existed (its state holds the hash of every key, cache.batch_size
    included) is still the cache this config gives: accepted, and never re-recorded (only read)."""
    from pipeline.config import fingerprint

    cfg, overrides = train_config(*QUICK, cache=("cache.batch_size=4",), name="base", with_overrides=True)
    src = cfg.run_dir
    splits = json.loads((src / "data" / "manifest.json").read_text())["splits"]
    prepared = {s: v["fingerprint"] for s, v in splits.items()}
    previous_rule = fingerprint(cfg.teacher, cfg.cache, cfg.data, cfg.tokenizer_path(), prepared)
    recorded = state.read_state(src, "cache")
    assert previous_rule != recorded["inputs"]
    (src / "state" / "cache.json").write_text(json.dumps({**recorded, "inputs": previous_rule}))
    before = tree(src)
    assert run_pipeline.main(["train", *overrides, "run.name=student", f"run.inputs_from={src}"]) == 0
    assert tree(src) == before
