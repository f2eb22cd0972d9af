"""The LM-head losses are fp32 whatever autocast is active (issue 16, item 1).

The trainer runs the student's forward inside ``accelerator.autocast()`` (bf16 on GPU by
default). Under it a matmul of fp32 inputs is still computed in bf16, so the loss must leave
autocast for the LM head and the softmax statistics. Checked under CPU bf16 autocast (the same
op policy for matmul) against a float64 dense computation: values and gradients. Before the
fix CE was off by ~2e-2 nats/token and the KD losses by ~1e-3.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from cache_helpers import targets

from cache.schema import TeacherRecord

from pipeline.losses import KDSpec, chunked_lm_losses, draw_weights, take_rows
from model_helpers import FixedHiddenLM
from pipeline.student import DistillStudent

T, H, V, VOCAB, K = 24, 64, 1000, 990, 8
TEMPS = (1.0, 2.0)


def teacher_for(z_TV: torch.Tensor, n_draws: int = 16) -> TeacherRecord:
    lp_TV = torch.log_softmax(z_TV, -1)
    ids_TK = lp_TV.argsort(-1, descending=True)[:, :K]
    logz_TP = torch.stack([torch.logsumexp(z_TV / t, -1) for t in TEMPS], -1)
    draw_ids_TD = torch.multinomial(torch.softmax(z_TV, -1), n_draws, replacement=True)
    draw_w_TD = torch.full(draw_ids_TD.shape, 1.0 / n_draws)  # repeated ids: the weights add up
    return targets(ids_TK, lp_TV.gather(-1, ids_TK).float(), logz_TP.float(), TEMPS, draw_ids_TD, draw_w_TD,
                   lp_TV.gather(-1, draw_ids_TD).float())


@pytest.fixture
def case():
    torch.manual_seed(5)
    hidden_TH = torch.randn(T, H)
    weight_VH = torch.randn(V, H) * (3.0 / H**0.5)  # student logits of std ~3
    labels_T = torch.randint(0, VOCAB, (T,))
    z_TV = 3.0 * torch.randn(T, VOCAB, dtype=torch.float64)
    return hidden_TH, weight_VH, labels_T, teacher_for(z_TV), z_TV


def dense_reference(hidden_TH, weight_VH, labels_T, teacher, z_TV, spec):
    """(CE sum, KD sum) in float64 from the full logits, by the definitions in docs/losses.md."""
    s_TV = hidden_TH @ weight_VH[:VOCAB].T
    ce = (torch.logsumexp(s_TV, -1) - s_TV.gather(-1, labels_T[:, None])[:, 0]).sum()
    tau = spec.temperature
    lp_TV = torch.log_softmax(s_TV / tau, -1)
    if spec.name == "sampled":
        w_TD = draw_weights(teacher, tau).double()  # importance weights at tau != 1 (see test_sampled_importance)
        return ce, -(w_TD * lp_TV.gather(-1, teacher.draw_ids)).sum()
    q_TV, p_TV = torch.softmax(z_TV / tau, -1), lp_TV.exp()
    ids_TK = teacher.topk_ids
    q_TB = torch.cat([q_TV.gather(-1, ids_TK), 1 - q_TV.gather(-1, ids_TK).sum(-1, keepdim=True)], -1)
    p_TB = torch.cat([p_TV.gather(-1, ids_TK), 1 - p_TV.gather(-1, ids_TK).sum(-1, keepdim=True)], -1)
    return ce, (q_TB * (q_TB.log() - p_TB.log())).sum()


def grads(fn, hidden_TH, weight_VH):
    h, w = hidden_TH.clone().requires_grad_(), weight_VH.clone().requires_grad_()
    ce, kd = fn(h, w)
    (ce + 0.5 * kd).backward()
    return ce.detach(), kd.detach(), h.grad, w.grad


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 1.0), KDSpec("forward_kl", 2.0), KDSpec("sampled", 2.0)],
                         ids=["forward_kl-1", "forward_kl-2", "sampled-2"])
def test_losses_under_bf16_autocast_match_float64(case, spec):
    hidden_TH, weight_VH, labels_T, teacher, z_TV = case
    mask_T = torch.ones(T, dtype=torch.bool)

    def ours(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = chunked_lm_losses(h, w, labels_T, mask_T, mask_T, teacher, spec, chunk_tokens=10, vocab_limit=VOCAB)
        return out["ce"], out["kd"]

    ce, kd, g_h, g_w = grads(ours, hidden_TH, weight_VH)
    ref_ce, ref_kd, ref_g_h, ref_g_w = grads(lambda h, w: dense_reference(h, w, labels_T, teacher, z_TV, spec),
                                             hidden_TH.double(), weight_VH.double())
    assert ce.dtype == kd.dtype == torch.float32
    # fp32 logits: ~1e-6 relative; the bf16 logits of the bug were off by ~2e-2 nats/token (CE)
    # and ~1e-3 (KD), i.e. ~2e-3 and ~1e-3 relative here.
    torch.testing.assert_close(ce.double() / T, ref_ce / T, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(kd.double() / T, ref_kd / T, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g_h.double(), ref_g_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w.double(), ref_g_w, rtol=1e-4, atol=1e-5)


def test_autocast_stays_on_outside_the_loss(case):
    """Leaving autocast is local to the loss: the caller's region still computes in bf16."""
    hidden_TH, weight_VH, labels_T, teacher, _ = case
    mask_T = torch.ones(T, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_lm_losses(hidden_TH, weight_VH, labels_T, mask_T, mask_T, teacher, KDSpec(), chunk_tokens=10)
        assert (hidden_TH @ weight_VH.T).dtype == torch.bfloat16



def test_student_forward_under_bf16_autocast_matches_float64(case):
    """Through DistillStudent.forward: CE and KD on the trained half, the prompt KL on the other."""
    hidden_TH, weight_VH, labels_T, teacher, z_TV = case
    trained_T = torch.arange(T) >= T // 2
    batch = {"input_ids": torch.zeros(1, T, dtype=torch.long), "attention_mask": torch.ones(1, T, dtype=torch.long),
             "valid": torch.ones(1, T, dtype=torch.bool), "labels": labels_T, "loss_mask": trained_T,
             "teacher": replace(teacher, draw_ids=None, draw_counts=None)}
    student = DistillStudent(FixedHiddenLM(hidden_TH, weight_VH), KDSpec(), VOCAB, 10, prompt_kl=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dict(student(batch).losses.items())
    spec = KDSpec()
    rows = {"trained": trained_T, "prompt": ~trained_T}
    ref = {part: dense_reference(hidden_TH[r].double(), weight_VH.double(), labels_T[r], take_rows(teacher, r.nonzero()[:, 0]),
                                 z_TV[r], spec) for part, r in rows.items()}
    torch.testing.assert_close(out["ce"].double(), ref["trained"][0], rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(out["kd"].double(), ref["trained"][1], rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(out["prompt_kl"].double(), ref["prompt"][1], rtol=2e-5, atol=1e-5)
