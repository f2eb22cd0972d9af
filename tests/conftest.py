"""Shared fixtures: a BPE tokenizer trained on the stdlib's docstrings, tiny saved models, data.

Everything is built once per test session under a temporary directory and loaded back
through the real ``from_pretrained`` paths.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.demo import save_tiny_model, stdlib_docstrings, tiny_config, train_tokenizer, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():  # tests/test_triton_*.py run the Triton kernels interpreted on CPU; triton
    os.environ.setdefault("TRITON_INTERPRET", "1")  # reads this when first imported, so before any test imports it
VOCAB = 512
pytest_plugins = ("s3_server",)  # s3_endpoint / s3_bucket: moto's S3 server for tests/test_s3*.py


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~100x faster than two
    spinning threads under load, and makes CPU results independent of the core count."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses tests start


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def docstrings():
    return stdlib_docstrings(max_docs=300)


@pytest.fixture(scope="session")
def tokenizer_dir(assets, docstrings) -> Path:
    out = assets / "tokenizer"
    train_tokenizer([doc for _, doc in docstrings], VOCAB, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def make_model(assets, tokenizer):
    """make_model(family, name=None, **config overrides) → path of a saved tiny model."""
    built: dict[str, Path] = {}

    def make(family: str, name: str | None = None, seed: int = 0, **overrides) -> Path:
        name = name or family
        if name not in built:
            config = tiny_config(family, len(tokenizer), **overrides)
            built[name] = save_tiny_model(config, assets / "models" / name, tokenizer, seed=seed)
        return built[name]

    return make


@pytest.fixture(scope="session")
def text_jsonl(assets, docstrings) -> Path:
    return write_jsonl(assets / "data" / "text.jsonl", [{"text": doc} for _, doc in docstrings])


@pytest.fixture(scope="session")
def pairs_jsonl(assets, docstrings) -> Path:
    rows = [{"prompt": f"Document {name}.", "response": doc} for name, doc in docstrings]
    return write_jsonl(assets / "data" / "pairs.jsonl", rows)


@pytest.fixture
def make_config(tmp_path, text_jsonl, make_model):
    """make_config(*overrides) → a PipelineConfig on the tiny Qwen3-MoE teacher and the text data."""
    from stages.config import PipelineConfig

    def make(*overrides: str, teacher: str = "qwen3_moe"):
        base = [f"run.root={tmp_path / 'runs'}", f"data.source={text_jsonl}", f"teacher.path={make_model(teacher)}",
                "data.max_length=64", "data.max_samples=120", "cache.k=8", "cache.batch_size=4",
                "cache.shard_tokens=600", "cache.chunk_tokens=256"]
        return load_config(PipelineConfig, [], base + list(overrides))

    return make


SMALL_RUN = ["data.max_samples=16", "data.max_length=24", "data.eval_fraction=0", "cache.splits=[train]",
             "cache.k=8", "cache.batch_size=4", "cache.shard_tokens=100"]


@pytest.fixture
def small_cli(tmp_path, text_jsonl, tokenizer_dir, make_model, capsys):
    """small_cli(command, *overrides, force=False) → (exit code, stdout, the error line or '') of
    run_pipeline.main on a small run in tmp; the error must be one line."""
    import run_pipeline
    from stages.config import PipelineConfig

    base = [f"run.root={tmp_path / 'runs'}", f"data.source={text_jsonl}", f"data.tokenizer={tokenizer_dir}",
            f"teacher.path={make_model('qwen3_moe')}", *SMALL_RUN]

    def run(command: str, *overrides: str, force: bool = False) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run_pipeline.main([command, *(["--force"] if force else []), *base, *overrides])
        out, err = capsys.readouterr()
        line = err.rsplit("error: ", 1)[1].rstrip("\n") if "error: " in err else ""
        assert "\n" not in line, f"the error is not one line: {line!r}"
        return code, out, line

    run.run_dir = tmp_path / "runs" / "demo"
    run.tokenizer_dir = tokenizer_dir
    run.config = lambda *overrides: load_config(PipelineConfig, [], [*base, *overrides])
    return run


# --- phase two: a prepared + cached run, built once per session and copied per test ----------

TRAIN_BASE = ["data.max_length=32", "data.max_samples=48", "cache.k=8", "cache.batch_size=8", "cache.shard_tokens=300",
              "cache.chunk_tokens=128", "cache.targets=topk+sampled", "cache.num_draws=8",
              "cache.temperatures=[1.0,2.0]", "train.batch_size=4", "train.steps=4", "train.log_every=1",
              "train.checkpoint_every=2", "train.warmup_steps=1", "train.lr=1e-3", "train.shuffle_window=16",
              "eval.rouge_samples=2", "eval.max_new_tokens=8"]


@pytest.fixture(scope="session")
def teacher_path(make_model) -> Path:
    """A teacher with peaked next-token distributions (a random 0.02-init model is near-uniform)."""
    return make_model("qwen3_moe", name="teacher_sharp", seed=3, initializer_range=0.25)


@pytest.fixture(scope="session")
def student_path(make_model) -> Path:
    return make_model("qwen3_moe", name="student_small", seed=1, hidden_size=32, num_experts=4)


@pytest.fixture(scope="session")
def cached_run(assets, text_jsonl, teacher_path, student_path):
    """cached_run(*overrides) → (run dir after prepare + cache, the overrides that built it); memoized."""
    from stages import cache_teacher, prepare
    from stages.config import PipelineConfig

    built: dict[tuple, tuple[Path, list[str]]] = {}

    def build(*overrides: str) -> tuple[Path, list[str]]:
        if overrides not in built:
            root = assets / "cached" / f"c{len(built)}"
            base = [f"run.root={root}", f"data.source={text_jsonl}", f"teacher.path={teacher_path}",
                    f"student.path={student_path}", *TRAIN_BASE, *overrides]
            cfg = load_config(PipelineConfig, [], base)
            prepare.run(cfg)
            cache_teacher.run(cfg)
            built[overrides] = (cfg.run_dir, base)
        return built[overrides]

    return build


@pytest.fixture
def train_config(tmp_path, cached_run):
    """train_config(*overrides, cache=(cache overrides), name="demo") → a PipelineConfig whose run
    directory (under tmp_path) is a copy of a session-built prepared + cached run
    (with_overrides=True: also the full override list, for run_pipeline.py subprocesses)."""
    import shutil

    from stages.config import PipelineConfig

    def make(*overrides: str, cache: tuple[str, ...] = (), name: str = "demo", with_overrides: bool = False):
        run_dir, base = cached_run(*cache)
        dest = tmp_path / "runs" / name
        if not dest.exists():
            shutil.copytree(run_dir, dest)
        everything = [*base, f"run.root={tmp_path / 'runs'}", f"run.name={name}", *overrides]
        cfg = load_config(PipelineConfig, [], everything)
        return (cfg, everything) if with_overrides else cfg  # the overrides: for run_pipeline.py subprocesses

    return make
