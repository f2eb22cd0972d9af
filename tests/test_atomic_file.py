"""cache/schema.atomic_file: the one write-then-rename for files (manifests, journals, stage state,
metrics, init shards, the native kernel)."""

from __future__ import annotations

import pytest

from cache.schema import atomic_file, write_json_atomic


def test_the_new_file_replaces_the_old_whole(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with atomic_file(path) as tmp:
        tmp.write_text("new, ")
        assert path.read_text() == "old", "readers see the old file until the rename"
        with open(tmp, "a") as f:
            f.write("written in two parts")
    assert path.read_text() == "new, written in two parts"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary left"


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, '{"v": 1}')
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_file(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("disk gone mid-write")
    assert path.read_text() == '{"v": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_writer_that_never_creates_the_file_is_an_error_not_an_empty_file(tmp_path):
    """A writer (a compiler, save_file) that failed without raising leaves nothing to rename."""
    path = tmp_path / "lib.so"
    with pytest.raises(FileNotFoundError):
        with atomic_file(path):
            pass
    assert not path.exists()
