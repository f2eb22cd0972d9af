"""From teacher logits to cache fields, a chunk of positions at a time.

Per chunk of C positions (a view into one sequence's logits) we take the top-k, the
log-partition at every cached temperature and the target's log-prob; the fp32 copy of a
chunk is the largest temporary, never the whole batch × vocabulary.

Shapes: C positions in a chunk, V vocabulary, K top-k, N draws, P temperatures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.teachers import native
from pipeline.teachers.base import padded_draws

TARGETS = ("topk", "sampled", "topk+sampled")
TOPK_BLOCK = 8  # entries per block in blocked_topk: k blocks of 8 leave 8k candidates


@dataclass(frozen=True)
class ExtractSpec:
    k: int
    temperatures: tuple[float, ...]  # temperatures[0] == 1.0
    targets: str = "topk"
    num_draws: int = 64
    draw_temperature: float = 1.0
    seed: int = 0
    vocab_limit: int = 0  # ids >= this are vocabulary padding and never a target
    chunk_tokens: int = 1024
    router_topk: str = "all"  # 'all' | 'routed' | 'none' | an integer
    router_layers: object = "all"  # 'all' | 'last' | 'every:N' | a tuple of decoder-layer indices (base.router_layers)
    kernel: str = "auto"  # the teacher resolves it to 'native' (CPU kernel), 'torch' or 'triton': native.resolve_kernel

    @property
    def wants_topk(self) -> bool:
        return "topk" in self.targets

    @property
    def wants_draws(self) -> bool:
        return "sampled" in self.targets


def log_partitions(zf_CV: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """log sum exp(z / t) per temperature [C, P], torch.logsumexp's algorithm with one max pass for all t."""
    max_C1 = zf_CV.amax(-1, keepdim=True)
    max_C1 = max_C1.masked_fill(max_C1.abs() == float("inf"), 0.0)
    cols = []
    for t in temperatures:
        shifted_CV = zf_CV - max_C1
        if t != 1.0:
            shifted_CV.div_(t)
        cols.append(shifted_CV.exp_().sum(-1).log_().add_(max_C1[:, 0] / t))
    return torch.stack(cols, -1)


def blocked_topk(z_CV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk (sorted, up to the order of ties) as two small selections, ~1.5x faster on CPU.

    Cut the columns into strided blocks (block i = columns i, i + B, i + 2B, ...); an entry
    whose block maximum is not among the k largest block maxima has k larger entries (those
    maxima), so the top k lie in those k blocks (plus the columns past the last whole block).
    """
    cols = z_CV.shape[-1]
    blocks = cols // TOPK_BLOCK
    if blocks < 2 * k:
        return torch.topk(z_CV, k, dim=-1)
    per_block_CRB = z_CV[:, : blocks * TOPK_BLOCK].unflatten(-1, (TOPK_BLOCK, blocks))
    _, best_CK = torch.topk(per_block_CRB.amax(1), k, dim=-1, sorted=False)
    members = torch.arange(0, TOPK_BLOCK * blocks, blocks, device=z_CV.device)
    cand_CM = (best_CK[:, :, None] + members).flatten(1)
    if cols > blocks * TOPK_BLOCK:
        rest = torch.arange(blocks * TOPK_BLOCK, cols, device=z_CV.device)
        cand_CM = torch.cat([cand_CM, rest.expand(len(cand_CM), -1)], 1)
    vals_CK, pos_CK = torch.topk(z_CV.gather(1, cand_CM), k, dim=-1, sorted=True)
    return vals_CK, cand_CM.gather(1, pos_CK)


def topk_and_partitions(z_CV: torch.Tensor, spec: ExtractSpec) -> dict[str, torch.Tensor]:
    zf_CV = z_CV.float()  # no copy for fp32 logits (CPU); the chunk's fp32 copy for bf16 ones
    if spec.kernel == "native":
        lp_CK, ids_CK, log_z_CP = native.topk_lse(zf_CV, spec.k if spec.wants_topk else 0, spec.temperatures)
        out = {"log_partition": log_z_CP, "zf": zf_CV}
        if spec.wants_topk:
            out["topk_ids"], out["topk_logprobs"] = ids_CK, lp_CK
        return out
    log_z_CP = log_partitions(zf_CV, spec.temperatures)
    out = {"log_partition": log_z_CP, "zf": zf_CV}
    if spec.wants_topk:
        # top-k in the logits' own dtype: the same values (bf16 -> fp32 is exact), half the bytes read;
        # CUDA's radix-select topk needs no help, CPU's per-row heap does
        cpu = z_CV.device.type == "cpu"
        vals_CK, ids_CK = blocked_topk(z_CV, spec.k) if cpu else torch.topk(z_CV, spec.k, dim=-1)
        out["topk_ids"] = ids_CK.to(torch.int32)
        out["topk_logprobs"] = vals_CK.float() - log_z_CP[:, :1]
    return out


def target_logprob(zf_CV: torch.Tensor, log_z1_C: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
    """Teacher log-prob of each position's next token; 0 where there is none (target -1)."""
    safe_C = targets_C.clamp(min=0)
    lp_C = zf_CV.gather(1, safe_C[:, None])[:, 0] - log_z1_C
    return torch.where(targets_C >= 0, lp_C, torch.zeros_like(lp_C))


def draw(zf_CV: torch.Tensor, u_CN: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Inverse-CDF sampling of N ids per position, returned as unique ids + counts [C, N] (ascending
    ids first, padded with count 0: the record's layout)."""
    probs_CV = torch.softmax(zf_CV if temperature == 1.0 else zf_CV / temperature, dim=-1)
    cdf_CV = torch.cumsum(probs_CV, dim=-1)
    ids_CN = torch.searchsorted(cdf_CV, u_CN * cdf_CV[:, -1:]).clamp_(max=zf_CV.shape[1] - 1)
    rows_CN = torch.arange(ids_CN.shape[0], device=ids_CN.device)[:, None].expand_as(ids_CN)
    keys, counts = torch.unique(rows_CN * zf_CV.shape[1] + ids_CN, return_counts=True)
    return padded_draws(keys, counts, ids_CN.shape[0], ids_CN.shape[1], zf_CV.shape[1])


def torch_chunk(z_CV: torch.Tensor, targets_C: torch.Tensor, u_CN: torch.Tensor | None,
                spec: ExtractSpec) -> dict[str, torch.Tensor]:
    out = topk_and_partitions(z_CV, spec)
    zf_CV = out.pop("zf")
    out["target_logprob"] = target_logprob(zf_CV, out["log_partition"][:, 0], targets_C)
    if u_CN is not None:
        out.update(draw(zf_CV, u_CN.to(zf_CV.device), spec.draw_temperature))
    return out


def triton_chunk(z_CV: torch.Tensor, targets_C: torch.Tensor, u_CN: torch.Tensor | None,
                 spec: ExtractSpec) -> dict[str, torch.Tensor]:
    """The same fields from one Triton kernel over the logits in their own dtype (pipeline/kernels/extract.py)."""
    from pipeline.kernels.extract import extract_chunk  # imports triton: only when selected

    return extract_chunk(z_CV, targets_C, u_CN, spec.k if spec.wants_topk else 0, spec.temperatures,
                         spec.draw_temperature)


def to_unit_gauge(log_z_CP: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """log sum exp(z/tau) → the gauge log Z_1 = 0 (z := log p): log sum p^(1/tau) = log Z_tau - log Z_1 / tau.
    The cache stores this: the logits' offset carries no information, and column 0 is then always 0."""
    inv_P = torch.tensor([1.0 / t for t in temperatures], dtype=log_z_CP.dtype, device=log_z_CP.device)
    return log_z_CP - log_z_CP[:, :1] * inv_P


@dataclass(frozen=True)
class HeadRows:
    """One sequence's logits made on demand, a row range at a time: the LM head over its last hidden states
    (pipeline/teachers/hf.py ``head_apart``). Phase one then never holds the [L, V] logits, and each chunk
    is read by the extraction right after the matmul wrote it."""

    hidden_LH: torch.Tensor
    head: torch.nn.Module

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.head(self.hidden_LH[rows])


def extract_sequence(z_LV: torch.Tensor | HeadRows, targets_L: torch.Tensor, u_LN: torch.Tensor | None,
                     spec: ExtractSpec) -> dict[str, torch.Tensor]:
    """All cache fields for the first L = len(targets_L) positions of a sequence, computed chunk by chunk from
    its logits (a tensor of at least L rows, or ``HeadRows`` that make each chunk's)."""
    parts: dict[str, list[torch.Tensor]] = {}
    chunk = triton_chunk if spec.kernel == "triton" else torch_chunk
    n = len(targets_L)
    for start in range(0, n, spec.chunk_tokens):
        stop = min(start + spec.chunk_tokens, n)
        z_CV = z_LV[start:stop][:, : spec.vocab_limit] if spec.vocab_limit else z_LV[start:stop]
        out = chunk(z_CV, targets_L[start:stop], None if u_LN is None else u_LN[start:stop], spec)
        if "draw_ids" in out:  # the teacher's tau = 1 log-prob at each stored draw (0 on padding), any kernel
            lp_CD = z_CV.gather(1, out["draw_ids"].long()).float() - out["log_partition"][:, :1]
            out["draw_logprobs"] = torch.where(out["draw_counts"] > 0, lp_CD, 0.0)
        out["log_partition"] = to_unit_gauge(out["log_partition"], spec.temperatures)
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}
