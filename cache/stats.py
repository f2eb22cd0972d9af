"""Statistics of a finished cache, for ``run_pipeline.py inspect`` (pure numpy; plots live in
stages/inspect_cache.py; every definition is spelled out in docs/inspect.md).

Storage sizes cover every shard (they are metadata, cheap to read). The teacher and router
statistics cover a sample: whole shards in manifest order, the last one cut at a sequence
boundary, so that at most ``max_tokens`` tokens are decoded; they are read in pieces of
about ``piece_tokens`` tokens so memory stays bounded.

Shapes: T positions, S sequences, K top-k entries, D draw entries, L MoE layers,
R stored router entries per layer (k_r), E experts.
"""

from __future__ import annotations

import numpy as np

from cache.schema import CacheError, Sequences
from cache.shards import open_shard

PIECE_TOKENS = 65536


# --- per-position statistics ------------------------------------------------------------


def next_token_targets(input_ids_T: np.ndarray, seq_lens_S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(target id of each position = the next token of the same sequence, whether it has one)."""
    targets_T = np.full(len(input_ids_T), -1, dtype=np.int64)
    targets_T[:-1] = input_ids_T[1:]
    has_next_T = np.ones(len(input_ids_T), dtype=bool)
    has_next_T[np.cumsum(seq_lens_S)[seq_lens_S > 0] - 1] = False  # a sequence's last token
    targets_T[~has_next_T] = -1
    return targets_T, has_next_T


def topk_mass(topk_logprobs_TK: np.ndarray) -> np.ndarray:
    """sum_k exp(topk_logprob) per position: the teacher probability the top-k cover."""
    return np.exp(topk_logprobs_TK.astype(np.float64)).sum(axis=1)


def bucket_entropy(probs_TK: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the K stored probabilities plus the rest of the mass as one bucket.

    Merging outcomes never raises entropy, so this is a lower bound on the entropy of the
    full distribution; it is exact when the K entries hold all the mass.
    """
    p_TK = np.clip(probs_TK.astype(np.float64), 0.0, 1.0)
    head_T = -np.sum(p_TK * np.log(np.where(p_TK > 0, p_TK, 1.0)), axis=1)
    tail_T = np.clip(1.0 - p_TK.sum(axis=1), 0.0, 1.0)  # fp16 rounding can push the sum past 1
    return head_T - tail_T * np.log(np.where(tail_T > 0, tail_T, 1.0))


def entropy_bounds(topk_logprobs_TK: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds on the teacher's entropy per position, in nats.

    lower: the tail mass r as one bucket. upper: r spread evenly over the V - K other tokens
    (the most entropy r can carry there): lower + r * log(V - K).
    """
    lower_T = bucket_entropy(np.exp(topk_logprobs_TK.astype(np.float64)))
    rest = vocab_size - topk_logprobs_TK.shape[1]
    tail_T = np.clip(1.0 - topk_mass(topk_logprobs_TK), 0.0, 1.0)
    upper_T = lower_T + tail_T * np.log(rest) if rest > 1 else lower_T
    return lower_T, upper_T


def target_in_topk(topk_ids_TK: np.ndarray, targets_T: np.ndarray) -> np.ndarray:
    return (topk_ids_TK == targets_T[:, None]).any(axis=1)


def target_in_draws(draw_ids_TD: np.ndarray, draw_counts_TD: np.ndarray, targets_T: np.ndarray) -> np.ndarray:
    """Whether each position's target id is among its sampled draws (padding: count 0)."""
    return ((draw_ids_TD == targets_T[:, None]) & (draw_counts_TD > 0)).any(axis=1)


def draw_mass(draw_counts_TD: np.ndarray, draw_logprobs_TD: np.ndarray) -> np.ndarray:
    """Teacher probability (tau = 1) of each position's unique drawn ids together (padding: count 0): [T]."""
    return np.where(draw_counts_TD > 0, np.exp(draw_logprobs_TD.astype(np.float64)), 0.0).sum(1)


# --- router statistics ------------------------------------------------------------------


def expert_load(router_ids_TLR: np.ndarray, router_probs_TLR: np.ndarray | None, num_experts: int,
                routed_k: int = 0) -> np.ndarray:
    """Per layer, the (unnormalised) load each expert receives: [L, E].

    routed_k > 0: each token counts once for each of its routed_k most probable stored experts (the
    experts it is routed to; ties: the first stored). Otherwise, with probabilities stored: each
    stored entry weighs its router probability (the soft load). Without probabilities (an ids-only
    cache holds exactly the routed experts): counts.
    """
    ids_TLR = router_ids_TLR.astype(np.int64)
    if 0 < routed_k < ids_TLR.shape[-1]:
        routed_TLR = np.argsort(-np.asarray(router_probs_TLR), axis=-1, kind="stable")[..., :routed_k]
        ids_TLR = np.take_along_axis(ids_TLR, routed_TLR, -1)
    use_probs = routed_k <= 0 and router_probs_TLR is not None
    weights_TLR = router_probs_TLR.astype(np.float64) if use_probs else np.ones(ids_TLR.shape)
    n_layers = ids_TLR.shape[1]
    flat_TLR = ids_TLR + num_experts * np.arange(n_layers)[None, :, None]
    load = np.bincount(flat_TLR.ravel(), weights=weights_TLR.ravel(), minlength=n_layers * num_experts)
    return load.reshape(n_layers, num_experts)


def router_entropy(router_probs_TLR: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each token's stored router probabilities per layer: [T, L].

    Uses ``bucket_entropy``: exact when all experts are stored (k_r = E), a lower bound otherwise (up to
    the quantisation of the stored probabilities; a row summing past 1 is scaled back to 1).
    """
    T, L, R = router_probs_TLR.shape
    p_NR = router_probs_TLR.reshape(T * L, R).astype(np.float64)
    p_NR = p_NR / np.maximum(p_NR.sum(1, keepdims=True), 1.0)  # quantised rows can sum past 1: no mass from nothing
    return bucket_entropy(p_NR).reshape(T, L)


# load_shares and coefficient_of_variation are the one home of the expert-load balance: inspect calls
# them on numpy arrays, training and evaluation (pipeline/router_losses.py) on torch tensors on the
# device (so training reads nothing back). Hence only the operators and methods both types share.


def load_shares(load_LE):
    """Each expert's share of its layer's load [L, E] (a layer without load: zeros)."""
    total_L = load_LE.sum(-1)
    return load_LE / (total_L + (total_L == 0))[..., None]


def coefficient_of_variation(shares_LE):
    """std / mean of the expert shares (or loads) of each layer [L] (0 = perfectly balanced, or no load)."""
    mean_L = shares_LE.mean(-1)
    std_L = (((shares_LE - mean_L[..., None]) ** 2).mean(-1)) ** 0.5
    return std_L / (mean_L + (mean_L == 0))


# --- one decoded piece ------------------------------------------------------------------


def piece_stats(seqs: Sequences, vocab_size: int, num_experts: int, routed_k: int) -> dict:
    """Partial results of one decoded piece: keys ending in _T are per-position arrays to
    concatenate, every other value is summed across pieces (see ``merge``)."""
    targets_T, has_next_T = next_token_targets(np.asarray(seqs.input_ids), np.asarray(seqs.seq_lens))
    trained_T = (np.asarray(seqs.loss_mask) == 1) & has_next_T
    out = seqs.teacher
    part = {"tokens": len(targets_T), "sequences": len(seqs.seq_lens), "trained": int(trained_T.sum()),
            "target_nll": -float(np.asarray(out.target_logprob, np.float64)[trained_T].sum())}
    if out.topk_logprobs is not None and out.topk_logprobs.shape[1] > 0:
        part["topk_mass_T"] = topk_mass(out.topk_logprobs)
        part["entropy_lower_T"], part["entropy_upper_T"] = entropy_bounds(out.topk_logprobs, vocab_size)
        part["target_in_topk"] = int(target_in_topk(out.topk_ids, targets_T)[trained_T].sum())
    if out.draw_ids is not None:
        counts_TD = np.asarray(out.draw_counts)
        part["draws_unique"] = int(np.count_nonzero(counts_TD))
        part["target_in_draws"] = int(target_in_draws(out.draw_ids, out.draw_counts, targets_T)[trained_T].sum())
        part["draws_total"] = int(counts_TD.astype(np.int64).sum())
        part["draws_singleton"] = int((counts_TD == 1).sum())
        part["draw_mass_T"] = draw_mass(counts_TD, out.draw_logprobs)
    if out.router_ids is not None:
        part["router_load"] = expert_load(out.router_ids, out.router_probs, num_experts, routed_k)
    if out.router_probs is not None:
        part["router_entropy"] = router_entropy(out.router_probs).sum(axis=0)
        part["router_mass_gap"] = np.abs(1.0 - out.router_probs.astype(np.float64).sum(-1)).sum(axis=0)
    return part


def merge(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if key.endswith("_T"):
                merged.setdefault(key, []).append(value)
            else:
                merged[key] = merged[key] + value if key in merged else value
    return {k: np.concatenate(v) if k.endswith("_T") else v for k, v in merged.items()}


# --- the sample ---------------------------------------------------------------------------


def split_sequences(offsets: np.ndarray, first: int, last: int, piece_tokens: int) -> list[tuple[int, int]]:
    """Cut sequences [first, last) into consecutive ranges of about piece_tokens tokens each."""
    ranges = []
    while first < last:
        stop = int(np.searchsorted(offsets, offsets[first] + piece_tokens, side="right")) - 1
        stop = min(max(stop, first + 1), last)
        ranges.append((first, stop))
        first = stop
    return ranges


def sample_plan(reader, max_tokens: int, piece_tokens: int = PIECE_TOKENS) -> list[tuple[str, int, int]]:
    """(shard, first_seq, last_seq) pieces: whole shards in manifest order, the last one cut at
    a sequence boundary so the sample holds at most max_tokens tokens (at least one sequence)."""
    plan: list[tuple[str, int, int]] = []
    budget = max_tokens
    for info in reader.shards:
        offsets = on_shard(info.name, reader.seq_offsets, info.name)
        n_seqs = len(offsets) - 1
        last = min(int(np.searchsorted(offsets, budget, side="right")) - 1, n_seqs)
        last = max(last, 1 if not plan else 0)
        plan += [(info.name, a, b) for a, b in split_sequences(offsets, 0, last, piece_tokens)]
        budget -= int(offsets[last])
        if last < n_seqs or budget <= 0:
            break
    return plan


def on_shard(name: str, fn, *args):
    """fn(*args), with a damaged or missing shard's error turned into one CacheError line."""
    try:
        return fn(*args)
    except CacheError:
        raise
    except Exception as err:  # zarr/h5py/codec errors on damaged bytes come in many types
        detail = str(err).splitlines()[0] if str(err) else ""
        raise CacheError(f"shard {name} cannot be read ({type(err).__name__}: {detail}); "
                         f"run inspect --verify") from None


# --- storage ------------------------------------------------------------------------------


def shard_sizes(cache_dir, store: str, name: str) -> dict[str, tuple[int, int]]:
    """{field: (stored bytes as the store reports them, raw bytes of the stored dtype)} of one shard."""
    shard = open_shard(cache_dir, store, name)
    try:
        arrays = {field: shard[field] for field in shard.keys()}
        return {field: (shard.stored_nbytes(field), int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize)
                for field, a in arrays.items()}
    finally:
        shard.close()


def storage(cache_dir, store: str, shard_names: list[str]) -> dict[str, dict[str, int]]:
    """Per field, summed over every shard: stored and raw bytes."""
    sizes: dict[str, dict[str, int]] = {}
    for name in shard_names:
        for field, (stored, raw) in on_shard(name, shard_sizes, cache_dir, store, name).items():
            entry = sizes.setdefault(field, {"stored": 0, "raw": 0})
            entry["stored"] += stored
            entry["raw"] += raw
    return sizes


def storage_summary(sizes: dict[str, dict[str, int]], n_tokens: int, disk_bytes: int) -> dict:
    per_token = max(n_tokens, 1)
    fields = {name: {"stored_bytes": s["stored"], "raw_bytes": s["raw"], "bytes_per_token": s["stored"] / per_token,
                     "compression_ratio": s["raw"] / max(s["stored"], 1)} for name, s in sorted(sizes.items())}
    stored = sum(s["stored"] for s in sizes.values())
    raw = sum(s["raw"] for s in sizes.values())
    return {"fields": fields, "bytes_per_token": stored / per_token, "disk_bytes_per_token": disk_bytes / per_token,
            "compression_ratio": raw / max(stored, 1)}


# --- the whole report ----------------------------------------------------------------------


def routed_experts(identity: dict) -> int:
    """The teacher's experts per token when the manifest records it, else 0 (unknown)."""
    return int(identity.get("experts_per_token") or 0)


def teacher_summary(totals: dict) -> dict:
    out: dict = {"trained_positions": totals["trained"]}
    trained = max(totals["trained"], 1)
    out["teacher_nll"] = totals["target_nll"] / trained
    if "topk_mass_T" in totals:
        mass_T, lower_T = totals["topk_mass_T"], totals["entropy_lower_T"]
        out.update(topk_mass_mean=float(mass_T.mean()), topk_mass_p5=float(np.percentile(mass_T, 5)),
                   topk_mass_p50=float(np.percentile(mass_T, 50)), entropy_lower_mean=float(lower_T.mean()),
                   entropy_lower_p50=float(np.percentile(lower_T, 50)),
                   entropy_upper_mean=float(totals["entropy_upper_T"].mean()),
                   target_in_topk=totals["target_in_topk"] / trained)
    if "draws_unique" in totals:
        tokens = max(totals["tokens"], 1)
        out.update(draws_unique_mean=totals["draws_unique"] / tokens,
                   target_in_draws=totals["target_in_draws"] / trained,
                   draws_per_position=totals["draws_total"] / tokens,
                   draws_singleton_share=totals["draws_singleton"] / max(totals["draws_unique"], 1),
                   draw_mass_mean=float(totals["draw_mass_T"].mean()),
                   draw_mass_p50=float(np.percentile(totals["draw_mass_T"], 50)))
    return out


def codec_summary(identity: dict) -> dict:
    """The preset and the documented error bounds of its quantisers (cache/codec.py)."""
    from cache.codec import LOGPROB_STEP, max_logprob_error

    codec = identity.get("codec", {})
    bits, router_bits = codec.get("logprob_bits", 32), codec.get("router_bits", 32)
    return {"preset": codec.get("preset", ""), "logprob_bits": bits, "router_bits": router_bits,
            "logprob_error_bound": max_logprob_error(bits),
            "target_error_bound": max_logprob_error(32 if bits == 32 else 16),
            "router_log_error_bound": 0.0 if router_bits == 32 else LOGPROB_STEP[router_bits] / 2,
            "vocab_ranked": len(codec.get("vocab_order", []))}


def router_summary(totals: dict, identity: dict, num_experts: int) -> dict:
    routed_k = routed_experts(identity)
    shares_LE = load_shares(totals["router_load"])
    n_layers = shares_LE.shape[0]
    layers = list(identity.get("moe_layers") or range(n_layers))
    stored_r = int(identity.get("router_topk") or 0)
    if routed_k > 0:
        weighting = f"routed: each token's top-{min(routed_k, stored_r or routed_k)} stored experts count 1"
    elif "router_entropy" in totals:
        weighting = "router probability (soft load; the teacher's experts per token is not recorded)"
    else:
        weighting = "routed: the stored (routed) expert ids count 1"
    out = {"layers": layers, "teacher_layers": list(identity.get("teacher_moe_layers") or layers),
           "num_experts": num_experts, "router_topk": stored_r, "load_weighting": weighting,
           "load_shares": shares_LE, "load_cv": coefficient_of_variation(shares_LE)}
    if "router_entropy" in totals:
        out["router_entropy"] = totals["router_entropy"] / max(totals["tokens"], 1)
        out["router_entropy_exact"] = stored_r == num_experts
        if stored_r == num_experts:  # every expert stored: the probabilities should sum to 1, what quantising leaves
            out["router_mass_gap"] = totals["router_mass_gap"] / max(totals["tokens"], 1)
    return out


def cache_stats(reader, max_tokens: int, piece_tokens: int = PIECE_TOKENS) -> dict:
    """Everything ``inspect`` reports about a finished cache (see docs/inspect.md)."""
    manifest, identity = reader.manifest, reader.manifest.identity
    vocab_size, num_experts = int(identity.get("vocab_size") or 0), int(identity.get("num_experts") or 0)
    plan = sample_plan(reader, max_tokens, piece_tokens)
    if not plan:
        raise CacheError(f"{reader.location} lists no shard: there is nothing to inspect")
    parts = [piece_stats(on_shard(piece[0], reader.read, *piece), vocab_size, num_experts, routed_experts(identity))
             for piece in plan]
    totals = merge(parts)
    stats = {"store": manifest.store, "k": manifest.k, "vocab_size": vocab_size, "targets": identity.get("targets"),
             "tokens": manifest.n_tokens, "sequences": manifest.n_seqs, "shards": len(manifest.shards),
             "sampled_tokens": totals["tokens"], "sampled_sequences": totals["sequences"],
             "sampled_shards": len({name for name, _, _ in plan})}
    sizes = storage(reader.location, manifest.store, [s.name for s in manifest.shards])
    stats.update(storage_summary(sizes, manifest.n_tokens, sum(s.nbytes for s in manifest.shards)))
    stats.update(teacher_summary(totals))
    stats["codec"] = codec_summary(identity)
    if "router_load" in totals:
        stats["router"] = router_summary(totals, identity, num_experts)
        stats["load_cv_mean"] = float(stats["router"]["load_cv"].mean())
        if "router_entropy" in stats["router"]:
            stats["router_entropy_mean"] = float(stats["router"]["router_entropy"].mean())
    stats["per_position"] = {k[:-2]: v for k, v in totals.items() if k.endswith("_T")}
    return stats
