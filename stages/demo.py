"""The embedded demo: the whole pipeline on CPU in minutes, with nothing downloaded.

    python run_pipeline.py

1. Assets, built once under runs/demo_assets: prompt/response pairs from the docstrings of
   this Python's standard library (prompt: the object's name; response: its docstring), a
   BPE tokenizer trained on them, a random Qwen3-MoE teacher and a smaller random student.
2. The teacher is first trained on that text (configs/demo_teacher.yaml: SFT, no cache).
3. configs/demo.yaml: prepare → cache → train (KD + router KL) → evaluate.
4. A summary: what the cache holds, and the student before/after against the teacher.
Running it again skips finished stages and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.demo import save_tiny_model, stdlib_docstrings, tiny_config, train_tokenizer, write_jsonl
from pipeline.run_paths import cache_dir
from stages import cache_teacher, evaluate, inspect_cache, prepare, train_student
from stages.config import PipelineConfig
from stages.evaluate import format_results

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TEACHER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96)
STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


def build_assets(root: Path) -> dict[str, Path]:
    paths = {"data": root / "docstrings.jsonl", "tokenizer": root / "tokenizer",
             "teacher_init": root / "teacher_init", "student": root / "student"}
    if all(p.exists() for p in paths.values()):
        return paths
    docs = stdlib_docstrings(max_docs=2500)
    write_jsonl(paths["data"], [{"prompt": f"{name}:", "response": doc} for name, doc in docs])
    tokenizer = train_tokenizer([f"{name}: {doc}" for name, doc in docs], 2048, paths["tokenizer"])
    save_tiny_model(tiny_config("qwen3_moe", len(tokenizer), **TEACHER), paths["teacher_init"], tokenizer, seed=1)
    save_tiny_model(tiny_config("qwen3_moe", len(tokenizer), **STUDENT), paths["student"], tokenizer, seed=2)
    return paths


def run_config(name: str, overrides: list[str]):
    return load_config(PipelineConfig, [CONFIGS / name], overrides)


def main(root: str = "runs") -> dict:
    assets = build_assets(Path(root) / "demo_assets")
    teacher_cfg = run_config("demo_teacher.yaml", [f"run.root={root}", f"data.source={assets['data']}",
                                                   f"student.path={assets['teacher_init']}", "eval.before=false"])
    print("== demo 1/2: training the teacher on the standard library's docstrings", flush=True)
    prepare.run(teacher_cfg)
    teacher = train_student.run(teacher_cfg)
    cfg = run_config("demo.yaml", [f"run.root={root}", f"data.source={assets['data']}", f"teacher.path={teacher}",
                                   f"student.path={assets['student']}"])
    print("== demo 2/2: prepare → cache → train → evaluate", flush=True)
    prepare.run(cfg)
    cache_teacher.run(cfg)
    train_student.run(cfg)
    results = evaluate.run(cfg)
    stats = inspect_cache.inspect(cache_dir(cfg.run_dir, "train"))
    print(summary(stats, results), flush=True)
    return {"stats": stats, "results": results}


def summary(stats: dict, results: dict) -> str:
    keys = [k for k in ("tokens", "sequences", "bytes_per_token", "topk_mass_mean", "target_in_topk") if k in stats]
    cache_lines = "\n".join(f"  {k:<20} {stats[k]:,.4g}" for k in keys)
    return f"\n== demo summary\ncache (train split):\n{cache_lines}\nstudent vs teacher (held-out):\n{format_results(results)}"


# --- shared by the studies built on the demo (scripts/compare_losses.py, scripts/ablate_router.py) ---


def inputs_from(demo_dir: Path) -> str:
    """The override that makes a study variant train and evaluate on the demo's prepared data and caches,
    in place (run.inputs_from: checked by identity, never copied; pipeline/inputs_from.py)."""
    return f"run.inputs_from={demo_dir}"


def link_student(demo_dir: Path, run_dir: Path) -> None:
    """A study run that re-evaluates the demo's own trained student links its train/ (never retrains it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "train"
    if not link.exists() and (demo_dir / "train").exists():
        link.symlink_to((demo_dir / "train").resolve(), target_is_directory=True)


def machine() -> str:
    """CPU model, cores and torch threads, for the tables the studies commit."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"


def study_parser(doc: str, root_help: str = "where the demo's runs are and the variants' go") -> argparse.ArgumentParser:
    """The options every study script shares (--root, --steps, --threads, --out); add your own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--root", default="runs", help=root_help)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per variant (0 = the demo's train.steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPU: 1)")
    parser.add_argument("--out", default="", help="also write the table here (markdown)")
    return parser


def study_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed options, torch's intra-op threads set from --threads."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def study_header(steps: int) -> str:
    """What a study ran: date, commit, steps, machine (its tables never carry numbers of another run)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=CONFIGS.parent, capture_output=True,
                            text=True).stdout
    return (f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit: {commit.strip() or '?'}; "
            f"steps per variant: {steps or 'the demo train.steps'}; seed 0; machine: {machine()}")


def demo_overrides(root: Path) -> list[str]:
    """The overrides main() gives configs/demo.yaml; runs the demo first unless its teacher and
    caches are already there (then nothing of it is re-run)."""
    root = Path(root)
    teacher = root / "demo_teacher" / "train" / "final"
    if not all((root / "demo" / d / "manifest.json").exists() for d in ("cache", "cache_eval")) or not teacher.exists():
        main(str(root))
    assets = build_assets(root / "demo_assets")
    return [f"data.source={assets['data']}", f"teacher.path={teacher}", f"student.path={assets['student']}"]
