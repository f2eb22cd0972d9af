"""Phase one's Triton kernel (pipeline/kernels/extract.py, cache.extract_kernel=triton): the fields
of pipeline/teachers/extract.py's torch path from fp32 and bf16 logits, log-partitions against
float64, top-k ties to the lower id, draws from the right distribution (chi-square and total
variation at a fixed seed), reproducible across calls and equal to the torch path's for the same
uniforms, and the kernel's selection.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); shapes stay tiny (the
interpreter runs one program, i.e. one row, at a time).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from pipeline.config import ConfigError  # noqa: E402
from pipeline.kernels import interpreting  # noqa: E402
from pipeline.kernels.extract import extract_chunk  # noqa: E402
from pipeline.seeding import sequence_generator  # noqa: E402
from pipeline.teachers import native  # noqa: E402
from pipeline.teachers.extract import ExtractSpec, extract_sequence  # noqa: E402

DEVICE = torch.device("cpu" if interpreting() else "cuda")
L, V, VOCAB, N = 12, 300, 290, 32  # V - VOCAB: padded logit columns (vocab_limit)
TEMPS = (1.0, 2.0, 0.5)
SPEC = ExtractSpec(k=8, temperatures=TEMPS, targets="topk+sampled", num_draws=N, draw_temperature=1.5,
                   vocab_limit=VOCAB, chunk_tokens=5, kernel="torch")


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_LV = (3 * torch.randn(L, V, generator=g)).to(dtype)
    targets_L = torch.randint(0, VOCAB, (L,), generator=g)
    targets_L[-1] = -1  # the last position has no next token
    u_LN = torch.rand(L, N, generator=sequence_generator(7, 42))
    return z_LV, targets_L, u_LN


def both(dtype, spec=SPEC):
    z_LV, targets_L, u_LN = inputs(dtype)
    u = u_LN if spec.wants_draws else None
    ref = extract_sequence(z_LV, targets_L, u, spec)
    out = extract_sequence(z_LV.to(DEVICE), targets_L.to(DEVICE), u, replace(spec, kernel="triton"))
    return ref, {k: v.cpu() for k, v in out.items()}, z_LV


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fields_equal_the_torch_path(dtype):
    ref, out, z_LV = both(dtype)
    assert out.keys() == ref.keys()
    for key in ref:
        assert out[key].dtype == ref[key].dtype and out[key].shape == ref[key].shape, key
    for key in ("log_partition", "target_logprob", "topk_logprobs"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=2e-6)
    # ids: the same up to the order of exact ties (bf16 logits have many); each id's logit is its value
    zf = z_LV[:, :VOCAB].float()
    log_z1 = torch.logsumexp(zf, -1, keepdim=True)  # the fields are in the gauge log Z_1 = 0 (cache format v2)
    torch.testing.assert_close(zf.gather(1, out["topk_ids"].long()) - log_z1, ref["topk_logprobs"], rtol=0, atol=4e-6)
    assert (ref["log_partition"][:, 0] == 0).all()
    assert all(len(set(row.tolist())) == SPEC.k for row in out["topk_ids"])
    if dtype == torch.float32:  # no ties in continuous fp32 logits: the very same ids
        assert torch.equal(out["topk_ids"], ref["topk_ids"])
    for key in ("draw_ids", "draw_counts"):  # the same uniforms, the same inverse CDF
        assert torch.equal(out[key], ref[key]), key
    torch.testing.assert_close(out["draw_logprobs"], ref["draw_logprobs"], rtol=0, atol=2e-6)


def test_log_partitions_against_float64_and_ties_to_the_lower_id():
    z_LV, targets_L, _ = inputs()
    z_LV[0, :] = 1.25  # a flat row: every entry ties
    z_LV[1, 10:20] = 30.0  # ten ties at the top
    out = {k: v.cpu() for k, v in extract_chunk(z_LV.to(DEVICE), targets_L.to(DEVICE), None, 8, TEMPS, 1.0).items()}
    z64 = z_LV.double()
    ref_LP = torch.stack([torch.logsumexp(z64 / t, -1) for t in TEMPS], -1)
    torch.testing.assert_close(out["log_partition"].double(), ref_LP, rtol=1e-6, atol=2e-6)
    assert out["topk_ids"][0].tolist() == list(range(8)) and out["topk_ids"][1].tolist() == list(range(10, 18))
    assert "draw_ids" not in out
    z_LV[2, 5] = float("nan")  # broken logits: NaN log-partitions, which HFTeacher refuses with one line
    out = extract_chunk(z_LV.to(DEVICE), targets_L.to(DEVICE), None, 8, TEMPS, 1.0)["log_partition"].cpu()
    assert out[2].isnan().all() and not out[3:].isnan().any()


def test_k_zero_and_draws_only():
    spec = replace(SPEC, targets="sampled", k=0)
    ref, out, _ = both(torch.float32, spec)
    assert "topk_ids" not in out and out.keys() == ref.keys()
    for key in ("draw_ids", "draw_counts"):
        assert torch.equal(out[key], ref[key]), key


@pytest.mark.slow
def test_draws_have_the_teacher_distribution_and_repeat():
    """Rows of one fixed distribution at draw temperature 1.5: the pooled counts pass a chi-square
    test against softmax(z / 1.5) and lie within a TV bound; a second call draws the same."""
    rows, vocab, draws = 8, 24, 256
    z_V = torch.linspace(-3.0, 3.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))]
    z_RV = z_V.expand(rows, vocab).contiguous().to(DEVICE)
    u_RN = torch.rand(rows, draws, generator=sequence_generator(0, 5))
    targets = torch.zeros(rows, dtype=torch.long, device=DEVICE)
    first = extract_chunk(z_RV, targets, u_RN, 0, (1.0,), 1.5)
    again = extract_chunk(z_RV, targets, u_RN, 0, (1.0,), 1.5)
    for key in ("draw_ids", "draw_counts"):
        assert torch.equal(first[key], again[key]), key
    counts_V = torch.zeros(vocab, dtype=torch.float64).index_add_(0, first["draw_ids"].cpu().long().reshape(-1),
                                                                  first["draw_counts"].cpu().double().reshape(-1))
    n = rows * draws
    assert counts_V.sum() == n
    p_V = torch.softmax(z_V.double() / 1.5, -1)
    chi2 = float(((counts_V - n * p_V) ** 2 / (n * p_V)).sum())
    assert chi2 < 49.7, chi2  # the 0.999 quantile of chi-square with 23 degrees of freedom
    assert 0.5 * float((counts_V / n - p_V).abs().sum()) < 0.05
    hot = extract_chunk(z_RV, targets, u_RN, 0, (1.0,), 0.25)  # a colder draw temperature: other counts
    assert not torch.equal(hot["draw_counts"], first["draw_counts"])


def test_selection():
    cpu = torch.device("cpu")
    if interpreting():
        assert native.resolve_kernel("triton", cpu) == "triton"
        with pytest.raises(ConfigError, match="extract_kernel=triton: TRITON_INTERPRET=1 runs on CPU tensors"):
            native.resolve_kernel("triton", torch.device("cuda"))
    else:
        assert native.resolve_kernel("triton", torch.device("cuda")) == "triton"
        with pytest.raises(ConfigError, match="extract_kernel=triton"):
            native.resolve_kernel("triton", cpu)
    assert native.resolve_kernel("auto", torch.device("cuda")) == "torch"  # auto keeps torch: no GPU figure yet


@pytest.mark.slow
def test_teacher_scores_the_same_with_the_triton_kernel(make_model):
    """HFTeacher.score (forward + extraction + copies to the host) with cache.extract_kernel torch and triton."""
    from pipeline.teachers.base import TeacherBatch, TeacherConfig
    from pipeline.teachers.hf import HFTeacher

    cfg = TeacherConfig(path=str(make_model("qwen3_moe")), dtype="float32")  # fp32 on a GPU too: no bf16 ties
    spec = ExtractSpec(k=8, temperatures=(1.0, 2.0), targets="topk+sampled", num_draws=8, router_topk="all")
    lengths = torch.tensor([14, 9])
    ids = torch.randint(1, 400, (2, 14), generator=torch.Generator().manual_seed(2))
    batch = TeacherBatch(torch.tensor([3, 8]), ids, lengths, torch.ones(2, 14, dtype=torch.uint8))
    outs = [HFTeacher(cfg, replace(spec, kernel=kernel), DEVICE).score(batch) for kernel in ("torch", "triton")]
    for key, ref in outs[0].arrays().items():
        got = outs[1].arrays()[key]
        if key in ("log_partition", "target_logprob", "topk_logprobs", "draw_logprobs", "router_probs"):
            torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(ref), rtol=0, atol=1e-5)
        else:
            assert (got == ref).all(), key
