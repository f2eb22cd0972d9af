"""Phase-one teacher throughput: vLLM vs HF backend on the same batches, as a table.

    python scripts/bench_vllm.py                       # tiny Qwen3-MoE built on the spot (CPU)
    python scripts/bench_vllm.py --model DIR --seqs 256 --length 512 --batch 32 --k 64

Both backends score identical TeacherBatches (real text: this Python's stdlib docstrings,
packed to --length tokens). HF runs first, then the vLLM engine starts, so they never share
the CPU. Rows: HF at --batch sequences per forward; vLLM at --batch sequences per generate
call and with all sequences in one call (vLLM schedules its own batches); and the cost of
turning vLLM's FlatLogprobs into cache fields with numpy vs a per-token Python loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo import save_tiny_model, stdlib_docstrings, tiny_config, train_tokenizer  # noqa: E402
from pipeline.teachers.base import TeacherBatch, TeacherConfig  # noqa: E402
from pipeline.teachers.extract import ExtractSpec  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="model directory (default: build a small Qwen3-MoE)")
    p.add_argument("--seqs", type=int, default=64, help="sequences scored")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16, help="sequences per score() call")
    p.add_argument("--k", type=int, default=64, help="top-k log-probs per position")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer size of the built model")
    return p.parse_args()


def build_model(out: Path, vocab: int) -> Path:
    """Qwen3-MoE, 4 layers, hidden 256, 8 experts (top-2), head_dim 32 (vLLM CPU needs >= 32)."""
    tok = train_tokenizer([d for _, d in stdlib_docstrings(max_docs=2000)], vocab, out / "tokenizer")
    config = tiny_config("qwen3_moe", len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, moe_intermediate_size=128)
    return save_tiny_model(config, out / "model", tok)


def make_batches(model: Path, seqs: int, length: int, batch: int) -> list[TeacherBatch]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    stream = np.concatenate([tok(d)["input_ids"] + [tok.eos_token_id or 0] for _, d in stdlib_docstrings(max_docs=4000)])
    if len(stream) < seqs * length:
        raise SystemExit(f"only {len(stream)} tokens of text; lower --seqs or --length")
    ids = torch.from_numpy(stream[: seqs * length].reshape(seqs, length).astype(np.int64))
    return [TeacherBatch(torch.arange(i, min(i + batch, seqs)), ids[i:i + batch], torch.full((len(ids[i:i + batch]),), length),
                         torch.ones_like(ids[i:i + batch], dtype=torch.uint8)) for i in range(0, seqs, batch)]


def timed(fn, batches: list[TeacherBatch]) -> tuple[float, list]:
    fn(batches[0])  # warm-up (first-call kernels, allocator)
    start = time.perf_counter()
    outs = [fn(b) for b in batches]
    return time.perf_counter() - start, outs


def merged(batches: list[TeacherBatch]) -> TeacherBatch:
    return TeacherBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in ("sample_ids", "input_ids", "lengths", "loss_mask")))


def python_loop_fields(outputs: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The slow way, for the table: one dict per position via FlatLogprobs' list API."""
    ids, lps = [], []
    for o in outputs:
        for pos in list(o.prompt_logprobs)[1:] + list(o.outputs[0].logprobs):
            top = sorted(((lp.rank, t, lp.logprob) for t, lp in pos.items() if lp.rank <= k))[:k]
            ids.append([t for _, t, _ in top])
            lps.append([v for _, _, v in top])
    return np.array(ids), np.array(lps)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else build_model(Path(tmp.name), args.vocab)
    batches = make_batches(model, args.seqs, args.length, args.batch)
    tokens = args.seqs * args.length
    spec = ExtractSpec(k=args.k, temperatures=(1.0,), router_topk="none")
    rows = []

    from pipeline.teachers.hf import HFTeacher

    hf = HFTeacher(TeacherConfig(path=str(model)), spec, torch.device("cpu"))
    seconds, hf_outs = timed(hf.score, batches)
    rows.append((f"hf, {args.batch} seqs/forward", seconds))
    del hf

    from pipeline.teachers.vllm import VLLMTeacher, cache_fields

    start = time.perf_counter()
    vt = VLLMTeacher(TeacherConfig(backend="vllm", path=str(model), max_model_len=args.length + 1,
                                   max_num_batched_tokens=max(8192, args.length)), spec, torch.device("cpu"))
    startup = time.perf_counter() - start
    seconds, v_outs = timed(vt.score, batches)
    rows.append((f"vllm, {args.batch} seqs/generate", seconds))
    seconds, _ = timed(vt.score, [merged(batches)] * 1)
    rows.append((f"vllm, all {args.seqs} seqs in one generate", seconds))

    outputs = vt.llm.generate([{"prompt_token_ids": b.input_ids[i].tolist()} for b in batches for i in range(len(b.lengths))],
                              vt.params, use_tqdm=False)
    start = time.perf_counter()
    fields = cache_fields(outputs, args.k, vt.n_logprobs, 0)
    numpy_s = time.perf_counter() - start
    start = time.perf_counter()
    loop_ids, _ = python_loop_fields(outputs, args.k)
    loop_s = time.perf_counter() - start
    assert np.array_equal(loop_ids, fields["topk_ids"]), "numpy and loop conversions disagree"
    vt.close()

    diff = max(float(np.abs(h.topk_logprobs - v.topk_logprobs).max()) for h, v in zip(hf_outs, v_outs))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nmodel {model} | {args.seqs} seqs x {args.length} tokens, k={args.k} | {cpu}, {os.cpu_count()} cores | "
          f"load avg {os.getloadavg()[0]:.1f} | vllm engine start-up {startup:.1f} s | max |lp_hf - lp_vllm| {diff:.1e}")
    print(f"| {'backend':<40} | {'seconds':>8} | {'tokens/s':>9} |\n|{'-' * 42}|{'-' * 10}|{'-' * 11}|")
    for name, s in rows:
        print(f"| {name:<40} | {s:8.2f} | {tokens / s:9,.0f} |")
    print(f"| {'FlatLogprobs → fields, numpy':<40} | {numpy_s:8.3f} | {tokens / numpy_s:9,.0f} |")
    print(f"| {'FlatLogprobs → fields, per-token loop':<40} | {loop_s:8.3f} | {tokens / loop_s:9,.0f} |")


if __name__ == "__main__":
    main()
