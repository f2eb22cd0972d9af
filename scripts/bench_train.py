"""Phase-two benchmark: KD step tokens/s and peak memory ÷ the same student's CE-only step.

    python scripts/bench_train.py                      # CPU: demo-sized data, hidden-256 Qwen3-MoE student
    python scripts/bench_train.py --repeats 5 --steps 8 --hidden 128
    python scripts/bench_train.py --gpu                # BENCHMARKS.md phase-two reference workload

Variants (same student, same batches): ``ce`` (α = 0, β = 0), ``kd`` (CE + forward KL over the
cached top-32 + tail bucket), ``kd+router`` (+ router KL, β = 0.1, the demo's loss) and
``sampled`` (CE + KD on 64 cached draws). Each (repeat, variant) runs in a fresh subprocess,
interleaved (ce kd kd+router sampled ce kd ...), and the table reports medians.

In each subprocess: the trainer's own setup (stages.train_setup.setup + accelerate), the
step's micro-batches read from the cache through the real stream (ShardStream + collate,
0 workers) and timed alone ("data"), then warm-up steps and timed steps of the trainer's
own train_step + clip + AdamW ("compute"). Tokens are input tokens (attention mask).
End-to-end tok/s = tokens / (data + compute) (synchronous reading; workers would overlap it).

Peak memory on CPU: the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs right before the first step) over its resident set at that moment: activations, gradients, AdamW state and
the loss temporaries, not the weights or the preloaded batches. It counts pages, not
tensors, so treat small differences as noise. On GPU: torch.cuda.max_memory_allocated.

--gpu: Qwen3-MoE 8 layers, hidden 1,024, 16/4 heads, head_dim 64, 32 experts top-4,
moe_intermediate 384, vocab 151,936; 8 × 1,024 tokens, AdamW, bf16 autocast; synthetic
teacher targets (random top-64 of random logits, 64 draws, router top-8 of 8 MoE layers)
built on the device, no cache read (the data cost is the CPU table's concern).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "ce": ["train.alpha=0", "train.router_weight=0", "train.source=cache"],
    "kd": ["train.alpha=0.5", "train.router_weight=0"],
    "kd+router": ["train.alpha=0.5", "train.router_weight=0.1"],
    "sampled": ["train.alpha=0.5", "train.router_weight=0", "train.kd_loss=sampled"],
}


# --- assets (CPU) ------------------------------------------------------------------------------


def build_assets(root: Path, hidden: int) -> list[str]:
    """Demo data + tokenizer (BPE 2,048), random teacher, hidden-``hidden`` student; prepared and
    cached once (k 32, 64 draws, all router probs). Returns the config overrides of the run."""
    from pipeline.config import load_config
    from pipeline.demo import save_tiny_model, stdlib_docstrings, tiny_config, train_tokenizer, write_jsonl
    from stages import cache_teacher, prepare
    from stages.config import PipelineConfig
    from stages.demo import STUDENT, TEACHER

    data, tok_dir = root / "docstrings.jsonl", root / "tokenizer"
    teacher, student = root / "teacher", root / f"student_h{hidden}"
    if not tok_dir.exists():
        docs = stdlib_docstrings(max_docs=2500)
        write_jsonl(data, [{"prompt": f"{name}:", "response": doc} for name, doc in docs])
        train_tokenizer([f"{name}: {doc}" for name, doc in docs], 2048, tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if not teacher.exists():
        save_tiny_model(tiny_config("qwen3_moe", len(tokenizer), **TEACHER), teacher, tokenizer, seed=1)
    if not student.exists():
        shape = {**STUDENT, "hidden_size": hidden, "intermediate_size": 2 * hidden, "head_dim": hidden // 4,
                 "moe_intermediate_size": hidden}
        save_tiny_model(tiny_config("qwen3_moe", len(tokenizer), **shape), student, tokenizer, seed=2)
    overrides = [f"run.root={root}", "run.name=bench", "run.device=cpu", f"data.source={data}",
                 f"teacher.path={teacher}", f"student.path={student}", "data.max_length=128", "data.max_samples=800",
                 "cache.k=32", "cache.targets=topk+sampled", "cache.num_draws=64", "cache.router_topk=all",
                 "cache.batch_size=16", "cache.shard_tokens=65536", "cache.splits=[train]",
                 "train.batch_size=16", "train.shuffle_window=4096", "train.precision=fp32"]
    cfg = load_config(PipelineConfig, [], overrides)
    prepare.run(cfg)
    cache_teacher.run(cfg)
    return overrides


# --- one variant in one process ----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def step_fn(model, optimizer, cfg, accelerator):
    from stages.train_student import train_step

    def step(micro):
        parts = train_step(model, micro, cfg.train, accelerator)
        accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return parts

    return step


def measure(step, batches: list, warmup: int, device) -> tuple[float, float, int]:
    """(seconds per step, peak memory growth in bytes, tokens per step) over batches[warmup:]."""
    import torch

    tokens = int(sum(int(mb["attention_mask"].sum()) for mb in batches[0]))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset_peak_rss()  # the setup's own peak (imports, cache index, preloading) must not count
    for micro in batches[:warmup]:
        step(micro)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for micro in batches[warmup:]:
        step(micro)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    return (time.perf_counter() - t0) / max(len(batches) - warmup, 1), peak, tokens


def worker_cpu(variant: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch

    from pipeline.batches import collate
    from pipeline.config import load_config
    from stages.config import PipelineConfig
    from stages.train_setup import setup
    from stages.train_student import make_accelerator

    torch.manual_seed(0)
    cfg = load_config(PipelineConfig, [], overrides + VARIANTS[variant])
    accelerator = make_accelerator(cfg, cfg.run_dir / "bench_out")
    job = setup(cfg, accelerator)
    model, optimizer = accelerator.prepare(job.model, job.optimizer)
    stream = job.stream
    plan = stream.steps(0)[: warmup + steps]
    t0 = time.perf_counter()
    batches = [[collate(stream.load(mb)) for mb in stream.rank_micro_batches(s)] for s in plan]
    data_s = (time.perf_counter() - t0) / len(plan)
    model.train()
    sec, peak, tokens = measure(step_fn(model, optimizer, cfg, accelerator), batches, warmup, accelerator.device)
    return {"variant": variant, "data_s": data_s, "step_s": sec, "peak_bytes": peak, "tokens": tokens,
            "rss_peak": peak_rss_bytes()}


# --- GPU reference workload (synthetic teacher targets) ------------------------------------------

GPU_STUDENT = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
                   moe_intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=False)


def synthetic_batch(vocab: int, batch: int, length: int, k: int, draws: int, layers: int, experts: int, device):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    T = batch * length
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -1, device=device)], 1).reshape(-1)
    teacher = {"log_partition": torch.zeros(T, 1, device=device), "target_logprob": torch.zeros(T, device=device)}
    chunks = []
    for start in range(0, T, 1024):  # never a [T, V] fp32 tensor
        logits = torch.randn(min(1024, T - start), vocab, device=device, generator=g) * 3
        chunks.append(torch.log_softmax(logits, -1).topk(k, -1))
    teacher["topk_logprobs"] = torch.cat([c.values for c in chunks])
    teacher["topk_ids"] = torch.cat([c.indices for c in chunks])
    teacher["draw_ids"] = teacher["topk_ids"][:, :draws].contiguous()
    teacher["draw_weights"] = torch.full((T, draws), 1.0 / draws, device=device)
    r_logits = torch.randn(T, layers, experts, device=device, generator=g)
    top = torch.softmax(r_logits, -1).topk(8, -1)
    teacher["router_ids"], teacher["router_probs"] = top.indices, top.values
    return {"input_ids": ids, "attention_mask": valid.long(), "valid": valid, "labels": labels,
            "loss_mask": labels >= 0, "sample_ids": torch.arange(batch, device=device), "teacher": teacher}


def worker_gpu(variant: str, steps: int, warmup: int) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import Qwen3MoeConfig, AutoModelForCausalLM

    from pipeline.losses import KDSpec
    from pipeline.router import RouterCapture, router_family, uniform_layer_map
    from pipeline.student import DistillStudent
    from stages.train_student import TrainConfig, build_optimizer

    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    config = Qwen3MoeConfig(**GPU_STUDENT)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device)
    overrides = dict(a.split("=", 1) for a in VARIANTS[variant] if a.startswith("train.") and "source" not in a)
    tcfg = TrainConfig(alpha=float(overrides["train.alpha"]), router_weight=float(overrides["train.router_weight"]),
                       kd_loss=overrides.get("train.kd_loss", "forward_kl"), steps=100, warmup_steps=0,
                       loss_chunk_tokens=1024)
    capture, layer_map = None, None
    if tcfg.router_weight > 0:
        capture = RouterCapture(model, router_family(config))
        layer_map = uniform_layer_map(len(capture.layers), 8)
        capture.__enter__()
    spec = KDSpec(name=tcfg.kd_loss) if tcfg.alpha > 0 else None
    wrapped = DistillStudent(model, spec, (1.0,), config.vocab_size, tcfg.loss_chunk_tokens, capture, layer_map, 128)
    optimizer, _ = build_optimizer(wrapped, tcfg)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    batch = synthetic_batch(config.vocab_size, 8, 1024, 64, 64, 8, 128, device)

    class Cfg:
        train = tcfg

    sec, peak, tokens = measure(step_fn(wrapped, optimizer, Cfg, accelerator), [[batch]] * (warmup + steps), warmup,
                                device)
    return {"variant": variant, "data_s": 0.0, "step_s": sec, "peak_bytes": peak, "tokens": tokens,
            "rss_peak": torch.cuda.max_memory_allocated()}


# --- driver: interleaved subprocesses, medians, table ------------------------------------------------


def run_worker(args, variant: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--gpu"] if args.gpu else ["--overrides", json.dumps(overrides)])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]], gib: bool) -> str:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("data_s", "step_s", "peak_bytes", "rss_peak")}
           | {"tokens": rs[0]["tokens"]} for v, rs in results.items()}
    ce = med["ce"]
    unit = 2**30 if gib else 2**20
    name = "GiB" if gib else "MiB"
    lines = [f"| variant | compute tok/s | ratio | end-to-end tok/s | ratio | data ms/step | compute ms/step | "
             f"peak growth {name} | ratio | peak RSS {name} |", "|" + "---|" * 10]
    for v, m in med.items():
        comp, e2e = m["tokens"] / m["step_s"], m["tokens"] / (m["step_s"] + m["data_s"])
        comp_ce, e2e_ce = ce["tokens"] / ce["step_s"], ce["tokens"] / (ce["step_s"] + ce["data_s"])
        lines.append(f"| {v} | {comp:,.0f} | {comp / comp_ce:.2f} | {e2e:,.0f} | {e2e / e2e_ce:.2f} | "
                     f"{m['data_s'] * 1e3:.1f} | {m['step_s'] * 1e3:.1f} | {m['peak_bytes'] / unit:.2f} | "
                     f"{m['peak_bytes'] / ce['peak_bytes']:.2f} | {m['rss_peak'] / unit:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256, help="CPU student hidden size")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--root", default="runs/bench_train")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        out = (worker_gpu(args.worker, args.steps, args.warmup) if args.gpu
               else worker_cpu(args.worker, json.loads(args.overrides), args.steps, args.warmup))
        print(json.dumps(out))
        return
    overrides = [] if args.gpu else build_assets(Path(args.root).resolve(), args.hidden)
    variants = args.variants.split(",")
    assert variants[0] == "ce", "the first variant is the CE-only baseline"
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            results[v].append(run_worker(args, v, overrides))
            print(f"repeat {r + 1}/{args.repeats} {v}: {results[v][-1]}", file=sys.stderr, flush=True)
    print(table(results, gib=args.gpu))


if __name__ == "__main__":
    main()
