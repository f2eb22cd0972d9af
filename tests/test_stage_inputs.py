"""A stage's inputs (pipeline/stage_inputs.py): refusals name the changed keys with old → new
values, keys that cannot change a stage's output do not count, a run recorded by the previous
fingerprint rule is still recognised, and a killed run that committed nothing starts afresh.

Through ``run_pipeline.main([...])``, the CLI's own entry point, on tiny models (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import run_pipeline
from pipeline import stage_inputs, state
from pipeline.config import fingerprint
from stages.config import PipelineConfig


@pytest.fixture
def cli(small_cli):
    """cli(command, *overrides) → (exit code, stdout, the error line or '') on a small run in tmp."""
    return small_cli


# --- refusals name the keys that changed ---------------------------------------------------------

def test_prepare_refusal_names_key_old_new_and_the_fix(cli):
    assert cli("prepare")[0] == 0
    code, _, err = cli("prepare", "data.max_length=32", "data.packing=true")
    assert code == 2
    assert "data.max_length 24 → 32" in err and "data.packing false → true" in err
    assert f"(against {cli.run_dir / 'data' / 'config.yaml'})" in err
    assert "--force" in err and "revert those settings" in err


def test_cache_keys_without_effect_do_not_count_and_others_are_named(cli):
    assert cli("prepare")[0] == 0 and cli("cache")[0] == 0
    done = state.read_state(cli.run_dir, "cache")
    shards = sorted(p.name for p in (cli.run_dir / "cache").glob("r*"))
    code, _, _ = cli("cache", "cache.batch_size=2", "cache.extract_kernel=torch", "cache.extract_chunk_tokens=64",
                     "teacher.attn_implementation=eager")
    assert code == 0 and state.read_state(cli.run_dir, "cache") == done, "skipped: the same cache"
    assert sorted(p.name for p in (cli.run_dir / "cache").glob("r*")) == shards
    code, _, err = cli("cache", "cache.k=4", "cache.batch_size=2")
    assert code == 2 and "cache.k 8 → 4" in err and "batch_size" not in err
    assert f"(against {cli.run_dir / 'cache' / 'config.yaml'})" in err


def test_train_keys_without_effect_do_not_count(train_config, capsys):
    cfg, overrides = train_config(with_overrides=True)
    assert run_pipeline.main(["train", *overrides]) == 0
    metrics = (cfg.run_dir / "train" / "metrics.jsonl").read_text()
    no_effect = ["train.log_every=3", "train.num_workers=1", "train.checkpoint_every=3", "train.keep_checkpoints=3",
                 "train.loss_chunk_tokens=16", "student.gradient_checkpointing=true", "cache.compression=gzip"]
    assert run_pipeline.main(["train", *overrides, *no_effect]) == 0
    assert (cfg.run_dir / "train" / "metrics.jsonl").read_text() == metrics, "skipped, not re-trained"
    capsys.readouterr()
    assert run_pipeline.main(["train", *overrides, "train.lr=2e-3", "train.log_every=3"]) == 2
    err = capsys.readouterr().err
    assert "train.lr 0.001 → 0.002" in err and "log_every" not in err


# --- a run recorded by the previous fingerprint rule ---------------------------------------------

def legacy_cache_fingerprint(cfg) -> str:
    """The cache stage's fingerprint as kdcache computed it before NO_EFFECT: every key counted."""
    manifest = json.loads((cfg.run_dir / "data" / "manifest.json").read_text())
    prepared = {s: v["fingerprint"] for s, v in manifest["splits"].items()}
    return fingerprint(cfg.teacher, cfg.cache, cfg.data, cfg.tokenizer_path(), prepared)


def test_a_run_recorded_by_the_previous_rule_is_unchanged(cli):
    assert cli("prepare")[0] == 0 and cli("cache")[0] == 0
    cfg = cli.config()
    old = legacy_cache_fingerprint(cfg)
    current = state.read_state(cli.run_dir, "cache")["inputs"]
    assert old != current, "cache.batch_size=4 counted before, no longer"
    recorded = state.read_state(cli.run_dir, "cache")
    (cli.run_dir / "state" / "cache.json").write_text(json.dumps({**recorded, "inputs": old}))
    assert cli("cache")[0] == 0
    assert state.read_state(cli.run_dir, "cache") == recorded, "skipped, and re-recorded under the current rule"


def test_without_no_effect_keys_the_fingerprint_is_the_previous_one(cli):
    """A run that set none of the NO_EFFECT keys keeps the fingerprint it was recorded with: the
    reference is each stage's fingerprint call as it was written before stage_inputs existed."""
    from pipeline.data import sources_stamp

    cfg = cli.config("cache.batch_size=8", "cache.splits=[train,eval]", "train.lr=1e-3")  # back to their defaults

    previous = {
        "prepare": fingerprint(cfg.data, cfg.tokenizer_path(), sources_stamp(cfg.data)),
        "train": fingerprint(cfg.student, cfg.train, cfg.run.seed, cfg.data, cfg.teacher, cfg.cache),
        "evaluate": fingerprint(cfg.eval, cfg.student, cfg.train, cfg.cache, cfg.data, cfg.teacher),
    }
    for stage, reference in previous.items():
        inputs = stage_inputs.stage_inputs(stage, cfg)
        assert inputs == reference and inputs.aliases == (), stage
    assert cli("prepare")[0] == 0
    assert stage_inputs.stage_inputs("cache", cfg) == legacy_cache_fingerprint(cfg)


def test_every_no_effect_key_is_a_field_of_a_hashed_section():
    defaults = PipelineConfig()
    for key, stages in stage_inputs.NO_EFFECT.items():
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(getattr(defaults, section))}, key
        assert set(stages) <= set(stage_inputs.PARTS) and any(section in stage_inputs.PARTS[s] for s in stages), key


def test_docs_list_the_keys_without_effect():
    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    section = text.split("## What counts toward a stage's fingerprint", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", section.split("Keys that cannot change", 1)[1]))
    assert set(stage_inputs.NO_EFFECT) <= listed


# --- a killed run that committed nothing (issue 17 item 3) ---------------------------------------

def write_killed_cache(run_dir: Path, journal: dict | None) -> None:
    """What a cache killed before its first shard leaves (a journal folder, maybe a journal), recorded
    as running with inputs other than today's."""
    state.write_state(run_dir, "cache", "running", "0123456789abcdef")
    folder = run_dir / "cache" / "journal"
    folder.mkdir(parents=True)
    if journal is not None:
        (folder / "rank000.json").write_text(json.dumps(journal))


ABSENT = {"name": "r000-00000.zarr", "rank": 0, "n_tokens": 40, "n_seqs": 2, "nbytes": 1000, "checksum": "0" * 64}


@pytest.mark.parametrize("journal", [None, {"identity": {"k": 99}, "shards": []},
                                     {"identity": {"k": 99}, "shards": [ABSENT]}],
                         ids=["journal folder only", "journal without shards", "journal whose shards are absent"])
def test_a_killed_cache_that_committed_nothing_starts_afresh(cli, journal):
    assert cli("prepare")[0] == 0
    write_killed_cache(cli.run_dir, journal)
    code, out, err = cli("cache")
    assert code == 0, err
    assert "committed no output" in out and "is set aside and the stage starts afresh" in out
    assert (cli.run_dir / "cache" / "manifest.json").exists()
    assert state.read_state(cli.run_dir, "cache")["status"] == "done"
    aside = list(cli.run_dir.glob("cache.old-*"))
    assert len(aside) == 1 and (aside[0] / "journal").is_dir(), "set aside, never deleted"


def test_a_killed_cache_with_a_committed_shard_is_still_refused(cli):
    assert cli("prepare")[0] == 0 and cli("cache")[0] == 0
    (cli.run_dir / "cache" / "manifest.json").unlink()  # killed before the manifest, its shards committed
    recorded = state.read_state(cli.run_dir, "cache")
    state.write_state(cli.run_dir, "cache", "running", recorded["inputs"])
    code, _, err = cli("cache", "cache.k=4")
    assert code == 2 and "was running with other inputs: cache.k 8 → 4" in err
    assert not list(cli.run_dir.glob("cache.old-*"))


def test_init_refusal_names_the_init_keys_and_its_timeout_does_not_count(tmp_path, make_model, capsys):
    teacher = make_model("qwen3_moe")
    student = make_model("qwen3_moe", name="small_student", num_experts=4, num_hidden_layers=1)
    args = ["init", f"run.root={tmp_path / 'runs'}", f"teacher.path={teacher}", f"student.path={student}"]
    assert run_pipeline.main(args) == 0
    done = state.read_state(tmp_path / "runs" / "demo", "init")
    assert run_pipeline.main([*args, "init.shard_wait_s=60"]) == 0
    assert state.read_state(tmp_path / "runs" / "demo", "init") == done, "skipped: a timeout is no other init"
    capsys.readouterr()
    assert run_pipeline.main([*args, "init.projection=svd"]) == 2
    err = capsys.readouterr().err
    saved = tmp_path / "runs" / "demo" / "init" / "init_config.yaml"
    assert f"init.projection 'slice' → 'svd' (against {saved})" in err and "shard_wait_s" not in err


def test_an_edited_source_file_is_named_when_no_key_changed(cli, tmp_path, text_jsonl):
    source = tmp_path / "data.jsonl"
    source.write_text(text_jsonl.read_text())
    assert cli("prepare", f"data.source={source}")[0] == 0
    source.write_text(text_jsonl.read_text() + json.dumps({"text": "one more record"}) + "\n")
    code, _, err = cli("prepare", f"data.source={source}")
    assert code == 2 and "no key it depends on differs from" in err
    assert "so the contents of data.source or data.eval_source" in err and "--force" in err


def test_a_killed_trainer_without_a_checkpoint_starts_afresh(train_config, capsys):
    """Killed before its first complete checkpoint (metrics and config written, a checkpoint half-written),
    then run with other settings: no --force needed, what it left is set aside."""
    cfg, overrides = train_config(with_overrides=True)
    train = cfg.run_dir / "train"
    (train / "checkpoints" / ".step-000002.tmp").mkdir(parents=True)
    (train / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    state.write_state(cfg.run_dir, "train", "running", "0123456789abcdef")
    capsys.readouterr()
    assert run_pipeline.main(["train", *overrides, "train.lr=2e-3"]) == 0
    assert "committed no output" in capsys.readouterr().out
    assert state.read_state(cfg.run_dir, "train")["status"] == "done"
    assert '"loss": 9.0' not in (train / "metrics.jsonl").read_text(), "the new run's metrics only"
    assert len(list(cfg.run_dir.glob("train.old-*"))) == 1
