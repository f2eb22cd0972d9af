"""Stage: initialise a student from its teacher in weight space (no data, no forward pass).

    python run_pipeline.py init --config configs/init.yaml teacher.path=<teacher> student.path=<student>
    torchrun --nproc_per_node 4 run_pipeline.py init --config configs/init.yaml teacher.path=... student.path=...

Load the teacher's tensors → map student layers to teacher positions → project every
student tensor (dense: blend + slice or SVD projection; MoE: pool, cluster, assign, align,
average) → save a full checkpoint or a PEFT LoRA adapter on the student. Under torchrun the
work is split round-robin over ranks by tensor group; each rank writes its share as a
safetensors shard, and after a barrier rank 0 merges and saves them while the others wait,
so any world size gives the same bits. See docs/init.md.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cache.schema import atomic_file
from pipeline import state
from pipeline.config import ConfigError, choice, fingerprint, ranged, save_config
from pipeline.distributed import Dist
from pipeline.expert_init import MOE_NAMES, init_moe_layer, moe_names
from pipeline.layer_map import LayerSource, layer_map
from pipeline.lora_extract import save_adapter
from pipeline.models import check_model_dir
from pipeline.router import num_experts
from pipeline.stage_inputs import stage_inputs
from pipeline.weight_init import BLENDS, PROJECTIONS, blend, layer_name, project_tensor, student_layer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("full", "lora")
TIED_FALLBACK = {"lm_head.weight": "model.embed_tokens.weight"}  # a teacher with tied embeddings stores one
PER_LAYER_FIELDS = ("layer_types",)  # config lists sized by num_hidden_layers, recomputed when it changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class InitConfig:
    teacher_path: str = ""
    """Teacher model directory (from_pretrained)."""
    student_path: str = ""
    """Model or config directory defining the student's shape; its weights (if any) are the LoRA base and the Hungarian match targets."""
    student_overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields set on the student config (on the teacher's when student_path is empty), e.g. num_hidden_layers."""
    output_dir: str = ""
    """Where the student checkpoint or adapter, init_config.yaml and init_map.json go ('' = runs/<name>/init)."""
    mode: str = choice("full", MODES)
    """'full' = save_pretrained checkpoint; 'lora' = PEFT adapter on the student turning it into the init."""
    layer_blend: str = choice("linear", BLENDS)
    """How the two neighbouring teacher layers of a student layer are blended."""
    projection: str = choice("slice", PROJECTIONS)
    """'slice' = the teacher's sub-matrix on the kept coordinates; 'svd' = the same rows/columns of its rank-r truncated SVD."""
    lora_rank: int = 16
    """Default LoRA rank (mode=lora)."""
    lora_rank_map: dict[str, int] = field(default_factory=dict)
    """Regex → rank, first re.search match on the module/parameter name wins; 0 excludes it."""
    lora_full_copies: bool = True
    """mode=lora: write norms and embeddings as full copies (modules_to_save); False keeps the student's."""
    seed: int = ranged(0, min=0)
    """KMeans random_state and randomized-SVD seed base."""
    dtype: str = choice("float32", tuple(DTYPES))
    """dtype of the saved student checkpoint (the maths runs in float32; LoRA factors stay float32)."""
    shard_wait_s: float = ranged(3600.0, above=0.0)
    """How long a rank waits at a barrier for the others (their shards, rank 0's save); the process group's timeout."""

    def validate(self) -> None:
        for fld in fields(self):
            allowed = fld.metadata.get("choices")
            if allowed is not None and getattr(self, fld.name) not in allowed:
                raise ConfigError(f"init.{fld.name}={getattr(self, fld.name)!r} is not allowed; "
                                  f"allowed: {', '.join(allowed)}")
        if self.lora_rank < 1:
            raise ConfigError(f"init.lora_rank={self.lora_rank} must be an integer >= 1")
        _check_rank_map(self.lora_rank_map)

    def check_paths(self) -> None:
        """The checks that need the paths (filled from teacher.path / student.path in a pipeline run)."""
        if not self.teacher_path or not self.output_dir:
            raise ConfigError("init.teacher_path and init.output_dir must be set (a teacher model dir, an output dir)")
        if self.mode == "lora" and not _has_weights(self.student_path):
            raise ConfigError(f"init.mode=lora needs init.student_path with weights; got {self.student_path!r}")
        if self.mode == "lora" and self.student_overrides:
            raise ConfigError("init.student_overrides must be empty with init.mode=lora (the adapter needs the student as saved)")
        for path in filter(None, (self.teacher_path, self.student_path)):
            check_model_dir(path)  # one line for a missing path or a directory without config.json


def _check_rank_map(rank_map: dict[str, int]) -> None:
    for pattern, rank in rank_map.items():
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"init.lora_rank_map key {pattern!r} is not a regex: {err}") from None
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"init.lora_rank_map[{pattern!r}]={rank!r} must be an integer >= 0")


def _has_weights(path: str) -> bool:
    """True for a model directory with weights, False for a config-only directory or ''."""
    return bool(path) and any(any(Path(path).glob(pattern)) for pattern in ("*.safetensors", "*.bin"))


@dataclass
class InitInputs:
    """Everything a rank needs to compute student tensors."""

    teacher: dict[str, torch.Tensor]
    teacher_type: str
    shapes: dict[str, tuple[int, ...]]
    student: dict[str, torch.Tensor] | None
    layers: list[LayerSource]
    head_dims: tuple[int, int]


def load_configs(cfg: InitConfig):
    """(teacher config, student config); the student's is the teacher's when no student_path is given."""
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(cfg.teacher_path)
    student = override(AutoConfig.from_pretrained(cfg.student_path or cfg.teacher_path), cfg.student_overrides)
    check_compatible(teacher, student)
    return teacher, student


def override(config, overrides: dict[str, Any]):
    """A copy of ``config`` with ``overrides`` applied; per-layer lists are rebuilt when the depth changes."""
    for key in overrides:
        if not hasattr(config, key):
            raise ConfigError(f"init.student_overrides.{key} is not a field of the {config.model_type} config")
    aliases = getattr(type(config), "attribute_map", {})  # e.g. num_experts → num_local_experts
    values = {**config.to_dict(), **{aliases.get(k, k): v for k, v in overrides.items()}}
    if "num_hidden_layers" in overrides:
        for derived in PER_LAYER_FIELDS:
            if derived not in overrides:
                values.pop(derived, None)
    try:
        return type(config)(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"init.student_overrides give an invalid {config.model_type} config: {err}") from None


def check_compatible(teacher, student) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"student vocab_size {student.vocab_size} != teacher's {teacher.vocab_size}; "
                          "init needs the teacher's tokenizer")
    e_t, e_s = num_experts(teacher), num_experts(student)
    if bool(e_t) != bool(e_s):
        raise ConfigError(f"teacher has {e_t} experts and student {e_s}; init needs both dense or both MoE")
    if e_s and (student.model_type not in MOE_NAMES or teacher.model_type not in MOE_NAMES):
        raise ConfigError(f"MoE init supports model_type {', '.join(MOE_NAMES)}; "
                          f"got teacher {teacher.model_type}, student {student.model_type}")
    if e_s > e_t:
        raise ConfigError(f"student has {e_s} experts, more than the teacher's {e_t}; init only merges experts")


def _head_dim(config) -> int:
    # a transformers config: not every family sets head_dim
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def student_shapes(student_config) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape, from a model built on the meta device (tied parameters once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def load_state(path: str) -> dict[str, torch.Tensor]:
    """A model's parameters as transformers holds them in memory (fused 3-D experts), in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}


def load_inputs(cfg: InitConfig) -> InitInputs:
    teacher_cfg, student_cfg = load_configs(cfg)
    student = load_state(cfg.student_path) if _has_weights(cfg.student_path) and not cfg.student_overrides else None
    layers = layer_map(student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)
    return InitInputs(load_state(cfg.teacher_path), teacher_cfg.model_type, student_shapes(student_cfg), student,
                      layers, (_head_dim(teacher_cfg), _head_dim(student_cfg)))


def work_groups(shapes: dict[str, tuple[int, ...]], model_type: str) -> list[tuple[str, ...]]:
    """Units of work in a fixed order: a MoE layer's (router, gate_up, down) together, every other tensor alone."""
    grouped, groups = set(), []
    layers = sorted({student_layer(n) for n in shapes} - {None})
    for layer in layers if model_type in MOE_NAMES else []:
        names = moe_names(model_type, layer)
        if all(n in shapes for n in names):
            groups.append(names)
            grouped.update(names)
    groups += [(n,) for n in shapes if n not in grouped]
    return sorted(groups)


def teacher_tensor(name: str, inputs: InitInputs, method: str) -> torch.Tensor:
    """The teacher tensor behind a student tensor: the blend of its layer's two neighbours."""
    layer = student_layer(name)
    if layer is None:
        found = name if name in inputs.teacher else TIED_FALLBACK.get(name)
        if found not in inputs.teacher:
            raise ConfigError(f"student tensor {name} has no counterpart in the teacher")
        return inputs.teacher[found].float()
    pairs = [(layer_name(name, t), w) for t, w in inputs.layers[layer].weights()]
    pairs = [(n, w) for n, w in pairs if n in inputs.teacher]
    if not pairs:
        raise ConfigError(f"student tensor {name} has no counterpart in teacher layers {inputs.layers[layer]}")
    if len(pairs) == 1:
        return inputs.teacher[pairs[0][0]].float()
    (a, _), (b, w) = pairs
    return blend(inputs.teacher[a], inputs.teacher[b], w, method)


def compute_group(group: tuple[str, ...], inputs: InitInputs, cfg: InitConfig) -> dict[str, torch.Tensor]:
    if len(group) == 3:  # only MoE layers are grouped (see work_groups)
        source = inputs.layers[student_layer(group[0])]
        return init_moe_layer(inputs.teacher, inputs.teacher_type, source, group, inputs.shapes, inputs.student,
                              cfg.seed, cfg.projection)
    name = group[0]
    w_T = teacher_tensor(name, inputs, cfg.layer_blend)
    return {name: project_tensor(name, w_T, inputs.shapes[name], inputs.head_dims, cfg.projection)}


def shard_dir(cfg: InitConfig) -> Path:
    """Per-config folder, so a shard left by an earlier run with other settings is never merged."""
    return Path(cfg.output_dir) / "_shards" / fingerprint(cfg)


def compute_shard(cfg: InitConfig, rank: int, world_size: int) -> Path:
    """This rank's share (groups rank, rank + world, ...) written as one safetensors shard."""
    inputs = load_inputs(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for group in work_groups(inputs.shapes, inputs.teacher_type)[rank::world_size]:
        tensors.update(compute_group(group, inputs, cfg))
    path = shard_dir(cfg) / f"rank{rank:04d}-of-{world_size:04d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # rank 0 never reads a half-written shard
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return path


def merge_shards(cfg: InitConfig, world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's shard merged (each tensor comes from exactly one rank); called after the barrier
    that follows compute_shard, so every shard is complete."""
    merged: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        path = shard_dir(cfg) / f"rank{rank:04d}-of-{world_size:04d}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"init: rank {rank} wrote no shard ({path}); is {shard_dir(cfg)} on a "
                                    "filesystem every rank shares?")
        part = load_file(str(path))
        assert not merged.keys() & part.keys(), "two ranks computed the same tensor"
        merged.update(part)
    return merged


def save_full(cfg: InitConfig, synthetic: dict[str, torch.Tensor], out: Path) -> None:
    """The student as a checkpoint (plus the teacher's tokenizer when it has one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, student_cfg = load_configs(cfg)
    model = AutoModelForCausalLM.from_config(student_cfg, dtype=torch.float32)
    params = dict(model.named_parameters())
    assert params.keys() == synthetic.keys(), "every student parameter must be initialised exactly once"
    with torch.no_grad():
        for name, tensor in synthetic.items():
            params[name].copy_(tensor)
    model.to(DTYPES[cfg.dtype]).save_pretrained(out)
    if any((Path(cfg.teacher_path) / f).exists() for f in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(cfg.teacher_path).save_pretrained(out)


def save_lora(cfg: InitConfig, synthetic: dict[str, torch.Tensor], out: Path) -> None:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(cfg.student_path, dtype=torch.float32)
    save_adapter(student, synthetic, cfg.lora_rank_map, cfg.lora_rank, cfg.lora_full_copies, out)


def write_map(cfg: InitConfig, out: Path) -> None:
    """init_map.json: which teacher layers (and weights) each student layer came from."""
    teacher_cfg, student_cfg = load_configs(cfg)
    layers = layer_map(student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)
    rows = [{"student": s, "teacher": [[t, w] for t, w in src.weights()]} for s, src in enumerate(layers)]
    (out / "init_map.json").write_text(json.dumps({"layers": rows}, indent=1))


def finish(cfg: InitConfig, synthetic: dict[str, torch.Tensor]) -> Path:
    """Rank 0: save the merged student (checkpoint or adapter), the map and the resolved config."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (save_full if cfg.mode == "full" else save_lora)(cfg, synthetic, out)
    write_map(cfg, out)
    save_config(cfg, out / "init_config.yaml")
    shutil.rmtree(shard_dir(cfg), ignore_errors=True)
    print(f"init: {cfg.mode} student from {cfg.teacher_path} → {out} ({len(synthetic)} tensors)", flush=True)
    return out


def run(cfg: InitConfig, dist: Dist | None = None) -> Path:
    """Load teacher and student → map → project (this rank's share) → merge on rank 0 → save.

    Under torchrun every rank computes its share of the work groups and writes it as a shard;
    after a barrier rank 0 merges and saves, and the other ranks wait at a second barrier, so
    every rank returns once the student is complete. One process: the same with no barriers.
    """
    cfg.validate()
    cfg.check_paths()
    dist = dist or Dist.from_env(timeout_s=cfg.shard_wait_s)
    compute_shard(cfg, dist.rank, dist.world_size)
    dist.barrier()  # every rank's shard is on disk
    if dist.is_main:
        finish(cfg, merge_shards(cfg, dist.world_size))
    dist.barrier()  # rank 0 has saved the student
    return Path(cfg.output_dir)


def run_stage(pipeline_cfg, force: bool = False) -> Path:
    """The init stage inside a pipeline run: paths from the teacher/student sections, state recorded
    by rank 0 (after the checks, so a corrected re-run is never refused).

        python run_pipeline.py init --config configs/my.yaml init.mode=lora
    """
    cfg = pipeline_cfg.init_config()
    cfg.validate()
    cfg.check_paths()
    dist = Dist.from_env(timeout_s=cfg.shard_wait_s)
    inputs = stage_inputs("init", pipeline_cfg)  # a refusal names the init keys changed since
    out = Path(cfg.output_dir)
    if state.begin_on_all_ranks(pipeline_cfg.run_dir, "init", inputs, [out], force, dist.is_main, dist.barrier):
        if dist.is_main:
            state.write_state(pipeline_cfg.run_dir, "init", "running", inputs)
        run(cfg, dist)
        if dist.is_main:
            state.write_state(pipeline_cfg.run_dir, "init", "done", inputs, mode=cfg.mode)
    return out
