"""The two extraction paths (native CPU kernel, torch) against a dense float64 reference.

Reference: log-partitions by float64 logsumexp; top-k by a full sort of each row by
(value descending, column ascending) — the native kernel breaks ties the same way, the
torch path returns tied entries in any order (compared as value lists there).
Tolerance: fp32 sums over up to V terms, 2e-6 · ln V absolute on log-partitions and log-probs
(measured at V = 151,936: 1.6e-5, docs/benchmarks.md).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.teachers import native
from pipeline.teachers.extract import ExtractSpec, extract_sequence, topk_and_partitions

ATOL = 2e-6


def reference(z_CV: torch.Tensor, k: int, temps: tuple[float, ...]):
    z = z_CV.double().numpy()
    lse = np.stack([torch.logsumexp(torch.from_numpy(z / t), -1).numpy() for t in temps], -1)
    cols = np.broadcast_to(np.arange(z.shape[1]), z.shape)
    order = np.lexsort((cols, -z), axis=-1)[:, :k]  # last key first: value desc, then column asc
    return np.take_along_axis(z, order, 1) - lse[:, :1], order, lse


def logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    assert native.available() is None, f"the native kernel must build on dev and CI machines: {native.available()}"


@pytest.mark.parametrize("rows,vocab,k", [(37, 8192, 64), (5, 1003, 16), (9, 100, 64), (3, 50_000, 1),
                                          (40, 2048, 128), (2, 64, 64), (8, 151_936, 64)])
@pytest.mark.parametrize("temps", [(1.0,), (1.0, 0.5, 2.0)])
def test_native_matches_dense_reference(rows, vocab, k, temps):
    z = logits(rows, vocab)
    lp, ids, lse = native.topk_lse(z, k, temps)
    ref_lp, ref_ids, ref_lse = reference(z, k, temps)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=ATOL * max(1, np.log(vocab)))
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(lp.numpy(), ref_lp, atol=ATOL * max(1, np.log(vocab)))


def test_native_ties_go_to_the_lower_column():
    z = torch.zeros(4, 4096)
    z[:, ::7] = 1.0  # 586 tied maxima per row, more than k
    lp, ids, lse = native.topk_lse(z, 32, (1.0,))
    np.testing.assert_array_equal(ids.numpy(), np.broadcast_to(np.arange(0, 32 * 7, 7), (4, 32)))
    ref_lp, _, ref_lse = reference(z, 32, (1.0,))
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=ATOL * 10)
    np.testing.assert_allclose(lp.numpy(), ref_lp, atol=ATOL * 10)


def test_native_column_prefix_and_row_views():
    """A vocab_limit prefix of padded logits (row stride > V) and a row slice, as extraction passes them."""
    padded = logits(20, 5000)
    z = padded[3:17, :4321]
    lp, ids, lse = native.topk_lse(z, 40, (1.0,))
    ref_lp, ref_ids, ref_lse = reference(z.contiguous(), 40, (1.0,))
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=ATOL * 10)
    np.testing.assert_allclose(lp.numpy(), ref_lp, atol=ATOL * 10)


def test_native_masked_vocab_and_extremes():
    z = logits(6, 3000)
    z[:, 2000:] = -float("inf")  # masked entries: zero probability, never in the top-k
    z[1] = -float("inf")  # a fully masked row: torch.logsumexp gives -inf
    z[2, 5] = 1e4  # one dominant entry
    z[3] *= 100  # very wide spread
    lp, ids, lse = native.topk_lse(z, 8, (1.0, 0.5))
    assert torch.isneginf(lse[1]).all()
    keep = [0, 2, 3, 4, 5]
    ref_lp, ref_ids, ref_lse = reference(z[keep], 8, (1.0, 0.5))
    np.testing.assert_allclose(lse[keep].numpy(), ref_lse, rtol=1e-6, atol=ATOL * 10)
    np.testing.assert_array_equal(ids[keep].numpy(), ref_ids)
    np.testing.assert_allclose(lp[keep].numpy(), ref_lp, rtol=1e-6, atol=ATOL * 10)
    assert (ids[keep] < 2000).all()


def test_native_nan_row_is_reported_not_sorted():
    z = logits(5, 4096)
    z[2, 100] = float("nan")
    z[4, 4095] = float("nan")  # a tail column (4096 = 8 x 512: no tail) / the last block
    lp, ids, lse = native.topk_lse(z, 16, (1.0,))
    assert torch.isnan(lse[[2, 4]]).all() and not torch.isnan(lse[[0, 1, 3]]).any()
    ref_lp, ref_ids, _ = reference(z[[0, 1, 3]], 16, (1.0,))
    np.testing.assert_array_equal(ids[[0, 1, 3]].numpy(), ref_ids)


def test_native_log_partitions_only():
    z = logits(33, 7777)
    lp, ids, lse = native.topk_lse(z, 0, (1.0, 3.0))
    assert lp.shape == (33, 0) and ids.shape == (33, 0)
    np.testing.assert_allclose(lse.numpy(), reference(z, 1, (1.0, 3.0))[2], atol=ATOL * 10)


def test_native_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="fp32 CPU logits"):
        native.topk_lse(logits(4, 100).to(torch.bfloat16), 4, (1.0,))
    with pytest.raises(ValueError, match="contiguous rows"):
        native.topk_lse(logits(100, 4).T, 4, (1.0,))
    with pytest.raises(ValueError, match="temperatures"):
        native.topk_lse(logits(4, 100), 4, (2.0, 1.0))


@pytest.mark.parametrize("targets", ["topk", "sampled", "topk+sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extract_sequence_native_equals_torch_path(targets, dtype):
    """The kernel is a drop-in: both paths give the same fields. bf16 logits (the fp32-copy
    path) tie often and the torch path orders ties arbitrarily: their ids are compared
    through the logits they pick."""
    z = logits(70, 3001, scale=2.0).to(dtype)
    targets_L = torch.randint(0, 3001, (70,))
    targets_L[-1] = -1
    u = torch.rand(70, 16)
    out = {}
    for kernel in ("native", "torch"):
        spec = ExtractSpec(k=24, temperatures=(1.0, 2.0), targets=targets, num_draws=16, vocab_limit=3000,
                           chunk_tokens=32, kernel=kernel)
        out[kernel] = extract_sequence(z, targets_L, u, spec)
    assert out["native"].keys() == out["torch"].keys()
    for key in out["native"]:
        a, b = out["native"][key], out["torch"][key]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        elif key == "topk_ids" and dtype == torch.bfloat16:
            assert torch.equal(z.gather(1, a.long()), z.gather(1, b.long()))
        else:
            assert torch.equal(a, b), key


def test_topk_and_partitions_auto_is_the_torch_path_until_resolved():
    z = logits(8, 500)
    out = topk_and_partitions(z, ExtractSpec(k=4, temperatures=(1.0,)))
    ref_lp, ref_ids, _ = reference(z, 4, (1.0,))
    np.testing.assert_array_equal(out["topk_ids"].numpy(), ref_ids)


def test_resolve_kernel_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert native.resolve_kernel("auto", cpu) == "native"
    assert native.resolve_kernel("native", cpu) == "native"
    assert native.resolve_kernel("torch", cpu) == "torch"
    assert native.resolve_kernel("auto", cuda) == "torch"
    with pytest.raises(ConfigError, match="CPU only"):
        native.resolve_kernel("native", cuda)
    with pytest.raises(ConfigError, match="allowed: auto, native, torch, triton"):
        native.resolve_kernel("cuda", cpu)


def test_without_a_compiler_auto_falls_back_and_native_refuses(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-kdcache")
    monkeypatch.setenv("KDCACHE_BUILD_DIR", str(tmp_path))
    native._function.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert native.resolve_kernel("auto", torch.device("cpu")) == "torch"
        assert "no C++ compiler 'no-such-compiler-kdcache'" in caplog.text
        with pytest.raises(ConfigError, match="extract_kernel=native: no C\\+\\+ compiler.*use extract_kernel=torch"):
            native.resolve_kernel("native", torch.device("cpu"))
    finally:
        monkeypatch.undo()
        native._function.cache_clear()


def test_build_is_cached_per_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("KDCACHE_BUILD_DIR", str(tmp_path))
    first = native.build()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, f"{first.name}.sha256"]  # no temporary left


PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("KDCACHE_PLANTED_MARKER"), "w"); if (f) { fputs("loaded", f); fclose(f); }
}
int kd_topk_lse(void) { return 0; }
"""


def test_a_tampered_library_is_rebuilt_not_loaded(monkeypatch, tmp_path, caplog):
    import subprocess

    build_dir, marker = tmp_path / "build", tmp_path / "loaded"
    monkeypatch.setenv("KDCACHE_BUILD_DIR", str(build_dir))
    monkeypatch.setenv("KDCACHE_PLANTED_MARKER", str(marker))
    lib = native.build()
    built = lib.read_bytes()
    (tmp_path / "planted.c").write_text("#include <stdlib.h>\n" + PLANTED)
    # a library that runs code as soon as it is loaded, put where the real one was built
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "planted.c"), "-o", str(lib)], check=True)
    native._function.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert native.available() is None
        assert not marker.exists(), "the tampered library was loaded"
        assert lib.read_bytes() == built and native.changed_since_built(lib) is None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "sha256 differs" in warnings[0].getMessage() and str(lib) in warnings[0].getMessage()
        lp, _, _ = native.topk_lse(logits(2, 100), 4, (1.0,))  # the rebuilt kernel computes
        assert torch.isfinite(lp).all()
        native.hash_record(lib).unlink()  # no record (a library from before records, or copied in): rebuilt too
        assert native.build() == lib and native.changed_since_built(lib) is None
    finally:
        monkeypatch.undo()
        native._function.cache_clear()
