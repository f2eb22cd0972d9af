"""Study: a weight-space-initialised student (SVD projection, or the teacher's sub-matrices) against a
randomly initialised one, on the demo.

    python scripts/compare_init.py --root runs --out docs/init_study_table.md

All variants are the demo's student shape (stages/demo.py STUDENT), trained with the demo's
loss (configs/demo.yaml) on the demo's cache (read in place: run.inputs_from) for the same
steps and seed. "random" starts from the demo's random student; "svd" and "slice" start from
the init stage's projection of the demo's trained teacher into that shape (init.mode=full,
init.projection=svd or slice).
Evaluate reports each student at step 0 ("before") and after training ("after"): held-out
perplexity, the full-vocabulary KL to the teacher (the teacher is run on the eval split), the
cached top-k + tail-bucket lower bound of it, and top-1 agreement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import demo  # noqa: E402  (after the path set-up: scripts run from a checkout)

COMMON = ["eval.rouge_samples=0"]
INIT_VARIANTS = ("svd", "slice")  # init.projection of the initialised variants
VARIANTS = ("random",) + INIT_VARIANTS


def run_variant(name: str, base: list[str], steps: int, demo_dir: Path) -> dict:
    from stages import evaluate, init_student, train_student

    budget = [f"train.steps={steps}", f"train.checkpoint_every={steps}"] if steps else []
    init = [f"init.projection={name}"] if name in INIT_VARIANTS else []
    cfg = demo.run_config("demo.yaml", base + COMMON + budget + init + [f"run.name=demo_init_{name}",
                                                                         demo.inputs_from(demo_dir)])

    if name in INIT_VARIANTS:
        cfg.student.path = str(init_student.run_stage(cfg))
    print(f"== variant {name} ({cfg.train.steps} steps)", flush=True)
    train_student.run(cfg)
    return evaluate.run(cfg)


def table(rows: dict[str, dict], steps: int) -> str:
    lines = ["| init | step | perplexity | KL to teacher (full vocabulary) | top-k + tail bound | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for name, results in rows.items():
        for when, label in (("before", "0"), ("after", str(steps))):
            r = results[when]
            kl = f"{r['kl_to_teacher']:.4f}" if "kl_to_teacher" in r else "not measured"
            lines.append(f"| {name} | {label} | {r['perplexity']:.2f} | {kl} | {r['kl_topk_bucket_lower_bound']:.4f} "
                         f"| {r['top1_agreement']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    args = demo.study_args(demo.study_parser(__doc__))
    root = Path(args.root)
    base = [f"run.root={root}"] + demo.demo_overrides(root)
    rows = {name: run_variant(name, base, args.steps, root / "demo") for name in VARIANTS}
    steps = args.steps or demo.run_config("demo.yaml", []).train.steps
    text = f"machine: {demo.machine()}\n\n{table(rows, steps)}\n"
    print(text, flush=True)
    (root / "init_study.json").write_text(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
