"""Stage (phase two): train a student against the cached teacher, resumably.

    python run_pipeline.py train --config configs/demo.yaml
    torchrun --nproc_per_node 8 run_pipeline.py train --config configs/demo.yaml

L = (1 − α)·CE + α·τ²·KD + w_p·prompt KL + β·router KL + λ_ERD·ERD + λ_MC·(MC + λ_cov·coverage)
  + λ_aux·aux (docs/losses.md, docs/router.md), each a sum over valid (loss-masked) tokens divided by the global count of
valid tokens of the optimizer step (all ranks, all micro-batches); the prompt KL is divided by the
global count of prompt tokens instead, and bild gets no τ² (both as BiLD). Without KD and teacher
router terms it reads the prepared data directly (SFT / CE-only baseline).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import checkpoint, state
from pipeline.batches import host_view, to_device, train_batches
from pipeline.config import ConfigError, choice, ranged, save_config
from pipeline.distributed import PARALLEL, prepare, training_accelerator
from pipeline.inputs_from import check_inputs_from
from pipeline.losses import KD_LOSSES
from pipeline.metrics import MetricsLogger
from pipeline.optim import drop_frozen_grads
from pipeline.router_losses import MC_TARGETS, TAU_RANGE
from pipeline.stage_inputs import stage_inputs
from pipeline.student import LossWeights, objective
from stages.train_setup import check_kd_targets, setup

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class StudentConfig:
    path: str = ""
    """Student model directory or hub id (MoE or dense), loaded with from_pretrained."""
    dtype: str = choice("float32", ("float32", "bfloat16"))
    """Weight dtype (mixed precision is train.precision)."""
    attn_implementation: str = "sdpa"
    """Attention kernel."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    init: str = choice("none", ("none", "svd"))
    """'svd': in `run`, start from the init stage's weight-space projection of the teacher (init.mode=full)."""


@dataclass
class TrainPhase:
    steps: int = ranged(0, min=1)
    """Optimizer steps in this phase."""
    param_groups: dict[str, float] = ranged({}, min=0.0)
    """Regex (searched in parameter names) → learning-rate multiplier; 0 freezes. First match wins."""
    default_lr_multiplier: float = ranged(1.0, min=0.0)
    """Multiplier of parameters no pattern matches."""


@dataclass
class TrainConfig:
    alpha: float = ranged(0.5, min=0.0, max=1.0)
    """Weight of the KD term; 1 − alpha weighs cross-entropy."""
    kd_loss: str = "forward_kl"
    """KD divergence (see docs/losses.md)."""
    temperature: float = ranged(1.0, above=0.0)
    """KD temperature tau; the KD term is scaled by tau² (bild: not, as in BiLD)."""
    missing_mass: str = choice("tail_bucket", ("tail_bucket", "renormalize"))
    """How the teacher mass outside the cached top-k is treated."""
    jsd_beta: float = ranged(0.5, above=0.0, below=1.0)
    """kd_loss=jsd: weight of the teacher in the mixture."""
    skew_alpha: float = ranged(0.1, above=0.0, below=1.0)
    """kd_loss=skew_forward_kl/skew_reverse_kl: weight of the first argument in the skewed mixture."""
    dkd_alpha: float = ranged(1.0, min=0.0)
    """kd_loss=dkd: weight of the target-class term (TCKD)."""
    dkd_beta: float = ranged(8.0, min=0.0)
    """kd_loss=dkd: weight of the non-target term (NCKD)."""
    nkd_gamma: float = ranged(1.5, min=0.0)
    """kd_loss=nkd: weight of the non-target term."""
    top_kl_k: int = ranged(0, min=0)
    """kd_loss=top_kl: the teacher's first k cached entries (0 = all cached)."""
    bild_top_k: int = ranged(8, min=2)
    """kd_loss=bild: k of both halves (clipped to the cached k)."""
    allow_uncached_temperature: bool = False
    """Accept the one-token tail approximation of a tau the cache lacks (tail_bucket; else refused)."""
    prompt_kl_weight: float = ranged(0.0, min=0.0)
    """Weight of forward KL at tau = 1 on the untrained (prompt) positions: BiLD's semantics with alpha = 1."""
    router_weight: float = ranged(0.0, min=0.0)
    """beta: weight of the router KL (MoE teacher and student, cache with router data)."""
    router_layer_map: list[int] = ranged([], min=0)
    """Teacher MoE layer (position among MoE layers) per student MoE layer; [] = uniform map."""
    router_expert_map: list[int] = ranged([], min=0)
    """Student expert per teacher expert (E_T entries); [] = contiguous blocks of E_T/E_S (docs/router.md)."""
    router_erd_weight: float = ranged(0.0, min=0.0)
    """lambda_ERD: entropy-aware router distillation KL(p_T ‖ softmax(g_S/τ_r)) − β_H·H."""
    router_entropy_weight: float = ranged(0.1, min=0.0)
    """beta_H: weight of the student router entropy bonus inside ERD."""
    router_temperature: float = ranged(1.0, min=0.5, max=1.5)
    """Initial router temperature τ_r (one per student MoE layer), kept in [0.5, 1.5]."""
    router_learn_temperature: bool = True
    """Train τ_r with the optimizer (false: fixed at router_temperature)."""
    router_mc_weight: float = ranged(0.0, min=0.0)
    """lambda_MC: Monte Carlo expert exploration −Σ_k w_k·log p_S(e_k) (+ coverage)."""
    router_mc_draws: int = ranged(3, min=1)
    """K: draws per token from the teacher's mapped router distribution."""
    router_mc_suppress: float = ranged(0.5, above=0.0, max=1.0)
    """Suppression: a drawn expert's probability is multiplied by this before the next draw."""
    router_mc_target: str = choice("suppressed", tuple(MC_TARGETS))
    """'suppressed' = each draw weighs 1/K (target: the teacher after suppression); 'bdistill' = w_k/Σw as B-Distill's code (sharper)."""
    router_coverage_weight: float = ranged(0.5, min=0.0)
    """lambda_cov: weight of the coverage KL(c_T ‖ c_S) inside the MC term."""
    router_aux_weight: float = ranged(0.0, min=0.0)
    """lambda_aux: the student family's own load-balancing loss (no teacher data needed)."""
    steps: int = ranged(100, min=1)
    """Optimizer steps (when phases is empty)."""
    phases: list[TrainPhase] = field(default_factory=list)
    """Multi-stage schedule: each phase its own length and parameter groups."""
    param_groups: dict[str, float] = ranged({}, min=0.0)
    """Single-phase parameter groups: regex → learning-rate multiplier."""
    batch_size: int = ranged(8, min=1)
    """Sequences per optimizer step, all ranks together (unless batch_tokens > 0)."""
    batch_tokens: int = ranged(0, min=0)
    """Tokens per optimizer step instead of a sequence count (0 = off)."""
    grad_accum: int = ranged(1, min=1)
    """Micro-batches per rank and optimizer step."""
    lr: float = ranged(3e-4, above=0.0)
    """Peak learning rate."""
    weight_decay: float = ranged(0.01, min=0.0)
    """AdamW weight decay (never on norms and biases)."""
    betas: list[float] = ranged([0.9, 0.95], min=0.0, below=1.0)
    """AdamW betas."""
    warmup_steps: int = ranged(10, min=0)
    """Linear warmup steps."""
    min_lr_ratio: float = ranged(0.1, min=0.0, max=1.0)
    """Cosine decay floor as a share of lr."""
    grad_clip: float = ranged(1.0, min=0.0)
    """Gradient norm clip (0 = off)."""
    precision: str = choice("auto", PRECISIONS)
    """'auto' = bf16 autocast on GPU, fp32 on CPU."""
    checkpoint_every: int = ranged(50, min=1)
    """Steps between checkpoints."""
    keep_checkpoints: int = ranged(2, min=1)
    """Complete checkpoints kept."""
    log_every: int = ranged(10, min=1)
    """Steps between progress lines."""
    num_workers: int = ranged(2, min=0)
    """DataLoader worker processes reading shards ahead of the step (0 = in the training process)."""
    shuffle_window: int = ranged(4096, min=0)
    """Sequences shuffled together."""
    loss_chunk_tokens: int = ranged(1024, min=1)
    """Tokens per chunk of the lm_head + loss (memory bound)."""
    fused_loss: str = choice("auto", ("auto", "always", "never", "triton"))
    """LM head + CE + KD fused, gradients in forward (docs/losses.md); auto: where covered, else chunked; always: refuse uncovered; triton: always, with the Triton kernel (CUDA; docs/kernels.md)."""
    parallel: str = choice("ddp", PARALLEL)
    """Several processes: 'ddp' replicates the student; 'fsdp' shards it (FSDP2: weights, gradients, optimizer state; docs/multinode.md)."""
    tracker: str = choice("none", ("none", "tensorboard"))
    """Experiment tracker through accelerate."""
    source: str = choice("auto", ("auto", "cache", "prepared"))
    """'auto': the cache unless alpha = 0 and router_weight = 0."""
    follow: bool = False
    """Start on the shards committed so far, take new ones as the cache stage commits them, until its manifest (docs/training.md, "Follow mode")."""
    follow_poll_s: float = ranged(5.0, above=0.0)
    """Follow mode: seconds between listings of the cache's journals (rank 0 lists, the others receive)."""
    follow_timeout_s: float = ranged(0.0, min=0.0)
    """Follow mode: stop with one line after this long without a new shard (0 = wait as long as it takes)."""

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas={self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.kd_loss not in KD_LOSSES:
            raise ConfigError(f"train.kd_loss={self.kd_loss!r} is unknown; allowed: {', '.join(KD_LOSSES)}")

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases) if self.phases else self.steps

    def all_phases(self) -> list[TrainPhase]:
        return self.phases or [TrainPhase(steps=self.steps, param_groups=dict(self.param_groups))]

    def uses_cache(self) -> bool:
        if self.source != "auto":
            return self.source == "cache"
        return (self.alpha > 0 or self.prompt_kl_weight > 0 or self.router_weight > 0 or self.router_erd_weight > 0
                or self.router_mc_weight > 0)


# --- the stage ------------------------------------------------------------------------------


def make_accelerator(cfg, out_dir: Path):
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("fp32" if cpu else "bf16")
    tracker = None if cfg.train.tracker == "none" else cfg.train.tracker
    acc = training_accelerator(cfg.train.parallel, cpu, "no" if precision == "fp32" else "bf16", tracker, str(out_dir))
    if tracker:
        acc.init_trackers("kdcache")
    return acc



def step_counts(accelerator, micro: list[dict]) -> torch.Tensor:
    """Global [loss-masked, prompt] token counts of the step, float64 [2] on the device.

    The counts are host data (``host_view``); the only communication is one stacked all-reduce,
    whose result stays on the device: nothing waits for it before the backward that uses it."""
    local = [float(sum(mb["host"][k] for mb in micro)) for k in ("loss_tokens", "prompt_tokens")]
    counts = torch.tensor(local, dtype=torch.float64).to(accelerator.device, non_blocking=True)
    return accelerator.reduce(counts, reduction="sum") if accelerator.num_processes > 1 else counts


def train_step(model, micro: list[dict], cfg: TrainConfig, accelerator, step: int = 0,
               log_stats: bool = True) -> dict:
    """Forward/backward every micro-batch of one optimizer step; returns the loss parts per token.

    The objective is pipeline.student.objective with LossWeights.of(cfg): each loss sum weighted
    and divided by the step's global token count. ``step`` seeds the Monte Carlo expert draws (with
    run.seed and the sample ids), so a resumed run draws the same; ``log_stats`` asks for the load
    statistics (the loop: on logged steps only), reported as token-weighted means.

    Nothing here waits for the device: each part is a float64 0-dim tensor on the device, this
    rank's share of the step's value (divided by the global token count; the sum over ranks is
    the value, which the MetricsLogger reduces once per log interval), and "tokens" is this
    rank's count of loss-masked tokens, a host int.
    """
    micro = [host_view(mb) for mb in micro]
    n_valid, n_prompt = step_counts(accelerator, micro).clamp(min=1.0).unbind()
    inv_valid, inv_prompt = (1 / n_valid).float(), (1 / n_prompt).float()
    weights = LossWeights.of(cfg)
    parts: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        parts[key] = parts[key] + value if key in parts else value

    for i, mb in enumerate(micro):
        sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            out = model(to_device(mb, accelerator.device), step=step, stats=log_stats)
            loss = objective(out.losses, weights, inv_valid, inv_prompt)
            accelerator.backward(loss * accelerator.num_processes)  # DDP averages gradients over ranks
        add("loss", loss.detach().double())
        for key, value in out.losses.items():
            add(key, value.detach().double() / (n_prompt if key == "prompt_kl" else n_valid))
        for key, value in out.stats.items():
            add(key, value.double() * (mb["host"]["loss_tokens"] / n_valid))
    return parts | {"tokens": sum(mb["host"]["loss_tokens"] for mb in micro)}


def run(cfg, force: bool = False) -> Path:
    out_dir = cfg.run_dir / "train"
    check_inputs_from(cfg)  # data/ and caches of another run (run.inputs_from): refused unless they are this config's
    inputs = stage_inputs("train", cfg)
    accelerator = make_accelerator(cfg, out_dir)
    check_kd_targets(cfg, accelerator.is_main_process)  # before any state: a refused run writes nothing
    committed = [p for p in (checkpoint.latest(out_dir / "checkpoints"), out_dir / "final") if p is not None]
    if not state.begin_on_all_ranks(cfg.run_dir, "train", inputs, [out_dir], force, accelerator.is_main_process,
                                    accelerator.wait_for_everyone, defer=True, committed=committed):
        return out_dir / "final"
    job = setup(cfg, accelerator)  # every check (student path, cache, batch shape) before the state records a run
    if not job.stream.steps(job.stream.epoch) and not job.stream.growing(job.stream.epoch):
        raise ConfigError("the training data is smaller than one optimizer step; lower train.batch_size")
    if accelerator.is_main_process:
        state.write_state(cfg.run_dir, "train", "running", inputs)  # sets old outputs aside if --force
        save_config(cfg, out_dir / "config.yaml")
    accelerator.wait_for_everyone()  # no rank looks for checkpoints before that
    model, optimizer = prepare(accelerator, job.model, job.optimizer, job.scheduler)
    checkpoint.attach(accelerator)
    step = resume(cfg, out_dir, accelerator, model, job)
    logger = MetricsLogger(out_dir, cfg.train.total_steps, accelerator.is_main_process, accelerator,
                           every=cfg.train.log_every)
    logger.resume_at(step)
    train_loop(cfg, accelerator, model, optimizer, job, step, logger, out_dir)
    return finish(cfg, accelerator, model, job, out_dir, inputs)


def resume(cfg, out_dir: Path, accelerator, model, job) -> int:
    """Continue from the newest checkpoint that passes its checks (a damaged one is skipped, named)."""
    def warn(line: str) -> None:
        if accelerator.is_main_process:
            print(line, file=sys.stderr, flush=True)

    loaded = checkpoint.read_latest(out_dir / "checkpoints", accelerator, accelerator.unwrap_model(model),
                                    cfg.train.parallel, warn)
    if loaded is None:
        return 0
    progress = checkpoint.apply(loaded, accelerator)
    job.stream.load_state_dict(progress["stream"])
    if progress.get("world_size", 1) != accelerator.num_processes:
        warn(f"warning: {loaded.path.name} was written by {progress.get('world_size', 1)} ranks, this run has "
             f"{accelerator.num_processes}: ranks without a saved RNG state keep their fresh one")
    if accelerator.is_main_process:
        print(f"resumed from {loaded.path} (step {progress['step']})", flush=True)
    return int(progress["step"])


def train_loop(cfg, accelerator, model, optimizer, job, step: int, logger, out_dir: Path) -> None:
    tcfg, total = cfg.train, cfg.train.total_steps
    if step >= total:
        return
    model.train()
    batches = train_batches(job.stream, tcfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    with contextlib.closing(batches):  # stops the workers when the last step is done
        for epoch, seqs, micro in batches:
            if epoch != job.stream.epoch:
                job.stream.next_epoch()
            parts = train_step(model, micro, tcfg, accelerator, step, log_stats=logger.due(step + 1))
            drop_frozen_grads(optimizer)
            if tcfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            job.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            job.stream.advance(seqs)
            step += 1
            logger.step(step, parts, parts.pop("tokens"), job.scheduler.get_last_lr()[0], accelerator.device)
            if step % tcfg.checkpoint_every == 0 or step == total:
                checkpoint.save(accelerator, out_dir / "checkpoints", step, job.stream.state_dict(),
                                tcfg.keep_checkpoints, tcfg.parallel)
            if step >= total:
                return
    raise ConfigError("the training data is smaller than one optimizer step; lower train.batch_size")


def finish(cfg, accelerator, model, job, out_dir: Path, inputs: str) -> Path:
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    full = accelerator.get_state_dict(model)  # every rank takes part: FSDP gathers the shards to rank 0
    if accelerator.is_main_process:
        wrapped = accelerator.unwrap_model(model)
        wrapped.model.save_pretrained(final, state_dict={k.removeprefix("model."): v for k, v in full.items()
                                                         if k.startswith("model.")})
        save_router_temperature(wrapped, full.get("router_temperature"), final)
        job.tokenizer.save_pretrained(final)
        state.write_state(cfg.run_dir, "train", "done", inputs, steps=cfg.train.total_steps)
    accelerator.end_training()
    return final


def save_router_temperature(wrapped, tau_L: torch.Tensor | None, final: Path) -> None:
    """save_pretrained keeps only the HF model: the learnt τ_r (from the full state dict) goes beside it
    (docs/router.md), projected into its range as the loss uses it."""
    if tau_L is None:
        return
    tau_L = tau_L.clamp(*TAU_RANGE)
    record = {"router_temperature": [round(t, 6) for t in tau_L.detach().tolist()],
              "student_moe_layers": wrapped.routers.layers, "teacher_moe_layers": list(wrapped.layer_map)}
    (final / "router_temperature.json").write_text(json.dumps(record, indent=1))
