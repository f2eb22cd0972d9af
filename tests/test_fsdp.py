"""FSDP2 students (issue 15): 2 CPU processes (torchrun, gloo) with train.parallel=fsdp follow
DDP's loss trajectory for the same global batch; SIGKILL mid-run and resume gives exactly the
uninterrupted run, for DDP and FSDP (accelerate's save_state: sharded optimizer state, each
rank its RNG); a DDP checkpoint resumes on another rank count; an FSDP one refuses a layout it
was not written with, in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import wait_for_checkpoint
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# 12 sequences per step: 2 ranks × 2 micro-batches of 3 (no_sync accumulation, the global token count);
# 12 divides by 1, 2 and 3 ranks × 2 micro-batches, so one plan serves every rank count tested
TRAIN = ("train.steps=9", "train.batch_size=12", "train.grad_accum=2", "train.router_weight=0.1", "train.log_every=1",
         "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.warmup_steps=2", "train.num_workers=0")
PARTS = ("loss", "ce", "kd", "router")


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def torchrun(overrides: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "run_pipeline.py", "train", *overrides]


def run(overrides: list[str]) -> str:
    done = subprocess.run(torchrun(overrides), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def kill_after_first_checkpoint(overrides: list[str], ckpt_root: Path) -> None:
    """SIGKILL the launcher and both ranks at once (a lost node) when a checkpoint is complete
    (torchrun starts each rank in its own session, so they are found as its children)."""
    import psutil

    proc = subprocess.Popen(torchrun(overrides), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(proc, ckpt_root)
    finally:
        victims = psutil.Process(proc.pid).children(recursive=True)
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        proc.kill()
        proc.wait()
        psutil.wait_procs(victims, timeout=30)


def per_step(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "steps logged twice or missing"
    return {r["step"]: r for r in rows}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cached_run):
    """make(name, *overrides) → (run dir, overrides): a copy of the session's cached run, for torchrun."""
    root = tmp_path_factory.mktemp("fsdp_runs")

    def make(name: str, *overrides: str) -> tuple[Path, list[str]]:
        run_dir, base = cached_run()
        if not (root / name).exists():
            shutil.copytree(run_dir, root / name)
        return root / name, [*base, f"run.root={root}", f"run.name={name}", *TRAIN, *overrides]

    return make


@pytest.fixture(scope="module")
def straight(runs):
    """The uninterrupted 2-process runs, DDP and FSDP."""
    out = {}
    for parallel in ("ddp", "fsdp"):
        run_dir, overrides = runs(f"straight_{parallel}", f"train.parallel={parallel}")
        run(overrides)
        out[parallel] = run_dir
    return out


@pytest.mark.slow
def test_fsdp_follows_ddp_for_the_same_global_batch(straight):
    ddp, fsdp = per_step(straight["ddp"]), per_step(straight["fsdp"])
    assert sorted(fsdp) == list(range(1, 10))
    # both sum the float32 gradients of the ranks (all-reduce vs reduce-scatter: with 2 ranks the same
    # a + b, so equal here: measured 0 difference in every loss and weight on CPU), but FSDP clips by a
    # norm summed from shards in another order, and with more ranks the reductions' order differs too:
    # rounding-level differences, which AdamW's normalised step can lift to ~1e-6 of a weight;
    # the tolerances of tests/test_train_multiprocess.py (DDP vs one process)
    for step in ddp:
        for key in PARTS:
            assert fsdp[step][key] == pytest.approx(ddp[step][key], rel=1e-5, abs=1e-6), (step, key)
    want, got = final_weights(straight["ddp"]), final_weights(straight["fsdp"])
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(straight["fsdp"] / "train" / "final")  # a plain HF directory
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.fixture(scope="module")
def killed(runs):
    """killed(parallel, name) → (run dir, overrides, newest complete checkpoint): a copy of one
    2-process run SIGKILLed after its first complete checkpoint (killed once per mode)."""
    made: dict[str, tuple[Path, str]] = {}

    def make(parallel: str, name: str, *overrides: str) -> tuple[Path, list[str], str]:
        if parallel not in made:
            run_dir, kill_overrides = runs(f"killed_{parallel}", f"train.parallel={parallel}")
            ckpts = run_dir / "train" / "checkpoints"
            kill_after_first_checkpoint(kill_overrides, ckpts)
            assert not (run_dir / "train" / "final").exists(), "killed too late: the run had finished"
            done = sorted(p.name for p in ckpts.glob("step-*") if (p / "COMPLETE").exists())
            assert done and done[-1] != "step-000009"
            made[parallel] = run_dir, done[-1]
        source, newest = made[parallel]
        run_dir, out = runs(name, *overrides)
        shutil.rmtree(run_dir)
        shutil.copytree(source, run_dir)
        return run_dir, out, newest

    return make


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_and_resumed_two_process_run_equals_the_uninterrupted_one(killed, straight, parallel):
    run_dir, overrides, newest = killed(parallel, f"resumed_{parallel}", f"train.parallel={parallel}")
    ckpts = run_dir / "train" / "checkpoints"
    names = {str(p.relative_to(ckpts / newest)) for p in (ckpts / newest).rglob("*")}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= names  # each rank its own RNG state
    if parallel == "fsdp":  # and its own shard of the weights and of the optimizer state
        assert {"optimizer_0/__0_0.distcp", "optimizer_0/__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= names

    out = run(overrides)
    assert f"resumed from {ckpts / newest}" in out, out[-2000:]
    want, got = final_weights(straight[parallel]), final_weights(run_dir)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    want_m, got_m = per_step(straight[parallel]), per_step(run_dir)
    assert sorted(got_m) == list(range(1, 10))
    for step in want_m:
        for key in PARTS:
            assert want_m[step][key] == got_m[step][key], (step, key)


@pytest.mark.slow
def test_a_two_rank_ddp_checkpoint_resumes_on_one_process(killed, straight, capsys):
    """The stream is a position in the global order: one process reads the same global batches (as
    2 micro-batches of 6), so it ends where the 2-rank run ends, to DDP-vs-one-process rounding."""
    import run_pipeline

    run_dir, overrides, newest = killed("ddp", "one_process", "train.parallel=ddp")
    capsys.readouterr()
    assert run_pipeline.main(["train", *overrides]) == 0
    captured = capsys.readouterr()
    assert f"resumed from {run_dir / 'train' / 'checkpoints' / newest}" in captured.out
    assert "written by 2 ranks, this run has 1" in captured.err
    want_m, got_m = per_step(straight["ddp"]), per_step(run_dir)
    assert sorted(got_m) == list(range(1, 10))
    for step in want_m:  # tolerances of tests/test_train_multiprocess.py (2 ranks vs one process)
        for key in PARTS:
            assert got_m[step][key] == pytest.approx(want_m[step][key], rel=1e-5, abs=1e-6), (step, key)
    want, got = final_weights(straight["ddp"]), final_weights(run_dir)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_an_fsdp_checkpoint_on_one_process_or_under_ddp_is_one_line(killed, capsys):
    from fault_helpers import one_line_error

    run_dir, overrides, _ = killed("fsdp", "fsdp_elsewhere", "train.parallel=fsdp")
    err = one_line_error(capsys, ["train", *overrides])
    assert "train.parallel=fsdp shards the student over processes but this run has one" in err
    err = one_line_error(capsys, ["train", *overrides, "train.parallel=ddp"])
    assert "train.parallel" in err and "fsdp" in err and "ddp" in err, err
    assert not (run_dir / "train" / "final").exists()


@pytest.mark.slow
def test_a_two_rank_fsdp_checkpoint_resumes_on_three_ranks(runs, straight):
    """DCP reshards weights and optimizer state from 2 shards into 3 as it loads: the last 3 steps on
    3 ranks end where the 2-rank run ends, to rounding (the reductions' order differs)."""
    from pipeline.state import read_state, write_state

    run_dir, overrides = runs("three_ranks", "train.parallel=fsdp")
    shutil.rmtree(run_dir)
    shutil.copytree(straight["fsdp"], run_dir)
    shutil.rmtree(run_dir / "train" / "final")  # as if killed after the step-6 checkpoint
    shutil.rmtree(run_dir / "train" / "checkpoints" / "step-000009")
    write_state(run_dir, "train", "running", read_state(run_dir, "train")["inputs"])
    rows = (run_dir / "train" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "train" / "metrics.jsonl").write_text("".join(rows[:6]))

    done = subprocess.run(torchrun(overrides, nproc=3), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "step-000006" in done.stdout, done.stdout[-2000:]
    assert "written by 2 ranks, this run has 3" in done.stderr
    want_m, got_m = per_step(straight["fsdp"]), per_step(run_dir)
    assert sorted(got_m) == list(range(1, 10))
    for step in range(7, 10):
        for key in PARTS:
            assert got_m[step][key] == pytest.approx(want_m[step][key], rel=1e-5, abs=1e-6), (step, key)
    want, got = final_weights(straight["fsdp"]), final_weights(run_dir)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("env_key, parallel", [("ACCELERATE_USE_FSDP", "ddp"), ("ACCELERATE_USE_DEEPSPEED", "fsdp")])
def test_an_accelerate_launch_config_asking_for_another_mode_is_one_line(monkeypatch, env_key, parallel):
    """`accelerate launch --config_file` sets these; train.parallel decides, a conflict is refused."""
    from pipeline.config import ConfigError
    from pipeline.distributed import training_accelerator

    monkeypatch.setenv(env_key, "true")
    with pytest.raises(ConfigError, match=f"{env_key}=true.*train.parallel={parallel}") as err:
        training_accelerator(parallel, True, "no", None, "unused")
    assert "\n" not in str(err.value)


def test_train_parallel_is_a_checked_choice():
    from pipeline.config import ConfigError, load_config
    from stages.config import PipelineConfig

    with pytest.raises(ConfigError, match="train.parallel.*ddp, fsdp"):
        load_config(PipelineConfig, [], ["train.parallel=deepspeed"])


def _rng_rank(rank: int, root: str, port: int, results) -> None:
    """One of 2 gloo ranks: save a checkpoint, scramble every RNG, resume, draw again."""
    import random

    import numpy as np

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pipeline import checkpoint
    from pipeline.distributed import prepare, training_accelerator

    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = training_accelerator("ddp", True, "no", None, root)
    model, optimizer = prepare(accelerator, model, optimizer, scheduler)
    checkpoint.attach(accelerator)
    random.seed(100 + rank), np.random.seed(100 + rank), torch.manual_seed(100 + rank)  # the ranks differ
    checkpoint.save(accelerator, Path(root), 1, {}, keep=2, parallel="ddp")
    after_save = draw()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = checkpoint.read_latest(Path(root), accelerator, accelerator.unwrap_model(model), "ddp")
    checkpoint.apply(loaded, accelerator)
    results.put((rank, after_save, draw()))
    accelerator.end_training()


@pytest.mark.slow
def test_each_rank_resumes_its_own_rng_state(tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: accelerate's state is per process
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rng_rank, args=(r, str(tmp_path), port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = {rank: (want, got) for rank, want, got in (queue.get(timeout=240) for _ in procs)}
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    for rank in range(2):
        want, got = results[rank]
        assert want == got, f"rank {rank} resumed another rank's RNG state"
    assert results[0][0] != results[1][0]


def test_a_student_with_tied_embeddings_checkpoints_and_resumes(tmp_path):
    """safetensors keeps one name of tied tensors (lm_head = embed_tokens, as in small Qwen3s): the key
    check accepts the missing alias and the load restores both through the tie."""
    from transformers import AutoModelForCausalLM

    from pipeline import checkpoint
    from pipeline.demo import tiny_config
    from pipeline.distributed import prepare, training_accelerator

    def trainer(seed: int):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3", 64, tie_word_embeddings=True))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        accelerator = training_accelerator("ddp", True, "no", None, str(tmp_path))
        model, optimizer = prepare(accelerator, model, optimizer, scheduler)
        checkpoint.attach(accelerator)
        return accelerator, model

    accelerator, model = trainer(0)
    checkpoint.save(accelerator, tmp_path, 1, {}, keep=1, parallel="ddp")
    accelerator, fresh = trainer(1)
    checkpoint.apply(checkpoint.read_latest(tmp_path, accelerator, fresh, "ddp"), accelerator)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
