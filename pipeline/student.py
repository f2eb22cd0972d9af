"""The student wrapped for distillation: one forward returns the loss sums of a micro-batch.

Everything that needs gradients happens inside ``forward`` (body, token-chunked lm_head +
CE + KD, router capture + router losses), so DDP/FSDP wrapping sees one ordinary module.
Sums, not means (``LossSums``); the weights of the objective (``LossWeights``, from the train
config) and the division by the step's global token counts are applied in one place, ``objective``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn

from pipeline import fused_loss
from pipeline.batches import valid_rows
from cache.schema import TeacherRecord
from pipeline.losses import KDSpec, chunked_lm_losses, kd_weight, take_rows
from pipeline.router import RouterCapture
from pipeline.router_losses import TAU_RANGE, RouterLossSpec, load_stats, router_parts

PROMPT_KL = KDSpec("forward_kl", 1.0)  # BiLD's prompt term: forward KL at tau = 1, tail bucket


@dataclass
class LossSums:
    """A micro-batch's loss terms, each an fp32 0-dim sum over its loss-masked tokens (prompt_kl: over
    its prompt tokens); None = not computed. Batch-level terms (coverage, aux) are the batch's value
    times its loss-masked token count, so that the step's division gives a token-weighted mean."""

    ce: torch.Tensor
    kd: torch.Tensor | None = None
    prompt_kl: torch.Tensor | None = None
    router: torch.Tensor | None = None
    erd: torch.Tensor | None = None
    mc: torch.Tensor | None = None
    coverage: torch.Tensor | None = None
    aux: torch.Tensor | None = None

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(f.name, v) for f in fields(self) if (v := getattr(self, f.name)) is not None]


@dataclass
class StudentOutput:
    losses: LossSums
    stats: dict[str, torch.Tensor]  # expert-load statistics (micro-batch means; empty unless asked)


@dataclass(frozen=True)
class LossWeights:
    """The weight of each LossSums term in the objective (docs/losses.md, docs/router.md):
    L = (1 − α)·CE + α·τ²·KD + w_p·prompt KL + β·router + λ_ERD·ERD + λ_MC·(MC + λ_cov·coverage) + λ_aux·aux
    (bild: no τ², as in BiLD)."""

    ce: float = 1.0
    kd: float = 0.0
    prompt_kl: float = 0.0
    router: float = 0.0
    erd: float = 0.0
    mc: float = 0.0
    coverage: float = 0.0
    aux: float = 0.0

    @classmethod
    def of(cls, t) -> "LossWeights":
        """From the train config section (stages/train_student.TrainConfig)."""
        return cls(ce=1 - t.alpha, kd=t.alpha * kd_weight(t.kd_loss, t.temperature), prompt_kl=t.prompt_kl_weight,
                   router=t.router_weight, erd=t.router_erd_weight, mc=t.router_mc_weight,
                   coverage=t.router_mc_weight * t.router_coverage_weight, aux=t.router_aux_weight)


def objective(sums: LossSums, weights: LossWeights, inv_valid: torch.Tensor, inv_prompt: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of the step's loss: each weighted sum divided by the step's global count
    of loss-masked tokens (1 / inv_valid; the prompt KL by that of prompt tokens, BiLD's mean)."""
    total = sums.ce.new_zeros(())
    for name, value in sums.items():
        total = total + getattr(weights, name) * value * (inv_prompt if name == "prompt_kl" else inv_valid)
    return total


def prompt_positions(batch: dict) -> torch.Tensor:
    """Bool [T]: positions with a next token that are not trained on (the prompt of prompt/response data)."""
    return (batch["labels"] >= 0) & ~batch["loss_mask"].bool()


class DistillStudent(nn.Module):
    def __init__(self, model, spec: KDSpec | None, vocab_limit: int, chunk_tokens: int,
                 routers: RouterCapture | None = None, layer_map: list[int] | None = None, teacher_experts: int = 0,
                 router_spec: RouterLossSpec | None = None, prompt_kl: bool = False, fused: str = "never",
                 weights: LossWeights = LossWeights(kd=1.0)):
        super().__init__()
        self.model, self.spec = model, spec
        self.prompt_kl = prompt_kl  # also return "prompt_kl" (train.prompt_kl_weight > 0)
        self.vocab_limit, self.chunk_tokens = vocab_limit, chunk_tokens
        # train.fused_loss: the fused LM head + CE + KD (pipeline/fused_loss.py) forms the gradient in forward
        # for the trainer's (ce, kd) weights; the prompt KL (forward KL at tau = 1) is always covered.
        self.fused = fused_loss.choose(fused, spec)
        self.kernel = fused_loss.kernel_for(fused)  # torch, or triton (train.fused_loss=triton)
        self.fused_prompt_kl, self.lm_weights = fused != "never" and prompt_kl, (weights.ce, weights.kd)
        self.routers, self.layer_map, self.teacher_experts = routers, layer_map or [], teacher_experts
        self.router_spec = router_spec or RouterLossSpec(parts=frozenset({"router"} if self.layer_map else ()))
        self.router_temperature = None
        if "erd" in self.router_spec.parts:  # one learnable router temperature per student MoE layer
            tau_L = torch.full((len(self.layer_map),), float(self.router_spec.temperature_init))
            self.router_temperature = nn.Parameter(tau_L, requires_grad=self.router_spec.learn_temperature)

    def forward(self, batch: dict, step: int = 0, stats: bool = False) -> StudentOutput:
        """The micro-batch's loss sums; ``step`` seeds the Monte Carlo expert draws (with run.seed and
        the sample ids), ``stats`` asks for the expert-load statistics (the trainer: on logged steps)."""
        if self.routers is not None:
            self.routers.logits.clear()
        hidden_BLH = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           use_cache=False).last_hidden_state
        hidden_TH = hidden_BLH.flatten(0, 1).index_select(0, valid_rows(batch))  # = hidden_BLH[valid], no sync
        mask_T = batch["loss_mask"]
        teacher = batch["teacher"]
        lm_losses = partial(fused_loss.fused_lm_losses, weights=self.lm_weights,
                            kernel=self.kernel) if self.fused else chunked_lm_losses
        lm = lm_losses(hidden_TH, self.model.get_output_embeddings().weight, batch["labels"], mask_T, mask_T,
                       teacher if self.spec is not None else None, self.spec,
                       chunk_tokens=self.chunk_tokens, vocab_limit=self.vocab_limit)
        sums = LossSums(ce=lm["ce"], kd=lm["kd"], router=hidden_TH.new_zeros(()))  # the log line always shows these
        if self.prompt_kl:
            sums.prompt_kl = self._prompt_kl(hidden_TH, batch, teacher)
        if self.routers is None:
            return StudentOutput(sums, {})
        logits = self.routers.logits[: len(self.routers.layers)]  # gradient checkpointing may append recomputes
        for name, value in router_parts(logits, batch, self.router_spec, self.layer_map, self.teacher_experts,
                                        self.router_tau(), step).items():
            setattr(sums, name, value)
        return StudentOutput(sums, load_stats(logits, valid_rows(batch), self.router_spec.top_k) if stats else {})

    def _prompt_kl(self, hidden_TH: torch.Tensor, batch: dict, teacher: TeacherRecord | None) -> torch.Tensor:
        """Sum of forward KL at tau = 1 (tail bucket) over the positions with a next token that are
        not trained on: the prompt of prompt/response data (BiLD's training semantics; the trainer
        divides it by the global count of those positions). The lm_head runs on those rows only, so
        response tokens are not projected twice."""
        if teacher is None or teacher.topk_ids is None:
            raise ValueError("train.prompt_kl_weight > 0 needs a cache with top-k targets (cache.targets=topk...)")
        rows_R = batch["prompt_rows"] if "prompt_rows" in batch else prompt_positions(batch).nonzero()[:, 0]
        kd_R = torch.ones_like(rows_R, dtype=torch.bool)
        lm_losses = partial(fused_loss.fused_lm_losses, weights=(0.0, 1.0), kernel=self.kernel) if self.fused_prompt_kl else chunked_lm_losses
        return lm_losses(hidden_TH.index_select(0, rows_R), self.model.get_output_embeddings().weight,
                         batch["labels"].index_select(0, rows_R), ~kd_R, kd_R, take_rows(teacher, rows_R),
                         PROMPT_KL, chunk_tokens=self.chunk_tokens, vocab_limit=self.vocab_limit)["kd"]

    def router_tau(self) -> torch.Tensor | None:
        """τ_r [L], projected into TAU_RANGE before use (projected gradient descent)."""
        tau_L = self.router_temperature
        if tau_L is not None:
            with torch.no_grad():
                tau_L.clamp_(*TAU_RANGE)
        return tau_L
