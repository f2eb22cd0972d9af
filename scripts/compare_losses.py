"""KD-loss study on the embedded demo (issue 4): the demo student trained once per KD loss of
the catalogue that the demo cache supports, plus the CE-only baseline (alpha = 0); same cache,
budget and seed; each evaluated on the held-out split.

    python scripts/compare_losses.py                              # builds/reuses the demo under runs/
    OMP_NUM_THREADS=1 python scripts/compare_losses.py --root /tmp/demo_runs --steps 60 --out docs/loss_study.md

The demo (stages/demo.py) is run first unless its teacher and caches exist, so its assets,
teacher and caches are reused. Each variant is a run ``demo_loss_<name>`` beside the demo's
that trains and evaluates on the demo run's data/, cache/ and cache_eval/ in place
(``run.inputs_from``: nothing is copied, re-prepared or re-cached), trained from
configs/demo.yaml with ``train.kd_loss=<name>``; the CE-only baseline (``ce_only``: alpha = 0)
reads the same cache so that it sees the same batches;

``bild_semantics`` is BiLD's recipe (bild at tau = 3 on response tokens, no tau², alpha = 1,
forward KL at tau = 1 on prompt tokens, a mean over them: train.prompt_kl_weight = 1). Every
variant has the router KL off (train.router_weight=0), so the rows differ only in the
token-level loss.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import demo  # noqa: E402  (after the path set-up: scripts run from a checkout)
from stages.evaluate import BOUND  # noqa: E402

COMMON = ["train.router_weight=0", "eval.before=false", "eval.rouge_samples=0"]
BASELINE = "ce_only"  # alpha = 0: the student on the data alone
EXTRA = {"bild_semantics": ["train.kd_loss=bild", "train.alpha=1", "train.prompt_kl_weight=1",
                            "train.temperature=3"]}  # BiLD's recipe, at its tau (bild gets no tau²)
# NormKD's per-token temperatures are never cached: its tail bucket is the one-token approximation
# (docs/losses.md), which the trainer refuses unless asked.
OPT_IN = {"normkd": ["train.allow_uncached_temperature=true"]}


def supported_losses(cache: Path) -> list[str]:
    """KD_LOSSES names the cache has targets for: 'sampled' needs draws, the others the top-k."""
    from pipeline.losses import KD_LOSSES

    targets = json.loads((cache / "manifest.json").read_text())["identity"]["targets"]
    return [name for name in KD_LOSSES if ("sampled" if name == "sampled" else "topk") in targets]


def variant_overrides(name: str, steps: int) -> list[str]:
    # The baseline reads the same cache (its KD part unused), so every variant sees the same batches.
    if name == BASELINE:
        loss = ["train.alpha=0", "train.source=cache"]
    else:
        loss = EXTRA.get(name, [f"train.kd_loss={name}"]) + OPT_IN.get(name, [])
    budget = [f"train.steps={steps}", f"train.checkpoint_every={steps}"] if steps else []
    return COMMON + budget + loss + [f"run.name=demo_loss_{name}"]


def tokens_per_second(train_dir: Path) -> float:
    """Median of the logged intervals' tok/s (the first interval also holds the start-up)."""
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line]
    rates = [r["tok_s"] for r in rows[1:]] or [r["tok_s"] for r in rows]
    return statistics.median(rates)


def run_variant(name: str, base: list[str], steps: int, demo_dir: Path) -> dict:
    from stages import evaluate, train_student

    cfg = demo.run_config("demo.yaml", base + variant_overrides(name, steps) + [demo.inputs_from(demo_dir)])
    start = time.time()

    print(f"== variant {name} ({cfg.train.steps} steps)", flush=True)
    train_student.run(cfg)
    results = evaluate.run(cfg)["after"]
    results["tok_s"] = tokens_per_second(cfg.run_dir / "train")
    results["seconds"] = round(time.time() - start)
    return results


def table(rows: dict[str, dict]) -> str:
    lines = ["| loss | perplexity | KL to teacher (full vocabulary) | top-k+tail KL (lower bound) | top-1 agreement "
             "| overlap@8 | overlap@32 | train tok/s |", "|" + "---|" * 8]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r.get('kl_to_teacher', float('nan')):.4f} | {r[BOUND]:.4f} "
                     f"| {r['top1_agreement']:.4f} | {r.get('overlap@8', float('nan')):.4f} "
                     f"| {r.get('overlap@32', float('nan')):.4f} | {r['tok_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = demo.study_parser(__doc__)
    parser.add_argument("--losses", nargs="*", default=[],
                        help=f"a subset of the KD losses (and/or {BASELINE}, {', '.join(EXTRA)}); default: all")
    args = demo.study_args(parser)
    root = Path(args.root)
    base = [f"run.root={root}"] + demo.demo_overrides(root)
    demo_dir = root / "demo"
    allowed = [BASELINE] + supported_losses(demo_dir / "cache") + list(EXTRA)
    unknown = sorted(set(args.losses) - set(allowed))
    if unknown:
        raise SystemExit(f"--losses: {', '.join(unknown)} not available with the demo cache; choose from {allowed}")
    names = [n for n in allowed if n in args.losses] if args.losses else allowed
    rows = {name: run_variant(name, base, args.steps, demo_dir) for name in names}
    text = f"{demo.study_header(args.steps)}\n\n{table(rows)}\n"
    print(text, flush=True)
    (root / "loss_study.json").write_text(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
