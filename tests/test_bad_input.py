"""Bad input: one clear line on stderr, a non-zero exit code, and nothing already written lost.

Every case goes through ``run_pipeline.main([...])``, the CLI's own entry point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import run_pipeline
from stages import cache_teacher

SMALL = ["data.max_samples=16", "data.max_length=24", "data.eval_fraction=0", "cache.splits=[train]",
         "cache.k=8", "cache.batch_size=4", "cache.shard_tokens=100"]


@pytest.fixture
def cli(tmp_path, text_jsonl, tokenizer_dir, make_model, capsys):
    """cli(command, *overrides) → (exit code, the error line or '') on a small run in tmp."""
    base = [f"run.root={tmp_path / 'runs'}", f"data.source={text_jsonl}", f"data.tokenizer={tokenizer_dir}",
            f"teacher.path={make_model('qwen3_moe')}", *SMALL]

    def run(command: str, *overrides: str, force: bool = False) -> tuple[int, str]:
        capsys.readouterr()
        code = run_pipeline.main([command, *(["--force"] if force else []), *base, *overrides])
        err = capsys.readouterr().err
        line = err.rsplit("error: ", 1)[1].rstrip("\n") if "error: " in err else ""
        assert "\n" not in line, f"the error is not one line: {line!r}"
        return code, line

    run.run_dir = tmp_path / "runs" / "demo"
    return run


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_model_path(cli):
    assert cli("prepare") == (0, "")
    data = snapshot(cli.run_dir / "data")
    code, line = cli("cache", "teacher.path=/no/such/model")
    assert code != 0 and "/no/such/model" in line and "does not exist" in line
    assert snapshot(cli.run_dir / "data") == data
    assert cli("cache")[0] == 0, "fixing the path is enough: no --force needed"


def test_dataset_lacking_fields(cli, tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    code, line = cli("prepare", f"data.source={source}")
    assert code != 0 and "question" in line and "'text'" in line and "'prompt'" in line
    assert not (cli.run_dir / "data").exists()


def test_k_larger_than_vocabulary(cli):
    assert cli("prepare")[0] == 0
    code, line = cli("cache", "cache.k=100000")
    assert code != 0 and "cache.k=100000" in line and "vocabulary" in line
    assert not (cli.run_dir / "cache" / "manifest.json").exists()
    assert cli("cache")[0] == 0, "a failed check must not leave a state that refuses the fixed run"


def test_teacher_vocabulary_smaller_than_tokenizer(cli, tokenizer, tmp_path):
    from pipeline.demo import save_tiny_model, tiny_config

    small = save_tiny_model(tiny_config("qwen3", 256), tmp_path / "vocab256", tokenizer)
    assert cli("prepare")[0] == 0
    code, line = cli("cache", f"teacher.path={small}")
    assert code != 0 and "256" in line and "tokenizer" in line


def test_data_prepared_with_another_tokenizer(cli, docstrings, tmp_path):
    from pipeline.demo import train_tokenizer

    other = tmp_path / "other_tokenizer"
    train_tokenizer([doc for _, doc in docstrings[:100]], 300, other)
    assert cli("prepare", f"data.tokenizer={other}")[0] == 0
    code, line = cli("cache", f"data.tokenizer={other}")
    assert code != 0 and "tokenizer" in line and "data.tokenizer" in line


def test_teacher_tokenizer_fingerprint_is_loaded(make_model, tokenizer):
    from pipeline.data import tokenizer_fingerprint
    from pipeline.teachers.extract import ExtractSpec
    from pipeline.models import own_tokenizer_fingerprint
    from pipeline.teachers.hf import HFTeacher
    from pipeline.teachers.base import TeacherConfig

    path = make_model("qwen3")
    teacher = HFTeacher(TeacherConfig(path=str(path)), ExtractSpec(k=4, temperatures=(1.0,)), torch_cpu())
    assert teacher.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert own_tokenizer_fingerprint(str(path / "missing")) is None


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_other_settings_refused_then_set_aside_with_force(cli):
    assert cli("prepare")[0] == 0
    assert cli("cache")[0] == 0
    cache = cli.run_dir / "cache"
    before = snapshot(cache)
    assert len([n for n in before if n.endswith("zarr.json") and n.count("/") == 1]) > 1, "several shards"
    code, line = cli("cache", "cache.k=4")
    assert code != 0 and "--force" in line
    assert snapshot(cache) == before, "refused: the old cache is untouched, byte for byte"
    assert cli("cache", "cache.k=4", force=True)[0] == 0
    aside = [p for p in cli.run_dir.iterdir() if p.name.startswith("cache.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before, "set aside, not deleted"
    assert json.loads((cache / "manifest.json").read_text())["identity"]["k"] == 4


def test_cache_dir_of_another_teacher_without_state(cli, make_model):
    """The state file is gone but the cache directory holds another teacher's journals."""
    assert cli("prepare")[0] == 0
    assert cli("cache")[0] == 0
    (cli.run_dir / "state" / "cache.json").unlink()
    (cli.run_dir / "cache" / "manifest.json").unlink()  # as if killed before the end
    before = snapshot(cli.run_dir / "cache")
    code, line = cli("cache", f"teacher.path={make_model('llama')}")
    assert code != 0 and "other settings" in line and "teacher" in line
    assert snapshot(cli.run_dir / "cache") == before


def test_finished_stage_is_skipped_without_loading_the_teacher(cli, monkeypatch):
    assert cli("prepare")[0] == 0
    assert cli("cache")[0] == 0
    before = snapshot(cli.run_dir)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a finished stage must not load the teacher")

    monkeypatch.setattr(cache_teacher, "build_teacher", no_teacher)
    assert cli("prepare") == (0, "")
    assert cli("cache") == (0, "")
    assert snapshot(cli.run_dir) == before


def test_edited_source_is_a_changed_input(cli, tmp_path, docstrings):
    """Same config, edited data file: prepare refuses, and with --force the cache refuses too."""
    import os

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for _, d in docstrings[:16]))
    assert cli("prepare", f"data.source={source}")[0] == 0
    assert cli("cache", f"data.source={source}")[0] == 0
    source.write_text("".join(json.dumps({"text": d}) + "\n" for _, d in docstrings[16:32]))
    os.utime(source, ns=(1, 1))  # whatever the clock's resolution
    code, line = cli("prepare", f"data.source={source}")
    assert code != 0 and "--force" in line
    assert cli("prepare", f"data.source={source}", force=True)[0] == 0
    code, line = cli("cache", f"data.source={source}")
    assert code != 0 and "--force" in line, "an old cache must not pass for the re-prepared data"
    assert cli("cache", f"data.source={source}", force=True)[0] == 0


def test_failed_prepare_leaves_no_state(cli, tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "a"}) + "\n")
    code, line = cli("prepare", f"data.source={tiny}", "data.add_eos=false")
    assert code != 0 and "at least 2 tokens" in line
    assert cli("prepare")[0] == 0, "the fixed run is not refused"
