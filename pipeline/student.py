"""The student wrapped for distillation: one forward returns the loss sums of a micro-batch.

Everything that needs gradients happens inside ``forward`` (body, token-chunked lm_head +
CE + KD, router capture + router losses), so DDP/FSDP wrapping sees one ordinary module.
Sums, not means: the trainer divides by the global count of valid tokens.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from pipeline import fused_loss
from pipeline.batches import valid_rows
from pipeline.losses import KDSpec, TeacherTargets, chunked_lm_losses
from pipeline.router import RouterCapture
from pipeline.router_losses import TAU_RANGE, RouterLossSpec, router_parts

PROMPT_KL = KDSpec("forward_kl", 1.0)  # BiLD's prompt term: forward KL at tau = 1, tail bucket


def prompt_positions(batch: dict) -> torch.Tensor:
    """Bool [T]: positions with a next token that are not trained on (the prompt of prompt/response data)."""
    return (batch["labels"] >= 0) & ~batch["loss_mask"].bool()


def teacher_targets(t: dict, temperatures: tuple[float, ...]) -> TeacherTargets | None:
    if "log_partition" not in t:
        return None
    return TeacherTargets(topk_ids_TK=t.get("topk_ids"), topk_logprobs_TK=t.get("topk_logprobs"),
                          log_partition_TP=t["log_partition"], temperatures=temperatures,
                          draw_ids_TD=t.get("draw_ids"), draw_weights_TD=t.get("draw_weights"))


class DistillStudent(nn.Module):
    def __init__(self, model, spec: KDSpec | None, temperatures: tuple[float, ...], vocab_limit: int,
                 chunk_tokens: int, routers: RouterCapture | None = None, layer_map: list[int] | None = None,
                 teacher_experts: int = 0, router_spec: RouterLossSpec | None = None, prompt_kl: bool = False,
                 fused: str = "never", loss_weights: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.model, self.spec, self.temperatures = model, spec, temperatures
        self.prompt_kl = prompt_kl  # also return "prompt_kl" (train.prompt_kl_weight > 0)
        self.vocab_limit, self.chunk_tokens = vocab_limit, chunk_tokens
        # train.fused_loss: the fused LM head + CE + KD (pipeline/fused_loss.py) forms the gradient in forward
        # for the trainer's (ce, kd) weights; the prompt KL (forward KL at tau = 1) is always covered.
        self.fused = fused_loss.choose(fused, spec)
        self.kernel = fused_loss.kernel_for(fused)  # torch, or triton (train.fused_loss=triton)
        self.fused_prompt_kl, self.loss_weights = fused != "never" and prompt_kl, tuple(loss_weights)
        self.routers, self.layer_map, self.teacher_experts = routers, layer_map or [], teacher_experts
        self.router_spec = router_spec or RouterLossSpec(parts=frozenset({"router"} if self.layer_map else ()),
                                                         stats=False)
        if "erd" in self.router_spec.parts:  # one learnable router temperature per student MoE layer
            tau_L = torch.full((len(self.layer_map),), float(self.router_spec.temperature_init))
            self.router_temperature = nn.Parameter(tau_L, requires_grad=self.router_spec.learn_temperature)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.routers is not None:
            self.routers.logits.clear()
        hidden_BLH = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           use_cache=False).last_hidden_state
        hidden_TH = hidden_BLH.flatten(0, 1).index_select(0, valid_rows(batch))  # = hidden_BLH[valid], no sync
        mask_T = batch["loss_mask"]
        wants_teacher = self.spec is not None or self.prompt_kl
        teacher = teacher_targets(batch["teacher"], self.temperatures) if wants_teacher else None
        lm_losses = partial(fused_loss.fused_lm_losses, weights=self.loss_weights, kernel=self.kernel) if self.fused else chunked_lm_losses
        out = lm_losses(hidden_TH, self.model.get_output_embeddings().weight, batch["labels"], mask_T, mask_T,
                        teacher if self.spec is not None else None, self.spec,
                        chunk_tokens=self.chunk_tokens, vocab_limit=self.vocab_limit)
        if self.prompt_kl:
            out["prompt_kl"] = self._prompt_kl(hidden_TH, batch, teacher)
        if self.routers is not None:
            out.update(self._router_parts(batch))
        out.setdefault("router", hidden_TH.new_zeros(()))
        return out

    def _prompt_kl(self, hidden_TH: torch.Tensor, batch: dict, teacher: TeacherTargets | None) -> torch.Tensor:
        """Sum of forward KL at tau = 1 (tail bucket) over the positions with a next token that are
        not trained on: the prompt of prompt/response data (BiLD's training semantics; the trainer
        divides it by the global count of those positions). The lm_head runs on those rows only, so
        response tokens are not projected twice."""
        if teacher is None or teacher.topk_ids_TK is None:
            raise ValueError("train.prompt_kl_weight > 0 needs a cache with top-k targets (cache.targets=topk...)")
        rows_R = batch["prompt_rows"] if "prompt_rows" in batch else prompt_positions(batch).nonzero()[:, 0]
        kd_R = torch.ones_like(rows_R, dtype=torch.bool)
        lm_losses = partial(fused_loss.fused_lm_losses, weights=(0.0, 1.0), kernel=self.kernel) if self.fused_prompt_kl else chunked_lm_losses
        return lm_losses(hidden_TH.index_select(0, rows_R), self.model.get_output_embeddings().weight,
                         batch["labels"].index_select(0, rows_R), ~kd_R, kd_R, teacher.index(rows_R),
                         PROMPT_KL, chunk_tokens=self.chunk_tokens, vocab_limit=self.vocab_limit)["kd"]

    def router_tau(self) -> torch.Tensor | None:
        """τ_r [L], projected into TAU_RANGE before use (projected gradient descent)."""
        tau_L = getattr(self, "router_temperature", None)
        if tau_L is not None:
            with torch.no_grad():
                tau_L.clamp_(*TAU_RANGE)
        return tau_L

    def _router_parts(self, batch: dict) -> dict[str, torch.Tensor]:
        """Router KL, ERD, MC exploration, coverage, aux loss and load statistics (see router_losses)."""
        logits = self.routers.logits[: len(self.routers.layers)]  # gradient checkpointing may append recomputes
        return router_parts(logits, batch, self.router_spec, self.layer_map, self.teacher_experts, self.router_tau())
