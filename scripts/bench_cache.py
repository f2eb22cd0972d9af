"""Phase-one benchmark: cached tokens/s ÷ the same engine's forward-with-logits tokens/s.

    python scripts/bench_cache.py                          # CPU: tiny Qwen3-MoE, ~5 min on 2 cores
    python scripts/bench_cache.py --store hdf5 --targets topk+sampled --repeats 5
    python scripts/bench_cache.py --gpu                    # BENCHMARKS.md reference workload, torch and Triton extraction

Four variants run on the same batches, interleaved (A B C D A B C D ...) after a warm-up,
and the table reports medians: the bare forward with logits, the forward with router capture,
``HFTeacher.score`` (+ extraction, no writing) and full phase one
(``stages.cache_teacher.run_batches``: score + encode + compress + write shards through
``CacheWriter`` and the real store, the writer drained at the end); ``--extract-kernels
torch,triton`` (the ``--gpu`` default) adds the last two with ``cache.extract_kernel=triton``
(pipeline/kernels/extract.py), whose cache the storage and codec figures then read (the codec
error compares it with the torch path's exact top-k). Then it reports bytes per token per stored
field, the codec's error against the exact top-k, and a breakdown of phase one's time by part
(each part timed alone, synchronously). The last line is one JSON object with the ratios.

CPU model: a byte-level BPE trained on the stdlib's docstrings and a Qwen3-MoE built from
its config class, saved and loaded through the real ``from_pretrained`` path. ``--gpu``
builds the 8-layer Qwen3-30B-A3B-shaped model with random bf16 weights on the device and
hands it to the teacher in place of ``from_pretrained`` (writing and re-reading ~11 GB of
random weights measures nothing), with random token ids.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.openmp import short_spin  # noqa: E402
from pipeline.quiet import quiet_progress_bars  # noqa: E402

short_spin()  # as run_pipeline.py does, before torch loads
quiet_progress_bars()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cache.codec import PRESETS, Codec, frequency_order  # noqa: E402
from cache.reader import CacheReader  # noqa: E402
from cache.shards import checksum, get_store, open_shard, resolve_compression  # noqa: E402
from cache.writer import CacheWriter, assemble_shard, finalize  # noqa: E402
from pipeline.distributed import Dist  # noqa: E402
from pipeline.teachers.base import TeacherBatch, TeacherConfig  # noqa: E402
from pipeline.teachers.extract import TARGETS, ExtractSpec  # noqa: E402
from stages.cache_teacher import make_batch, run_batches  # noqa: E402

CPU_SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                 moe_intermediate_size=256, max_position_embeddings=2048)
CODEC = Codec()  # main sets the --preset's, with the vocabulary ranked by the benchmark's own tokens
GPU_SHAPE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                 num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=4096,
                 norm_topk_prob=True, decoder_sparse_step=1, tie_word_embeddings=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="zarr", choices=("zarr", "hdf5"))
    p.add_argument("--targets", default="topk", choices=TARGETS)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--preset", default="balanced", choices=tuple(PRESETS), help="cache.preset: the codec")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median reported)")
    p.add_argument("--batches", type=int, default=8, help="batches per repeat")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per batch (default 8 CPU, 4 GPU)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default 512 CPU, 2048 GPU)")
    p.add_argument("--vocab", type=int, default=8192, help="CPU: BPE vocabulary to train")
    p.add_argument("--shard-batches", type=int, default=0,
                   help="batches per shard (default: a repeat's batches, one shard; cache.shard_tokens' default "
                        "262,144 holds 64 CPU batches, so smaller shards overstate the per-shard costs)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--gpu", action="store_true", help="the reference GPU workload of BENCHMARKS.md")
    p.add_argument("--extract-kernels", default="",
                   help="torch (the teacher's auto choice) and/or triton, comma-separated (default: torch; "
                        "torch,triton with --gpu): each kernel's score and full phase one, side by side")
    args = p.parse_args(argv)
    args.extract_kernels = (args.extract_kernels or ("torch,triton" if args.gpu else "torch")).split(",")
    if not set(args.extract_kernels) <= {"torch", "triton"} or "torch" not in args.extract_kernels:
        p.error(f"--extract-kernels {','.join(args.extract_kernels)}: torch, optionally with triton")
    args.batch_size = args.batch_size or (4 if args.gpu else 8)
    args.seq_len = args.seq_len or (2048 if args.gpu else 512)
    args.shard_batches = args.shard_batches or args.batches
    return args


# --- setup ---------------------------------------------------------------------------------


def cpu_teacher(args, tmp: Path, spec_kw: dict):
    """Tokenizer + tiny Qwen3-MoE saved and loaded back; the docstrings as packed sequences."""
    from pipeline.demo import save_tiny_model, stdlib_docstrings, tiny_config, train_tokenizer
    from pipeline.teachers.hf import HFTeacher

    texts = [doc for _, doc in stdlib_docstrings(max_docs=100_000)]
    tok = train_tokenizer(texts, args.vocab, tmp / "tokenizer")
    vocab = len(tok)
    path = save_tiny_model(tiny_config("qwen3_moe", vocab, **CPU_SHAPE), tmp / "teacher", tok)
    teacher = HFTeacher(TeacherConfig(path=str(path)), ExtractSpec(vocab_limit=vocab, **spec_kw), torch.device("cpu"))
    flat = np.concatenate([np.array(ids + [tok.eos_token_id]) for ids in tok(texts)["input_ids"]])
    shape = (f"Qwen3-MoE (CPU, fp32): vocab {vocab} (BPE on stdlib docstrings), hidden 256, 4 layers, "
             f"4/2 heads x 64, 16 experts top-2, moe_intermediate 256")
    return teacher, flat, shape


def gpu_teacher(args, spec_kw: dict):
    """The BENCHMARKS.md reference teacher, random bf16 weights built on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    import pipeline.teachers.hf as hf

    cfg = Qwen3MoeConfig(**GPU_SHAPE)
    device = torch.device("cuda")
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    hf.load_causal_lm = lambda *a, **kw: model  # the teacher takes the built model as if loaded
    teacher = hf.HFTeacher(TeacherConfig(path="random-qwen3-30b-a3b-8l", dtype="bfloat16"),
                           ExtractSpec(vocab_limit=cfg.vocab_size, **spec_kw), device)
    need = args.batches * args.batch_size * args.seq_len
    flat = np.random.default_rng(0).integers(0, cfg.vocab_size, size=need * 2)
    shape = ("Qwen3-MoE shaped like Qwen3-30B-A3B, 8 layers (GPU, bf16, sdpa): vocab 151,936, hidden 2,048, "
             "32/4 heads x 128, 128 experts top-8, moe_intermediate 768, random weights")
    return teacher, flat, shape


class Columns:
    """What the cache stage reads of a numpy-formatted datasets.Dataset (its length, a column by
    name, rows by a list of indices), for a --gpu machine whose datasets does not import."""

    def __init__(self, **columns: np.ndarray):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["sample_id"])

    def __getitem__(self, key):
        return self.columns[key] if isinstance(key, str) else {k: v[key] for k, v in self.columns.items()}


def packed_dataset(flat: np.ndarray, args):
    """Fixed-length sequences cut from the token stream, as the prepare stage stores them."""
    n = args.batches * args.batch_size
    if len(flat) < n * args.seq_len:
        raise SystemExit(f"only {len(flat)} tokens of text for {n} x {args.seq_len}; lower --batches")
    seqs = flat[: n * args.seq_len].reshape(n, args.seq_len).astype(np.int64)
    columns = {"sample_id": np.arange(n), "input_ids": seqs, "loss_mask": np.ones_like(seqs, dtype=np.uint8)}
    try:
        import datasets
    except ImportError as err:  # a GPU image's pyarrow can be older than datasets wants; the batches are the same
        print(f"datasets does not import ({err}); plain columns instead", file=sys.stderr)
        return Columns(**columns)
    return datasets.Dataset.from_dict({k: list(v) if v.ndim > 1 else v for k, v in columns.items()}).with_format("numpy")


# --- timed variants ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_mask(batch: TeacherBatch, device: torch.device) -> torch.Tensor:
    positions = torch.arange(batch.input_ids.shape[1], device=device)
    return (positions[None, :] < batch.lengths.to(device)[:, None]).long()


@torch.inference_mode()
def forward_logits(teacher, batches: list[TeacherBatch]) -> None:
    for batch in batches:
        ids = batch.input_ids.to(teacher.device)
        teacher.model(input_ids=ids, attention_mask=attention_mask(batch, teacher.device), use_cache=False).logits
    sync(teacher.device)


@torch.inference_mode()
def forward_router(teacher, batches: list[TeacherBatch]) -> None:
    for batch in batches:
        ids, mask = batch.input_ids.to(teacher.device), attention_mask(batch, teacher.device)
        with teacher.capture:
            teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        teacher._router(teacher.capture.pop(), mask)
    sync(teacher.device)


@torch.inference_mode()
def score_only(teacher, batches: list[TeacherBatch]) -> None:
    for batch in batches:
        teacher.score(batch)


def triton_teacher(teacher):
    """The same teacher (model, router capture) with cache.extract_kernel=triton."""
    from pipeline.teachers.native import resolve_kernel

    tri = copy.copy(teacher)
    tri.spec = replace(teacher.spec, kernel=resolve_kernel("triton", teacher.device))
    return tri


def new_writer(out_dir: Path, args, teacher) -> CacheWriter:
    return CacheWriter(out_dir, rank=0, identity={"bench": True, "codec": CODEC.to_dict()}, store=args.store, codec=CODEC,
                       shard_tokens=args.shard_batches * args.batch_size * args.seq_len, chunk_tokens=4096,
                       compression=resolve_compression(args.store, "auto"), level=3,
                       num_experts=teacher.num_experts)


def phase_one(teacher, ds, args, out_dir: Path) -> None:
    """What the cache stage does for these batches, the writer drained before the clock stops."""
    rows = [np.arange(i, i + args.batch_size) for i in range(0, len(ds), args.batch_size)]
    run_batches(teacher, ds, rows, new_writer(out_dir, args, teacher), Dist(0, 1, teacher.device), "bench")


def interleaved(variants: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One warm-up run of each, then A B C A B C ...; wall and process-CPU seconds per run.

    CPU seconds (all threads of this process) are the robust figure on a shared, loaded
    machine; wall seconds are what a quiet machine would see, background writing overlapped.
    """
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in wall.items()),
              file=sys.stderr, flush=True)
    return wall, cpu


# --- storage and codec error ---------------------------------------------------------------


def bytes_per_token(cache_dir: Path, store: str, n_tokens: int) -> dict[str, float]:
    manifest = finalize(cache_dir, {"bench": True, "codec": CODEC.to_dict()}, store, [])
    per_field: dict[str, int] = {}
    for info in manifest.shards:
        shard = open_shard(cache_dir, store, info.name)
        for name in shard.keys():
            per_field[name] = per_field.get(name, 0) + shard.stored_nbytes(name)
        shard.close()
    out = {name: nbytes / n_tokens for name, nbytes in sorted(per_field.items())}
    out["total (fields)"] = sum(per_field.values()) / n_tokens
    out["total (on disk)"] = sum(info.nbytes for info in manifest.shards) / n_tokens
    return out


def by_id(ids_TK: np.ndarray, lp_TK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids_TK, axis=1, kind="stable")
    return np.take_along_axis(ids_TK, order, 1), np.take_along_axis(lp_TK.astype(np.float64), order, 1)


def topk_kl(p_lp_TK: np.ndarray, q_lp_TK: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) per position over the top-k entries plus the tail bucket (1 - their mass)."""
    p, q = np.exp(p_lp_TK), np.exp(q_lp_TK)
    p_tail, q_tail = np.clip(1 - p.sum(1), 1e-12, None), np.clip(1 - q.sum(1), 1e-12, None)
    return (p * (p_lp_TK - q_lp_TK)).sum(1) + p_tail * np.log(p_tail / q_tail)


def codec_error(teacher, ds, args, cache_dir: Path) -> dict[str, float]:
    """Stored (decoded from the shards) against exact (the teacher's fp32 top-k) log-probs."""
    reader = CacheReader(cache_dir)
    stored = {int(s): None for s in ds["sample_id"]}
    for info in reader.shards:
        out = reader.read_shard(info.name)
        bounds = np.concatenate([[0], np.cumsum(out.seq_lens)])
        for i, sid in enumerate(out.sample_ids):
            stored[int(sid)] = (out.teacher.topk_ids[bounds[i]:bounds[i + 1]],
                                out.teacher.topk_logprobs[bounds[i]:bounds[i + 1]])
    deltas, kls, mismatched = [], [], 0
    for i in range(0, len(ds), args.batch_size):
        exact = teacher.score(make_batch(ds, np.arange(i, i + args.batch_size), pad_id=0))
        ex_ids, ex_lp = by_id(exact.teacher.topk_ids, exact.teacher.topk_logprobs)
        st_ids, st_lp = by_id(*(np.concatenate(p) for p in zip(*(stored[int(s)] for s in exact.sample_ids))))
        mismatched += int((ex_ids != st_ids).any(1).sum())
        deltas.append(np.abs(ex_lp - st_lp).ravel())
        kls.append(topk_kl(ex_lp, st_lp))
    reader.close()
    delta, kl = np.concatenate(deltas), np.concatenate(kls)
    return {"mean |d logprob|": delta.mean(), "max |d logprob|": delta.max(), "mean KL(exact||stored)": kl.mean(),
            "max KL(exact||stored)": kl.max(), "positions with other ids": mismatched}


# --- breakdown -----------------------------------------------------------------------------


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


@torch.inference_mode()
def breakdown(teacher, ds, args, tmp: Path) -> dict[str, float]:
    """Seconds per part of phase one over all batches, each part run alone (no overlap)."""
    parts = dict.fromkeys(["make_batch", "forward + router capture", "router probs + top-k",
                           "extract (top-k, logsumexp, target, draws)", "to numpy (_output)",
                           "assemble_shard (encode)", "write_shard (compress + write)", "checksum"], 0.0)
    dev, records = teacher.device, []
    for i in range(0, len(ds), args.batch_size):
        t, batch = timed(lambda: make_batch(ds, np.arange(i, i + args.batch_size), pad_id=0), dev)
        parts["make_batch"] += t
        ids, mask = batch.input_ids.to(dev), attention_mask(batch, dev)

        def fwd():
            with teacher.capture:
                return teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        t, logits = timed(fwd, dev)
        parts["forward + router capture"] += t
        t, router = timed(lambda: teacher._router(teacher.capture.pop(), mask), dev)
        parts["router probs + top-k"] += t
        t, per_seq = timed(lambda: [teacher._sequence(logits[b], ids[b], batch, b) for b in range(len(batch.lengths))], dev)
        parts["extract (top-k, logsumexp, target, draws)"] += t
        t, out = timed(lambda: teacher._output(batch, per_seq, router), dev)
        parts["to numpy (_output)"] += t
        records.append(out)
    for s in range(0, len(records), args.shard_batches):
        t, arrays = timed(lambda: assemble_shard(records[s:s + args.shard_batches], CODEC, teacher.num_experts), dev)
        parts["assemble_shard (encode)"] += t
        path = tmp / f"b{s}{get_store(args.store).SUFFIX}"
        t, _ = timed(lambda: get_store(args.store).write_shard(path, arrays, 4096,
                                                               resolve_compression(args.store, "auto"), 3), dev)
        parts["write_shard (compress + write)"] += t
        t, _ = timed(lambda: checksum(path), dev)
        parts["checksum"] += t
    return parts


# --- report --------------------------------------------------------------------------------


def print_report(args, shape, n_tokens, times, cpu, storage, error, parts) -> None:
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    base, base_cpu = med["forward with logits"], med_cpu["forward with logits"]
    print(f"\n{shape}\nbatches {args.batches} x {args.batch_size} x {args.seq_len} tokens per repeat, k={args.k}, "
          f"targets={args.targets}, store={args.store}, torch threads {torch.get_num_threads()}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}, "
          f"median of {args.repeats} interleaved repeats after a warm-up\n")
    print("| what | tok/s (wall) | ratio (wall) | tok per CPU-s | ratio (CPU time) | wall runs (s) |\n"
          "|---|---|---|---|---|---|")
    for name, t in med.items():
        runs = " ".join(f"{x:.2f}" for x in times[name])
        print(f"| {name} | {n_tokens / t:,.0f} | {base / t:.3f} | {n_tokens / med_cpu[name]:,.0f} | "
              f"{base_cpu / med_cpu[name]:.3f} | {runs} |")
    print("\n| field | bytes/token |\n|---|---|")
    for name, b in storage.items():
        print(f"| {name} | {b:.2f} |")
    if error:
        print("\n| codec error (stored vs exact top-k) | value |\n|---|---|")
        for name, v in error.items():
            print(f"| {name} | {v:.3g} |")
    total = sum(parts.values())
    print("\n| phase-one part (alone, no overlap) | s | share |\n|---|---|---|")
    for name, t in parts.items():
        print(f"| {name} | {t:.3f} | {t / total:.1%} |")
    device = torch.cuda.get_device_name() if args.gpu else "cpu"
    print(json.dumps({"workload": "gpu" if args.gpu else "cpu", "device": device, "tokens": n_tokens,
                      "forward_tok_s": round(n_tokens / base, 1),
                      "ratio_wall": {name: round(base / t, 4) for name, t in med.items()},
                      "ratio_cpu": {name: round(base_cpu / t, 4) for name, t in med_cpu.items()}}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec_kw = dict(k=args.k, temperatures=(1.0,), targets=args.targets, chunk_tokens=1024,
                   router_topk="all")
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp_name:
        tmp = Path(tmp_name)
        teacher, flat, shape = gpu_teacher(args, spec_kw) if args.gpu else cpu_teacher(args, tmp, spec_kw)
        ds = packed_dataset(flat, args)
        global CODEC
        vocab = teacher.spec.vocab_limit or teacher.vocab_size
        CODEC = Codec.for_preset(args.preset, vocab, frequency_order(np.concatenate(list(ds["input_ids"])), vocab))
        batches = [make_batch(ds, np.arange(i, i + args.batch_size), pad_id=0) for i in range(0, len(ds), args.batch_size)]
        runs = iter(range(1_000_000))
        variants = {
            "forward with logits": lambda: forward_logits(teacher, batches),
            "+ router capture": lambda: forward_router(teacher, batches),
            "+ extraction (score, no writer)": lambda: score_only(teacher, batches),
            "full phase one": lambda: phase_one(teacher, ds, args, tmp / f"cache{next(runs)}"),
        }
        if "triton" in args.extract_kernels:  # last: the storage and codec figures then read its cache
            tri = triton_teacher(teacher)
            variants["+ extraction, triton kernel"] = lambda: score_only(tri, batches)
            variants["full phase one, triton kernel"] = lambda: phase_one(tri, ds, args, tmp / f"cache{next(runs)}")
        times, cpu = interleaved(variants, args.repeats)
        n_tokens = len(ds) * args.seq_len
        last = tmp / f"cache{next(runs) - 1}"
        storage = bytes_per_token(last, args.store, n_tokens)
        error = codec_error(teacher, ds, args, last) if "topk" in args.targets else {}
        (tmp / "parts").mkdir()
        parts = breakdown(teacher, ds, args, tmp / "parts")
        print_report(args, shape, n_tokens, times, cpu, storage, error, parts)


if __name__ == "__main__":
    main()
