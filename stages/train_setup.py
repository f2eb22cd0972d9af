"""Setup of the train stage: data source and stream, student, losses, optimizer.

Kept apart from stages/train_student.py so the stage itself reads as the loop it is.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch

from cache.follow import Follower
from cache.schema import MANIFEST_NAME, read_manifest
from cache.stream import CacheSource, ShardStream, StreamPlan
from pipeline.batches import PreparedSource
from pipeline.config import ConfigError
from pipeline.data import tokenizer_fingerprint
from pipeline.losses import KDSpec, approximates_tail
from pipeline.models import load_causal_lm, student_tokenizer
from pipeline.optim import build_optimizer
from pipeline.router import RouterCapture, num_experts, router_family, uniform_layer_map
from pipeline.router_losses import TEACHER_PARTS, RouterLossSpec
from pipeline.run_paths import cache_location
from pipeline.student import DistillStudent, LossWeights


@dataclass
class TrainJob:
    model: DistillStudent
    optimizer: object
    scheduler: object
    stream: ShardStream
    tokenizer: object


def load_student(cfg):
    if not cfg.student.path:
        raise ConfigError("student.path is empty; set it to a model directory or hub id")
    model = load_causal_lm(cfg.student.path, getattr(torch, cfg.student.dtype), torch.device("cpu"),
                           cfg.student.attn_implementation, False)
    if cfg.student.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def check_cache_fits(identity: dict, tokenizer, model) -> None:
    if identity["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError("the cache was made with another tokenizer than the student's; "
                          "distill only between models that share a tokenizer")
    if model.get_output_embeddings().weight.shape[0] < identity["vocab_size"]:
        raise ConfigError(f"the student's vocabulary ({model.get_output_embeddings().weight.shape[0]}) is smaller "
                          f"than the cache's tokenizer ({identity['vocab_size']})")


def check_kd_targets(cfg, is_main: bool = True) -> None:
    """Refuse a KD loss the cache cannot give at train.temperature, before anything is written:
    draws made at another temperature, a loss without its targets, or (unless
    train.allow_uncached_temperature) the one-token tail approximation of an uncached tau."""
    t = cfg.train
    if not t.uses_cache() or (t.alpha == 0 and t.prompt_kl_weight == 0):
        return
    identity = train_cache_identity(cfg)
    if t.prompt_kl_weight > 0 and "topk" not in identity["targets"]:
        raise ConfigError(f"train.prompt_kl_weight > 0 needs the teacher's top-k but the cache holds "
                          f"cache.targets={identity['targets']}; re-cache with cache.targets=topk+sampled")
    if t.alpha == 0:
        return
    if t.kd_loss == "sampled":
        check_draw_temperature(t, identity.get("draws"))
    elif "topk" not in identity["targets"]:
        raise ConfigError(f"train.kd_loss={t.kd_loss} needs the teacher's top-k but the cache holds "
                          f"cache.targets={identity['targets']}; use train.kd_loss=sampled or re-cache with "
                          f"cache.targets=topk+sampled")
    else:
        check_cached_temperature(t, identity, is_main)


def check_draw_temperature(t, draws: dict | None) -> None:
    """The sampled loss needs draws. At a train temperature other than the draws' own, a format-v2
    cache's stored draw log-probs give self-normalised importance weights (losses.draw_weights),
    so any tau is the right target; one line says which weighting is used."""
    if not draws:
        raise ConfigError("train.kd_loss=sampled needs a cache with draws; re-cache with cache.targets=topk+sampled")
    tau_draw = float(draws["temperature"])
    if not math.isclose(t.temperature, tau_draw, rel_tol=1e-6):
        print(f"train.kd_loss=sampled at train.temperature={t.temperature}: the draws (made at "
              f"cache.draw_temperature={tau_draw}) are importance-weighted to the teacher at {t.temperature} "
              f"(docs/losses.md)", file=sys.stderr, flush=True)


def kd_spec(t) -> KDSpec:
    """The KD loss of the train section: every KDSpec hyper-parameter is a train.<name> key of the same name."""
    names = [f.name for f in dataclasses.fields(KDSpec) if f.name != "name"]
    return KDSpec(name=t.kd_loss, **{n: getattr(t, n) for n in names})


def check_cached_temperature(t, identity: dict, is_main: bool) -> None:
    """The one-token tail of an uncached tau (docs/losses.md) is refused unless opted in; then one warning."""
    temps = [float(x) for x in identity["temperatures"]]
    spec = KDSpec(name=t.kd_loss, temperature=t.temperature, missing_mass=t.missing_mass)  # what the tail needs
    if not approximates_tail(spec, tuple(temps), identity["k"], identity["vocab_size"]):
        return
    if t.kd_loss == "normkd":
        what = "train.kd_loss=normkd tempers each token by T_norm·σ, never a cached temperature"
        fix = "use train.missing_mass=renormalize"
    else:
        what = f"train.temperature={t.temperature} is not among the cache's temperatures {temps}"
        fix = f"re-cache with cache.temperatures={sorted(set(temps) | {t.temperature})}"
    approximation = "with train.missing_mass=tail_bucket the teacher's tail then counts as one token (docs/losses.md)"
    if not t.allow_uncached_temperature:
        raise ConfigError(f"{what}: {approximation}; {fix}, or accept the approximation with "
                          f"train.allow_uncached_temperature=true")
    if is_main:
        print(f"warning: {what}: {approximation}, allowed by train.allow_uncached_temperature=true",
              file=sys.stderr, flush=True)


ROUTER_WEIGHTS = {"router": "router_weight", "erd": "router_erd_weight", "mc": "router_mc_weight",
                  "aux": "router_aux_weight"}  # part → the TrainConfig weight that turns it on


def router_parts_on(t) -> frozenset:
    parts = {part for part, key in ROUTER_WEIGHTS.items() if getattr(t, key) > 0}
    if "mc" in parts and t.router_coverage_weight > 0:
        parts.add("coverage")
    return frozenset(parts)


def router_setup(cfg, model, identity: dict):
    """(capture, layer map, loss spec) for the router parts and expert-load statistics of a MoE
    student, or (None, None, None) for a dense student with every router weight at 0."""
    parts = router_parts_on(cfg.train)
    keys = [f"train.{ROUTER_WEIGHTS[p]}" for p in ROUTER_WEIGHTS if p in parts]
    fix = " ".join(f"{k}=0" for k in keys)
    if parts & set(TEACHER_PARTS) and not (identity.get("moe_layers") and identity.get("router_topk", 0)):
        raise ConfigError(f"{', '.join(keys)} > 0 but the cache holds no router data; set {fix}")
    if not num_experts(model.config):
        if parts:
            raise ConfigError(f"{', '.join(keys)} > 0 but the student is dense; set {fix}")
        return None, None, None
    try:
        family = router_family(model.config)
    except ConfigError:
        if parts:  # the teacher-side fix (cache.router_topk=none) does not apply to a student
            raise ConfigError(f"router capture does not support the student's model_type '{model.config.model_type}'; "
                              f"set {fix} to train it without router terms") from None
        return None, None, None  # an unsupported MoE family still trains, without load statistics
    capture = RouterCapture(model, family)
    layer_map = []
    if parts & set(TEACHER_PARTS):
        layer_map = teacher_layer_map(cfg.train, capture, identity)
        check_expert_map(list(cfg.train.router_expert_map), identity.get("num_experts", 0), num_experts(model.config))
    return capture, layer_map, router_spec(cfg, model, parts)


def teacher_layer_map(t, capture: RouterCapture, identity: dict) -> list[int]:
    n_teacher = len(identity["moe_layers"])
    layer_map = list(t.router_layer_map) or uniform_layer_map(len(capture.layers), n_teacher)
    if len(layer_map) != len(capture.layers) or any(not 0 <= x < n_teacher for x in layer_map):
        raise ConfigError(f"train.router_layer_map needs {len(capture.layers)} entries in 0..{n_teacher - 1}")
    return layer_map


def check_expert_map(expert_map: list[int], e_teacher: int, e_student: int) -> None:
    if expert_map:
        if len(expert_map) != e_teacher or any(not 0 <= e < e_student for e in expert_map):
            raise ConfigError(f"train.router_expert_map needs {e_teacher} entries (student expert per teacher "
                              f"expert) in 0..{e_student - 1}")
    elif e_teacher % e_student:
        raise ConfigError(f"the teacher has {e_teacher} experts per layer and the student {e_student}; set "
                          f"train.router_expert_map (student expert per teacher expert) or distill between "
                          f"models whose expert counts divide")


def router_spec(cfg, model, parts: frozenset) -> RouterLossSpec:
    t = cfg.train
    return RouterLossSpec(parts=parts, expert_map=tuple(t.router_expert_map), entropy_weight=t.router_entropy_weight,
                          mc_draws=t.router_mc_draws, mc_suppress=t.router_mc_suppress, mc_target=t.router_mc_target,
                          seed=cfg.run.seed,
                          top_k=int(getattr(model.config, "num_experts_per_tok", 1)),
                          model_type=model.config.model_type, temperature_init=t.router_temperature,
                          learn_temperature=t.router_learn_temperature)


def stream_plan(cfg, accelerator) -> StreamPlan:
    t, world = cfg.train, accelerator.num_processes
    if not t.batch_tokens and t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes × grad_accum "
                          f"({world} × {t.grad_accum})")
    return StreamPlan(seed=cfg.run.seed, batch_size=t.batch_size, batch_tokens=t.batch_tokens,
                      micro_batches=t.grad_accum, shuffle_window=t.shuffle_window,
                      rank=accelerator.process_index, world_size=world, follow=t.follow)


def train_cache_identity(cfg) -> dict:
    """The identity of the cache train reads: its manifest's, or in follow mode (before the manifest) its
    journals', waiting for the cache stage's first commit."""
    location = cache_location(cfg, "train", cfg.inputs_dir)
    if not cfg.train.follow or location.exists(MANIFEST_NAME):
        return read_manifest(location).identity
    follower = Follower(location, cfg.train.follow_poll_s, cfg.train.follow_timeout_s)
    follower.refresh()
    if not follower.identity:
        print(f"follow: waiting for the first committed shard of {location} (listing every "
              f"{cfg.train.follow_poll_s:g} s)", flush=True)
    while not follower.identity:
        follower.wait("first committed shard")
    return follower.identity


def train_source(cfg, accelerator) -> CacheSource:
    """The cache; in follow mode, a growing one listed by rank 0 and broadcast (no list storm of N ranks)."""
    location = cache_location(cfg, "train", cfg.inputs_dir)
    if not cfg.train.follow:
        return CacheSource(location)
    share = lambda value: value  # noqa: E731
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        share = lambda value: broadcast_object_list([value], from_process=0)[0]  # noqa: E731
    follower = Follower(location, cfg.train.follow_poll_s, cfg.train.follow_timeout_s,
                        is_main=accelerator.is_main_process, share=share)
    return CacheSource(location, follower)


def setup(cfg, accelerator) -> TrainJob:
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = load_student(cfg), student_tokenizer(cfg.student.path, cfg.tokenizer_path())
    if cfg.train.uses_cache():
        source = train_source(cfg, accelerator)
        identity = source.reader.manifest.identity
        check_cache_fits(identity, tokenizer, model)
        spec = kd_spec(cfg.train)
        vocab_limit = identity["vocab_size"]
    else:
        source, spec, vocab_limit, identity = PreparedSource(cfg.inputs_dir), None, len(tokenizer), {}
    capture, layer_map, losses = router_setup(cfg, model, identity)
    wrapped = DistillStudent(model, spec if cfg.train.alpha > 0 else None, vocab_limit, cfg.train.loss_chunk_tokens,
                             capture, layer_map, identity.get("num_experts", 0), losses,
                             prompt_kl=cfg.train.prompt_kl_weight > 0, fused=cfg.train.fused_loss,
                             weights=LossWeights.of(cfg.train))
    if capture is not None:
        capture.__enter__()  # hooks live as long as the job
    optimizer, scheduler = build_optimizer(wrapped, cfg.train)
    return TrainJob(wrapped, optimizer, scheduler, ShardStream(source, stream_plan(cfg, accelerator)), tokenizer)
