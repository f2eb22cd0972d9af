"""Setup of the train stage: data source and stream, student, losses, optimizer.

Kept apart from stages/train_student.py so the stage itself reads as the loop it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache.stream import CacheSource, ShardStream, StreamPlan
from pipeline.config import ConfigError
from pipeline.data import tokenizer_fingerprint
from pipeline.losses import KDSpec
from pipeline.router import RouterCapture, num_experts, router_family, uniform_layer_map
from pipeline.student import DistillStudent
from stages.cache_teacher import cache_dir


@dataclass
class TrainJob:
    model: DistillStudent
    optimizer: object
    scheduler: object
    stream: ShardStream
    tokenizer: object


def load_student(cfg):
    import torch

    from pipeline.teachers.hf import load_causal_lm

    if not cfg.student.path:
        raise ConfigError("student.path is empty; set it to a model directory or hub id")
    model = load_causal_lm(cfg.student.path, getattr(torch, cfg.student.dtype), torch.device("cpu"),
                           cfg.student.attn_implementation, False)
    if cfg.student.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def student_tokenizer(cfg):
    """The student's own tokenizer if its directory has one, else the data's."""
    from stages.prepare import load_tokenizer

    try:
        return load_tokenizer(cfg.student.path)
    except ConfigError:
        return load_tokenizer(cfg.tokenizer_path())


def check_cache_fits(identity: dict, tokenizer, model) -> None:
    if identity["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError("the cache was made with another tokenizer than the student's; "
                          "distill only between models that share a tokenizer")
    if model.get_output_embeddings().weight.shape[0] < identity["vocab_size"]:
        raise ConfigError(f"the student's vocabulary ({model.get_output_embeddings().weight.shape[0]}) is smaller "
                          f"than the cache's tokenizer ({identity['vocab_size']})")


def router_setup(cfg, model, identity: dict):
    """(capture, layer map) for router distillation, or (None, None) when it is off."""
    if cfg.train.router_weight <= 0:
        return None, None
    if not identity.get("moe_layers") or not identity.get("router_topk", 0):
        raise ConfigError("train.router_weight > 0 but the cache holds no router data; set train.router_weight=0")
    family = router_family(model.config) if num_experts(model.config) else None
    if family is None:
        raise ConfigError("train.router_weight > 0 but the student is dense; set train.router_weight=0")
    capture = RouterCapture(model, family)
    n_teacher = len(identity["moe_layers"])
    layer_map = list(cfg.train.router_layer_map) or uniform_layer_map(len(capture.layers), n_teacher)
    if len(layer_map) != len(capture.layers) or any(not 0 <= t < n_teacher for t in layer_map):
        raise ConfigError(f"train.router_layer_map needs {len(capture.layers)} entries in 0..{n_teacher - 1}")
    return capture, layer_map


def stream_plan(cfg, accelerator) -> StreamPlan:
    t, world = cfg.train, accelerator.num_processes
    if not t.batch_tokens and t.batch_size % (world * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes × grad_accum "
                          f"({world} × {t.grad_accum})")
    return StreamPlan(seed=cfg.run.seed, batch_size=t.batch_size, batch_tokens=t.batch_tokens,
                      micro_batches=t.grad_accum, shuffle_window=t.shuffle_window,
                      rank=accelerator.process_index, world_size=world)


def setup(cfg, accelerator) -> TrainJob:
    import torch

    from pipeline.batches import PreparedSource
    from stages.train_student import build_optimizer

    torch.manual_seed(cfg.run.seed)
    model, tokenizer = load_student(cfg), student_tokenizer(cfg)
    if cfg.train.uses_cache():
        source = CacheSource(cache_dir(cfg.run_dir, "train"))
        identity = source.reader.manifest.identity
        check_cache_fits(identity, tokenizer, model)
        spec = KDSpec(name=cfg.train.kd_loss, temperature=cfg.train.temperature, missing_mass=cfg.train.missing_mass)
        temps, vocab_limit = tuple(identity["temperatures"]), identity["vocab_size"]
        capture, layer_map = router_setup(cfg, model, identity)
        experts = identity.get("num_experts", 0)
    else:
        source, spec, temps, vocab_limit, capture, layer_map, experts = PreparedSource(cfg.run_dir), None, (1.0,), len(tokenizer), None, None, 0
    wrapped = DistillStudent(model, spec if cfg.train.alpha > 0 else None, temps, vocab_limit,
                             cfg.train.loss_chunk_tokens, capture, layer_map, experts)
    if capture is not None:
        capture.__enter__()  # hooks live as long as the job
    optimizer, scheduler = build_optimizer(wrapped, cfg.train)
    return TrainJob(wrapped, optimizer, scheduler, ShardStream(source, stream_plan(cfg, accelerator)), tokenizer)
