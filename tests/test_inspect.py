"""`inspect` statistics against direct numpy/loop computations on the decoded arrays, --verify on
damaged shards, --plots, and `status` on finished and killed runs; on the Zarr and HDF5 stores."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import run_pipeline
from cache.reader import CacheReader
from cache.stats import bucket_entropy, entropy_bounds, expert_load
from pipeline.config import load_config
from pipeline.state import read_state, write_state
from stages import cache_teacher, inspect_cache, prepare, status

BASE = ["data.max_samples=40", "data.max_length=48", "data.eval_fraction=0.1", "cache.k=8", "cache.batch_size=4",
        "cache.shard_tokens=300", "cache.chunk_tokens=64", "cache.num_draws=8"]
FULL = ["cache.targets=topk+sampled", "cache.router_topk=all"]


@pytest.fixture(scope="module")
def build(tmp_path_factory, text_jsonl, make_model):
    """build(name, *overrides) → run dir after prepare + cache (memoized per module)."""
    from stages.config import PipelineConfig

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("inspect_runs")

    def make(name: str, *overrides: str) -> Path:
        if name not in built:
            cfg = load_config(PipelineConfig, [], [f"run.root={root}", f"run.name={name}", f"data.source={text_jsonl}",
                                                   f"teacher.path={make_model('qwen3_moe')}", *BASE, *overrides])
            prepare.run(cfg)
            cache_teacher.run(cfg)
            built[name] = cfg.run_dir
        return built[name]

    return make


@pytest.fixture(params=["zarr", "hdf5"])
def full_run(request, build) -> Path:
    return build(f"full_{request.param}", f"cache.store={request.param}", *FULL)


@pytest.fixture(scope="module")
def _inspected() -> dict:
    return {}


@pytest.fixture
def full(full_run, _inspected) -> tuple[dict, CacheReader, list]:
    """(inspect's stats, a reader, every shard decoded) of a full run; computed once per store."""
    if full_run not in _inspected:
        _inspected[full_run] = (inspect_cache.inspect(full_run / "cache"), *decoded(full_run / "cache"))
    return _inspected[full_run]


def decoded(cache_dir: Path):
    reader = CacheReader(cache_dir)
    outs = [reader.read_shard(s.name) for s in reader.shards]
    return reader, outs


# --- statistics against direct computations ------------------------------------------------


def test_counts_and_storage(full):
    stats, reader, outs = full
    cache_dir = reader.location.path()
    tokens = sum(len(o.input_ids) for o in outs)
    assert stats["tokens"] == stats["sampled_tokens"] == tokens
    assert stats["sequences"] == stats["sampled_sequences"] == sum(len(o.seq_lens) for o in outs)
    assert stats["shards"] == stats["sampled_shards"] == len(reader.shards) > 1
    fields = stats["fields"]
    assert fields["input_ids"]["raw_bytes"] == 4 * tokens
    assert fields["topk_logprobs"]["raw_bytes"] == 2 * 8 * tokens  # 16-bit steps (balanced), k = 8
    assert fields["router_probs"]["raw_bytes"] == tokens * len(reader.manifest.identity["moe_layers"]) * 8  # 8-bit
    stored = sum(f["stored_bytes"] for f in fields.values())
    raw = sum(f["raw_bytes"] for f in fields.values())
    paths = [p for s in reader.shards for p in [cache_dir / s.name, *(cache_dir / s.name).rglob("*")]]
    on_disk = sum(p.stat().st_size for p in paths if p.is_file())
    assert 0 < stored <= on_disk
    assert stats["bytes_per_token"] == pytest.approx(stored / tokens)
    assert stats["disk_bytes_per_token"] == pytest.approx(on_disk / tokens)
    assert stats["compression_ratio"] == pytest.approx(raw / stored)


def test_teacher_statistics(full):
    stats, _, outs = full
    mass = [sum(math.exp(float(x)) for x in row) for o in outs for row in o.teacher.topk_logprobs]
    assert stats["topk_mass_mean"] == pytest.approx(np.mean(mass), rel=1e-6)
    assert stats["topk_mass_p5"] == pytest.approx(np.percentile(mass, 5), rel=1e-6)
    assert stats["topk_mass_p50"] == pytest.approx(np.percentile(mass, 50), rel=1e-6)
    lower = []
    for o in outs:
        for row in o.teacher.topk_logprobs:
            p = [math.exp(float(x)) for x in row]
            tail = max(0.0, 1.0 - sum(p))
            lower.append(-sum(q * math.log(q) for q in p if q > 0) - (tail * math.log(tail) if tail > 0 else 0.0))
    assert stats["entropy_lower_mean"] == pytest.approx(np.mean(lower), rel=1e-6)
    assert stats["entropy_lower_mean"] <= stats["entropy_upper_mean"] <= math.log(stats["vocab_size"]) + 1e-6


def brute_force_targets(outs) -> dict[str, int]:
    """Loops over sequences: trained positions, target in top-k, target among draws, NLL sum."""
    n = hit_topk = hit_draw = 0
    nll = 0.0
    for o in outs:
        start = 0
        for length in o.seq_lens:
            for i in range(start, start + length - 1):  # the last token of a sequence has no target
                if o.loss_mask[i] != 1:
                    continue
                target = o.input_ids[i + 1]
                n += 1
                nll -= float(o.teacher.target_logprob[i])
                hit_topk += target in o.teacher.topk_ids[i].tolist()
                hit_draw += target in o.teacher.draw_ids[i][o.teacher.draw_counts[i] > 0].tolist()
            start += length
    return {"n": n, "topk": hit_topk, "draws": hit_draw, "nll": nll}


def test_target_rates(full):
    stats, _, outs = full
    want = brute_force_targets(outs)
    assert stats["trained_positions"] == want["n"] > 0
    assert stats["target_in_topk"] == pytest.approx(want["topk"] / want["n"])
    assert stats["target_in_draws"] == pytest.approx(want["draws"] / want["n"])
    assert stats["teacher_nll"] == pytest.approx(want["nll"] / want["n"], rel=1e-5)
    draws = sum(int(np.count_nonzero(o.teacher.draw_counts)) for o in outs) / sum(len(o.input_ids) for o in outs)
    assert stats["draws_unique_mean"] == pytest.approx(draws)
    assert 1 <= stats["draws_unique_mean"] <= 8


def test_v2_draw_and_codec_statistics(full):
    stats, reader, outs = full
    counts = np.concatenate([o.teacher.draw_counts for o in outs])
    lp = np.concatenate([o.teacher.draw_logprobs for o in outs]).astype(np.float64)
    assert stats["draws_per_position"] == pytest.approx(counts.sum() / len(counts)) and counts.sum() == 8 * len(counts)
    assert stats["draws_singleton_share"] == pytest.approx((counts == 1).sum() / (counts > 0).sum())
    mass = [sum(math.exp(x) for x, c in zip(row_lp, row_c) if c > 0) for row_lp, row_c in zip(lp, counts)]
    assert stats["draw_mass_mean"] == pytest.approx(np.mean(mass)) and 0 < stats["draw_mass_mean"] <= 1 + 1e-3
    codec = stats["codec"]
    assert codec["preset"] == "balanced" and codec["logprob_error_bound"] == 2.0**-11
    assert codec["router_log_error_bound"] == 1 / 32 and codec["vocab_ranked"] > 100
    gap = np.abs(1 - np.concatenate([o.teacher.router_probs for o in outs]).astype(np.float64).sum(-1)).mean(0)
    np.testing.assert_allclose(stats["router"]["router_mass_gap"], gap, rtol=1e-6)
    assert stats["router"]["teacher_layers"] == reader.manifest.identity["teacher_moe_layers"]


def test_router_statistics_all_experts(full):
    stats, reader, outs = full
    router = stats["router"]
    ident = reader.manifest.identity
    assert router["layers"] == ident["moe_layers"] and router["router_entropy_exact"]
    ids = np.concatenate([o.teacher.router_ids for o in outs]).astype(int)
    probs = np.concatenate([o.teacher.router_probs for o in outs]).astype(np.float64)
    shares = np.asarray(router["load_shares"])
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-9)
    for layer in range(ids.shape[1]):
        routed_k = ident.get("experts_per_token", 0)  # recorded: hard load of the routed experts
        load = np.zeros(ident["num_experts"])
        for t in range(ids.shape[0]):  # routed: the routed_k most probable entries (stored in any order)
            by_prob = sorted(range(ids.shape[2]), key=lambda r: -probs[t, layer, r])
            for r in by_prob[:routed_k or ids.shape[2]]:
                load[ids[t, layer, r]] += 1.0 if routed_k else probs[t, layer, r]
        np.testing.assert_allclose(shares[layer], load / load.sum(), rtol=1e-9)
        assert router["load_cv"][layer] == pytest.approx(np.std(shares[layer]) / np.mean(shares[layer]))
        entropy = np.mean([-sum(p * math.log(p) for p in row if p > 0) for row in probs[:, layer]])
        # 8-bit probabilities (|Δ log p| ≤ 1/32) sum to 1 only within ~3%; the tail bucket absorbs the rest
        assert router["router_entropy"][layer] == pytest.approx(entropy, abs=0.05)
    assert stats["router_entropy_mean"] <= math.log(ident["num_experts"])


def test_max_tokens_samples_whole_sequences_in_manifest_order(build):
    cache_dir = build("full_zarr", "cache.store=zarr", *FULL) / "cache"
    stats = inspect_cache.inspect(cache_dir, max_tokens=100)
    reader = CacheReader(cache_dir)
    offsets = reader.seq_offsets(reader.shards[0].name)
    fit = int(offsets[offsets <= 100].max())
    assert stats["sampled_tokens"] == fit <= 100 and stats["sampled_shards"] == 1
    _, outs = decoded(cache_dir)
    n_seqs = int(np.searchsorted(offsets, fit))
    mass = np.exp(outs[0].teacher.topk_logprobs[:fit].astype(np.float64)).sum(1)
    assert stats["sampled_sequences"] == n_seqs
    assert stats["topk_mass_mean"] == pytest.approx(mass.mean())


# --- estimators on synthetic distributions --------------------------------------------------


def test_entropy_bounds_bracket_the_true_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 50)) * 2
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    true = -(np.exp(logp) * logp).sum(1)
    topk = -np.sort(-logp, axis=1)[:, :8]
    lower, upper = entropy_bounds(topk, vocab_size=50)
    assert np.all(lower <= true + 1e-9) and np.all(true <= upper + 1e-9)
    full_lower, full_upper = entropy_bounds(logp, vocab_size=50)
    np.testing.assert_allclose(full_lower, true, rtol=1e-9)
    np.testing.assert_allclose(full_upper, true, rtol=1e-9)
    np.testing.assert_allclose(bucket_entropy(np.array([[0.5, 0.25]])), [1.5 * math.log(2)])


def test_expert_load_routed_and_ids_only():
    rng = np.random.default_rng(1)
    T, L, E, R = 30, 3, 6, 4
    probs = rng.dirichlet(np.ones(E), size=(T, L))
    ids = np.argsort(-probs, axis=2)[:, :, :R]
    top = np.take_along_axis(probs, ids, axis=2)
    want = np.zeros((L, E))
    for t in range(T):
        for layer in range(L):
            for e in ids[t, layer, :2]:
                want[layer, e] += 1
    np.testing.assert_array_equal(expert_load(ids, top, E, routed_k=2), want)
    np.testing.assert_array_equal(expert_load(ids[:, :, :2], None, E), want)  # ids-only cache (vLLM)
    assert expert_load(ids, top, E).sum() == pytest.approx(top.sum())


# --- a cache without top-k or router data -----------------------------------------------------


def test_sampled_only_cache_without_router(build, tmp_path):
    cache_dir = build("sampled_zarr", "cache.targets=sampled", "cache.router_topk=none") / "cache"
    stats = inspect_cache.main(str(cache_dir), plots=str(tmp_path / "plots"))
    assert "router" not in stats and "topk_mass_mean" not in stats and stats["draws_unique_mean"] >= 1
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["bytes_per_token.png"]


# --- the CLI: report, --verify, --plots, errors ---------------------------------------------


def test_cli_report_and_plots(full_run, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert run_pipeline.main(["inspect", str(full_run / "cache"), "--verify", "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    for text in ("tokens", "bytes/token", "compression", "top-8 probability mass", "lower bound", "target in top-k",
                 "target among draws", "unique draws drawn once", "teacher mass of the unique draws", "preset",
                 "16-bit, |error| <= 0.00049", "MoE layers stored", "load CV", "router entropy", "verify: all"):
        assert text in out, text
    names = ["bytes_per_token.png", "expert_load.png", "teacher_entropy.png", "topk_mass.png"]
    assert sorted(p.name for p in plots.iterdir()) == names
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def damage(cache_dir: Path, shard: str) -> None:
    """Flip bytes in the middle of one chunk file (zarr) or of the file itself (hdf5)."""
    path = cache_dir / shard
    target = path if path.is_file() else max((p for p in path.rglob("*") if p.is_file() and "c" in p.parts),
                                             key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    target.write_bytes(bytes(data))


def inspect_error(capsys, cache_dir: Path, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = run_pipeline.main(["inspect", str(cache_dir), *flags])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, f"not one line: {err!r}"
    return code, err


def test_verify_names_corrupt_and_missing_shards(full_run, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    shutil.copytree(full_run / "cache", cache_dir)
    shards = [s.name for s in CacheReader(cache_dir).shards]
    damage(cache_dir, shards[1])
    code, err = inspect_error(capsys, cache_dir, "--verify")
    assert code != 0 and f"{shards[1]} (checksum mismatch)" in err and shards[0] not in err
    shutil.rmtree(cache_dir / shards[2]) if (cache_dir / shards[2]).is_dir() else (cache_dir / shards[2]).unlink()
    code, err = inspect_error(capsys, cache_dir, "--verify")
    assert code != 0 and "2 of" in err and f"{shards[2]} (missing)" in err
    code, err = inspect_error(capsys, cache_dir)  # without --verify: each shard is checked before it is read
    assert code == 2 and "is damaged" in err and (shards[1] in err or shards[2] in err) and "--verify" in err


def test_incomplete_or_missing_cache_is_one_line_error(full_run, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    shutil.copytree(full_run / "cache", cache_dir)
    (cache_dir / "manifest.json").unlink()
    code, err = inspect_error(capsys, cache_dir)
    assert code == 2 and "manifest.json" in err
    code, err = inspect_error(capsys, tmp_path / "nowhere")
    assert code == 2 and "nowhere" in err


# --- status -----------------------------------------------------------------------------------


def test_status_of_a_finished_run(build, capsys):
    run_dir = build("full_zarr", "cache.store=zarr", *FULL)
    report = status.main(str(run_dir))
    out = capsys.readouterr().out
    assert report["stages"]["prepare"]["status"] == report["stages"]["cache"]["status"] == "done"
    assert report["stages"]["train"] is None and report["checkpoint_step"] is None
    cache = report["caches"]["cache"]
    n_tokens = CacheReader(run_dir / "cache").manifest.n_tokens
    assert cache["complete"] and cache["tokens"] == cache["expected_tokens"] == n_tokens
    assert "cache_eval" in report["caches"]
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "done" in lines["prepare"] and "done" in lines["cache"] and "not started" in lines["train"]
    assert "tokens=" in lines["cache"] and "complete (manifest.json written)" in out


def test_status_of_a_killed_cache(build, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    shutil.copytree(build("full_hdf5", "cache.store=hdf5", *FULL), run_dir)
    (run_dir / "cache" / "manifest.json").unlink()
    shards = CacheReader(build("full_hdf5") / "cache").shards
    write_state(run_dir, "cache", "running", read_state(run_dir, "cache")["inputs"])
    report = status.main(str(run_dir))
    out = capsys.readouterr().out
    cache = report["caches"]["cache"]
    assert report["stages"]["cache"]["status"] == "running" and not cache["complete"]
    assert cache["shards"] == len(shards) and cache["tokens"] == sum(s.n_tokens for s in shards)
    assert f"{len(shards)} shards committed" in out and "incomplete" in out and "interrupted" in out


def test_status_of_a_missing_run_dir(tmp_path, capsys):
    assert run_pipeline.main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err
