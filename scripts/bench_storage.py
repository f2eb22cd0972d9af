"""Cache format v2 per preset: bytes/token per field, reconstruction error, decode tokens/s per core.

    OMP_NUM_THREADS=1 python scripts/bench_storage.py                    # real-shape synthetic + the demo teacher
    python scripts/bench_storage.py --skip-demo --positions 8192         # synthetic only
    python scripts/bench_storage.py --root runs                          # the demo's teacher under runs/ (built if absent)

Two teacher signals, each written through the project's writer (CacheWriter → Zarr v3 shards, zstd level 3,
4,096-row chunks) with each preset (cache/codec.py PRESETS: its k, draws, router entries and codec), then
read back through CacheReader:

(a) the demo's trained teacher (stages/demo.py: the BPE tokenizer over the stdlib's docstrings, vocab 2,048,
    a 4-layer Qwen3-MoE with 8 experts, top-2, trained by configs/demo_teacher.yaml) scored by HFTeacher on
    its prepared train split;
(b) a real-shape synthetic teacher (pipeline/teachers/synthetic.py: vocab 151,936, 48 MoE layers × 128
    experts, top-8; the statistics it was fitted to and those this run produced are printed).

Per preset: bytes/token of each stored field (as the store reports them), of the logit signal (everything
but the tokens, the mask, the offsets and the router fields) and of the router per stored MoE layer; the
error of each stored value against the exact float32 the teacher computed (mean/max |Δ log p|, and the KL
of the exact distribution restricted to the stored support against the stored one, both renormalised on
that support); decoded tokens/s per core through the trainer's path (ShardStream.load → CacheReader →
collate, one thread). The last line is one JSON object with the headline figures per preset.

``quality_column(preset, demo_dir) -> float | None`` is the hook for the share of full-KD gain
(students trained per preset on the demo, KL over the full vocabulary); it returns None until it is
filled in, and the table prints "n/a".
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.quiet import quiet_progress_bars  # noqa: E402

quiet_progress_bars()

import numpy as np  # noqa: E402

from cache.codec import PRESETS, Codec, frequency_order  # noqa: E402
from cache.reader import CacheReader  # noqa: E402
from cache.schema import Sequences, concat_sequences, sequences_from_flat  # noqa: E402
from cache.stats import storage  # noqa: E402
from cache.writer import CacheWriter, finalize  # noqa: E402
from pipeline.teachers.synthetic import (ALPHA, BOOST_MEAN, BOOST_SD, EXPERTS, MOE_LAYERS, ROUTED, SIGMA,  # noqa: E402
                                         VOCAB, SyntheticTeacher, signal_statistics, teacher_record)

SIGNAL_EXCLUDED = ("input_ids", "loss_mask", "seq_offsets", "sample_ids", "seq_draw_offsets")
PRESET_NAMES = tuple(PRESETS)


def quality_column(preset: str, demo_dir: Path | None) -> float | None:
    """Share of full-KD gain of a student trained on ``preset``: what scripts/study_presets.py measured
    beside this demo (its ``preset_study.json`` under the same --root); None when it has not run."""
    results = None if demo_dir is None else demo_dir.parent / "preset_study.json"
    if results is None or not results.exists():
        return None
    return json.loads(results.read_text()).get(preset, {}).get("share_of_full_kd_gain")


# --- one cache per preset ---------------------------------------------------------------------


def preset_shape(preset: str, experts: int, routed: int) -> dict:
    p = PRESETS[preset]
    router_topk = experts if p.router_topk == "all" else routed if p.router_topk == "routed" else int(p.router_topk)
    return {"k": p.k if "topk" in p.targets else 0, "num_draws": p.num_draws if "sampled" in p.targets else 0,
            "router_topk": router_topk}


def restrict(record: dict, shape: dict) -> dict:
    """A record made with the widest shape cut to a preset's: the first k head entries, drawless when N = 0."""
    out = dict(record)
    if shape["k"]:
        out["topk_ids"], out["topk_logprobs"] = record["topk_ids"][:, :shape["k"]], record["topk_logprobs"][:, :shape["k"]]
    else:
        out.pop("topk_ids", None), out.pop("topk_logprobs", None)
    if not shape["num_draws"]:
        for key in ("draw_n", "draw_ids", "draw_counts", "draw_logprobs"):
            out.pop(key, None)
    if "router_ids" in record:
        out["router_ids"], out["router_probs"] = (record["router_ids"][..., :shape["router_topk"]],
                                                  record["router_probs"][..., :shape["router_topk"]])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_cache(cache_dir: Path, records: list[dict], codec: Codec, experts: int) -> None:
    identity = {"codec": codec.to_dict(), "k": int(records[0].get("topk_ids", np.zeros((0, 0))).shape[1])}
    with CacheWriter(cache_dir, rank=0, identity=identity, store="zarr", codec=codec, shard_tokens=1 << 20,
                     chunk_tokens=4096, compression="zstd", level=3, num_experts=experts) as writer:
        for rec in records:
            writer.add(sequences_from_flat({k: v.copy() for k, v in rec.items()}))
    finalize(cache_dir, identity, "zarr", sorted(records[0]))


def flat(seqs: Sequences) -> dict[str, np.ndarray]:
    """A record's arrays with the draws ragged (``draw_n`` per token, the drawn entries flat), as written."""
    out = {k: getattr(seqs, k) for k in ("sample_ids", "seq_lens", "input_ids", "loss_mask")} | seqs.teacher.arrays()
    if "draw_ids" in out:
        drawn = out["draw_counts"] > 0
        out.update(draw_n=drawn.sum(1), **{k: out[k][drawn] for k in ("draw_ids", "draw_counts", "draw_logprobs")})
    return out


def field_bytes(cache_dir: Path, n_tokens: int) -> dict[str, float]:
    reader = CacheReader(cache_dir)
    sizes = storage(reader.location, "zarr", [s.name for s in reader.shards])
    return {name: s["stored"] / n_tokens for name, s in sizes.items()}


# --- reconstruction error ---------------------------------------------------------------------


def by_id(pos: np.ndarray, ids: np.ndarray, *values: np.ndarray) -> list[np.ndarray]:
    order = np.lexsort((ids, pos))
    return [ids[order]] + [v[order] for v in values]


def support_kl(pos: np.ndarray, exact_lp: np.ndarray, stored_lp: np.ndarray, n: int) -> np.ndarray:
    """Per position KL(exact ‖ stored), both renormalised over the stored entries of that position."""
    def normed(lp):
        p = np.exp(lp.astype(np.float64))
        return p / np.maximum(np.bincount(pos, weights=p, minlength=n)[pos], 1e-300)
    p, q = normed(exact_lp), normed(stored_lp)
    return np.bincount(pos, weights=p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), minlength=n)


def errors(exact: dict, seqs: Sequences) -> dict[str, dict[str, float]]:
    """|Δ| and support KL per stored value field: the decoded record against the exact float32 one."""
    n = len(exact["input_ids"])
    got = flat(seqs)
    out = {"target_logprob": delta_stats(got["target_logprob"], exact["target_logprob"])}
    if "topk_ids" in exact:
        k = exact["topk_ids"].shape[1]
        pos = np.repeat(np.arange(n), k)
        e_ids, e_lp = by_id(pos, exact["topk_ids"].ravel().astype(np.int64), exact["topk_logprobs"].ravel())
        g_ids, g_lp = by_id(pos, got["topk_ids"].ravel(), got["topk_logprobs"].ravel())
        assert np.array_equal(e_ids, g_ids), "the head's ids must come back exactly"
        out["topk_logprobs"] = {**delta_stats(g_lp, e_lp), "kl_support": float(support_kl(pos, e_lp, g_lp, n).mean())}
    if "draw_ids" in exact:
        pos = np.repeat(np.arange(n), exact["draw_n"])
        e_ids, e_lp, e_c = by_id(pos, exact["draw_ids"].astype(np.int64), exact["draw_logprobs"], exact["draw_counts"])
        g_ids, g_lp, g_c = by_id(np.repeat(np.arange(n), got["draw_n"]), got["draw_ids"], got["draw_logprobs"],
                                 got["draw_counts"])
        assert np.array_equal(e_ids, g_ids) and np.array_equal(e_c, g_c), "draw ids and counts come back exactly"
        out["draw_logprobs"] = {**delta_stats(g_lp, e_lp), "kl_support": float(support_kl(pos, e_lp, g_lp, n).mean())}
    if "router_ids" in exact:
        t, layers, r = exact["router_ids"].shape
        pos = np.repeat(np.arange(t * layers), r)
        e_ids, e_p = by_id(pos, exact["router_ids"].reshape(-1).astype(np.int64), exact["router_probs"].reshape(-1))
        g_ids, g_p = by_id(pos, got["router_ids"].reshape(-1), got["router_probs"].reshape(-1))
        assert np.array_equal(e_ids, g_ids), "router ids come back exactly"
        e_lp, g_lp = np.log(np.maximum(e_p, 1e-30)), np.log(np.maximum(g_p, 1e-30))
        out["router_probs"] = {**delta_stats(g_lp, e_lp),
                               "kl_support": float(support_kl(pos, e_lp, g_lp, t * layers).mean())}
    return out


def delta_stats(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    d = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    return {"mean_abs": float(d.mean()) if d.size else 0.0, "max_abs": float(d.max()) if d.size else 0.0}


# --- decode speed -------------------------------------------------------------------------------


def decode_rate(cache_dir: Path, micro: int, passes: int = 2) -> float:
    """Decoded tokens/s on one thread through MicroBatches (ShardStream.load → read_many → collate), the
    chunks already decompressed once (a warm-up pass), best of ``passes``."""
    import torch

    from cache.stream import CacheSource, ShardStream, StreamPlan
    from pipeline.batches import MicroBatches

    torch.set_num_threads(1)
    stream = ShardStream(CacheSource(cache_dir), StreamPlan(batch_size=micro, shuffle_window=4096))
    data, order = MicroBatches(stream), stream.order(0)
    mbs = [order[i:i + micro] for i in range(0, len(order) - micro + 1, micro)] or [order]
    for seqs in mbs:
        data[(0, seqs)]
    best = 0.0
    for _ in range(passes):
        start, tokens = time.perf_counter(), 0
        for seqs in mbs:
            tokens += int(data[(0, seqs)]["valid"].sum())
        best = max(best, tokens / (time.perf_counter() - start))
    return best


# --- the two signals ------------------------------------------------------------------------------


def synthetic_records(positions: int, seq_len: int, num_draws: int) -> tuple[list[dict], dict]:
    """Records at the widest head and the given draws (the text and distributions do not depend on it)."""
    teacher = SyntheticTeacher()
    k = max(p.k for p in PRESETS.values())
    records = [teacher_record(teacher, 1, seq_len, k=k, num_draws=num_draws, router_topk=EXPERTS, first_sample=i)
               for i in range(max(1, positions // seq_len))]
    stats = signal_statistics(teacher)
    lp = np.concatenate([r["target_logprob"] for r in records])
    stats.update(target_nll=float(-lp[lp != 0].mean()),
                 router_top8_mass=float(np.concatenate([r["router_probs"][..., :ROUTED].sum(-1).ravel()
                                                        for r in records]).mean()))
    return records, stats


def demo_records(root: Path, n_seqs: int):
    """(num_draws → the demo teacher's records on its prepared train split (the widest head, exact float32),
    vocab, experts, experts per token)."""
    import torch

    from pipeline.config import load_config
    from pipeline.splits import load_split
    from pipeline.teachers.base import TeacherConfig
    from pipeline.teachers.extract import ExtractSpec
    from pipeline.teachers.hf import HFTeacher
    from stages import demo, prepare, train_student
    from stages.cache_teacher import make_batch, plan_batches
    from stages.config import PipelineConfig

    assets = demo.build_assets(root / "demo_assets")
    cfg = load_config(PipelineConfig, [demo.CONFIGS / "demo_teacher.yaml"],
                      [f"run.root={root}", f"data.source={assets['data']}", f"student.path={assets['teacher_init']}",
                       "eval.before=false"])
    final = cfg.run_dir / "train" / "final"
    if not final.exists():
        prepare.run(cfg)
        train_student.run(cfg)
    ds, manifest = load_split(cfg.run_dir, "train")
    k = max(p.k for p in PRESETS.values())
    batches = plan_batches(np.asarray(ds["sample_id"]), 16)[: max(1, n_seqs // 16)]
    made: dict = {}

    def make(num_draws: int) -> list[dict]:
        if num_draws not in made:
            spec = ExtractSpec(k=k, temperatures=(1.0,), targets="topk+sampled" if num_draws else "topk",
                               num_draws=max(num_draws, 1), vocab_limit=manifest["vocab_size"], router_topk="all")
            teacher = HFTeacher(TeacherConfig(path=str(final)), spec, torch.device("cpu"))
            made[num_draws] = [flat(teacher.score(make_batch(ds, rows, pad_id=0))) for rows in batches]
            made["shape"] = (teacher.num_experts, teacher.experts_per_token)
        return made[num_draws]

    make(0)
    return make, manifest["vocab_size"], *made["shape"]


def measure(name: str, make_records, vocab: int, experts: int, routed: int, tmp: Path, micro: int) -> dict:
    """Every preset on one signal (``make_records(num_draws)``: its records): bytes per field, errors, decode speed."""
    out = {}
    for preset in PRESET_NAMES:
        shape = preset_shape(preset, experts, routed)
        records = make_records(shape["num_draws"])
        tokens = sum(len(r["input_ids"]) for r in records)
        order = frequency_order(np.concatenate([r["input_ids"] for r in records]), vocab)
        cut = [restrict(r, shape) for r in records]
        codec = Codec.for_preset(preset, vocab, order)
        cache_dir = tmp / f"{name}-{preset}"
        write_cache(cache_dir, cut, codec, experts)
        per_field = field_bytes(cache_dir, tokens)
        reader = CacheReader(cache_dir)
        got = [reader.read_shard(s.name) for s in reader.shards]
        exact = {k: np.concatenate([c[k] for c in cut]) for k in cut[0]}
        err = errors(exact, concat_sequences(got))
        layers = cut[0]["router_ids"].shape[1] if "router_ids" in cut[0] else 0
        signal = sum(v for k, v in per_field.items() if k not in SIGNAL_EXCLUDED and not k.startswith("router_"))
        router = sum(v for k, v in per_field.items() if k.startswith("router_"))
        out[preset] = {"shape": shape, "fields": per_field, "signal_bytes_per_token": signal,
                       "router_bytes_per_layer": router / layers if layers else 0.0,
                       "total_bytes_per_token": sum(per_field.values()), "errors": err,
                       "unique_draws": float(exact["draw_n"].mean()) if "draw_n" in exact else 0.0,
                       "decode_tok_per_s": decode_rate(cache_dir, micro)}
        # the logit signal alone (no router fields): the reader's figure the 1M tokens/s is about
        cut_nr = [{k: v for k, v in c.items() if not k.startswith("router_")} for c in cut]
        nr_dir = tmp / f"{name}-{preset}-norouter"
        write_cache(nr_dir, cut_nr, codec, experts)
        out[preset]["decode_tok_per_s_no_router"] = decode_rate(nr_dir, micro)
    return out


# --- report ------------------------------------------------------------------------------------------


def print_table(title: str, results: dict, quality: dict) -> None:
    print(f"\n{title}")
    fields = sorted({f for r in results.values() for f in r["fields"]})
    head = f"{'field':<20}" + "".join(f"{p:>18}" for p in results)
    print(head)
    for f in fields:
        print(f"{f:<20}" + "".join(f"{r['fields'].get(f, 0):>18.2f}" for r in results.values()))
    rows = [("logit signal B/tok", lambda r: f"{r['signal_bytes_per_token']:.2f}"),
            ("router B/layer", lambda r: f"{r['router_bytes_per_layer']:.2f}"),
            ("total B/tok", lambda r: f"{r['total_bytes_per_token']:.2f}"),
            ("unique draws", lambda r: f"{r['unique_draws']:.2f}"),
            ("head |Δ| mean/max", lambda r: err(r, "topk_logprobs")),
            ("head KL support", lambda r: kl(r, "topk_logprobs")),
            ("draw |Δ| mean/max", lambda r: err(r, "draw_logprobs")),
            ("draw KL support", lambda r: kl(r, "draw_logprobs")),
            ("target |Δ| mean/max", lambda r: err(r, "target_logprob")),
            ("router |Δlog p|", lambda r: err(r, "router_probs")),
            ("router KL support", lambda r: kl(r, "router_probs")),
            ("decode tok/s/core", lambda r: f"{r['decode_tok_per_s']:,.0f}"),
            ("  without router", lambda r: f"{r['decode_tok_per_s_no_router']:,.0f}")]
    for label, fn in rows:
        print(f"{label:<20}" + "".join(f"{fn(r):>18}" for r in results.values()))
    print(f"{'full-KD gain share':<20}" + "".join(f"{'n/a' if quality.get(p) is None else f'{quality[p]:.3f}':>18}"
                                                 for p in results))


def err(r: dict, key: str) -> str:
    e = r["errors"].get(key)
    return "-" if e is None else f"{e['mean_abs']:.1e}/{e['max_abs']:.1e}"


def kl(r: dict, key: str) -> str:
    e = r["errors"].get(key)
    return "-" if e is None else f"{e['kl_support']:.1e}"


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores (shared), no GPU, one thread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=8192, help="synthetic positions (2,048-token sequences)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--demo-seqs", type=int, default=128, help="demo sequences scored by its teacher")
    parser.add_argument("--root", default="", help="where the demo's runs live (default: a temporary folder)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--micro", type=int, default=4, help="sequences per decoded micro-batch")
    args = parser.parse_args()
    print(f"bench_storage: {machine()}, {datetime.date.today()}")
    print(f"synthetic teacher: vocab {VOCAB:,}, {MOE_LAYERS} MoE layers x {EXPERTS} experts, top-{ROUTED}; logits = "
          f"{ALPHA}*log Zipf prior + {SIGMA}*N(0,1), one context token boosted by N({BOOST_MEAN}, {BOOST_SD})")
    summary: dict = {"bench": "storage", "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        made: dict = {}
        def synthetic(num_draws: int) -> list[dict]:
            if num_draws not in made:
                made.clear()  # one set in memory at a time
                made[num_draws] = synthetic_records(args.positions, args.seq_len, num_draws)
            return made[num_draws][0]

        _, stats = synthetic_records(args.seq_len, args.seq_len, 0)
        print("synthetic statistics produced: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items())
              + " (targets: mean entropy 2-3 nats, top-1 ~0.5)")
        real = measure("synthetic", synthetic, VOCAB, EXPERTS, ROUTED, tmp, args.micro)
        made.clear()
        demo_dir = None
        quality = {p: quality_column(p, demo_dir) for p in PRESET_NAMES}
        print_table(f"(b) real-shape synthetic teacher: {args.positions:,} positions, bytes/token per stored field",
                    real, quality)
        demo = None
        if not args.skip_demo:
            root = Path(args.root) if args.root else tmp / "runs"
            records, vocab, experts, routed = demo_records(root, args.demo_seqs)
            demo_dir = root / "demo"
            demo = measure("demo", records, vocab, experts, routed, tmp, args.micro)
            quality = {p: quality_column(p, demo_dir) for p in PRESET_NAMES}
            print_table(f"(a) the demo's trained teacher (vocab {vocab:,}, {experts} experts, top-{routed}): "
                        f"{sum(len(r['input_ids']) for r in records(0)):,} positions", demo, quality)
        for p in PRESET_NAMES:
            summary["presets"][p] = {
                "real_signal_bytes_per_token": round(real[p]["signal_bytes_per_token"], 2),
                "real_router_bytes_per_layer": round(real[p]["router_bytes_per_layer"], 2),
                "demo_signal_bytes_per_token": None if demo is None else round(demo[p]["signal_bytes_per_token"], 2),
                "demo_total_bytes_per_token": None if demo is None else round(demo[p]["total_bytes_per_token"], 2),
                "decode_tok_per_s_per_core": round(real[p]["decode_tok_per_s_no_router"]),
                "decode_tok_per_s_per_core_with_router": round(real[p]["decode_tok_per_s"]),
                "full_kd_gain_share": quality[p]}
    summary["synthetic_statistics"] = {k: round(v, 4) for k, v in stats.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
