"""Config: unknown keys and bad values are one-line errors; YAML + overrides merge; saved beside outputs."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from stages import cache_teacher, prepare
from stages.config import PipelineConfig
from test_losses import dense_bild, dense_dkd, dense_kl, dense_nkd, make_teacher, mix, probs


def config_error(*overrides: str, yaml_paths=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(PipelineConfig, list(yaml_paths), list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_unknown_key_names_it_and_the_allowed_keys():
    message = config_error("cache.kk=1")
    assert "cache.kk" in message
    for key in ("k", "targets", "store", "router_topk", "shard_tokens"):
        assert f" {key}," in message or message.endswith(f" {key}")


def test_unknown_top_level_section():
    message = config_error("cachee.k=1")
    assert "cachee" in message and "cache" in message and "data" in message


@pytest.mark.parametrize("override,key,allowed", [
    ("cache.store=foo", "cache.store", ["zarr", "hdf5"]),
    ("cache.targets=all", "cache.targets", ["topk", "sampled", "topk+sampled"]),
    ("cache.preset=huffman", "cache.preset", ["compact", "balanced", "exact"]),
    ("cache.compression=lzf", "cache.compression", ["zstd", "gzip", "none"]),  # lzf is hdf5-only
    ("cache.router_topk=some", "cache.router_topk", ["all", "none", "integer"]),
    ("teacher.backend=onnx", "teacher.backend", ["hf", "vllm"]),
    ("data.mode=chat", "data.mode", ["text", "prompt_response"]),
])
def test_bad_choice_names_key_and_allowed_values(override, key, allowed):
    message = config_error(override)
    assert key in message and override.split("=")[1] in message
    assert all(a in message for a in allowed), message


@pytest.mark.parametrize("override,key,expected", [
    ("cache.k=abc", "cache.k", "expected int"),
    ("cache.batch_size=1.5", "cache.batch_size", "expected int"),
    ("data.packing=maybe", "data.packing", "expected bool"),
    ("cache.temperatures=abc", "cache.temperatures", "expected list[float]"),
])
def test_bad_typed_value_names_key_and_type(override, key, expected):
    message = config_error(override)
    assert key in message and expected in message


@pytest.mark.parametrize("override", ["cache.k=-2", "cache.num_draws=-1", "data.max_length=1",
                                      "data.eval_fraction=1.0", "cache.temperatures=[0.0]", "run.name=a/b"])
def test_out_of_range_values(override):
    assert override.split("=")[0] in config_error(override)


def test_not_an_override_and_missing_file(tmp_path):
    assert "section.key=value" in config_error("cache.k")
    assert "does not exist" in config_error(yaml_paths=[tmp_path / "nope.yaml"])


def test_yaml_files_then_overrides_later_wins(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("cache:\n  k: 16\n  store: hdf5\ndata:\n  max_length: 100\n")
    second.write_text("cache:\n  k: 24\n")
    cfg = load_config(PipelineConfig, [first, second], ["data.max_length=50"])
    assert (cfg.cache.k, cfg.cache.store, cfg.data.max_length) == (24, "hdf5", 50)
    assert cfg.cache.batch_size == PipelineConfig().cache.batch_size  # untouched default
    cfg = load_config(PipelineConfig, [first, second], ["cache.k=4"])
    assert cfg.cache.k == 4


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("cache:\n  kk: 3\n")
    assert "cache.kk" in config_error(yaml_paths=[path])


def test_resolved_config_saved_beside_outputs(make_config):
    cfg = make_config("data.max_samples=12", "cache.k=5", "cache.store=hdf5", "cache.splits=[train]")
    prepare.run(cfg)
    cache_teacher.run(cfg)
    for path in (cfg.run_dir / "data" / "config.yaml", cfg.run_dir / "cache" / "config.yaml"):
        saved = yaml.safe_load(path.read_text())
        assert saved["cache"]["k"] == 5 and saved["cache"]["store"] == "hdf5" and saved["data"]["max_samples"] == 12
        assert load_config(PipelineConfig, [path], []) == cfg, "the saved file reproduces the resolved config"


def _leaf_fields(cls, prefix=""):
    import dataclasses

    from stages.train_student import TrainPhase

    for fld in dataclasses.fields(cls):
        default = fld.default_factory() if fld.default_factory is not dataclasses.MISSING else fld.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_fields(type(default), f"{prefix}{fld.name}.")
        else:
            yield f"{prefix}{fld.name}", fld
    if not prefix:
        yield from ((f"train.phases[i].{f.name}", f) for f in dataclasses.fields(TrainPhase))


# numbers whose range depends on another field, checked by the section's validate() (docs/config.md)
CROSS_FIELD = {"cache.compression_level", "init.lora_rank", "init.lora_rank_map"}


def test_every_numeric_field_declares_its_range():
    """A new int/float field (or list/dict of them) must come with ranged(...) — or be a documented cross-field check."""
    from stages.config import PipelineConfig

    missing = [key for key, fld in _leaf_fields(PipelineConfig)
               if any(t in str(fld.type) for t in ("int", "float")) and "bool" not in str(fld.type)
               and "range" not in fld.metadata and key not in CROSS_FIELD]
    assert not missing, f"declare a range (pipeline.config.ranged) for: {missing}"


def doc_default(value) -> str:
    """How docs/config.md writes a default: in backticks, YAML-like (true, '' for empty, [8, 32])."""
    import json

    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value and value.strip() == value else f"`{value!r}`"
    return f"`{json.dumps(value)}`" if isinstance(value, (list, dict)) else f"`{value}`"


def test_docs_list_every_key_with_its_default_and_range():
    """docs/config.md's table holds every key with the default and the range the code has."""
    import dataclasses
    from pathlib import Path

    from pipeline.config import describe_range

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    rows = {line.split("`")[1]: line for line in doc.splitlines() if line.startswith("| `")}
    for key, fld in _leaf_fields(PipelineConfig):
        default = fld.default_factory() if fld.default_factory is not dataclasses.MISSING else fld.default
        assert key in rows, f"docs/config.md lacks a row for {key}"
        assert rows[key].startswith(f"| `{key}` | {doc_default(default)} | "), f"docs/config.md: default of {key}"
        if "range" in fld.metadata:
            assert f"| {describe_range(fld.metadata['range'])}" in rows[key], f"docs/config.md: range of {key}"
        if "choices" in fld.metadata:
            assert "| one of " + ", ".join(map(str, fld.metadata["choices"])) in rows[key], f"choices of {key}"
    for key in CROSS_FIELD:
        assert "across fields" in rows[key]


@pytest.mark.parametrize("bounds, inside, outside", [
    ((1, False, None, False), [1, 2, 10**9], [0, -1]),
    ((0.0, True, None, False), [1e-12, 3.0], [0.0, -1e-9]),
    ((0.0, False, 1.0, True), [0.0, 0.5], [1.0, -0.1]),
    ((0.0, True, 1.0, False), [1.0, 0.3], [0.0, 1.01]),
])
def test_in_range_ends(bounds, inside, outside):
    from pipeline.config import in_range

    assert all(in_range(v, bounds) for v in inside) and not any(in_range(v, bounds) for v in outside)


def test_every_shipped_config_passes_its_checks():
    """configs/*.yaml load with every range and choice check (a shipped config must run)."""
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(PipelineConfig, [path], [])


def test_every_kd_hyper_parameter_is_a_train_key_with_kdspec_default():
    import dataclasses

    from pipeline.losses import KDSpec
    from stages.train_student import TrainConfig

    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for fld in dataclasses.fields(KDSpec):
        if fld.name != "name":
            assert fld.name in train, f"KDSpec.{fld.name} cannot be set from the config (train.{fld.name})"
            assert getattr(TrainConfig(), fld.name) == fld.default, f"train.{fld.name} default differs from KDSpec's"


def _dense_jsd(q, p, beta):
    return beta * dense_kl(q, mix(beta, q, p)) + (1 - beta) * dense_kl(p, mix(beta, q, p))


@pytest.mark.parametrize("overrides, cached, reference", [
    (["train.kd_loss=jsd", "train.jsd_beta=0.3"], 40, lambda z, s: _dense_jsd(probs(z), probs(s), 0.3)),
    (["train.kd_loss=skew_forward_kl", "train.skew_alpha=0.2"], 40,
     lambda z, s: dense_kl(probs(z), mix(0.2, probs(z), probs(s)))),
    (["train.kd_loss=skew_reverse_kl", "train.skew_alpha=0.35"], 40,
     lambda z, s: dense_kl(probs(s), mix(0.35, probs(s), probs(z)))),
    (["train.kd_loss=dkd", "train.dkd_alpha=0.7", "train.dkd_beta=3.0"], 40,
     lambda z, s: dense_dkd(probs(z), probs(s), z.argmax(-1), 0.7, 3.0)),
    (["train.kd_loss=nkd", "train.nkd_gamma=1.3"], 40, lambda z, s: dense_nkd(z, s, 1.0, 1.3)),
    (["train.kd_loss=top_kl", "train.top_kl_k=4"], 10, lambda z, s: _renormalised_kl(z, s, 4)),
    (["train.kd_loss=bild", "train.bild_top_k=3"], 40, lambda z, s: dense_bild(z, s, 3, 1.0)),
], ids=lambda x: x[1].split("=")[0] if isinstance(x, list) else "")
def test_kd_hyper_parameters_from_the_config_reach_the_loss(overrides, cached, reference):
    """train.<key>=value → the KDSpec the train stage builds (stages/train_setup.kd_spec) → the loss equals
    its dense float64 definition at that value (tests/test_losses.py's references)."""
    import torch

    from pipeline.losses import kd_per_token
    from stages.train_setup import kd_spec

    spec = kd_spec(load_config(PipelineConfig, [], overrides).train)
    z, s = 2.5 * torch.randn(6, 40), 2.5 * torch.randn(6, 40)
    got = kd_per_token(s, make_teacher(z, k=cached), spec)
    torch.testing.assert_close(got.double(), reference(z, s), atol=2e-5, rtol=1e-4)


def _renormalised_kl(z, s, k):
    ids = z.topk(k, -1).indices
    q, p = probs(z).gather(-1, ids), probs(s).gather(-1, ids)
    return dense_kl(q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True))


@pytest.mark.parametrize("override", ["train.jsd_beta=1.0", "train.skew_alpha=0", "train.dkd_beta=-1",
                                      "train.bild_top_k=1", "train.top_kl_k=-1", "train.nkd_gamma=-0.5"])
def test_kd_hyper_parameters_out_of_range(override):
    assert override.split("=")[0] in config_error(override)


@pytest.mark.parametrize("splits", ["[train,test]", "[validation]", "[]", "[train,train]"])
def test_cache_splits_are_checked_at_config_load(splits):
    """An unknown (or repeated) split is one line when the config loads, long before a teacher loads."""
    message = config_error(f"cache.splits={splits}")
    assert "cache.splits" in message and "train, eval" in message


def test_preset_fills_the_shape_keys_left_at_their_defaults():
    cfg = load_config(PipelineConfig, [], ["cache.preset=compact", "cache.k=2"])
    assert (cfg.cache.targets, cfg.cache.k, cfg.cache.num_draws, cfg.cache.router_topk) == ("topk+sampled", 2, 48, "routed")
    default = load_config(PipelineConfig, [], [])
    assert (default.cache.preset, default.cache.targets, default.cache.k) == ("balanced", "topk", 64)


@pytest.mark.parametrize("value", ["'every:0'", "first", "[]", "'[1, x]'"])
def test_router_layers_syntax_is_one_line(value):
    message = config_error(f"cache.router_layers={value}")
    assert "cache.router_layers" in message and "allowed: all, last, every:N" in message and "\n" not in message
