"""Config: unknown keys and bad values are one-line errors; YAML + overrides merge; saved beside outputs."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from stages import cache_teacher, prepare
from stages.config import PipelineConfig


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
    ("cache.id_codec=huffman", "cache.id_codec", ["sorted_delta", "plain"]),
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


@pytest.mark.parametrize("override", ["cache.k=-1", "cache.num_draws=0", "data.max_length=1",
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


def test_docs_list_every_range():
    """docs/config.md's table holds every ranged key with the range the code checks."""
    from pathlib import Path

    from pipeline.config import describe_range
    from stages.config import PipelineConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for key, fld in _leaf_fields(PipelineConfig):
        if "range" in fld.metadata:
            assert f"| `{key}` | {describe_range(fld.metadata['range'])}" in doc, f"docs/config.md lacks the range of {key}"
    for key in CROSS_FIELD:
        assert f"`{key}`" in doc


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
