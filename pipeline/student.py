"""The student wrapped for distillation: one forward returns the loss sums of a micro-batch.

Everything that needs gradients happens inside ``forward`` (body, token-chunked lm_head +
CE + KD, router capture + router KL), so DDP/FSDP wrapping sees one ordinary module.
Sums, not means: the trainer divides by the global count of valid tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.losses import KDSpec, TeacherTargets, chunked_lm_losses
from pipeline.router import RouterCapture, map_experts, router_kl, teacher_router_dense


def teacher_targets(t: dict, temperatures: tuple[float, ...]) -> TeacherTargets | None:
    if "log_partition" not in t:
        return None
    return TeacherTargets(topk_ids_TK=t.get("topk_ids"), topk_logprobs_TK=t.get("topk_logprobs"),
                          log_partition_TP=t["log_partition"], temperatures=temperatures,
                          draw_ids_TD=t.get("draw_ids"), draw_weights_TD=t.get("draw_weights"))


class DistillStudent(nn.Module):
    def __init__(self, model, spec: KDSpec | None, temperatures: tuple[float, ...], vocab_limit: int,
                 chunk_tokens: int, routers: RouterCapture | None = None, layer_map: list[int] | None = None,
                 teacher_experts: int = 0):
        super().__init__()
        self.model, self.spec, self.temperatures = model, spec, temperatures
        self.vocab_limit, self.chunk_tokens = vocab_limit, chunk_tokens
        self.routers, self.layer_map, self.teacher_experts = routers, layer_map or [], teacher_experts

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.routers is not None:
            self.routers.logits.clear()
        hidden_BLH = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           use_cache=False).last_hidden_state
        valid = batch["valid"]
        hidden_TH = hidden_BLH[valid]
        mask_T = batch["loss_mask"]
        teacher = teacher_targets(batch["teacher"], self.temperatures) if self.spec is not None else None
        out = chunked_lm_losses(hidden_TH, self.model.get_output_embeddings().weight, batch["labels"], mask_T, mask_T,
                                teacher, self.spec, chunk_tokens=self.chunk_tokens, vocab_limit=self.vocab_limit)
        out["router"] = self._router_loss(batch, valid, mask_T) if self.routers is not None else hidden_TH.new_zeros(())
        return out

    def _router_loss(self, batch: dict, valid_BL: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
        """Sum over valid tokens of the mean over mapped layers of KL(teacher router ‖ student router)."""
        logits = self.routers.logits[: len(self.routers.layers)]  # gradient checkpointing may append recomputes
        ids_TLR = batch["teacher"]["router_ids"]
        probs_TLR = batch["teacher"].get("router_probs")
        flat_valid = valid_BL.reshape(-1)
        total = logits[0].new_zeros((), dtype=torch.float32)
        for s, t in enumerate(self.layer_map):
            student_TE = logits[s][flat_valid]
            dense_TE = teacher_router_dense(ids_TLR[:, t], None if probs_TLR is None else probs_TLR[:, t],
                                            self.teacher_experts)
            kl_T = router_kl(student_TE, map_experts(dense_TE, student_TE.shape[1]))
            total = total + (kl_T * mask_T).sum()
        return total / max(len(self.layer_map), 1)
