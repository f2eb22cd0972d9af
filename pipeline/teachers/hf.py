"""The transformers teacher: one forward per batch, extraction on the device.

bf16 on GPU, fp32 on CPU (``teacher.dtype=auto``). Positions are flattened per sequence
(views into the logits, never a gathered copy of batch × vocab), router logits come from
hooks on the router modules (see pipeline/router.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch

from cache.schema import Sequences, TeacherRecord
from pipeline.config import ConfigError
from pipeline.models import load_causal_lm, own_tokenizer_fingerprint, teacher_identity
from pipeline.router import RouterCapture, check_raw_logits, find_routers, num_experts, router_family
from pipeline.seeding import sequence_generator
from pipeline.teachers.base import TeacherBatch, TeacherConfig, resolve_dtype, router_layers
from pipeline.teachers.extract import ExtractSpec, HeadRows, extract_sequence
from pipeline.teachers.native import resolve_kernel


def resolve_router_topk(setting: str, experts: int, routed: int) -> int:
    """'all' → every expert, 'routed' → the teacher's experts per token, 'none' → no router data, an
    integer → that many (≤ experts)."""
    if setting == "none" or experts == 0:
        return 0
    if setting == "all":
        return experts
    if setting == "routed":
        return routed or experts
    if not setting.isdigit() or not 0 < int(setting) <= experts:
        raise ConfigError(f"cache.router_topk={setting!r} must be 'all', 'routed', 'none' or 1..{experts}")
    return int(setting)


# Families whose causal-LM forward is exactly ``lm_head(base_model(...).last_hidden_state)``: no logit
# soft-capping (Gemma 2/3), scaling (Granite, Cohere) or other transform after the head. Others keep the
# model's own forward; tests/test_teacher_hf.py checks both paths against the model's logits.
HEAD_APART_FAMILIES = ("qwen3_moe", "qwen2_moe", "qwen3", "qwen2", "llama", "mistral", "mixtral", "olmoe")


def head_apart(model) -> bool:
    """Whether phase one runs the body alone and the LM head per extraction chunk (``HeadRows``)."""
    head = model.get_output_embeddings()
    return (model.config.model_type in HEAD_APART_FAMILIES and model.base_model is not model
            and type(head) is torch.nn.Linear)


def to_host(fields: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every field as numpy. From a GPU: all copies queued into pinned buffers (non_blocking, no
    pageable staging), then one wait, instead of a synchronous .cpu() per field."""
    if not any(t.device.type == "cuda" for t in fields.values()):
        return {key: t.numpy(force=True) for key, t in fields.items()}
    host = {key: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for key, t in fields.items()}
    for key, t in fields.items():
        host[key].copy_(t, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return {key: t.numpy() for key, t in host.items()}


class HFTeacher:
    def __init__(self, cfg: TeacherConfig, spec: ExtractSpec, device: torch.device):
        self.cfg, self.device = cfg, device
        self.spec = replace(spec, kernel=resolve_kernel(spec.kernel, device))
        self.model = load_causal_lm(cfg.path, resolve_dtype(cfg.dtype, device), device,
                                    cfg.attn_implementation, cfg.trust_remote_code)
        config = self.model.config
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.family = router_family(config) if spec.router_topk != "none" else None
        self.num_experts = num_experts(config) if self.family else 0
        self.experts_per_token = getattr(config, "num_experts_per_tok", 0) if self.num_experts else 0
        self.router_topk = resolve_router_topk(spec.router_topk, self.num_experts, self.experts_per_token)
        self.capture, self.moe_layers = None, []
        if self.router_topk:
            self.moe_layers = [i for i, _ in find_routers(self.model, self.family)]
            self.capture = RouterCapture(self.model, self.family, router_layers(spec.router_layers, self.moe_layers))
        self.tokenizer_fingerprint = own_tokenizer_fingerprint(cfg.path)
        self.router_has_probs = True
        self.head_apart = head_apart(self.model)
        self._checked = False

    def close(self) -> None:
        """Nothing to stop: the model's memory goes with the teacher object."""

    def identity(self) -> dict:
        config = self.model.config
        return {
            **teacher_identity(self.cfg.path, config),
            "router_topk": self.router_topk,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "moe_layers": self.capture.layers if self.capture else [],  # the stored ones (cache.router_layers)
            "teacher_moe_layers": self.moe_layers,
        }

    @torch.inference_mode()
    def score(self, batch: TeacherBatch) -> Sequences:
        input_ids = batch.input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device)
        attention_mask = (positions[None, :] < batch.lengths.to(self.device)[:, None]).long()
        with self.capture or contextlib.nullcontext():
            logits_BLV = self._logits(input_ids, attention_mask)
        router = self._router(self.capture.pop(), attention_mask) if self.capture else {}
        per_seq = [self._sequence(logits_BLV[b], input_ids[b], batch, b) for b in range(len(batch.lengths))]
        return self._output(batch, per_seq, router)

    def _logits(self, input_ids, attention_mask) -> torch.Tensor | list[HeadRows]:
        """The batch's logits [B, L, V], or with ``head_apart`` each sequence's ``HeadRows`` (the body's hidden
        states; the head runs per extraction chunk: no [B, L, V] tensor, 5 GB in bf16 at 8 × 2,048 × 151,936)."""
        if not self.head_apart:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        hidden_BLH = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        return [HeadRows(hidden_LH, head) for hidden_LH in hidden_BLH]

    def _sequence(self, logits_LV, ids_L, batch: TeacherBatch, b: int) -> dict[str, torch.Tensor]:
        n = int(batch.lengths[b])
        targets_L = torch.full((n,), -1, dtype=torch.long, device=ids_L.device)
        targets_L[:-1] = ids_L[1:n]
        u_LN = None
        if self.spec.wants_draws:
            u_LN = torch.rand(n, self.spec.num_draws, generator=sequence_generator(self.spec.seed, int(batch.sample_ids[b])))
        return extract_sequence(logits_LV, targets_L, u_LN, self.spec)  # its first n rows

    def _router(self, logits: list[torch.Tensor], attention_mask_BL: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._checked:
            check_raw_logits(logits[0])
            self._checked = True
        valid = attention_mask_BL.reshape(-1).bool()
        probs_NLE = torch.stack([self.family.probs(layer_NE[valid]) for layer_NE in logits], 1)
        if self.router_topk == probs_NLE.shape[-1]:  # every expert: a sort is ~1.5x faster than topk on CPU
            probs_NLR, ids_NLR = torch.sort(probs_NLE, dim=-1, descending=True)
        else:
            probs_NLR, ids_NLR = torch.topk(probs_NLE, self.router_topk, dim=-1)
        return {"router_probs": probs_NLR, "router_ids": ids_NLR.to(torch.int32)}

    def _output(self, batch: TeacherBatch, per_seq: list[dict], router: dict) -> Sequences:
        fields = to_host({**{key: torch.cat([s[key] for s in per_seq]) for key in per_seq[0]}, **router})
        if np.isnan(fields["log_partition"]).any():
            raise ConfigError(f"the teacher's logits hold NaN (batch of sample ids {batch.sample_ids[:3].tolist()}...): "
                              "fp16 overflow or broken weights; try teacher.dtype=bfloat16 or float32")
        lengths = batch.lengths.numpy()
        valid = np.arange(batch.input_ids.shape[1])[None, :] < lengths[:, None]
        return Sequences(sample_ids=batch.sample_ids.numpy(), seq_lens=lengths, input_ids=batch.input_ids.numpy()[valid],
                         loss_mask=batch.loss_mask.numpy()[valid],
                         teacher=TeacherRecord(temperatures=tuple(self.spec.temperatures),
                                               draw_temperature=self.spec.draw_temperature, **fields))
