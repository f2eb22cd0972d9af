"""Progress: one dense line per interval on rank 0, the same numbers in metrics.jsonl.

    step 120/10000 | loss 2.41 (ce 2.90 kd 1.95 router 0.08) | tok/s 41,200 | mem 38.0 GiB | eta 3h12m
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GiB (Linux)
    except ImportError:  # pragma: no cover
        return 0.0


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, enabled: bool, accelerator=None, every: int = 10):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.total, self.enabled, self.accelerator, self.every = total_steps, enabled, accelerator, every
        self.start = time.time()
        self._tokens, self._t0, self._first_step = 0, time.time(), None

    def resume_at(self, step: int) -> None:
        """Drop the records after ``step``: a killed run logged steps that its resume repeats."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def step(self, step: int, parts: dict[str, float], tokens: int, lr: float, device: torch.device) -> None:
        """Record one optimizer step; print and write every ``every`` steps and at the end."""
        self._first_step = step - 1 if self._first_step is None else self._first_step
        self._tokens += tokens
        if not (step % self.every == 0 or step == self.total):
            return
        elapsed = time.time() - self._t0
        tok_s = self._tokens / max(elapsed, 1e-9)
        per_step = (time.time() - self.start) / max(step - self._first_step, 1)
        record = {"step": step, **{k: round(v, 5) for k, v in parts.items()}, "tok_s": round(tok_s, 1), "lr": lr,
                  "mem_gib": round(memory_gib(device), 2), "eta_s": round(per_step * (self.total - step), 1)}
        self._tokens, self._t0 = 0, time.time()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if not self.enabled:
            return
        print(self.line(record), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def line(self, r: dict) -> str:
        parts = ("ce", "kd", "prompt_kl", "router", "erd", "mc", "coverage", "aux")
        others = " ".join(f"{k} {r[k]:.3f}" for k in parts if k in r and (r[k] or k in ("ce", "kd", "router")))
        return (f"step {r['step']}/{self.total} | loss {r['loss']:.4f} ({others}) | tok/s {r['tok_s']:,.0f} | "
                f"mem {r['mem_gib']:.1f} GiB | eta {format_eta(r['eta_s'])}")
