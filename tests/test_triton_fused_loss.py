"""Phase two's Triton kernel (pipeline/kernels/fused_ce_kd.py, train.fused_loss=triton) against the
float64 dense references of tests/test_fused_loss.py and against the torch fused path: values and
gradients w.r.t. the hidden states and the LM-head weight; tile sizes change nothing; all-masked
gives 0; K = V; bf16 dots under autocast; DistillStudent with the kernel selected.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton loads);
with a CUDA device (scripts/gpu_check.sh) the same tests run compiled on the GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from model_helpers import FixedHiddenLM  # noqa: E402
from pipeline.fused_loss import choose, fused_lm_losses, kernel_for  # noqa: E402
from pipeline.kernels import fused_ce_kd, interpreting  # noqa: E402
from pipeline.losses import KDSpec  # noqa: E402
from pipeline.student import DistillStudent, LossWeights  # noqa: E402
from test_fused_loss import (  # noqa: E402
    ALPHA, T, VOCAB, case, kl, reference, spec_id, teacher_from, value_and_grads, weights_for, with_garbage,
)

DEVICE = torch.device("cpu" if interpreting() else "cuda")
assert case  # the shared fixture (hidden, weight, labels, teacher logits, mask), imported for pytest


def on(teacher):
    return teacher if DEVICE.type == "cpu" else teacher.to(DEVICE)


def run(case_, spec, kernel, chunk_tokens=16, teacher=None, autocast=False):
    """(ce, kd, dH, dW) of fused_lm_losses with the given kernel, on CPU tensors."""
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case_
    teacher = teacher if teacher is not None else with_garbage(teacher_from(z_TV), mask_T)
    weights = weights_for(spec) if spec else (1.0, 0.0)

    def fn(h, w):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            out = fused_lm_losses(h, w, labels_T.to(DEVICE), mask_T.to(DEVICE), mask_T.to(DEVICE),
                                  on(teacher) if spec else None, spec, weights, chunk_tokens=chunk_tokens,
                                  vocab_limit=VOCAB, kernel=kernel)
        return out["ce"], out["kd"]

    h = hidden_TH.to(DEVICE).bfloat16() if autocast else hidden_TH.to(DEVICE)  # autocast: the body's bf16 output
    return [x.cpu() for x in value_and_grads(fn, h, weight_VH.to(DEVICE), weights)]


SPECS = [None, KDSpec("forward_kl", 1.0), KDSpec("forward_kl", 2.0), KDSpec("forward_kl", 1.5),
         KDSpec("forward_kl", 2.0, "renormalize"), KDSpec("sampled", 1.0), KDSpec("sampled", 2.0), KDSpec("nkd", 2.0)]


def name(spec):
    return "ce" if spec is None else spec_id(spec)


@pytest.mark.parametrize("spec", SPECS, ids=name)
def test_triton_matches_float64_dense_and_the_torch_path(case, spec):
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    ce, kd, g_h, g_w = run(case, spec, "triton")
    ref_spec = spec or KDSpec()
    weights = weights_for(spec) if spec else (1.0, 0.0)
    ref = value_and_grads(lambda h, w: reference(h, w, labels_T, z_TV, mask_T, ref_spec),
                          hidden_TH.double(), weight_VH.double(), weights)
    n = int(mask_T.sum())
    torch.testing.assert_close(ce.double() / n, ref[0] / n, rtol=2e-6, atol=2e-6)
    if spec:
        torch.testing.assert_close(kd.double() / n, ref[1] / n, rtol=2e-5, atol=2e-6)
    else:
        assert kd.item() == 0.0
    torch.testing.assert_close(g_h.double(), ref[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w.double(), ref[3], rtol=1e-4, atol=1e-5)
    assert not g_w[VOCAB:].any()  # padded LM-head rows are in neither softmax
    for a, b in zip((ce, kd, g_h, g_w), run(case, spec, "torch")):  # the torch fused path, fp32 both
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("sampled", 2.0)], ids=spec_id)
def test_tile_sizes_and_chunks_do_not_change_results(case, spec, monkeypatch):
    runs = []
    for tiles, chunk in (((16, 16, 16), 24), ((32, 64, 32), 7), ((16, 128, 64), 1000)):
        monkeypatch.setattr(fused_ce_kd, "INTERPRET_TILES" if interpreting() else "GPU_TILES", tiles)
        runs.append(run(case, spec, "triton", chunk_tokens=chunk))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("sampled", 1.0), None], ids=name)
def test_all_masked_gives_zero_and_zero_gradients(case, spec):
    hidden_TH, weight_VH, labels_T, z_TV, _ = case
    none_T = torch.zeros(T, dtype=torch.bool)
    ce, kd, g_h, g_w = run((hidden_TH, weight_VH, labels_T, z_TV, none_T), spec, "triton",
                           teacher=with_garbage(teacher_from(z_TV), none_T))
    assert ce.item() == 0.0 and kd.item() == 0.0
    assert not g_h.any() and not g_w.any()


@pytest.mark.slow
def test_whole_vocabulary_cache_has_no_tail(case):
    """K = V: every id is gathered and none is in the tail (an empty online logsumexp)."""
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    spec = KDSpec("forward_kl", 2.0)
    _, kd, g_h, g_w = run(case, spec, "triton", teacher=teacher_from(z_TV, k=VOCAB))
    s_TV = (hidden_TH @ weight_VH[:VOCAB].T).double()
    ref_T = kl(torch.softmax(z_TV / 2.0, -1), torch.softmax(s_TV / 2.0, -1))
    torch.testing.assert_close(kd.double(), ref_T[mask_T].sum(), rtol=2e-5, atol=1e-5)
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()


@pytest.mark.parametrize("spec", [KDSpec("forward_kl", 2.0), KDSpec("sampled", 2.0)], ids=spec_id)
def test_bf16_autocast_multiplies_bf16_inputs_with_fp32_accumulation(case, spec):
    """Under autocast the body hands bf16 hidden states: the kernel's dots take bf16 h and W (fp32
    accumulation, fp32 logits), so it equals the float64 reference of the bf16-rounded inputs."""
    hidden_TH, weight_VH, labels_T, z_TV, mask_T = case
    ce, kd, g_h, g_w = run(case, spec, "triton", autocast=True)
    h16, w16 = hidden_TH.bfloat16().double(), weight_VH.bfloat16().double()
    ref = value_and_grads(lambda h, w: reference(h, w, labels_T, z_TV, mask_T, spec), h16, w16, weights_for(spec))
    n = int(mask_T.sum())
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce.double() / n, ref[0] / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd.double() / n, ref[1] / n, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w.double(), ref[3], rtol=1e-3, atol=1e-4)  # dW = d^T h with h the same bf16 values
    torch.testing.assert_close(g_h.double(), ref[2], rtol=1e-2, atol=1e-3)  # dH comes back in h's bf16


def test_student_with_triton_equals_chunked(case):
    """DistillStudent with train.fused_loss=triton (prompt KL too) against never: same losses and gradients."""
    hidden_TH, weight_VH, labels_T, z_TV, _ = case
    spec, teacher = KDSpec("forward_kl", 2.0), teacher_from(z_TV)
    trained_T = torch.arange(T) >= T // 3
    batch = {"input_ids": torch.zeros(1, T, dtype=torch.long), "attention_mask": torch.ones(1, T, dtype=torch.long),
             "valid": torch.ones(1, T, dtype=torch.bool), "labels": labels_T, "loss_mask": trained_T,
             "teacher": replace(teacher, draw_ids=None, draw_counts=None)}
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    weights = {"ce": 1 - ALPHA, "kd": ALPHA * 4.0, "prompt_kl": 0.7}
    results = []
    for mode in ("never", "triton"):
        lm = FixedHiddenLM(hidden_TH, weight_VH, trainable_hidden=True).to(DEVICE)
        student = DistillStudent(lm, spec, VOCAB, 10, prompt_kl=True, fused=mode, weights=LossWeights(**weights))
        out = student(batch).losses
        sum(weights[k] * getattr(out, k) for k in weights).backward()
        results.append([x.cpu() for x in (out.ce, out.kd, out.prompt_kl, lm.hidden_1TH.grad, lm.head.weight.grad)])
    for off, on_ in zip(*results):
        torch.testing.assert_close(on_, off, rtol=2e-5, atol=2e-6)


def test_selection():
    assert choose("triton", KDSpec("sampled")) and kernel_for("triton") == "triton"
    assert kernel_for("auto") == kernel_for("always") == "torch"  # auto keeps torch: no GPU measurement yet
    with pytest.raises(ValueError, match="fused_loss=triton does not cover"):
        choose("triton", KDSpec("bild"))


def test_float64_is_refused_with_the_fix(case):
    hidden_TH, weight_VH, labels_T, _, mask_T = case
    with pytest.raises(ValueError, match="fused_loss=always"):
        fused_lm_losses(hidden_TH.double().to(DEVICE), weight_VH.double().to(DEVICE), labels_T.to(DEVICE),
                        mask_T.to(DEVICE), mask_T.to(DEVICE), None, None, (1.0, 0.0), kernel="triton")


@pytest.mark.slow
def test_train_stage_with_triton_logs_what_the_torch_fused_path_logs(train_config):
    """train.fused_loss=triton through the train stage (config, setup, DistillStudent, optimizer
    steps, metrics) against train.fused_loss=always on the same cached run, fp32 both."""
    import json

    from stages import train_student

    logged = {}
    for mode in ("always", "triton"):
        cfg = train_config("train.steps=2", f"train.fused_loss={mode}", f"run.device={DEVICE.type}",
                           "train.precision=fp32", "train.router_weight=0", name=mode)
        train_student.run(cfg)
        rows = [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
        logged[mode] = [(r["step"], r["loss"], r["ce"], r["kd"]) for r in rows]
    assert [r[0] for r in logged["triton"]] == [1, 2]
    for a, b in zip(logged["always"], logged["triton"]):
        assert a[0] == b[0] and all(abs(x - y) <= 1e-4 * abs(x) + 1e-6 for x, y in zip(a[1:], b[1:])), (a, b)
