"""KD targets the cache cannot give at train.temperature are refused at train start (issue 16,
items 3 and 4): one line on stderr, exit != 0, nothing written, and the corrected run trains.

- Sampled targets are draws from the teacher at cache.draw_temperature: at another train
  temperature the stored draw log-probs importance-weight them (one line says so).
- An uncached tau with tail_bucket treats the teacher's tail as one token; refused unless
  train.allow_uncached_temperature=true, which trains with one warning line.
The session cache (conftest TRAIN_BASE) has draws at tau 1 and temperatures [1, 2].
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cache_helpers import targets

from cache.schema import TeacherRecord

import run_pipeline
from pipeline.config import ConfigError
from pipeline.losses import KD_LOSSES, KDSpec, approximates_tail, kd_per_token
from stages.train_setup import check_cached_temperature

BASE = ("train.steps=1", "train.router_weight=0", "train.checkpoint_every=1")


@pytest.fixture
def train_cli(train_config, capsys):
    """train_cli(*overrides) → (exit code, stderr lines) of `run_pipeline.py train` on a copy of the cache."""

    def run(*overrides: str) -> tuple[int, list[str]]:
        _, everything = train_config(*BASE, *overrides, with_overrides=True)
        capsys.readouterr()
        code = run_pipeline.main(["train", *everything])
        return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    run.run_dir = train_config(*BASE).run_dir
    return run


def files_under(folder: Path) -> set[str]:
    """Every path under folder but the stage locks, which the CLI takes first and keeps by design."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix != ".lock"}


def said(err: list[str]) -> list[str]:
    """The stderr lines meant for the user (not the progress bars of loading and saving)."""
    return [line for line in err if line.startswith(("error: ", "warning: "))]


def refused(train_cli, *overrides: str) -> str:
    before = files_under(train_cli.run_dir)
    code, err = train_cli(*overrides)
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert files_under(train_cli.run_dir) == before, "a refused run must write nothing"
    assert not (train_cli.run_dir / "train").exists()
    return err[0]


def test_sampled_at_another_temperature_than_the_draws_trains_importance_weighted(train_cli):
    """v2 stores the teacher's log-prob at each draw, so tau != tau_draw is the right target (the
    weights' maths against the dense gradient: tests/test_sampled_importance.py); one line says so."""
    code, err = train_cli("train.kd_loss=sampled", "train.temperature=2.0")
    lines = [line for line in err if "importance-weighted" in line]
    assert code == 0 and len(lines) == 1 and "cache.draw_temperature=1.0" in lines[0], err
    assert (train_cli.run_dir / "train" / "final").is_dir()


def test_uncached_temperature_is_refused_unless_allowed(train_cli):
    line = refused(train_cli, "train.temperature=3.0")
    assert "train.temperature=3.0" in line and "[1.0, 2.0]" in line
    assert "cache.temperatures=[1.0, 2.0, 3.0]" in line and "train.allow_uncached_temperature=true" in line
    code, err = train_cli("train.temperature=3.0", "train.allow_uncached_temperature=true")
    (warning,) = said(err)
    assert code == 0 and warning.startswith("warning: ") and "train.temperature=3.0" in warning and "[1.0, 2.0]" in warning
    assert (train_cli.run_dir / "train" / "final").is_dir()


@pytest.mark.parametrize("overrides", [("train.kd_loss=forward_kl",), ("train.alpha=0", "train.prompt_kl_weight=1")])
def test_a_loss_needing_the_top_k_on_a_cache_of_draws_only_is_refused(train_config, capsys, overrides):
    cfg, everything = train_config(*BASE, *overrides, cache=("cache.targets=sampled",), with_overrides=True)
    capsys.readouterr()
    assert run_pipeline.main(["train", *everything]) != 0
    (line,) = said(capsys.readouterr().err.splitlines())
    assert "needs the teacher's top-k" in line and "cache.targets=sampled" in line
    assert not (cfg.run_dir / "train").exists() and not (cfg.run_dir / "state" / "train.json").exists()


def check(kd_loss="forward_kl", temperature=3.0, missing_mass="tail_bucket", allow=False, k=8, vocab=512):
    t = SimpleNamespace(kd_loss=kd_loss, temperature=temperature, missing_mass=missing_mass,
                        allow_uncached_temperature=allow)
    check_cached_temperature(t, {"temperatures": [1.0, 2.0], "k": k, "vocab_size": vocab}, is_main=True)


@pytest.mark.parametrize("case", [
    {"temperature": 2.0},  # cached
    {"missing_mass": "renormalize"},  # exact renormalised top-k at any tau
    {"k": 512},  # the whole vocabulary is cached: no tail
    {"kd_loss": "bild"}, {"kd_loss": "top_kl"},  # never temper a tail bucket
])
def test_exact_cases_pass_silently(case, capsys):
    check(**case)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kd_loss", ["forward_kl", "reverse_kl", "jsd", "tvd", "dkd", "nkd", "skew_forward_kl"])
def test_every_bucket_loss_at_an_uncached_tau_is_refused(kd_loss):
    with pytest.raises(ConfigError, match=r"train.temperature=3.0 is not among the cache's temperatures \[1.0, 2.0\]"):
        check(kd_loss)


def test_normkd_with_tail_bucket_is_refused_at_any_tau(capsys):
    with pytest.raises(ConfigError, match="normkd.*train.missing_mass=renormalize.*allow_uncached_temperature=true"):
        check("normkd", temperature=1.0)
    check("normkd", temperature=1.0, missing_mass="renormalize")
    check("normkd", temperature=1.0, allow=True)
    assert capsys.readouterr().err.count("warning: ") == 1


def cache_of(z_TV: torch.Tensor, k: int, temps: tuple[float, ...]) -> TeacherRecord:
    lp_TV = torch.log_softmax(z_TV, -1)
    ids_TK = lp_TV.argsort(-1, descending=True)[:, :k]
    logz_TP = torch.stack([torch.logsumexp(z_TV / t, -1) for t in temps], -1)
    return targets(ids_TK, lp_TV.gather(-1, ids_TK), logz_TP, temps)


@pytest.mark.parametrize("mode", ["tail_bucket", "renormalize"])
@pytest.mark.parametrize("name", sorted(set(KD_LOSSES) - {"sampled", "normkd"}))
def test_the_rule_flags_exactly_the_losses_that_change_when_tau_is_cached(name, mode):
    """approximates_tail (what the trainer refuses) against the reference of a cache that holds tau:
    where it says exact, the loss equals the one computed with tau cached; where it says
    approximated, the two differ."""
    torch.manual_seed(0)
    z_TV, s_TV = 3.0 * torch.randn(5, 40, dtype=torch.float64), 3.0 * torch.randn(5, 40, dtype=torch.float64)
    spec = KDSpec(name=name, temperature=3.0, missing_mass=mode, bild_top_k=4)
    lacking, holding = cache_of(z_TV, 8, (1.0, 2.0)), cache_of(z_TV, 8, (1.0, 2.0, 3.0))
    got, reference = kd_per_token(s_TV, lacking, spec), kd_per_token(s_TV, holding, spec)
    expected_exact = mode == "renormalize" or name in ("bild", "top_kl")
    assert approximates_tail(spec, lacking.temperatures, 8, 40) is not expected_exact
    assert not approximates_tail(spec, holding.temperatures, 8, 40)
    if expected_exact:
        torch.testing.assert_close(got, reference)
    else:
        assert (got - reference).abs().max() > 1e-3
