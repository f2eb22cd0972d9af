"""Train resume (issue 3, STYLE 12): SIGKILL `run_pipeline.py train` after its first complete
checkpoint, re-run it, and get exactly the weights and losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import wait_for_checkpoint
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RESUME = ("train.steps=12", "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.router_weight=0.1",
          "train.log_every=1", "train.warmup_steps=2")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "run_pipeline.py", "train", *overrides]


def run_train(overrides: list[str]) -> str:
    done = subprocess.run(train_cmd(overrides), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def kill_after_first_checkpoint(overrides: list[str], ckpt_root: Path) -> None:
    proc = subprocess.Popen(train_cmd(overrides), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(proc, ckpt_root)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def per_step(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "steps logged twice or missing"
    return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(train_config):
    reference, ref_overrides = train_config(*RESUME, name="straight", with_overrides=True)
    run_train(ref_overrides)
    # the interrupted run also reads with 2 DataLoader workers: the stream position, not the
    # loader, is the resume state
    cfg, overrides = train_config(*RESUME, "train.num_workers=2", name="killed", with_overrides=True)
    ckpts = cfg.run_dir / "train" / "checkpoints"
    kill_after_first_checkpoint(overrides, ckpts)
    assert not (cfg.run_dir / "train" / "final").exists(), "killed too late: the run had finished"
    done = sorted(p.name for p in ckpts.glob("step-*") if (p / "COMPLETE").exists())
    assert done and done[-1] != "step-000012"
    # debris that resume must ignore: a dir that never got COMPLETE, and a leftover temporary one
    (ckpts / "step-000011").mkdir()
    (ckpts / "step-000011" / "model.safetensors").write_bytes(b"garbage")
    (ckpts / ".step-000011.tmp").mkdir(exist_ok=True)
    (ckpts / ".step-000011.tmp" / "COMPLETE").touch()

    out = run_train(overrides)
    assert f"resumed from {ckpts / done[-1]}" in out, out[-2000:]

    want = load_file(reference.run_dir / "train" / "final" / "model.safetensors")
    got = load_file(cfg.run_dir / "train" / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    want_m, got_m = per_step(reference.run_dir), per_step(cfg.run_dir)
    assert sorted(got_m) == list(range(1, 13))
    for step in want_m:
        for key in ("loss", "ce", "kd", "router"):
            assert want_m[step][key] == got_m[step][key], (step, key)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "train" / "final")
    tokenizer = AutoTokenizer.from_pretrained(cfg.run_dir / "train" / "final")
    ids = tokenizer("Return the sum of a and b.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def reopen(run_dir: Path) -> Path:
    """Undo the end of a finished run: no final/, the stage recorded as running (as if killed after the last checkpoint)."""
    import shutil

    from pipeline.state import read_state, write_state

    shutil.rmtree(run_dir / "train" / "final")
    write_state(run_dir, "train", "running", read_state(run_dir, "train")["inputs"])
    return run_dir / "train" / "checkpoints"


@pytest.mark.slow
def test_a_damaged_or_planted_newest_checkpoint_resumes_bit_identically_from_the_previous(train_config, capsys):
    from fault_helpers import Payload, flip_byte, one_line_error, rewrite_checksums

    from stages import train_student

    cfg, overrides = train_config("train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=2",
                                  "train.router_weight=0.1", "train.warmup_steps=2", with_overrides=True)
    train_student.run(cfg)
    final = cfg.run_dir / "train" / "final" / "model.safetensors"
    want = load_file(final)

    def resumed_weights() -> dict:
        capsys.readouterr()
        train_student.run(cfg)
        captured = capsys.readouterr()
        assert f"resumed from {ckpts / 'step-000003'} (step 3)" in captured.out
        skipped = [line for line in captured.err.splitlines() if "skipping checkpoint" in line]
        assert len(skipped) == 1 and "step-000006" in skipped[0], captured.err[-2000:]
        return load_file(final)

    ckpts = reopen(cfg.run_dir)  # 1. a flipped byte in the newest checkpoint's weights
    flip_byte(ckpts / "step-000006" / "model.safetensors", (ckpts / "step-000006" / "model.safetensors").stat().st_size // 2)
    got = resumed_weights()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    ckpts = reopen(cfg.run_dir)  # 2. code planted in the newest optimizer state, its checksums made to agree
    marker = cfg.run_dir / "pwned"
    trainer = torch.load(ckpts / "step-000006" / "optimizer.bin", weights_only=True)
    torch.save({**trainer, "extra": Payload(marker)}, ckpts / "step-000006" / "optimizer.bin")
    rewrite_checksums(ckpts / "step-000006")
    got = resumed_weights()
    assert not marker.exists(), "resume ran code from a checkpoint"
    assert all(torch.equal(want[k], got[k]) for k in want)

    ckpts = reopen(cfg.run_dir)  # 3. every checkpoint damaged: one line, exit 2, nothing trained
    for path in ckpts.glob("step-*"):
        flip_byte(path / "model.safetensors", 200)
    err = one_line_error(capsys, ["train", *overrides])
    assert "no usable checkpoint" in err and str(ckpts) in err
    assert not final.exists()
