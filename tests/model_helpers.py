"""A stand-in causal LM for loss tests (tests/test_fused_loss.py, tests/test_loss_autocast.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class FixedHiddenLM(torch.nn.Module):
    """The two things DistillStudent asks of a causal LM: final hidden states (fixed, or a
    trainable parameter) and an LM head whose weight is ``weight_VH``."""

    def __init__(self, hidden_TH: torch.Tensor, weight_VH: torch.Tensor, trainable_hidden: bool = False):
        super().__init__()
        hidden_1TH = hidden_TH[None].clone()
        self.hidden_1TH = torch.nn.Parameter(hidden_1TH) if trainable_hidden else hidden_1TH
        self.head = torch.nn.Linear(weight_VH.shape[1], weight_VH.shape[0], bias=False)
        self.head.weight = torch.nn.Parameter(weight_VH.clone())

    def base_model(self, input_ids, attention_mask, use_cache):
        return SimpleNamespace(last_hidden_state=self.hidden_1TH)

    def get_output_embeddings(self):
        return self.head
