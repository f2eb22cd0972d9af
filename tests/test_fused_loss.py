"""The fused LM head + CE + KD (pipeline/fused_loss.py) against float64 dense full-vocabulary
references: values and gradients w.r.t. the hidden states and the LM-head weight, for every KD
loss it covers (tau = 1, a cached tau != 1, an uncached tau; tail_bucket and renormalize), under
bf16 autocast too; chunk sizes change nothing; all-masked gives 0 with zero gradients; the
student's forward is the same with the fused path on and off.
"""

from __future__ import annotations

import pytest
import torch
from cache_helpers import targets

from cache.schema import TeacherRecord

from pipeline.fused_loss import choose, fused_lm_losses, not_covered
from pipeline.losses import KD_LOSSES, KDSpec, draw_weights, kd_weight
from model_helpers import FixedHiddenLM
from pipeline.student import DistillStudent, LossWeights

T, H, V, VOCAB, K, D = 24, 32, 310, 300, 8, 12  # V - VOCAB padded LM-head rows
TEMPS = (1.0, 2.0)  # 1.5 is an uncached temperature
ALPHA = 0.6


def teacher_from(z_TV: torch.Tensor, k: int = K, dtype=torch.float32) -> TeacherRecord:
    lp_TV = torch.log_softmax(z_TV, -1)
    ids_TK = lp_TV.argsort(-1, descending=True)[:, :k]
    logz_TP = torch.stack([torch.logsumexp(z_TV / t, -1) for t in TEMPS], -1)
    g = torch.Generator().manual_seed(3)
    draws_TN = torch.multinomial(torch.softmax(z_TV / 2.0, -1), D, replacement=True, generator=g)  # tau_draw 2
    return targets(ids_TK, lp_TV.gather(-1, ids_TK).to(dtype), logz_TP.to(dtype), TEMPS, draws_TN,
                   torch.full(draws_TN.shape, 1.0 / D, dtype=dtype), lp_TV.gather(-1, draws_TN).to(dtype), 2.0)


@pytest.fixture
def case():
    torch.manual_seed(11)
    hidden_TH = torch.randn(T, H)
    weight_VH = torch.randn(V, H) * (3.0 / H**0.5)  # student logits of std ~3
    labels_T = torch.randint(0, VOCAB, (T,))
    z_TV = 3.0 * torch.randn(T, VOCAB, dtype=torch.float64)
    mask_T = torch.rand(T) > 0.25
    return hidden_TH, weight_VH, labels_T, z_TV, mask_T


def with_garbage(teacher: TeacherRecord, mask_T: torch.Tensor) -> TeacherRecord:
    """Padding rows of a cache may hold anything: NaN log-probs, ids out of range."""
    off_T1 = ~mask_T[:, None]
    return targets(torch.where(off_T1, 10**6, teacher.topk_ids),
                   torch.where(off_T1, float("nan"), teacher.topk_logprobs),
                   torch.where(off_T1, float("nan"), teacher.log_partition), TEMPS,
                   torch.where(off_T1, -5, teacher.draw_ids),
                   torch.where(off_T1, float("nan"), teacher.draw_counts),
                   torch.where(off_T1, float("nan"), teacher.draw_logprobs), teacher.draw_temperature)


# --- float64 dense references (definitions of docs/losses.md, over the whole vocabulary) -----


def buckets(p_TV: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    top_TK = p_TV.gather(-1, ids_TK)
    return torch.cat([top_TK, p_TV.sum(-1, keepdim=True) - top_TK.sum(-1, keepdim=True)], -1)


def kl(q_TB: torch.Tensor, p_TB: torch.Tensor) -> torch.Tensor:
    return torch.where(q_TB > 0, q_TB * (q_TB.log() - p_TB.log()), 0.0).sum(-1)


def reference_kd(s_TV, z_TV, teacher64: TeacherRecord, spec: KDSpec) -> torch.Tensor:
    """Per-token KD in float64 from the full student logits and the teacher's exact logits."""
    tau, ids_TK = spec.temperature, teacher64.topk_ids
    if spec.name == "sampled":
        ls_TD = torch.log_softmax(s_TV / tau, -1).gather(-1, teacher64.draw_ids)
        return -(draw_weights(teacher64, tau) * ls_TD).sum(-1)  # importance weights at tau != 2 (see test_sampled_importance)
    if spec.name != "forward_kl":  # the catalogue's own maths, applied to the dense fp64 logits
        return KD_LOSSES[spec.name](s_TV, teacher64, spec)
    if spec.missing_mass == "renormalize":
        return kl(torch.softmax(z_TV.gather(-1, ids_TK) / tau, -1), torch.softmax(s_TV.gather(-1, ids_TK) / tau, -1))
    if tau in TEMPS:  # exact buckets at tau
        return kl(buckets(torch.softmax(z_TV / tau, -1), ids_TK), buckets(torch.softmax(s_TV / tau, -1), ids_TK))
    q1_TB, p1_TB = buckets(torch.softmax(z_TV, -1), ids_TK), buckets(torch.softmax(s_TV, -1), ids_TK)
    return kl(torch.softmax(q1_TB.log() / tau, -1), torch.softmax(p1_TB.log() / tau, -1))  # tau=1 buckets tempered


def reference(hidden_TH, weight_VH, labels_T, z_TV, mask_T, spec):
    """(CE sum, KD sum) over the masked-in rows, float64, dense."""
    s_TV = hidden_TH @ weight_VH[:VOCAB].T
    ce_T = torch.logsumexp(s_TV, -1) - s_TV.gather(-1, labels_T[:, None])[:, 0]
    kd_T = reference_kd(s_TV, z_TV, teacher_from(z_TV, dtype=torch.float64), spec)
    return ce_T[mask_T].sum(), kd_T[mask_T].sum()


def weights_for(spec: KDSpec) -> tuple[float, float]:
    return 1 - ALPHA, ALPHA * kd_weight(spec.name, spec.temperature)


def value_and_grads(fn, hidden_TH, weight_VH, weights):
    h, w = hidden_TH.clone().requires_grad_(), weight_VH.clone().requires_grad_()
    ce, kd = fn(h, w)
    (weights[0] * ce + weights[1] * kd).backward()
    return ce.detach(), kd.detach(), h.grad, w.grad


def fused(labels_T, teacher, mask_T, spec, chunk_tokens=7, autocast=False):
    def fn(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fused_lm_losses(h, w, labels_T, mask_T, mask_T, teacher, spec, weights_for(spec),
                                  chunk_tokens=chunk_tokens, vocab_limit=VOCAB)
        return out["ce"], out["kd"]
    return fn


def assert_matches_reference(case, spec, autocast=False):
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    teacher = with_garbage(teacher_from(z_TV), mask_T)
    ce, kd, g_h, g_w = value_and_grads(fused(labels_T, teacher, mask_T, spec, autocast=autocast),
                                       hidden_TH, weight_VH, weights_for(spec))
    ref = value_and_grads(lambda h, w: reference(h, w, labels_T, z_TV, mask_T, spec),
                          hidden_TH.double(), weight_VH.double(), weights_for(spec))
    assert ce.dtype == kd.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.float32
    n = int(mask_T.sum())
    torch.testing.assert_close(ce.double() / n, ref[0] / n, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(kd.double() / n, ref[1] / n, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(g_h.double(), ref[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w.double(), ref[3], rtol=1e-4, atol=1e-5)
    assert not g_w[VOCAB:].any()  # padded LM-head rows are in neither softmax


COVERED = [KDSpec("forward_kl", 1.0), KDSpec("forward_kl", 2.0), KDSpec("forward_kl", 1.5),
           KDSpec("forward_kl", 2.0, "renormalize"), KDSpec("forward_kl", 1.5, "renormalize"),
           KDSpec("sampled", 1.0), KDSpec("sampled", 2.0),
           KDSpec("reverse_kl", 2.0), KDSpec("reverse_kl", 1.0, "renormalize"), KDSpec("top_kl", 2.0, top_kl_k=5),
           KDSpec("jsd", 2.0), KDSpec("skew_forward_kl", 1.5), KDSpec("skew_reverse_kl", 2.0), KDSpec("tvd", 2.0),
           KDSpec("dkd", 2.0), KDSpec("dkd", 1.0, "renormalize"),
           KDSpec("nkd", 1.0), KDSpec("nkd", 1.5), KDSpec("nkd", 2.0),
           KDSpec("nkd", 2.0, "renormalize"), KDSpec("normkd", 2.0), KDSpec("normkd", 1.0, "renormalize")]


def spec_id(spec: KDSpec) -> str:
    return f"{spec.name}-{spec.temperature}-{spec.missing_mass}"


@pytest.mark.parametrize("spec", COVERED, ids=spec_id)
def test_fused_matches_float64_dense(case, spec):
    assert not not_covered(spec)
    assert_matches_reference(case, spec)


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("forward_kl", 1.5, "renormalize"),
                                  KDSpec("sampled", 2.0), KDSpec("jsd", 1.0)], ids=spec_id)
def test_fused_is_fp32_under_bf16_autocast(case, spec):
    assert_matches_reference(case, spec, autocast=True)


def test_whole_vocabulary_cache_matches_dense_kl(case):
    """K = V: no tail bucket; forward KL equals the full-vocabulary KL, at a cached tau != 1."""
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    spec, teacher = KDSpec("forward_kl", 2.0), teacher_from(z_TV, k=VOCAB)
    _, kd, _, g_w = value_and_grads(fused(labels_T, teacher, mask_T, spec), hidden_TH, weight_VH, weights_for(spec))
    s_TV = (hidden_TH @ weight_VH[:VOCAB].T).double()
    ref_T = kl(torch.softmax(z_TV / 2.0, -1), torch.softmax(s_TV / 2.0, -1))
    torch.testing.assert_close(kd.double(), ref_T[mask_T].sum(), rtol=2e-5, atol=1e-5)
    assert torch.isfinite(g_w).all()


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("sampled", 2.0), KDSpec("dkd", 1.5)], ids=spec_id)
def test_chunk_size_does_not_change_results(case, spec):
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    teacher = teacher_from(z_TV)
    runs = [value_and_grads(fused(labels_T, teacher, mask_T, spec, chunk_tokens=c), hidden_TH, weight_VH,
                            weights_for(spec)) for c in (1, 5, T, 1000)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("sampled", 1.0), None], ids=str)
def test_all_masked_gives_zero_and_zero_gradients(case, spec):
    hidden_TH, weight_VH, labels_T, z_TV, _ = case
    none_T = torch.zeros(T, dtype=torch.bool)
    teacher = with_garbage(teacher_from(z_TV), none_T) if spec else None
    weights = weights_for(spec) if spec else (1.0, 0.0)
    h, w = hidden_TH.clone().requires_grad_(), weight_VH.clone().requires_grad_()
    out = fused_lm_losses(h, w, labels_T, none_T, none_T, teacher, spec, weights, chunk_tokens=7, vocab_limit=VOCAB)
    (weights[0] * out["ce"] + weights[1] * out["kd"]).backward()
    assert out["ce"].item() == 0.0 and out["kd"].item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_empty_input_gives_zero(case):
    _, weight_VH, _, _, _ = case
    h, w = torch.zeros(0, H, requires_grad=True), weight_VH.clone().requires_grad_()
    empty_T = torch.zeros(0, dtype=torch.bool)
    out = fused_lm_losses(h, w, torch.zeros(0, dtype=torch.long), empty_T, empty_T, None, None, (1.0, 0.0))
    out["ce"].backward()
    assert out["ce"].item() == 0.0 and not w.grad.any()


def test_backward_refuses_weights_it_was_not_built_for(case):
    """The gradient is formed in forward for (w_ce, w_kd); another mix would be silently wrong."""
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    h = hidden_TH.clone().requires_grad_()
    out = fused_lm_losses(h, weight_VH, labels_T, mask_T, mask_T, teacher_from(z_TV), KDSpec(), (0.5, 0.5))
    with pytest.raises(RuntimeError, match="weights"):
        (out["ce"] + 2 * out["kd"]).backward()
    h2 = hidden_TH.clone().requires_grad_()
    out = fused_lm_losses(h2, weight_VH, labels_T, mask_T, mask_T, teacher_from(z_TV), KDSpec(), (0.5, 0.5))
    (3.0 * (0.5 * out["ce"] + 0.5 * out["kd"])).backward()  # any common factor (the trainer's 1 / tokens) is fine
    assert torch.isfinite(h2.grad).all() and h2.grad.abs().sum() > 0


def test_selection(capsys):
    assert choose("auto", KDSpec("forward_kl", 2.0)) and choose("always", None)
    assert not choose("never", KDSpec("forward_kl")) and capsys.readouterr().err == ""
    assert not choose("auto", KDSpec("bild"))
    assert choose("auto", KDSpec("nkd", 2.0))  # nkd at a cached tau != 1: two tails, both fused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bild" in err[0] and "chunked" in err[0]
    with pytest.raises(ValueError, match="fused_loss=always"):
        choose("always", KDSpec("bild"))
    with pytest.raises(ValueError, match="allowed"):
        choose("yes", None)



@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("sampled", 2.0)], ids=spec_id)
def test_student_forward_fused_equals_chunked(case, spec):
    """DistillStudent with train.fused_loss always and never: the same CE, KD, prompt KL and gradients."""
    hidden_TH, weight_VH, labels_T, z_TV, _ = case
    teacher = teacher_from(z_TV)
    trained_T = torch.arange(T) >= T // 3
    batch = {"input_ids": torch.zeros(1, T, dtype=torch.long), "attention_mask": torch.ones(1, T, dtype=torch.long),
             "valid": torch.ones(1, T, dtype=torch.bool), "labels": labels_T, "loss_mask": trained_T,
             "teacher": teacher}
    weights = {"ce": 1 - ALPHA, "kd": ALPHA * spec.temperature**2, "prompt_kl": 0.7}
    results = []
    for mode in ("never", "always"):
        lm = FixedHiddenLM(hidden_TH, weight_VH, trainable_hidden=True)
        student = DistillStudent(lm, spec, VOCAB, 10, prompt_kl=True, fused=mode, weights=LossWeights(**weights))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = student(batch).losses
        sum(weights[k] * getattr(out, k) for k in weights).backward()
        results.append([out.ce, out.kd, out.prompt_kl, lm.hidden_1TH.grad, lm.head.weight.grad])
    assert DistillStudent(FixedHiddenLM(hidden_TH, weight_VH, trainable_hidden=True), spec, VOCAB, 10, fused="always").fused
    for off, on in zip(*results):
        torch.testing.assert_close(on, off, rtol=2e-5, atol=2e-6)


def test_bf16_weights_and_hidden_give_bf16_gradients_of_the_fp32_loss(case):
    """student.dtype=bfloat16: the loss is still fp32 (of the bf16 values), the gradients come back in bf16."""
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    spec = KDSpec("forward_kl", 2.0)
    h16, w16 = hidden_TH.bfloat16(), weight_VH.bfloat16()
    ce, kd, g_h, g_w = value_and_grads(fused(labels_T, teacher_from(z_TV), mask_T, spec), h16, w16, weights_for(spec))
    ref = value_and_grads(lambda h, w: reference(h, w, labels_T, z_TV, mask_T, spec), h16.double(), w16.double(),
                          weights_for(spec))
    assert ce.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    torch.testing.assert_close(ce.double(), ref[0], rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(kd.double(), ref[1], rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(g_h.double(), ref[2], rtol=1e-2, atol=1e-4)  # bf16 rounding of the gradient
    torch.testing.assert_close(g_w.double(), ref[3], rtol=1e-2, atol=1e-4)
