"""Quality of each cache preset (issue 12): the demo student trained on a cache of each
`cache.preset`, against a CE-only student and a student trained on the whole vocabulary
(k = V, full KD); same data, steps and seed; KL to the teacher over the full vocabulary
(the teacher run live on the eval split, not read from a cache).

    python scripts/study_presets.py                                   # builds/reuses the demo under runs/
    OMP_NUM_THREADS=1 python scripts/study_presets.py --root /tmp/demo_runs --steps 150 --out docs/preset_study.md

share of full-KD gain = (KL_ce − KL_preset) / (KL_ce − KL_full). Each variant is its own run
(prepare → cache → train → evaluate, `demo_preset_<name>`) from configs/demo.yaml with the
demo's teacher; the router KL is off so the rows differ only in the logit signal. A preset with
draws trains `train.kd_loss=sampled`, one without draws `forward_kl` (top-k + tail bucket), each
at τ = 1. The CE-only baseline reads the full-KD cache (alpha = 0) so it sees the same batches.
The last line is one JSON object: per variant its KL, bytes/token of its train cache and share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import demo  # noqa: E402  (after the path set-up: scripts run from a checkout)

COMMON = ["train.router_weight=0", "eval.before=false", "eval.rouge_samples=0", "eval.run_teacher=true",
          "train.temperature=1.0", "cache.temperatures=[1.0]"]
FULL, BASELINE = "full_kd", "ce_only"


def variants(vocab: int) -> dict[str, list[str]]:
    """name → the cache and loss overrides of its run."""
    from cache.codec import PRESETS

    out = {FULL: [f"cache.k={vocab}", "cache.targets=topk", "cache.router_topk=none", "train.kd_loss=forward_kl"]}
    for name, preset in PRESETS.items():
        loss = "sampled" if "sampled" in preset.targets else "forward_kl"
        # configs/demo.yaml sets the cache's shape; the keys at their 'preset' values take the preset's own
        out[name] = [f"cache.preset={name}", "cache.k=-1", "cache.targets=preset", "cache.num_draws=0",
                     "cache.router_topk=preset", f"train.kd_loss={loss}"]
    return out


def run_variant(name: str, overrides: list[str], base: list[str], steps: int) -> dict:
    from pipeline.run_paths import cache_dir
    from stages import cache_teacher, evaluate, prepare, train_student

    budget = [f"train.steps={steps}", f"train.checkpoint_every={steps}"] if steps else []
    cfg = demo.run_config("demo.yaml", base + COMMON + budget + overrides + [f"run.name=demo_preset_{name}"])
    print(f"== variant {name}: {' '.join(overrides)}", flush=True)
    prepare.run(cfg)
    manifests = cache_teacher.run(cfg)
    train_student.run(cfg)
    result = evaluate.run(cfg)["after"]
    result["bytes_per_token"] = bytes_per_token(manifests["train"])
    result["cache"] = str(cache_dir(cfg.run_dir, "train"))
    return result


def run_baseline(full_run: Path, base: list[str], steps: int, vocab: int) -> dict:
    from stages import evaluate, train_student

    budget = [f"train.steps={steps}", f"train.checkpoint_every={steps}"] if steps else []
    cfg = demo.run_config("demo.yaml", base + COMMON + budget + variants(vocab)[FULL]
                          + ["train.alpha=0", "train.source=cache", f"run.name=demo_preset_{BASELINE}",
                             demo.inputs_from(full_run)])
    print(f"== variant {BASELINE}: alpha = 0 on the full-KD cache", flush=True)
    train_student.run(cfg)
    return evaluate.run(cfg)["after"] | {"bytes_per_token": 0.0}


def bytes_per_token(manifest) -> float:
    return sum(s.nbytes for s in manifest.shards) / max(manifest.n_tokens, 1)


def share(kl_ce: float, kl: float, kl_full: float) -> float:
    return (kl_ce - kl) / (kl_ce - kl_full) if kl_ce != kl_full else float("nan")


def table(rows: dict[str, dict]) -> str:
    kl_ce, kl_full = rows[BASELINE]["kl_to_teacher"], rows[FULL]["kl_to_teacher"]
    lines = ["| variant | train cache bytes/token | KL to teacher (full vocabulary) | share of full-KD gain | perplexity "
             "| top-1 agreement |", "|" + "---|" * 6]
    for name, r in rows.items():
        r["share"] = share(kl_ce, r["kl_to_teacher"], kl_full)
        lines.append(f"| {name} | {r['bytes_per_token']:,.1f} | {r['kl_to_teacher']:.4f} | {r['share']:.3f} "
                     f"| {r['perplexity']:.3f} | {r['top1_agreement']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    from pipeline.models import load_tokenizer

    args = demo.study_args(demo.study_parser(__doc__))
    root = Path(args.root)
    base = [f"run.root={root}"] + demo.demo_overrides(root)
    vocab = len(load_tokenizer(str(root / "demo_assets" / "tokenizer")))
    rows = {name: run_variant(name, overrides, base, args.steps) for name, overrides in variants(vocab).items()}
    rows = {BASELINE: run_baseline(root / f"demo_preset_{FULL}", base, args.steps, vocab), **rows}
    text = f"{demo.study_header(args.steps)}\n\n{table(rows)}\n"
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    headline = {name: {"kl_to_teacher": round(r["kl_to_teacher"], 5), "bytes_per_token": round(r["bytes_per_token"], 2),
                       "share_of_full_kd_gain": round(r["share"], 4)} for name, r in rows.items()}
    (root / "preset_study.json").write_text(json.dumps(headline, indent=1))  # scripts/bench_storage.py's quality column
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
