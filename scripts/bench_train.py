"""Phase-two benchmark: each training step's tokens/s and peak memory ÷ plain transformers CE.

    python scripts/bench_train.py                      # CPU: vocab-32,768 student, 8 × 512 tokens, synthetic targets
    python scripts/bench_train.py --repeats 5 --steps 4 --variants hf_ce,fused_kd
    python scripts/bench_train.py --gpu                # BENCHMARKS.md phase-two reference workload (bf16)
    python scripts/bench_train.py --cache              # the demo cache through the real reader (end-to-end)

Baseline ``hf_ce``: what a user would run without this project, the model's own
``model(input_ids, attention_mask, labels=input_ids)`` (transformers' lm_head over the whole
batch + its cross-entropy), backward, clip, AdamW. Every other variant is the trainer's own
``train_step`` on ``DistillStudent`` (α = 0.5), same student, same batch, same optimizer:
``chunked_ce`` (the project's CE path, α = 0), ``chunked_kd`` / ``fused_kd`` (CE + forward KL over
the top-64 + tail bucket, train.fused_loss never / always), ``chunked_sampled`` / ``fused_sampled``
(CE + KD on 64 draws), and with ``--gpu`` also ``triton_ce`` / ``triton_kd`` / ``triton_sampled``
(train.fused_loss=triton: the same fused loss from the Triton kernel, pipeline/kernels/). Each
(repeat, variant) runs in a fresh subprocess, interleaved
(hf_ce chunked_ce ... hf_ce chunked_ce ...); the table reports medians, ratios to hf_ce.

Workload (default, CPU): Qwen3-MoE from its config class with random weights, vocab 32,768,
hidden 256, 2 layers, 4/2 heads × 64, 4 experts top-2 (moe_intermediate 256), untied
embeddings, fp32, sdpa; one micro-batch of 8 × 512 random tokens; synthetic teacher targets
built in the worker (top-64 of random logits of std 3 + tail, 64 draws). ``--gpu``: the
BENCHMARKS.md phase-two student (vocab 151,936, hidden 1,024, 8 layers, 32 experts top-4),
8 × 1,024 tokens, bf16 autocast. Tokens are input tokens.

Peak memory on CPU: each variant runs in its own process; the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs right after the model, optimizer and
batch are built) over its resident set at that moment: activations, gradients, AdamW state,
loss temporaries (tracemalloc does not see torch's allocations; RSS does). It counts touched
pages, so treat differences of a few MiB as noise. On GPU: torch.cuda.max_memory_allocated.

The script prints the table, then one JSON line: {"baseline": "hf_ce", "variants": {name:
{"tok_s_ratio", "peak_ratio", "tok_s", "peak_mib"}}, ...}.
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

from pipeline.openmp import short_spin  # noqa: E402
from pipeline.quiet import quiet_progress_bars  # noqa: E402

short_spin()  # as run_pipeline.py: idle OpenMP workers do not spin for long (before torch loads)
quiet_progress_bars()

# name: (kd_loss or None for CE only; train.fused_loss); "hf_ce" is the model's own labels= loss
VARIANTS = {
    "hf_ce": None,
    "chunked_ce": (None, "never"),
    "chunked_kd": ("forward_kl", "never"),
    "fused_kd": ("forward_kl", "always"),
    "chunked_sampled": ("sampled", "never"),
    "fused_sampled": ("sampled", "always"),
    "triton_ce": (None, "triton"),
    "triton_kd": ("forward_kl", "triton"),
    "triton_sampled": ("sampled", "triton"),
}
GPU_ONLY = ("triton_ce", "triton_kd", "triton_sampled")  # the Triton kernel runs on CUDA (docs/kernels.md)
# --cache: the demo cache through the trainer's own setup and reader (the older end-to-end table)
CACHE_VARIANTS = {
    "ce": ["train.alpha=0", "train.router_weight=0", "train.source=cache", "train.fused_loss=never"],
    "kd": ["train.alpha=0.5", "train.router_weight=0", "train.fused_loss=never"],
    "fused_kd": ["train.alpha=0.5", "train.router_weight=0", "train.fused_loss=always"],
    "kd+router": ["train.alpha=0.5", "train.router_weight=0.1", "train.fused_loss=never"],
    "sampled": ["train.alpha=0.5", "train.router_weight=0", "train.kd_loss=sampled", "train.fused_loss=never"],
}


# --- assets (CPU) ------------------------------------------------------------------------------


def build_assets(root: Path, hidden: int) -> list[str]:
    """Demo data + tokenizer (BPE 2,048), random teacher, hidden-``hidden`` student; prepared and
    cached once (k 32, 64 draws, all router probs). Returns the config overrides of the run."""
    from pipeline.config import load_config
    from pipeline.demo import (
        save_tiny_model,
        stdlib_docstrings,
        tiny_config,
        train_tokenizer,
        write_jsonl,
    )
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


def measure(step, batches: list, warmup: int, device) -> tuple[float, float, int, float]:
    """(seconds per step, peak memory growth in bytes, tokens per step, process CPU seconds per step)
    over batches[warmup:]."""
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
    t0, cpu0 = time.perf_counter(), time.process_time()
    for micro in batches[warmup:]:
        step(micro)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    n = max(len(batches) - warmup, 1)
    return (time.perf_counter() - t0) / n, peak, tokens, (time.process_time() - cpu0) / n


def worker_cpu(variant: str, overrides: list[str], steps: int, warmup: int, loader_workers: int) -> dict:
    import torch

    from pipeline.batches import collate
    from pipeline.config import load_config
    from stages.config import PipelineConfig
    from stages.train_setup import setup
    from stages.train_student import make_accelerator

    torch.manual_seed(0)
    cfg = load_config(PipelineConfig, [], overrides + CACHE_VARIANTS[variant])
    accelerator = make_accelerator(cfg, cfg.run_dir / "bench_out")
    job = setup(cfg, accelerator)
    model, optimizer = accelerator.prepare(job.model, job.optimizer)
    stream = job.stream
    plan = stream.steps(0)[: warmup + steps]
    t0 = time.perf_counter()
    batches = [[collate(stream.load(mb)) for mb in stream.rank_micro_batches(s)] for s in plan]
    data_s = (time.perf_counter() - t0) / len(plan)
    model.train()
    step = step_fn(model, optimizer, cfg, accelerator)
    sec, peak, tokens, cpu = measure(step, batches, warmup, accelerator.device)
    return {"variant": variant, "data_s": data_s, "step_s": sec, "cpu_s": cpu, "peak_bytes": peak, "tokens": tokens,
            "rss_peak": peak_rss_bytes(), "loader_ratio": loader_of_compute(step, batches, stream, warmup, loader_workers)}


def loader_of_compute(step, batches: list, stream, warmup: int, workers: int, block: int = 5) -> float:
    """Throughput fed by the trainer's own loader (pipeline/batches.train_batches: ``workers`` DataLoader
    processes reading ahead, as train.num_workers), the waits for a micro-batch included, over the
    throughput on the same steps read beforehand (``batches``). Timed in alternating blocks of ``block``
    steps, so the machine's drift falls on both alike; during a pre-read block the workers sit idle with
    their read-ahead full. The first reads of every shard fall in these steps, as in the synchronous column."""
    from pipeline.batches import train_batches

    stream.source.reader.close()  # no decoded chunk to inherit: the workers start cold, as a run's do
    fed = train_batches(stream, num_workers=workers)  # the plan from the start: the same steps as ``batches``
    for _ in range(warmup):  # the workers start and open their shards
        step(next(fed)[2])
    pre_s = fed_s = 0.0
    timed = batches[warmup:]
    for i in range(0, len(timed), block):
        t0 = time.perf_counter()
        for micro in timed[i:i + block]:
            step(micro)
        t1 = time.perf_counter()
        for _ in timed[i:i + block]:
            step(next(fed)[2])
        pre_s, fed_s = pre_s + t1 - t0, fed_s + time.perf_counter() - t1
    return pre_s / fed_s


# --- the synthetic workload (CPU default, --gpu) ---------------------------------------------------

CPU_STUDENT = dict(vocab_size=32768, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=256, max_position_embeddings=1024, tie_word_embeddings=False)
GPU_STUDENT = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
                   moe_intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=False)


def synthetic_batch(vocab: int, batch: int, length: int, k: int, draws: int, device):
    """Random tokens and teacher targets in the trainer's batch layout (top-k of random logits of
    std 3 at tau = 1 with their log-partition, so the tail is exact; ``draws`` sampled ids)."""
    import torch

    from cache.schema import TeacherRecord

    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -1, device=device)], 1).reshape(-1)
    T, teacher = batch * length, {"topk_logprobs": [], "topk_ids": [], "draw_ids": [], "log_partition": []}
    for start in range(0, T, 1024):  # never a [T, V] fp32 tensor
        z = torch.randn(min(1024, T - start), vocab, device=device, generator=g) * 3
        top = torch.log_softmax(z, -1).topk(k, -1)
        teacher["topk_logprobs"].append(top.values)
        teacher["topk_ids"].append(top.indices)
        teacher["log_partition"].append(torch.logsumexp(z, -1, keepdim=True))
        teacher["draw_ids"].append(torch.multinomial(torch.softmax(z, -1), draws, replacement=True, generator=g))
    teacher = {key: torch.cat(v) for key, v in teacher.items()}
    teacher = TeacherRecord(draw_counts=torch.ones(T, draws, dtype=torch.int32, device=device), **teacher)  # repeats add up
    return {"input_ids": ids, "attention_mask": valid.long(), "valid": valid, "labels": labels,
            "loss_mask": labels >= 0, "sample_ids": torch.arange(batch, device=device), "teacher": teacher}


def hf_step(model, optimizer, accelerator, grad_clip: float):
    """The baseline: transformers' own loss (labels = input_ids, shifted inside the model)."""

    def step(micro):
        for mb in micro:
            with accelerator.autocast():
                loss = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                             labels=mb["input_ids"], use_cache=False).loss
            accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker_synthetic(variant: str, args) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from pipeline.losses import KDSpec
    from pipeline.optim import build_optimizer
    from pipeline.student import DistillStudent, LossWeights
    from stages.train_student import TrainConfig

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not args.gpu, mixed_precision="bf16" if args.gpu else "no")
    device = accelerator.device
    config = Qwen3MoeConfig(**(GPU_STUDENT if args.gpu else CPU_STUDENT))
    with device:  # initialised where it runs: the GPU student's 0.6B random weights in seconds, not on the host
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    batch, length = (8, 1024) if args.gpu else (8, 512)
    data = synthetic_batch(config.vocab_size, batch, length, 64, 64, device)
    kd_loss, fused = VARIANTS[variant] or (None, "never")
    tcfg = TrainConfig(alpha=0.5 if kd_loss else 0.0, kd_loss=kd_loss or "forward_kl", steps=100, warmup_steps=0,
                       loss_chunk_tokens=args.chunk_tokens, fused_loss=fused)
    if VARIANTS[variant] is None:
        optimizer, _ = build_optimizer(model, tcfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        step = hf_step(model, optimizer, accelerator, tcfg.grad_clip)
    else:
        spec = KDSpec(name=kd_loss) if kd_loss else None
        wrapped = DistillStudent(model, spec, config.vocab_size, tcfg.loss_chunk_tokens, fused=fused,
                                 weights=LossWeights.of(tcfg))
        optimizer, _ = build_optimizer(wrapped, tcfg)
        wrapped, optimizer = accelerator.prepare(wrapped, optimizer)

        class Cfg:
            train = tcfg

        step = step_fn(wrapped, optimizer, Cfg, accelerator)
    sec, peak, tokens, cpu = measure(step, [[data]] * (args.warmup + args.steps), args.warmup, device)
    return {"variant": variant, "data_s": 0.0, "step_s": sec, "cpu_s": cpu, "peak_bytes": peak, "tokens": tokens,
            "rss_peak": torch.cuda.max_memory_allocated() if args.gpu else peak_rss_bytes()}


# --- driver: interleaved subprocesses, medians, table ------------------------------------------------


def run_worker(args, variant: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--chunk-tokens", str(args.chunk_tokens)]
    cmd += ["--gpu"] if args.gpu else []
    if args.cache:
        cmd += ["--cache", "--overrides", json.dumps(overrides), "--loader-workers", str(args.loader_workers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:  # reported, and the variant left out of the table: one broken variant spoils no run
        print(f"worker {variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(results: dict[str, list[dict]]) -> dict[str, dict]:
    keys = ("data_s", "step_s", "cpu_s", "peak_bytes", "rss_peak", "loader_ratio")  # loader_ratio: --cache only
    return {v: {k: statistics.median(r[k] for r in rs) for k in keys if k in rs[0]}
            | {"tokens": rs[0]["tokens"]} for v, rs in results.items()}


def table(med: dict[str, dict], gib: bool, baseline: str) -> str:
    """Medians; "tok per CPU-s" divides by the process's CPU seconds (all threads): on a shared
    machine it is steadier than wall time. With --cache only: "end-to-end" adds the synchronous read;
    "loader-fed / compute" is the same steps fed by the trainer's DataLoader with --loader-workers workers,
    timed in blocks alternating with the pre-read ones."""
    base = med[baseline]
    unit, name = (2**30, "GiB") if gib else (2**20, "MiB")
    columns = [("tok/s", lambda m, r: f"{m['tokens'] / m['step_s']:,.0f}"),
               ("ratio", lambda m, r: f"{r['tok_s_ratio']:.2f}"),
               ("tok per CPU-s", lambda m, r: f"{m['tokens'] / max(m['cpu_s'], 1e-9):,.0f}"),
               ("ratio", lambda m, r: f"{r['cpu_ratio']:.2f}")]
    if "loader_ratio" in base:  # --cache: the reader's columns
        columns += [("end-to-end tok/s", lambda m, r: f"{m['tokens'] / (m['step_s'] + m['data_s']):,.0f}"),
                    ("ratio", lambda m, r: f"{r['e2e_ratio']:.2f}"),
                    ("end-to-end / compute", lambda m, r: f"{r['e2e_of_compute']:.3f}"),
                    ("loader-fed / compute", lambda m, r: f"{r['loader_of_compute']:.3f}")]
    columns += [("ms/step", lambda m, r: f"{m['step_s'] * 1e3:,.0f}"),
                (f"peak growth {name}", lambda m, r: f"{m['peak_bytes'] / unit:,.2f}"),
                ("ratio", lambda m, r: f"{r['peak_ratio']:.2f}"),
                (f"peak {'allocated' if gib else 'RSS'} {name}", lambda m, r: f"{m['rss_peak'] / unit:,.2f}")]
    lines = ["| variant | " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for v, m in med.items():
        r = ratios(m, base)
        lines.append(f"| {v} | " + " | ".join(cell(m, r) for _, cell in columns) + " |")
    return "\n".join(lines)


def ratios(m: dict, base: dict) -> dict:
    per = lambda x, key: x["tokens"] / max(x[key], 1e-9)
    e2e = lambda x: x["tokens"] / (x["step_s"] + x["data_s"])
    out = {"tok_s_ratio": per(m, "step_s") / per(base, "step_s"), "cpu_ratio": per(m, "cpu_s") / per(base, "cpu_s"),
           "peak_ratio": m["peak_bytes"] / base["peak_bytes"]}
    if "loader_ratio" not in m:  # the synthetic workloads read nothing
        return out
    return out | {"e2e_ratio": e2e(m) / e2e(base), "e2e_of_compute": m["step_s"] / (m["step_s"] + m["data_s"]),
                  "loader_of_compute": m["loader_ratio"]}  # the variant's own read cost, synchronous and loader-fed


def headline(med: dict[str, dict], baseline: str, args) -> dict:
    return {"baseline": baseline, "workload": "gpu" if args.gpu else "cache" if args.cache else "cpu",
            "repeats": args.repeats, "steps": args.steps,
            "variants": {v: {"tok_s": round(m["tokens"] / m["step_s"], 1),
                             "peak_mib": round(m["peak_bytes"] / 2**20, 1)}
                         | {k: round(x, 3) for k, x in ratios(m, med[baseline]).items()} for v, m in med.items()}}


def device_name(args) -> str:
    if not args.gpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="train.loss_chunk_tokens")
    p.add_argument("--variants", default="")
    p.add_argument("--gpu", action="store_true", help="BENCHMARKS.md's phase-two reference workload")
    p.add_argument("--cache", action="store_true", help="the demo cache through the real reader (baseline: ce)")
    p.add_argument("--hidden", type=int, default=256, help="--cache: student hidden size")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="--cache: DataLoader workers of the loader-fed run (train.num_workers)")
    p.add_argument("--root", default="runs/bench_train", help="--cache: where the demo assets go")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        out = (worker_cpu(args.worker, json.loads(args.overrides), args.steps, args.warmup, args.loader_workers)
               if args.cache
               else worker_synthetic(args.worker, args))
        print(json.dumps(out))
        return
    overrides = build_assets(Path(args.root).resolve(), args.hidden) if args.cache else []
    default = CACHE_VARIANTS if args.cache else [v for v in VARIANTS if args.gpu or v not in GPU_ONLY]
    variants = (args.variants or ",".join(default)).split(",")
    baseline = variants[0]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            out = run_worker(args, v, overrides)
            results[v] += [out] if out else []
            print(f"repeat {r + 1}/{args.repeats} {v}: {out}", file=sys.stderr, flush=True)
    failed = [v for v, rs in results.items() if not rs]
    if baseline in failed:
        raise SystemExit(f"the baseline {baseline} failed; no ratios to report")
    med = medians({v: rs for v, rs in results.items() if rs})
    if failed:
        print(f"failed (left out): {', '.join(failed)}")
    print(table(med, args.gpu, baseline))
    print(json.dumps(headline(med, baseline, args) | {"failed": failed, "device": device_name(args)}))


if __name__ == "__main__":
    main()
