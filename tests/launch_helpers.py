"""Running a stage under torchrun from a test: 2 gloo ranks on CPU, the same command line a user types."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(command: str, *overrides: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node <nproc> run_pipeline.py <command> <overrides>``; fails the
    test with the ranks' stderr unless it exits 0. One thread per rank: the CI machine has few cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "run_pipeline.py", command, *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_for_checkpoint(proc: subprocess.Popen, ckpt_root: Path, timeout: float = 240) -> None:
    """Return once a complete checkpoint (step-*/COMPLETE) exists under ckpt_root; fail if the run
    ends first or none appears within timeout seconds."""
    deadline = time.time() + timeout
    while not any((p / "COMPLETE").exists() for p in ckpt_root.glob("step-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
