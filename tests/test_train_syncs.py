"""The training step without host stalls (issue 13, item 2): no host sync on steps that are not
logged, one read per log line, and the logged numbers equal a hand-made reference.

On CPU there is no device to wait for, so syncs are counted: a TorchFunctionMode sees every
tensor method and torch function our code calls and records those that would read a device
tensor back to the host (item, tolist, float(), nonzero, boolean-mask indexing, bincount, ...).
The micro-batches the loader yields are host memory; the test copies them at the transfer
(``to_device``), so calls on the loader's tensors are host work and calls on the copies count.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from launch_helpers import torchrun
from torch.overrides import TorchFunctionMode

from cache.schema import TeacherRecord
from pipeline import batches as batches_module
from pipeline.student import LossWeights
from pipeline.batches import collate
from pipeline.metrics import MetricsLogger
from stages import train_student
from stages.train_setup import setup

ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(ROOT / d) + os.sep for d in ("pipeline", "stages", "cache"))
ALWAYS = {"item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "masked_select", "bincount", "unique",
          "unique_consecutive", "__bool__", "__float__", "__int__", "__index__", "nonzero_static"}
# The chunked loss (pipeline/losses.py, owned by the fused-loss work) picks its KD rows with
# nonzero; listed so that a new sync anywhere else still fails.
KNOWN_ELSEWHERE = {("pipeline/losses.py", "_chunk_losses_fp32", "nonzero")}
ROUTER_PARTS = ("train.router_weight=0.1", "train.router_erd_weight=0.1", "train.router_mc_weight=0.1",
                "train.router_aux_weight=0.01")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.ndim > 0 for i in items)


def _is_sync(name: str, args, kwargs) -> bool:
    if name in ALWAYS:
        return True
    if name in ("__getitem__", "__setitem__"):
        return _bool_index(args[1])
    if name == "where":
        return len(args) + len(kwargs) == 1  # torch.where(cond) is nonzero
    if name == "repeat_interleave":
        return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and \
            kwargs.get("output_size") is None
    return False


class SyncCounter(TorchFunctionMode):
    """Records (file, function, op, step) of each would-be sync called directly by repo code,
    except on the loader's host tensors."""

    def __init__(self):
        super().__init__()
        self.host_ids: set[int] = set()
        self.keep: list = []  # the host tensors stay alive, so their ids are not reused
        self.step: int | None = None  # None: before the first batch (setup is not the hot path)
        self.seen: list[tuple[str, str, str, int]] = []
        self.elsewhere: Counter = Counter()  # syncs in transformers / torch code, for the report

    def add_host(self, tree) -> None:
        if isinstance(tree, (dict, list)):
            for value in tree.values() if isinstance(tree, dict) else tree:
                self.add_host(value)
        elif isinstance(tree, torch.Tensor):
            self.host_ids.add(id(tree))
            self.keep.append(tree)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_sync(name, args, kwargs) and not (args and id(args[0]) in self.host_ids):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if where.startswith(OURS):
                self.seen.append((os.path.relpath(where, ROOT), frame.f_code.co_name, name, self.step))
            else:
                self.elsewhere[(where.rsplit("site-packages/", 1)[-1], name)] += 1
        return func(*args, **kwargs)


def copying_to_device(real):
    """to_device that copies every tensor, as a transfer to a GPU would (on CPU .to is a no-op)."""

    def copy(tree):
        return {k: v if k == "host" or v is None else v.map(torch.clone) if isinstance(v, TeacherRecord) else v.clone()
                for k, v in tree.items()}

    return lambda batch, device: real(copy(batch), device)


def count_syncs(monkeypatch, cfg) -> SyncCounter:
    """Run the real train stage under a SyncCounter; counter.step = optimizer steps done (None
    before the first batch: setup is not the hot path)."""
    counter = SyncCounter()
    real_batches, real_step = batches_module.train_batches, MetricsLogger.step

    def host_batches(*args, **kwargs):
        for epoch, seqs, micro in real_batches(*args, **kwargs):
            counter.add_host(micro)
            counter.step = 0 if counter.step is None else counter.step
            yield epoch, seqs, micro

    def logger_step(self, step, *args, **kwargs):
        real_step(self, step, *args, **kwargs)
        counter.step = step

    monkeypatch.setattr(train_student, "train_batches", host_batches)  # the name the stage calls
    monkeypatch.setattr(MetricsLogger, "step", logger_step)
    monkeypatch.setattr(train_student, "to_device", copying_to_device(train_student.to_device))
    with counter:
        train_student.run(cfg)
    return counter


def metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


HOT = ("train.steps=4", "train.log_every=4", "train.checkpoint_every=100", "train.grad_accum=2")


def test_the_counter_sees_the_syncs_it_looks_for():
    """The instrument itself: each kind of sync on a copied tensor is seen, host tensors are not."""
    counter = SyncCounter()
    host = torch.ones(4)
    counter.add_host(host)
    from pipeline import batches

    x, mask = torch.arange(4.0), torch.tensor([True, False, True, True])
    with counter:
        batches.valid_rows({"valid": mask})  # nonzero, called from repo code
        x[mask], float(x.sum()), x.tolist(), host.numpy(), x[1:]  # here: this file is not repo code
    assert [(f, fn, op) for f, fn, op, _ in counter.seen] == [("pipeline/batches.py", "valid_rows", "nonzero")]
    assert counter.elsewhere[(__file__, "__getitem__")] == 1 and counter.elsewhere[(__file__, "__float__")] == 1
    assert (__file__, "numpy") not in counter.elsewhere  # a host tensor


def test_no_host_sync_on_steps_that_are_not_logged(monkeypatch, train_config):
    """alpha = 0 with every router part: student forward, router losses, MC draws, aux loss, loop
    and logger, none waits for the device before the log line; that line reads once."""
    cfg = train_config(*HOT, "train.alpha=0", *ROUTER_PARTS, "train.num_workers=0")
    counter = count_syncs(monkeypatch, cfg)
    hot = [s for s in counter.seen if s[3] is not None and s[3] < 3]
    assert hot == [], hot
    logged = [s[:3] for s in counter.seen if s[3] == 3]
    assert logged == [("pipeline/metrics.py", "read", "tolist")], logged  # the one read of the interval
    (row,) = metrics(cfg)
    assert row["step"] == 4 and row["router"] > 0 and row["mc"] > 0 and row["load_cv"] >= 0


@pytest.mark.parametrize("fused, allowed", [("auto", set()), ("never", KNOWN_ELSEWHERE)])
def test_kd_steps_sync_only_in_the_chunked_loss(monkeypatch, train_config, fused, allowed):
    """With KD and workers on: none with the fused loss (the default), only the chunked loss's
    known one without it. Outside our code: the model body's one mask check per forward
    (transformers' masking_utils), and the optimizer's step counters (CPU tensors on a GPU too)."""
    cfg = train_config(*HOT, "train.router_weight=0.1", "train.num_workers=2", f"train.fused_loss={fused}",
                       name=f"fused_{fused.strip(chr(39))}")
    counter = count_syncs(monkeypatch, cfg)
    hot = {s[:3] for s in counter.seen if s[3] is not None and s[3] < 3}
    assert hot == allowed, f"{hot - allowed} are new; {allowed - hot} are gone (then drop them from KNOWN_ELSEWHERE)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_on_steps_that_are_not_logged(monkeypatch, train_config):
    """On a GPU the runtime says it: under torch.cuda.set_sync_debug_mode("warn") every
    synchronising call warns, at the Python line that made it; none may be ours before the log."""
    import warnings

    cfg = train_config(*HOT, "train.alpha=0", *ROUTER_PARTS)
    marks: dict[str, int] = {}
    real_batches, real_step = batches_module.train_batches, MetricsLogger.step

    def marked_batches(*args, **kwargs):
        marks.setdefault("start", len(caught))
        yield from real_batches(*args, **kwargs)

    def logger_step(self, step, *args, **kwargs):
        real_step(self, step, *args, **kwargs)
        marks[f"after {step}"] = len(caught)

    monkeypatch.setattr(train_student, "train_batches", marked_batches)
    monkeypatch.setattr(MetricsLogger, "step", logger_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_student.run(cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hot = [f"{w.filename}:{w.lineno}" for w in caught[marks["start"]:marks["after 3"]] if w.filename.startswith(OURS)]
    assert hot == [], hot


# --- logged numbers against a reference made by hand ------------------------------------------


class _OneProcess:
    num_processes, process_index = 1, 0


def reference_parts(cfg, steps: int) -> list[dict[str, float]]:
    """Per step: every part's sum over the micro-batches (Python floats, boolean-mask paths, no
    host_view) divided by the step's loss-masked token count counted here, after the same
    forward/backward/clip/AdamW updates the trainer makes, from a fresh setup."""
    accelerator = train_student.make_accelerator(cfg, cfg.run_dir / "reference")
    job = setup(cfg, accelerator)
    model, stream, weights = job.model, job.stream, LossWeights.of(cfg.train)
    model.train()
    out_rows = []
    for step, seqs in enumerate(stream.steps(0)[:steps]):
        micro = [collate(stream.load(mb)) for mb in stream.rank_micro_batches(seqs)]
        n = sum(int(mb["loss_mask"].sum()) for mb in micro)
        sums: dict[str, float] = {}
        for mb in micro:
            out = model(mb, step=step, stats=True)
            loss = sum(getattr(weights, k) * v for k, v in out.losses.items())
            (loss / n).backward()
            stats = {k: v * int(mb["loss_mask"].sum()) for k, v in out.stats.items()}  # token-weighted means
            for key, value in {**dict(out.losses.items()), **stats, "loss": loss}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        job.optimizer.step()
        job.scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
        out_rows.append({k: v / n for k, v in sums.items()})
    return out_rows


LOAD = ("load_cv", "router_entropy", "dead_experts")


def test_logged_means_equal_a_hand_made_reference(train_config):
    """log_every=2 over 4 steps with 2 micro-batches and 2 workers: each line is the mean of its
    two steps' loss parts; the load statistics are those of the logged step alone."""
    cfg = train_config("train.steps=4", "train.log_every=2", "train.grad_accum=2", "train.checkpoint_every=100",
                       "train.num_workers=2", *ROUTER_PARTS)
    train_student.run(cfg)
    rows = metrics(cfg)
    ref = reference_parts(cfg, 4)
    assert [r["step"] for r in rows] == [2, 4]
    for row, (a, b) in zip(rows, [ref[0:2], ref[2:4]]):
        losses = set(a) - set(LOAD)
        assert {"loss", "ce", "kd", "router", "erd", "mc", "coverage", "aux"} <= losses
        for key in losses:
            assert row[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-5, abs=2e-5), (row["step"], key)
        for key in LOAD:
            assert row[key] == pytest.approx(b[key], rel=1e-5, abs=2e-5), (row["step"], key)
    assert rows[0]["kd"] != pytest.approx(ref[1]["kd"], rel=1e-3)  # a mean, not the last step's value


@pytest.mark.slow
def test_two_processes_log_the_interval_means_of_one(train_config):
    """The interval's stacked all-reduce across 2 gloo ranks (2 micro-batches each) gives the one-
    process means. Per-token parts only: coverage, aux and the load statistics are statistics of
    a micro-batch, which differ between 1 × 4 and 2 × 2 × 1 sequences."""
    common = ("train.steps=4", "train.batch_size=4", "train.log_every=2", "train.checkpoint_every=100",
              "train.num_workers=1", "train.router_weight=0.1", "train.router_erd_weight=0.1",
              "train.router_mc_weight=0.1", "train.router_coverage_weight=0")
    one = train_config(*common, "train.grad_accum=1", name="one")
    train_student.run(one)
    two, overrides = train_config(*common, "train.grad_accum=2", name="two", with_overrides=True)
    torchrun("train", *overrides)
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [2, 4]
    for a, b in zip(m1, m2):
        for key in ("loss", "ce", "kd", "router", "erd", "mc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
