"""Progress: one dense line per interval on rank 0, the same numbers in metrics.jsonl.

    step 120/10000 | loss 2.41 (ce 2.90 kd 1.95 router 0.08) | tok/s 41,200 | mem 38.0 GiB | eta 3h12m

The loss parts arrive as device tensors and stay there (LossMeter): each line is the mean of
the steps since the previous one, read with one stacked all-reduce and one device-to-host copy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cache.schema import atomic_file


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


class LossMeter:
    """Per-step loss parts summed on the device between two log lines; read once per interval.

    A part counts the steps it appeared in (load statistics only on logged steps), so a line
    shows each part's mean over its own steps. Every rank adds its share of each step's value
    (its sum divided by the global token count); ``read`` sums the shares across ranks in one
    stacked all-reduce, and its ``tolist`` is the interval's one device-to-host copy.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = {}
        self.tokens = 0  # this rank's loss-masked tokens, a host count

    def add(self, parts: dict[str, torch.Tensor], tokens: int) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.steps[key] = self.steps.get(key, 0) + 1
        self.tokens += int(tokens)

    def read(self, accelerator=None) -> tuple[dict[str, float], int]:
        """(each part's mean per step, all ranks' tokens) since the last read; resets the meter."""
        keys = sorted(self.sums)  # the same order on every rank
        device = self.sums[keys[0]].device if keys else torch.device("cpu")
        stacked = torch.stack([self.sums[k].to(device, torch.float64) for k in keys]
                              + [torch.tensor(float(self.tokens), dtype=torch.float64, device=device)])
        if accelerator is not None and accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
        *values, tokens = stacked.tolist()
        parts = {k: v / self.steps[k] for k, v in zip(keys, values)}
        self.sums, self.steps, self.tokens = {}, {}, 0
        return parts, round(tokens)


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, enabled: bool, accelerator=None, every: int = 10):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.total, self.enabled, self.accelerator, self.every = total_steps, enabled, accelerator, every
        self.start = time.time()
        self._t0, self._first_step = time.time(), None
        self.meter = LossMeter()

    def resume_at(self, step: int) -> None:
        """Drop the records after ``step``: a killed run logged steps that its resume repeats."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))

    def due(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) writes a line: every ``every`` steps and the last."""
        return step % self.every == 0 or step == self.total

    def step(self, step: int, parts: dict[str, torch.Tensor], tokens: int, lr: float, device: torch.device) -> None:
        """Record one optimizer step (parts: device tensors, this rank's share; tokens: this rank's
        count); on a due step, reduce the interval (every rank takes part), print and write."""
        self._first_step = step - 1 if self._first_step is None else self._first_step
        self.meter.add(parts, tokens)
        if not self.due(step):
            return
        means, tokens = self.meter.read(self.accelerator)
        elapsed = time.time() - self._t0
        tok_s = tokens / max(elapsed, 1e-9)
        per_step = (time.time() - self.start) / max(step - self._first_step, 1)
        record = {"step": step, **{k: round(v, 5) for k, v in means.items()}, "tok_s": round(tok_s, 1), "lr": lr,
                  "mem_gib": round(memory_gib(device), 2), "eta_s": round(per_step * (self.total - step), 1)}
        self._t0 = time.time()
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
