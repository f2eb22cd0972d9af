"""Fault-trial helpers shared by tests/test_faults.py and tests/test_train_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import run_pipeline


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = run_pipeline.main(argv)
    err = capsys.readouterr().err
    assert code != 0, "the fault went unnoticed (exit 0)"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside transformers' bars
    assert len(errors) == 1 and "Traceback" not in err, f"not one line: {err[-2000:]!r}"
    return errors[0]


class Payload:
    """Unpickling this runs code: it writes a marker file (a harmless stand-in for an exploit)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def rewrite_checksums(path: Path) -> None:
    """What an attacker who edits a checkpoint also does: make COMPLETE agree with the new bytes."""
    from pipeline import checkpoint

    sums = {str(p.relative_to(path)): checkpoint.sha256(p) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != checkpoint.COMPLETE}
    (path / checkpoint.COMPLETE).write_text(json.dumps(sums))
