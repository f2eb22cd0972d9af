"""Stage: held-out metrics of the student before and after training, against the teacher.

    python run_pipeline.py eval --config configs/demo.yaml

On the eval split, on run.device: perplexity; KL(teacher ‖ student) at τ = 1 over the whole
vocabulary (`kl_to_teacher`), top-1 agreement and overlap@k, from the teacher itself
(teacher.path, run on the split); from the cache (cache_eval/) the KL over the cached top-k plus
one tail bucket, which is only a lower bound of the full KL (data-processing inequality) and
equals the tail-bucket forward-KL training loss (`kl_topk_bucket_lower_bound`). Without the
teacher the agreement metrics come from the cached top-k, `kl_to_teacher` is absent and
`kl_to_teacher_missing` says why; a cache of draws holds an unbiased estimate of the
cross-entropy to the teacher (its KL needs the draws' log-probs, not cached) and, with
cache.k=0, top-1 against the most drawn token (`sampled_estimates` says so in the results).
For prompt/response data also Rouge-L of greedy generations (left-padded batches) against the
references; for MoE models the expert load (per-layer load CV, router entropy, dead-expert share, load histogram; docs/router.md). Results go to
runs/<name>/eval/results.json.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from cache.schema import TeacherRecord, read_manifest, write_json_atomic
from cache.stream import CacheSource, ShardStream, StreamPlan
from pipeline import state
from pipeline.batches import PreparedSource, collate, to_device
from pipeline.config import ConfigError, choice, ranged, save_config
from pipeline.data import tokenizer_fingerprint
from pipeline.distributed import Dist, use_cpu
from pipeline.generation import rouge_l
from pipeline.inputs_from import check_inputs_from
from pipeline.losses import KDSpec, draw_weights, forward_kl
from pipeline.models import load_causal_lm, own_tokenizer_fingerprint, student_tokenizer
from pipeline.router import RouterCapture, num_experts, router_family
from pipeline.router_losses import expert_counts, load_summary
from pipeline.run_paths import cache_location
from pipeline.splits import load_split
from pipeline.stage_inputs import stage_inputs
from pipeline.teachers.base import resolve_dtype


@dataclass
class EvalConfig:
    split: str = choice("eval", ("train", "eval"))
    """Prepared split to evaluate on (its cache is cache_<split>/)."""
    batch_size: int = ranged(8, min=1)
    """Sequences per forward."""
    max_sequences: int = ranged(0, min=0)
    """Evaluate at most this many sequences (0 = all)."""
    overlap_k: list[int] = ranged([8, 32], min=1)
    """k of overlap@k with the teacher's top-k (k < vocabulary; from the cache alone k ≤ the cached k)."""
    rouge_samples: int = ranged(16, min=0)
    """Prompt/response data: generations scored with Rouge-L (0 = off)."""
    max_new_tokens: int = ranged(48, min=1)
    """Tokens generated per prompt for Rouge-L."""
    before: bool = True
    """Also evaluate the student's starting weights."""
    run_teacher: bool = True
    """Run the teacher (teacher.path) on the split for the full-vocabulary KL; false: the cache's lower bound only."""


BOUND = "kl_topk_bucket_lower_bound"  # KL over the cached top-k + one tail bucket: ≤ the full KL
SAMPLED_CE = "cross_entropy_to_teacher_sampled"  # unbiased estimate of KL(q ‖ p) + H(q), from the cached draws
BUCKET_KL = KDSpec("forward_kl", 1.0, "tail_bucket")  # the training loss at tau = 1, on log-probs
SAMPLED_TOP1 = "top1_agreement_sampled"  # the student's argmax vs the most drawn id (draws-only cache)


def eval_device(setting: str) -> torch.device:
    """run.device: 'auto' = CUDA when available (the local rank's GPU under a launcher)."""
    if use_cpu(setting):
        return torch.device("cpu")
    return Dist.from_env(cpu=False).device


def valid_logits(model, batch: dict, vocab_limit: int) -> torch.Tensor:
    """fp32 logits [T, vocab_limit] at the batch's valid positions (ids ≥ vocab_limit are padding)."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.get_output_embeddings()(hidden[batch["valid"]]).float()[:, :vocab_limit]


@torch.no_grad()
def token_metrics(model, batch: dict, vocab_limit: int, ks: list[int], teacher=None) -> dict[str, float]:
    """Sums over the batch's loss-masked positions (divide by 'tokens'). With ``teacher`` (a model)
    the teacher metrics are over its whole distribution; without, over the cached top-k."""
    logp_TV = torch.log_softmax(valid_logits(model, batch, vocab_limit), -1)
    mask = batch["loss_mask"].float()
    labels = batch["labels"].clamp(min=0)
    out = {"tokens": float(mask.sum()), "nll": float(-(logp_TV.gather(1, labels[:, None])[:, 0] * mask).sum())}
    t = batch["teacher"] or TeacherRecord(log_partition=None)  # prepared data (SFT without a cache): no teacher
    cached_k = t.topk_ids.shape[1] if t.topk_ids is not None else 0
    if cached_k:  # KL of the K+1-bucket coarsenings of q and p (top-k + one tail): a lower bound of the full KL
        out["kl_bound"] = float((forward_kl(logp_TV, t, BUCKET_KL) * mask).sum())
    if teacher is not None:
        lq_TV = torch.log_softmax(valid_logits(teacher, batch, vocab_limit), -1)
        out["kl"] = float((full_kl(lq_TV, logp_TV) * mask).sum())
        out["teacher_nll"] = float(-(lq_TV.gather(1, labels[:, None])[:, 0] * mask).sum())
        ks = overlap_ks(ks, cached_k, live=True, vocab=vocab_limit)
        out.update(agreement(logp_TV, lq_TV.topk(max(ks, default=1), -1).indices, mask, ks))
    else:
        if t.target_logprob is not None:
            out["teacher_nll"] = float(-(t.target_logprob * mask).sum())
        if cached_k:
            out.update(agreement(logp_TV, t.topk_ids, mask, overlap_ks(ks, cached_k, live=False, vocab=vocab_limit)))
        if t.draw_ids is not None:
            out.update(sampled_metrics(logp_TV, t.draw_ids, draw_weights(t), mask, top1=not cached_k))
    return out


def sampled_metrics(logp_TV: torch.Tensor, draw_ids_TW: torch.Tensor, draw_weights_TW: torch.Tensor,
                    mask: torch.Tensor, top1: bool) -> dict[str, float]:
    """From the cached draws (ids and their share c/N of the N draws, padding weight 0), summed:
    ``ce_sampled``, -Σ (c/N)·log p, an unbiased estimate of the cross-entropy H(q, p) = KL(q ‖ p) + H(q)
    (the draws' own log-probs, which H(q) needs, are not cached); with ``top1``, ``top1_sampled``:
    the student's argmax equals the most drawn id (ties: the first stored), an estimate of top-1
    agreement that is exact when the teacher's top-1 is drawn most."""
    lp_TW = logp_TV.gather(1, draw_ids_TW)
    out = {"ce_sampled": float((-(draw_weights_TW * lp_TW).sum(-1) * mask).sum())}
    if top1:
        mode_T = draw_ids_TW.gather(1, draw_weights_TW.argmax(-1, keepdim=True))[:, 0]
        out["top1_sampled"] = float(((logp_TV.argmax(-1) == mode_T) * mask).sum())
    return out


def full_kl(lq_TV: torch.Tensor, lp_TV: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) per position over the whole vocabulary, from both log-softmaxes."""
    return (lq_TV.exp() * (lq_TV - lp_TV)).sum(-1)


def overlap_ks(ks: list[int], cached_k: int, live: bool, vocab: int) -> list[int]:
    """The overlap@k reported: the configured ks below the vocabulary (overlap@V is 1 for any model);
    from the cache alone only those within the cached top-k."""
    return sorted({k for k in ks if k < vocab and (live or k <= cached_k)})


def agreement(logp_TV: torch.Tensor, teacher_ids_TK: torch.Tensor, mask: torch.Tensor, ks: list[int]) -> dict:
    """Top-1 agreement and overlap@k (share of the teacher's top-k among the student's top-k), summed."""
    out = {"top1": float(((logp_TV.argmax(-1) == teacher_ids_TK[:, 0]) * mask).sum())}
    if ks:
        hits_TK = topk_hits(logp_TV, teacher_ids_TK, ks)
        out.update({f"overlap@{k}": float((hits_TK[:, i] / k * mask).sum()) for i, k in enumerate(ks)})
    return out


def topk_hits(logp_TV: torch.Tensor, teacher_ids_TK: torch.Tensor, ks: list[int], rows: int = 0) -> torch.Tensor:
    """[T, len(ks)] |student top-k ∩ teacher top-k| per position, in O(T·V) (no [T, k, k] comparison):
    the student's rank of every id is scattered into a [rows, V] table, gathered at the teacher's ids."""
    k_max, vocab = max(ks), logp_TV.shape[1]
    rows = rows or max(1, (1 << 24) // vocab)  # bounds the rank table at 64 MiB
    ks_K = torch.as_tensor(ks, device=logp_TV.device)
    out = []
    for lo in range(0, logp_TV.shape[0], rows):
        student_TK = logp_TV[lo:lo + rows].topk(k_max, -1).indices
        rank_TV = torch.full((len(student_TK), vocab), k_max, dtype=torch.int32, device=logp_TV.device)
        ranks_TK = torch.arange(k_max, dtype=torch.int32, device=logp_TV.device).expand_as(student_TK)
        rank_TV.scatter_(1, student_TK, ranks_TK)
        rank_TK = rank_TV.gather(1, teacher_ids_TK[lo:lo + rows, :k_max])  # student rank of the teacher's i-th id
        within = (rank_TK[:, None, :] < ks_K[None, :, None]) & (torch.arange(k_max, device=ks_K.device) < ks_K[:, None])
        out.append(within.sum(-1))
    return torch.cat(out).float()


def evaluate_model(model, batches: list[dict], vocab_limit: int, ks: list[int], teacher=None) -> dict[str, float]:
    """Token metrics of ``model`` on the (CPU) batches, run on the model's device; with ``teacher``
    (a model on the same device) the full-vocabulary KL and agreement against it."""
    model.eval()
    sums: dict[str, float] = {}
    capture, loads = router_capture(model), []
    top_k = int(getattr(model.config, "num_experts_per_tok", 1))  # a transformers config: MoE families name it so
    with capture or contextlib.nullcontext():
        for batch in batches:
            batch = to_device(batch, model.device)
            for key, value in token_metrics(model, batch, vocab_limit, ks, teacher).items():
                sums[key] = sums.get(key, 0.0) + value
            if capture is not None:
                loads.append(batch_load(capture.pop(), batch, top_k))
    n = max(sums.pop("tokens", 0.0), 1.0)
    out = {"perplexity": math.exp(sums.pop("nll") / n)}
    if "teacher_nll" in sums:
        out["teacher_perplexity"] = math.exp(sums.pop("teacher_nll") / n)
    if "kl" in sums:
        out["kl_to_teacher"] = sums.pop("kl") / n
    if "kl_bound" in sums:
        out[BOUND] = sums.pop("kl_bound") / n
    if "top1" in sums:
        out["top1_agreement"] = sums.pop("top1") / n
    if "ce_sampled" in sums:
        out[SAMPLED_CE] = sums.pop("ce_sampled") / n
    if "top1_sampled" in sums:
        out[SAMPLED_TOP1] = sums.pop("top1_sampled") / n
    out.update({k: v / n for k, v in sums.items()})
    return out | (expert_load_results(loads) if loads else {}) | {"tokens": int(n)}


def router_capture(model):
    """A RouterCapture on a MoE model of a supported family, else None (dense or unsupported)."""
    try:
        family = router_family(model.config) if num_experts(model.config) else None
    except ConfigError:
        return None
    return RouterCapture(model, family) if family is not None else None


def batch_load(logits_LNE: list[torch.Tensor], batch: dict, top_k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(expert token counts [L, E], summed router entropy [L], routed rows) of one batch, padding excluded."""
    valid_N = batch["attention_mask"].reshape(-1).bool()
    pairs = [expert_counts(g, valid_N, top_k) for g in logits_LNE]
    return torch.stack([c for c, _ in pairs]).cpu(), torch.stack([h for _, h in pairs]).cpu(), float(valid_N.sum())


def expert_load_results(loads: list) -> dict:
    """Layer means of load CV, router entropy, dead-expert share; per-layer values and the load
    histogram (share of top-k assignments per expert) under 'expert_load'."""
    per_layer = load_summary(sum(c for c, _, _ in loads), sum(h for _, h, _ in loads), sum(r for _, _, r in loads))
    means = {k: float(np.mean(per_layer[k])) for k in ("load_cv", "router_entropy", "dead_experts")}
    return means | {"expert_load": per_layer}


def eval_batches(cfg) -> tuple[list[dict], int]:
    directory = cache_location(cfg, cfg.eval.split, cfg.inputs_dir)
    if directory.exists("manifest.json"):
        source = CacheSource(directory)
        vocab = source.reader.manifest.identity["vocab_size"]
    else:
        source = PreparedSource(cfg.inputs_dir, cfg.eval.split)
        vocab = 0
    stream = ShardStream(source, StreamPlan(batch_size=1, shuffle_window=0, drop_last=False))
    seqs = np.concatenate(stream.steps(0))
    if cfg.eval.max_sequences:
        seqs = seqs[: cfg.eval.max_sequences]
    steps = [seqs[i:i + cfg.eval.batch_size] for i in range(0, len(seqs), cfg.eval.batch_size)]
    return [collate(stream.load(step)) for step in steps], vocab


def eval_teacher(cfg, device: torch.device, vocab_limit: int, tokenizer):
    """(the teacher model, '') for the full-vocabulary metrics, or (None, why it is not run)."""
    if not cfg.eval.run_teacher:
        return None, "eval.run_teacher=false"
    if not cfg.teacher.path:
        return None, "teacher.path is empty"
    t = cfg.teacher
    try:
        teacher = load_causal_lm(t.path, resolve_dtype(t.dtype, device), device, t.attn_implementation,
                                 t.trust_remote_code)
    except ConfigError as err:
        raise ConfigError(f"{err} (eval runs the teacher for the full-vocabulary KL; "
                          "eval.run_teacher=false reports only the cache's lower bound)") from None
    if teacher.get_output_embeddings().weight.shape[0] < vocab_limit:
        raise ConfigError(f"the teacher's vocabulary ({teacher.get_output_embeddings().weight.shape[0]}) is smaller "
                          f"than the evaluated vocabulary ({vocab_limit})")
    own = own_tokenizer_fingerprint(t.path)
    if own is not None and own != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"teacher.path={t.path!r} has another tokenizer than the student's: a KL over token ids "
                          "would compare different tokens")
    return teacher, ""


def run(cfg, force: bool = False) -> dict:
    out_dir = cfg.run_dir / "eval"
    check_inputs_from(cfg)  # data/ and caches of another run (run.inputs_from): refused unless they are this config's
    inputs = stage_inputs("evaluate", cfg)
    if not state.begin(cfg.run_dir, "evaluate", inputs, [out_dir], force):
        return json.loads((out_dir / "results.json").read_text())
    device = eval_device(cfg.run.device)
    batches, vocab = eval_batches(cfg)
    tokenizer = student_tokenizer(cfg.student.path, cfg.tokenizer_path())
    vocab_limit = vocab or len(tokenizer)
    teacher, missing = eval_teacher(cfg, device, vocab_limit, tokenizer)
    identity = cache_identity(cfg)
    notes = result_notes(list(cfg.eval.overlap_k), identity, teacher is not None, vocab_limit)
    if teacher is None and "sampled_estimates" not in notes:
        batches = [{**b, "teacher": b["teacher"] and replace(b["teacher"], draw_ids=None, draw_counts=None)}
                   for b in batches]
    ds, manifest = load_split(cfg.inputs_dir, cfg.eval.split)
    models = {"before": cfg.student.path} if cfg.eval.before else {}
    models["after"] = str(cfg.run_dir / "train" / "final")
    results = {}
    for label, path in models.items():
        model = load_causal_lm(path, torch.float32, device, "sdpa", False)
        results[label] = evaluate_model(model, batches, vocab_limit, list(cfg.eval.overlap_k), teacher)
        if missing:
            results[label]["kl_to_teacher_missing"] = missing
        results[label].update(notes)
        if manifest["mode"] == "prompt_response" and cfg.eval.rouge_samples:
            results[label]["rouge_l"] = rouge_l(model, tokenizer, ds, cfg.eval.rouge_samples, cfg.eval.max_new_tokens,
                                                cfg.eval.batch_size)
        del model
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    write_json_atomic(out_dir / "results.json", json.dumps(results, indent=1))
    print(format_results(results), flush=True)
    state.write_state(cfg.run_dir, "evaluate", "done", inputs)
    return results


def cache_identity(cfg) -> dict:
    """The identity of the evaluated split's cache ({} without one)."""
    directory = cache_location(cfg, cfg.eval.split, cfg.inputs_dir)
    return read_manifest(directory).identity if directory.exists("manifest.json") else {}


def result_notes(ks: list[int], identity: dict, live: bool, vocab: int) -> dict[str, str]:
    """What the results leave out or only estimate, and why (saved beside the numbers)."""
    cached_k, draws, notes = int(identity.get("k", 0)), identity.get("draws"), {}
    shown = overlap_ks(ks, cached_k, live, vocab)
    skipped = [f"overlap@{k}: " + (f"k is not below the vocabulary ({vocab}), where every model scores 1" if k >= vocab
               else f"the cache holds the teacher's top-{cached_k} and the teacher was not run")
               for k in sorted(set(ks) - set(shown))]
    if skipped:
        notes["overlap_skipped"] = "; ".join(skipped)
    if live or not draws:
        return notes
    if float(draws["temperature"]) != 1.0:
        notes["sampled_skipped"] = (f"the cached draws come from the teacher at cache.draw_temperature="
                                    f"{draws['temperature']}, not at 1: they estimate nothing about KL(q ‖ p) "
                                    f"at τ = 1")
        return notes
    notes["sampled_estimates"] = (
        f"{SAMPLED_CE} is an unbiased estimate, from the cache's {draws['n']} draws per position, of the "
        f"cross-entropy H(q, p) = KL(q ‖ p) + H(q); the KL itself needs the teacher's entropy H(q), i.e. the "
        f"log-probs of the drawn ids, which cache format v1 does not store; H(q) does not depend on the student, "
        f"so the before/after difference of the estimate is the difference of the KLs"
        + ("" if cached_k else f"; {SAMPLED_TOP1} compares the student's argmax with the most drawn id, the "
           f"teacher's top-1 unless its first ids lie within the sampling noise (cache.k=0: no cached top-1)"))
    return notes


def format_results(results: dict) -> str:
    keys = sorted({k for r in results.values() for k, v in r.items() if k != "tokens" and isinstance(v, float)},
                  key=_metric_order)
    lines = [f"{'metric':<34}" + "".join(f"{label:>12}" for label in results)]
    for key in keys:
        lines.append(f"{key:<34}" + "".join(f"{r.get(key, float('nan')):>12.4f}" for r in results.values()))
    missing = next((r["kl_to_teacher_missing"] for r in results.values() if "kl_to_teacher_missing" in r), "")
    if missing:
        lines.append(f"kl_to_teacher (full vocabulary) not measured: {missing}, so the teacher was not run"
                     + (f"; {BOUND} is only a lower bound of it" if any(BOUND in r for r in results.values()) else ""))
    first = next(iter(results.values()), {})
    notes = ("sampled_estimates", "sampled_skipped", "overlap_skipped")
    lines += [f"{key}: {first[key]}" for key in notes if key in first]
    return "\n".join(lines)


def _metric_order(key: str) -> tuple:
    order = ["perplexity", "teacher_perplexity", "kl_to_teacher", BOUND, SAMPLED_CE, "top1_agreement", SAMPLED_TOP1,
             "rouge_l"]
    return (order.index(key) if key in order else len(order), key)
