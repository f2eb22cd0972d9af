"""Stage state: skip, resume, refuse, and the case of a stage that stopped before writing."""

from __future__ import annotations

import pytest

from pipeline import state
from pipeline.config import ConfigError


def test_done_is_skipped_running_is_resumed(tmp_path):
    state.write_state(tmp_path, "cache", "done", "A")
    assert state.begin(tmp_path, "cache", "A", [tmp_path / "cache"], force=False) is False
    state.write_state(tmp_path, "cache", "running", "A")
    assert state.begin(tmp_path, "cache", "A", [tmp_path / "cache"], force=False) is True


def test_other_inputs_refused_while_outputs_exist(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard").write_text("data")
    for status in ("running", "done"):
        state.write_state(tmp_path, "cache", status, "A")
        with pytest.raises(ConfigError, match="other inputs; re-run with --force"):
            state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False)
    assert (tmp_path / "cache" / "shard").read_text() == "data"


def test_stopped_before_writing_needs_no_force(tmp_path):
    """A run stopped before its first output (e.g. interrupted while loading the model) with
    other settings next time: nothing to set aside, so the new settings simply start."""
    state.write_state(tmp_path, "cache", "running", "A")
    assert state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False) is True
    assert state.read_state(tmp_path, "cache") is None
    state.write_state(tmp_path, "cache", "done", "A")  # a done stage with no outputs left is still refused
    with pytest.raises(ConfigError):
        state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=False)


def test_force_sets_outputs_aside(tmp_path):
    (tmp_path / "cache").mkdir()
    state.write_state(tmp_path, "cache", "done", "A")
    assert state.begin(tmp_path, "cache", "B", [tmp_path / "cache"], force=True) is True
    assert not (tmp_path / "cache").exists()
    assert len(list(tmp_path.glob("cache.old-*"))) == 1
