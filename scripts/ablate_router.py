"""Router-loss ablation on the embedded demo (issue 5): full, without MC exploration, without
ERD, without any router loss; same cache, budget and seed; each evaluated on the held-out split.

    python scripts/ablate_router.py                    # builds/reuses the demo under runs/
    python scripts/ablate_router.py --root runs_router --demo-root runs --out docs/router_study.md

The demo (stages/demo.py) is run first unless its teacher and caches exist, so its assets,
teacher and caches are reused. Each variant is a run ``router_<variant>`` that trains and
evaluates on the demo run's data/, cache/ and cache_eval/ in place (``run.inputs_from``), from
configs/demo.yaml with the variant's train.* overrides. The demo's own student (β·router KL =
0.1) is re-evaluated as a reference (its train/ linked).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import demo  # noqa: E402  (after the path set-up: scripts run from a checkout)
from stages.evaluate import BOUND  # noqa: E402

COMMON = ["train.router_weight=0", "eval.before=false", "eval.rouge_samples=0"]
ROUTER_ON = {"router_erd_weight": 0.1, "router_mc_weight": 0.1, "router_aux_weight": 0.01}
VARIANTS = {
    "full": ROUTER_ON,
    "no_mc": {**ROUTER_ON, "router_mc_weight": 0.0},
    "no_erd": {**ROUTER_ON, "router_erd_weight": 0.0},
    "no_router": dict.fromkeys(ROUTER_ON, 0.0),
}


def variant_config(name: str, weights: dict, base: list[str], steps: int = 0):
    budget = [f"train.steps={steps}", f"train.checkpoint_every={steps}"] if steps else []
    overrides = base + COMMON + budget + [f"run.name=router_{name}"] + [f"train.{k}={v}" for k, v in weights.items()]
    return demo.run_config("demo.yaml", overrides)


def run_variant(name: str, weights: dict, base: list[str], demo_dir: Path, steps: int = 0) -> dict:
    from stages import evaluate, train_student

    cfg = variant_config(name, weights, base + [demo.inputs_from(demo_dir)], steps)
    start = time.time()
    print(f"== variant {name}: {' '.join(f'{k}={v}' for k, v in weights.items())}", flush=True)
    final = train_student.run(cfg)
    results = evaluate.run(cfg)["after"]
    tau = final / "router_temperature.json"
    results["router_temperature"] = json.loads(tau.read_text())["router_temperature"] if tau.exists() else None
    results["seconds"] = round(time.time() - start)
    return results


def demo_row(base: list[str], demo_dir: Path) -> dict:
    """The demo's own student (β·router KL = 0.1, same cache, budget, seed) re-evaluated here, so
    its row has the expert-load metrics too: its train/ is linked, never retrained."""
    from stages import evaluate

    cfg = variant_config("kl_demo", {"router_weight": 0.1}, base + [demo.inputs_from(demo_dir)])
    demo.link_student(demo_dir, cfg.run_dir)
    return evaluate.run(cfg)["after"]


def table(rows: dict[str, dict]) -> str:
    head = ("| variant | perplexity | KL to teacher (full vocabulary) | top-k+tail KL (lower bound) | top-1 agreement "
            "| load CV | dead experts | router entropy | τ_r (per layer) |")
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        tau = ", ".join(f"{t:.3f}" for t in r["router_temperature"]) if r.get("router_temperature") else "–"
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r.get('kl_to_teacher', float('nan')):.4f} | {r[BOUND]:.4f} "
                     f"| {r['top1_agreement']:.4f} | {r.get('load_cv', float('nan')):.3f} "
                     f"| {r.get('dead_experts', float('nan')):.3f} | {r.get('router_entropy', float('nan')):.3f} "
                     f"| {tau} |")
    return "\n".join(lines)


def main() -> None:
    parser = demo.study_parser(__doc__, root_help="where the variants' runs go")
    parser.add_argument("--demo-root", default="", help="where the demo's runs are (default: --root)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = demo.study_args(parser)
    root, demo_root = Path(args.root), Path(args.demo_root or args.root)
    base = [f"run.root={root}"] + demo.demo_overrides(demo_root)
    demo_dir = demo_root / "demo"
    rows = {name: run_variant(name, VARIANTS[name], base, demo_dir, args.steps) for name in args.variants}
    from pipeline.state import read_state

    if (read_state(demo_dir, "train") or {}).get("status") == "done":  # the demo's own student, if trained by now
        rows["demo: β·router KL 0.1"] = demo_row(base, demo_dir)
    text = f"{demo.study_header(args.steps)}\n\n{table(rows)}\n"
    print(text, flush=True)
    (root / "router_ablation.json").write_text(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
