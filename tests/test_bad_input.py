"""Bad input: one clear line on stderr, a non-zero exit code, and nothing already written lost.

Every case goes through ``run_pipeline.main([...])``, the CLI's own entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import run_pipeline
from stages import cache_teacher


@pytest.fixture
def cli(small_cli):
    """cli(command, *overrides, force=False) → (exit code, the error line or '') on a small run in tmp."""
    def run(command: str, *overrides: str, force: bool = False) -> tuple[int, str]:
        code, _, line = small_cli(command, *overrides, force=force)
        return code, line

    run.run_dir, run.tokenizer_dir = small_cli.run_dir, small_cli.tokenizer_dir
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


# --- issue 16 item 13: every value out of its range is one line, before anything is written -------

OUT_OF_RANGE = [
    ("train.steps=-1", "train.steps=-1", ">= 1"), ("train.lr=-0.001", "train.lr=-0.001", "> 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0", ">= 1"), ("train.log_every=0", "train.log_every=0", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum=0", ">= 1"), ("train.batch_size=0", "train.batch_size=0", ">= 1"),
    ("cache.batch_size=0", "cache.batch_size=0", ">= 1"), ("eval.batch_size=0", "eval.batch_size=0", ">= 1"),
    ("train.alpha=1.5", "train.alpha=1.5", "in [0.0, 1.0]"), ("train.betas=[0.9,1.0]", "train.betas[1]=1.0", "in [0.0, 1.0)"),
    ("cache.temperatures=[1.0,-2.0]", "cache.temperatures[1]=-2.0", "> 0"),
    ("data.eval_fraction=1.0", "data.eval_fraction=1.0", "in [0.0, 1.0)"), ("data.max_length=1", "data.max_length=1", ">= 2"),
    ("cache.shard_tokens=0", "cache.shard_tokens=0", ">= 1"), ("cache.compression_level=30", "cache.compression_level=30", "[1, 22]"),
    ("teacher.gpu_memory_utilization=0", "teacher.gpu_memory_utilization=0.0", "in (0.0, 1.0]"),
    ("eval.overlap_k=[8,0]", "eval.overlap_k[1]=0", ">= 1"), ("run.seed=-1", "run.seed=-1", ">= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1", ">= 0"), ("eval.split=test", "eval.split='test'", "train, eval"),
]


@pytest.mark.parametrize("override, key, allowed", OUT_OF_RANGE, ids=[o for o, _, _ in OUT_OF_RANGE])
def test_value_out_of_range_is_one_line_before_anything_is_written(cli, override, key, allowed):
    code, line = cli("run", override)
    assert code != 0 and line.startswith(key) and allowed in line, line
    assert not cli.run_dir.exists(), "a refused config writes nothing"


def test_every_ranged_default_is_in_range():
    """The defaults pass their own declared ranges (a default outside would refuse every run)."""
    from pipeline.config import validate
    from stages.config import PipelineConfig

    validate(PipelineConfig())


def test_phase_steps_checked_in_yaml(cli, tmp_path):
    phases = tmp_path / "phases.yaml"
    phases.write_text("train:\n  phases:\n    - steps: 2\n    - steps: 0\n")
    code, line = cli("run", "--config", str(phases))
    assert code != 0 and line.startswith("train.phases[1].steps=0") and ">= 1" in line


@pytest.mark.parametrize("text, words", [("train: [1\n", ("not valid YAML", "line")),
                                         ("- 1\n- 2\n", ("list at the top level", "map sections"))])
def test_bad_yaml_file_is_one_line(cli, tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, line = cli("run", "--config", str(path))
    assert code != 0 and str(path) in line and all(w in line for w in words), line
    assert not cli.run_dir.exists()


def test_teacher_directory_without_model(cli, tmp_path):
    assert cli("prepare")[0] == 0
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    code, line = cli("cache", f"teacher.path={empty}")
    assert code != 0 and str(empty) in line and "config.json" in line
    assert not (cli.run_dir / "cache").exists() and not (cli.run_dir / "state" / "cache.json").exists()


@pytest.mark.parametrize("content, words", [("", "is empty"), ("\n\n", "cannot read")])
def test_empty_dataset_file(cli, tmp_path, content, words):
    source = tmp_path / "empty.jsonl"
    source.write_text(content)
    code, line = cli("prepare", f"data.source={source}")
    assert code != 0 and str(source) in line and words in line, line
    assert not cli.run_dir.exists()


def test_truncation_is_reported(cli, capsys, text_jsonl):
    """Every sequence of the demo text is longer than 8 tokens: prepare says so."""
    capsys.readouterr()
    code = run_pipeline.main(["prepare", f"run.root={cli.run_dir.parent}", f"data.source={text_jsonl}",
                              f"data.tokenizer={cli.tokenizer_dir}", "data.max_samples=16", "data.max_length=8"])
    out = capsys.readouterr().out
    assert code == 0 and "16 sequences" in out and "16 truncated to data.max_length=8" in out, out
    manifest = json.loads((cli.run_dir / "data" / "manifest.json").read_text())
    assert manifest["sequences_cut"]["truncated"] == 16


def test_no_trained_position_within_max_length_is_refused(cli, tmp_path):
    source = tmp_path / "long_prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": "word " * 60, "response": "short answer"}) + "\n" for _ in range(6)))
    code, line = cli("prepare", f"data.source={source}")
    assert code != 0 and "no train sequence keeps a trained position" in line and "data.max_length" in line
    assert not cli.run_dir.exists()
    assert cli("prepare", f"data.source={source}", "data.max_length=200")[0] == 0, "the fixed run is not refused"


def _cli_subprocess(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    root = Path(run_pipeline.__file__).parent
    return subprocess.run([sys.executable, str(root / "run_pipeline.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=root)


@pytest.mark.parametrize("override", ["train.batch_size=0", "train.steps=-1", "train.lr=-1"])
def test_cli_subprocess_bad_value_one_line_no_hang(tmp_path, override):
    """The real CLI: exit code 2, one line on stderr, no traceback, no hang (batch_size=0 used to)."""
    proc = _cli_subprocess(["train", f"run.root={tmp_path}", override])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {override.split('=')[0]}=")
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_unsupported_moe_student_names_the_student_side_fix(train_config, monkeypatch, capsys):
    """The teacher-side fix (cache.router_topk=none) means nothing for a student: name the router weights."""
    from pipeline import router

    cfg, overrides = train_config(with_overrides=True)
    monkeypatch.delitem(router.ROUTER_FAMILIES, "qwen3_moe")  # as if the student's family had no router capture
    capsys.readouterr()
    assert run_pipeline.main(["train", *overrides, "train.router_weight=0.1"]) == 2
    line = capsys.readouterr().err.rsplit("error: ", 1)[1].strip()
    assert "student's model_type 'qwen3_moe'" in line and "train.router_weight=0" in line
    assert "cache.router_topk" not in line and "\n" not in line
    assert not (cfg.run_dir / "train").exists()


def test_empty_eval_split_is_one_line(cli):
    """data.eval_fraction=0 leaves the eval split empty: the cache skips it, eval says so in one line."""
    assert cli("prepare")[0] == 0
    assert cli("cache", "cache.splits=[train,eval]")[0] == 0, "an empty split is not cached (it used to crash)"
    assert not (cli.run_dir / "cache_eval").exists()
    from pipeline.config import ConfigError
    from pipeline.splits import load_split

    with pytest.raises(ConfigError, match="'eval' split .* holds no sequences"):
        load_split(cli.run_dir, "eval")
    code, line = cli("run", "cache.splits=[train,eval]")
    assert code != 0 and "data.eval_fraction=0" in line and "eval.split=train" in line


@pytest.mark.parametrize("args, words", [
    (["train.lr=[1"], ("override 'train.lr=[1' is not valid YAML",)),
    (["train=3"], ("'train' is a section",)),
    (["train.lr=1e400"], ("train.lr=inf", "finite")),
    (["train.alpha=nan"], ("train.alpha=nan", "finite")),
])
def test_malformed_override_is_one_line(cli, args, words):
    code, line = cli("run", *args)
    assert code != 0 and all(w in line for w in words), line
    assert not cli.run_dir.exists()


def test_section_given_a_value_in_yaml(cli, tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("train: 5\n")
    code, line = cli("run", "--config", str(path))
    assert code != 0 and str(path) in line and "'train' is a section" in line


def test_forced_command_with_a_typo_sets_nothing_aside(cli):
    """--force with a bad teacher path: refused in one line, the finished cache stays where it was."""
    assert cli("prepare")[0] == 0
    assert cli("cache")[0] == 0
    before = snapshot(cli.run_dir / "cache")
    code, line = cli("cache", "cache.k=4", "teacher.path=/no/such/model", force=True)
    assert code != 0 and "/no/such/model" in line
    assert snapshot(cli.run_dir / "cache") == before and not list(cli.run_dir.glob("cache.old-*"))
    assert cli("cache") == (0, ""), "the old cache is still the finished one"
    assert cli("cache", "cache.k=4", force=True)[0] == 0 and len(list(cli.run_dir.glob("cache.old-*"))) == 1


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_init_with_a_directory_without_a_model(cli, tmp_path, which):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    code, line = cli("init", f"{which}.path={empty}")
    assert code != 0 and str(empty) in line and "config.json" in line
    assert not cli.run_dir.exists(), "nothing written, no state that would block the fixed command"


def test_third_party_progress_bars_are_quiet_under_the_cli():
    probe = ("import run_pipeline, datasets, transformers.utils.logging as tl; "
             "print(tl.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(run_pipeline.__file__).parent, env={k: v for k, v in os.environ.items()
                                                                   if "PROGRESS_BARS" not in k})
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]
