"""KD losses against independent dense references (full-vocabulary softmaxes in float64).

A top-k cache with k = V holds the whole teacher distribution, so every sparse loss must equal
its dense definition there; with k < V the tail bucket must equal the KL between the
(k+1)-bucket coarsenings of the two dense distributions.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cache_helpers import targets

from cache.schema import TeacherRecord
import torch.nn.functional as F

from pipeline.losses import (
    KD_LOSSES,
    KDSpec,
    chunked_lm_losses,
    kd_per_token,
    take_rows,
    take_span,
    teacher_logprobs,
)

TEMPS = (1.0, 2.0)


# --- building caches and dense references -------------------------------------------------


def make_teacher(z_TV, k, temps=TEMPS, n_draws=0, draw_tau=1.0) -> TeacherRecord:
    """What phase one would cache for teacher logits z_TV: top-k by descending prob, etc."""
    lp_TV = torch.log_softmax(z_TV.double(), -1)
    ids_TK = lp_TV.argsort(-1, descending=True)[:, :k]
    logz_TP = torch.stack([torch.logsumexp(z_TV.double() / t, -1) for t in temps], -1)
    draw_ids, draw_w = (None, None) if not n_draws else draws(z_TV, n_draws, draw_tau)
    draw_lp = None if not n_draws else lp_TV.gather(-1, draw_ids).float()  # what a v2 cache stores
    return targets(ids_TK, lp_TV.gather(-1, ids_TK).float(), logz_TP.float(), tuple(temps), draw_ids, draw_w,
                   draw_lp, draw_temperature=draw_tau)


def draws(z_TV, n, tau):
    """n draws per row from softmax(z / tau): unique ids + counts / n, padded with id 0."""
    rows = []
    for probs_V in torch.softmax(z_TV.double() / tau, -1):
        ids, counts = torch.multinomial(probs_V, n, replacement=True).unique(return_counts=True)
        rows.append((ids, counts.double() / n))
    width = max(len(ids) for ids, _ in rows)
    ids_TD = torch.zeros(len(rows), width, dtype=torch.long)
    w_TD = torch.zeros(len(rows), width)
    for t, (ids, w) in enumerate(rows):
        ids_TD[t, : len(ids)], w_TD[t, : len(ids)] = ids, w.float()
    return ids_TD, w_TD


def dense_kl(q_CV, p_CV):
    q_CV, p_CV = q_CV.double(), p_CV.double()
    return torch.where(q_CV > 0, q_CV * (q_CV.log() - p_CV.log()), torch.zeros_like(q_CV)).sum(-1)


def coarsen(prob_CV, ids_CK):
    """The (K+1)-bucket distribution: the K cached ids, then everything else."""
    top_CK = prob_CV.gather(-1, ids_CK)
    return torch.cat([top_CK, (1 - top_CK.sum(-1, keepdim=True)).clamp_min(0)], -1)


def probs(x_CV, tau=1.0):
    return torch.softmax(x_CV.double() / tau, -1)


@pytest.fixture
def logits():
    T, V = 6, 40
    return 2.5 * torch.randn(T, V), 2.5 * torch.randn(T, V)  # teacher z, student s


# --- teacher side -------------------------------------------------------------------------


def test_teacher_logprobs_at_cached_temperature_is_exact(logits):
    z, _ = logits
    teacher = make_teacher(z, k=7)
    lq_TK, log_tail_T = teacher_logprobs(teacher, 2.0, "tail_bucket")
    ref_TK = torch.log_softmax(z.double() / 2, -1).gather(-1, teacher.topk_ids)
    torch.testing.assert_close(lq_TK.double(), ref_TK, atol=2e-5, rtol=0)
    ref_tail = (1 - ref_TK.exp().sum(-1)).log()
    torch.testing.assert_close(log_tail_T.double(), ref_tail, atol=2e-4, rtol=0)


def test_teacher_logprobs_uncached_temperature(logits):
    z, _ = logits
    # k = V: the tail is empty, so the single-tail-logit approximation is exact (up to the
    # fp32 rounding of 1 - sum exp(lp), which tau > 1 amplifies as m^(1/tau)).
    full = make_teacher(z, k=z.shape[1], temps=(1.0,))
    lq, _ = teacher_logprobs(full, 1.7, "tail_bucket")
    ref = torch.log_softmax(z.double() / 1.7, -1).gather(-1, full.topk_ids)
    torch.testing.assert_close(lq.double(), ref, atol=2e-4, rtol=0)
    # k < V: top-k ratios stay exact; the tail is the one documented approximation.
    part = make_teacher(z, k=5, temps=(1.0,))
    lq, log_tail = teacher_logprobs(part, 1.7, "tail_bucket")
    lp = part.topk_logprobs.double()
    torch.testing.assert_close((lq - lq[:, :1]).double(), (lp - lp[:, :1]) / 1.7, atol=2e-5, rtol=0)
    m = 1 - lp.exp().sum(-1)
    torch.testing.assert_close((log_tail - lq[:, 0]).double(), (m.log() - lp[:, 0]) / 1.7, atol=2e-5, rtol=0)
    # renormalize is exact at any temperature.
    lq, none = teacher_logprobs(part, 1.7, "renormalize")
    assert none is None
    torch.testing.assert_close(lq.double(), torch.log_softmax(lp / 1.7, -1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_uncached_temperature_tempers_both_bucket_sets(logits, name):
    """tau = 1.7 is not cached: exact for K = V, 0 at p = q, and equal to tempering both
    sides' exact tau = 1 coarsenings for K < V (the documented approximation)."""
    z, s = logits
    spec = spec_for(name, temperature=1.7)
    full = kd_per_token(s, make_teacher(z, k=z.shape[1], temps=(1.0,)), spec)
    ref = DENSE[name](probs(z, 1.7), probs(s, 1.7), z.argmax(-1))
    torch.testing.assert_close(full.double(), ref, atol=2e-5, rtol=1e-4)
    teacher = make_teacher(z, k=6, temps=(1.0,))
    same = kd_per_token(z, teacher, spec)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-5, rtol=0)
    ids = teacher.topk_ids
    q, p = (torch.softmax(coarsen(probs(x), ids).log() / 1.7, -1) for x in (z, s))
    got = kd_per_token(s, teacher, spec)
    torch.testing.assert_close(got.double(), DENSE[name](q, p, None), atol=2e-5, rtol=1e-4)


def test_unknown_names_are_value_errors(logits):
    z, s = logits
    with pytest.raises(ValueError, match="forward_kl"):
        KDSpec(name="nope")
    with pytest.raises(ValueError, match="forward_kl"):
        kd_per_token(s, make_teacher(z, 3), SimpleNamespace(name="nope"))
    with pytest.raises(ValueError, match="tail_bucket"):
        KDSpec(missing_mass="drop")
    with pytest.raises(ValueError, match="draws"):
        kd_per_token(s, make_teacher(z, 3), KDSpec(name="sampled"))


# --- forward KL and sampled ---------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_full_cache_equals_dense_kl(logits, tau):
    z, s = logits
    got = kd_per_token(s, make_teacher(z, k=z.shape[1]), KDSpec(temperature=tau))
    ref = F.kl_div(torch.log_softmax(s.double() / tau, -1), probs(z, tau), reduction="none").sum(-1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_tail_bucket_equals_coarsened_kl(logits, tau):
    z, s = logits
    teacher = make_teacher(z, k=6)
    got = kd_per_token(s, teacher, KDSpec(temperature=tau))
    ids = teacher.topk_ids
    ref = dense_kl(coarsen(probs(z, tau), ids), coarsen(probs(s, tau), ids))
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


def test_forward_kl_renormalize_equals_topk_kl(logits):
    z, s = logits
    teacher = make_teacher(z, k=6)
    got = kd_per_token(s, teacher, KDSpec(missing_mass="renormalize", temperature=2.0))
    ids = teacher.topk_ids
    q, p = probs(z, 2).gather(-1, ids), probs(s, 2).gather(-1, ids)
    ref = dense_kl(q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_sampled_hand_built():
    s = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    teacher = targets(
        None, None, torch.zeros(2, 1), (1.0,),
        draw_ids_TD=torch.tensor([[2, 1, 3], [0, 0, 0]]),
        draw_weights_TD=torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]), draw_temperature=2.0,
    )
    ls = torch.log_softmax(s.double() / 2, -1)
    want = torch.stack([-(0.5 * ls[0, 2] + 0.25 * ls[0, 1] + 0.25 * ls[0, 3]), -ls[1, 0]])
    torch.testing.assert_close(kd_per_token(s, teacher, KDSpec(name="sampled", temperature=2.0)).double(), want)


def test_sampled_estimates_dense_cross_entropy(logits):
    z, s = logits
    n = 20_000
    got = kd_per_token(s, make_teacher(z, 3, n_draws=n), KDSpec(name="sampled")).double()
    nll_CV = -torch.log_softmax(s.double(), -1)
    q = probs(z)
    ce = (q * nll_CV).sum(-1)
    std_err = (((q * nll_CV**2).sum(-1) - ce**2) / n).sqrt()
    assert ((got - ce).abs() < 5 * std_err + 1e-6).all(), (got, ce, std_err)


@pytest.mark.parametrize("mode", ["tail_bucket", "renormalize"])
def test_forward_kl_zero_for_identical(logits, mode):
    z, _ = logits
    got = kd_per_token(z, make_teacher(z, k=6), KDSpec(missing_mass=mode, temperature=2.0))
    torch.testing.assert_close(got, torch.zeros_like(got), atol=2e-6, rtol=0)


def small_case(k, V=7, C=3):
    torch.manual_seed(1)
    z, s = 2 * torch.randn(C, V), 2 * torch.randn(C, V, dtype=torch.float64)
    return make_teacher(z, k, n_draws=16), s.requires_grad_()


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("spec", [KDSpec(), KDSpec(missing_mass="renormalize"), KDSpec(temperature=1.5), KDSpec(name="sampled")])
def test_gradcheck_core(k, spec):
    teacher, s = small_case(k)
    assert torch.autograd.gradcheck(lambda x: kd_per_token(x, teacher, spec), (s,))


# --- chunked CE + KD ----------------------------------------------------------------------


def lm_case(T=10, H=6, V=13, vocab=11, k=4):
    torch.manual_seed(2)
    hidden = torch.randn(T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, vocab, (T,))
    ce_mask = torch.rand(T) > 0.3
    kd_mask = torch.rand(T) > 0.3
    teacher = make_teacher(3 * torch.randn(T, vocab), k, n_draws=8)
    return hidden, weight, labels, ce_mask, kd_mask, teacher


def run_lm(hidden, weight, labels, ce_mask, kd_mask, teacher, spec, chunk, vocab_limit=11):
    hidden.grad = weight.grad = None
    out = chunked_lm_losses(hidden, weight, labels, ce_mask, kd_mask, teacher, spec, chunk, vocab_limit)
    (out["ce"] + 0.7 * out["kd"]).backward()
    return out, hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("spec", [KDSpec(temperature=2.0), KDSpec(name="sampled")])
def test_chunked_equals_unchunked(spec):
    case = lm_case()
    (a, ga_h, ga_w), (b, gb_h, gb_w) = run_lm(*case, spec, 3), run_lm(*case, spec, 10**9)
    for key in ("ce", "kd"):
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(ga_h, gb_h)
    torch.testing.assert_close(ga_w, gb_w)


def test_chunked_matches_per_token_references():
    hidden, weight, labels, ce_mask, kd_mask, teacher = lm_case()
    spec = KDSpec(temperature=2.0)
    out, _, grad_w = run_lm(hidden, weight, labels, ce_mask, kd_mask, teacher, spec, 4)
    logits = (hidden @ weight.T)[:, :11].detach()
    ce = F.cross_entropy(logits[ce_mask], labels[ce_mask], reduction="sum")
    torch.testing.assert_close(out["ce"], ce)
    kd = kd_per_token(logits[kd_mask], take_rows(teacher, kd_mask.nonzero()[:, 0]), spec).sum()
    torch.testing.assert_close(out["kd"], kd)
    assert (grad_w[11:] == 0).all()  # padded vocabulary rows take no part


def test_vocab_limit_excludes_padding():
    hidden, weight, labels, ce_mask, kd_mask, teacher = lm_case()
    out = chunked_lm_losses(hidden, weight, labels, ce_mask, kd_mask, teacher, KDSpec(), 3, vocab_limit=11)
    cut = chunked_lm_losses(hidden, weight[:11], labels, ce_mask, kd_mask, teacher, KDSpec(), 3)
    with torch.no_grad():
        weight[11:] = 100.0  # huge padding logits would dominate any softmax that saw them
    again = chunked_lm_losses(hidden, weight, labels, ce_mask, kd_mask, teacher, KDSpec(), 3, vocab_limit=11)
    for key in ("ce", "kd"):
        torch.testing.assert_close(out[key], cut[key])
        torch.testing.assert_close(out[key], again[key])


@pytest.mark.parametrize("T", [0, 5])
def test_all_masked_gives_zero_and_zero_grads(T):
    hidden, weight, _, _, _, teacher = lm_case(T=max(T, 1))
    hidden = hidden.detach()[:T].requires_grad_()
    labels = torch.full((T,), -100)
    none = torch.zeros(T, dtype=torch.bool)
    for spec in (KDSpec(), KDSpec(name="sampled")):
        hidden.grad = weight.grad = None
        out = chunked_lm_losses(hidden, weight, labels, none, none, take_span(teacher, 0, T), spec, 2, 11)
        assert out["ce"].item() == 0 and out["kd"].item() == 0
        (out["ce"] + out["kd"]).backward()
        assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_no_teacher_gives_zero_kd():
    hidden, weight, labels, ce_mask, kd_mask, _ = lm_case()
    out = chunked_lm_losses(hidden, weight, labels, ce_mask, kd_mask, None, None, 3, 11)
    assert out["kd"].item() == 0 and out["ce"].item() > 0


def test_finite_gradients_with_empty_tail():
    """k = V: teacher tail 0 (log -inf), student tail empty; gradients must stay finite."""
    hidden, weight, labels, ce_mask, kd_mask, _ = lm_case()
    teacher = make_teacher(3 * torch.randn(10, 11), k=11)
    for name in sorted(set(KD_LOSSES) - {"sampled"}):
        _, g_h, g_w = run_lm(hidden, weight, labels, ce_mask, kd_mask, teacher, KDSpec(name=name), 3)
        assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()


# --- the catalogue (issue 4): dense references ----------------------------------------------


def mix(w, a, b):
    return w * a + (1 - w) * b


def dense_dkd(q, p, t, alpha, beta):
    """DKD with target column t (an index tensor [C]), both sides full distributions."""
    q_t, p_t = q.gather(-1, t[:, None]), p.gather(-1, t[:, None])
    keep = torch.ones_like(q, dtype=torch.bool).scatter(-1, t[:, None], False)
    q_hat = q[keep].view(len(q), -1) / (1 - q_t)
    p_hat = p[keep].view(len(p), -1) / (1 - p_t)
    tckd = dense_kl(torch.cat([q_t, 1 - q_t], -1), torch.cat([p_t, 1 - p_t], -1))
    return alpha * tckd + beta * dense_kl(q_hat, p_hat)


SPEC = KDSpec(jsd_beta=0.3, skew_alpha=0.2, dkd_alpha=0.7, dkd_beta=3.0)
DENSE = {  # name -> reference(q, p, index of the teacher's argmax) on full distributions
    "forward_kl": lambda q, p, t: dense_kl(q, p),
    "reverse_kl": lambda q, p, t: dense_kl(p, q),
    "jsd": lambda q, p, t: 0.3 * dense_kl(q, mix(0.3, q, p)) + 0.7 * dense_kl(p, mix(0.3, q, p)),
    "skew_forward_kl": lambda q, p, t: dense_kl(q, mix(0.2, q, p)),
    "skew_reverse_kl": lambda q, p, t: dense_kl(p, mix(0.2, p, q)),
    "tvd": lambda q, p, t: 0.5 * (q - p).abs().sum(-1),
    "dkd": lambda q, p, t: dense_dkd(q, p, t, 0.7, 3.0),
    "top_kl": lambda q, p, t: dense_kl(q, p),
}


def spec_for(name, **kw):
    return KDSpec(**{**SPEC.__dict__, "name": name, **kw})


@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_catalogue_full_cache_equals_dense(logits, name, tau):
    z, s = logits
    got = kd_per_token(s, make_teacher(z, k=z.shape[1]), spec_for(name, temperature=tau))
    ref = DENSE[name](probs(z, tau), probs(s, tau), z.argmax(-1))
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(set(DENSE) - {"top_kl"}))
@pytest.mark.parametrize("mode", ["tail_bucket", "renormalize"])
def test_catalogue_top_k_equals_dense_on_coarsened(logits, name, mode):
    """k < V: the (k+1)-bucket coarsenings (tail_bucket) or the renormalised top-k."""
    z, s = logits
    teacher = make_teacher(z, k=6)
    ids = teacher.topk_ids
    if mode == "tail_bucket":
        q, p = coarsen(probs(z, 2), ids), coarsen(probs(s, 2), ids)
    else:
        q, p = probs(z, 2).gather(-1, ids), probs(s, 2).gather(-1, ids)
        q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    got = kd_per_token(s, teacher, spec_for(name, temperature=2.0, missing_mass=mode))
    torch.testing.assert_close(got.double(), DENSE[name](q, p, torch.zeros(len(q), dtype=torch.long)), atol=2e-5, rtol=1e-4)


def test_top_kl_renormalises_over_first_k(logits):
    z, s = logits
    teacher = make_teacher(z, k=10)
    ids = teacher.topk_ids[:, :4]
    q, p = probs(z, 2).gather(-1, ids), probs(s, 2).gather(-1, ids)
    ref = dense_kl(q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True))
    got = kd_per_token(s, teacher, KDSpec(name="top_kl", top_kl_k=4, temperature=2.0, missing_mass="tail_bucket"))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def dense_nkd(z, s, tau, gamma):
    t = z.argmax(-1)[:, None]
    target = -probs(z).gather(-1, t)[:, 0] * torch.log_softmax(s.double(), -1).gather(-1, t)[:, 0]
    keep = torch.ones_like(z, dtype=torch.bool).scatter(-1, t, False)
    q_hat = torch.softmax(z.double()[keep].view(len(z), -1) / tau, -1)
    ls_hat = torch.log_softmax(s.double()[keep].view(len(s), -1) / tau, -1)
    return target / tau**2 - gamma * (q_hat * ls_hat).sum(-1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_nkd_full_cache_equals_dense(logits, tau):
    z, s = logits
    got = kd_per_token(s, make_teacher(z, k=z.shape[1]), KDSpec(name="nkd", temperature=tau, nkd_gamma=1.3))
    torch.testing.assert_close(got.double(), dense_nkd(z, s, tau, 1.3), atol=2e-5, rtol=1e-4)


def dense_normkd(z, s, t_norm):
    t_z, t_s = t_norm * z.double().std(-1, keepdim=True), t_norm * s.double().std(-1, keepdim=True)
    kl = dense_kl(torch.softmax(z.double() / t_z, -1), torch.softmax(s.double() / t_s, -1))
    return kl * t_z[:, 0] ** 2 / t_norm**2


@pytest.mark.parametrize("mode", ["tail_bucket", "renormalize"])
def test_normkd_full_cache_equals_dense(logits, mode):
    z, s = logits
    got = kd_per_token(s, make_teacher(z, k=z.shape[1]), KDSpec(name="normkd", temperature=1.5, missing_mass=mode))
    torch.testing.assert_close(got.double(), dense_normkd(z, s, 1.5), atol=5e-5, rtol=1e-4)


def dense_bild(z, s, k, tau):
    def pair_kl(t_CK, s_CK):
        i, j = torch.triu_indices(k, k, 1)
        return dense_kl(torch.softmax((t_CK[:, i] - t_CK[:, j]) / tau, -1), torch.softmax((s_CK[:, i] - s_CK[:, j]) / tau, -1))

    z, s = z.double(), s.double()
    t_top, t_ids = z.topk(k, -1)
    s_top, s_ids = s.topk(k, -1)
    return pair_kl(t_top, s.gather(-1, t_ids)) + pair_kl(z.gather(-1, s_ids), s_top)


@pytest.mark.parametrize("cached", [40, 12])
def test_bild_equals_dense(logits, cached):
    """Full cache; or 12 cached with the student's top-4 inside them (no fallback needed)."""
    z, s = logits
    if cached < z.shape[1]:
        s = z + 0.3 * torch.randn_like(z)
        s_top = s.topk(4, -1).indices
        assert (s_top[:, :, None] == z.topk(cached, -1).indices[:, None, :]).any(-1).all()
    got = kd_per_token(s, make_teacher(z, k=cached), KDSpec(name="bild", bild_top_k=4, temperature=2.0))
    torch.testing.assert_close(got.double(), dense_bild(z, s, 4, 2.0), atol=2e-5, rtol=1e-4)


def test_bild_fallback_for_uncached_student_ids():
    """The student's top-k lies outside the teacher's cache: tail share, capped at lp_K."""
    z = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0]])
    teacher = make_teacher(z, k=3)
    got = kd_per_token(s, teacher, KDSpec(name="bild", bild_top_k=3))
    lp = torch.log_softmax(z.double(), -1)[0]
    tail = (1 - lp[:3].exp().sum()) / 4  # spread over the V - K = 4 uncached ids
    s_top, s_ids = s.double().topk(3, -1)
    t_vals = torch.where(s_ids < 3, lp[s_ids.clamp(max=2)], torch.minimum(tail.log(), lp[2]))
    i, j = torch.triu_indices(3, 3, 1)
    s_led = dense_kl(torch.softmax(t_vals[:, i] - t_vals[:, j], -1), torch.softmax(s_top[:, i] - s_top[:, j], -1))
    # The teacher's top-3 are ids 0, 1, 2 (all cached): the t-LD half needs no fallback.
    t_led = dense_kl(torch.softmax(lp[None, i] - lp[None, j], -1), torch.softmax(s.double()[:, i] - s.double()[:, j], -1))
    torch.testing.assert_close(got.double(), t_led + s_led, atol=1e-5, rtol=1e-5)


DIVERGENCES = sorted(set(KD_LOSSES) - {"sampled", "nkd"})  # 0 exactly when student == teacher


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("mode", ["tail_bucket", "renormalize"])
def test_catalogue_zero_for_identical(logits, name, mode):
    z, _ = logits
    got = kd_per_token(z, make_teacher(z, k=8), spec_for(name, temperature=2.0, missing_mass=mode))
    torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(set(KD_LOSSES) - {"forward_kl", "sampled"}))
@pytest.mark.parametrize("k", [3, 7])
def test_gradcheck_catalogue(name, k):
    teacher, s = small_case(k)
    for mode in ("tail_bucket", "renormalize"):
        spec = spec_for(name, temperature=1.5, missing_mass=mode, bild_top_k=3)
        assert torch.autograd.gradcheck(lambda x: kd_per_token(x, teacher, spec), (s,))


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_every_loss_through_chunked_lm(name):
    """Chunked equals unchunked, and gradients are finite, for every catalogue entry."""
    case = lm_case()
    spec = spec_for(name, temperature=2.0, bild_top_k=3)
    (a, ga_h, ga_w), (b, gb_h, gb_w) = run_lm(*case, spec, 3), run_lm(*case, spec, 10**9)
    torch.testing.assert_close(a["kd"], b["kd"])
    torch.testing.assert_close(ga_h, gb_h)
    torch.testing.assert_close(ga_w, gb_w)
    assert torch.isfinite(ga_h).all() and torch.isfinite(ga_w).all()
