"""``teacher.backend`` → the class that runs the teacher.

    python run_pipeline.py cache --config configs/demo.yaml teacher.backend=vllm
"""

from __future__ import annotations

import torch

from pipeline.config import ConfigError
from pipeline.teachers.base import BACKENDS, Teacher, TeacherConfig
from pipeline.teachers.extract import ExtractSpec
from pipeline.teachers.hf import HFTeacher


def vllm_teacher(cfg: TeacherConfig, spec: ExtractSpec, device: torch.device) -> Teacher:
    """VLLMTeacher, imported when chosen: vllm takes seconds to import, and CPU installs may lack it."""
    from pipeline.teachers.vllm import VLLMTeacher

    return VLLMTeacher(cfg, spec, device)


TEACHERS = {"hf": HFTeacher, "vllm": vllm_teacher}
assert tuple(TEACHERS) == BACKENDS, "teacher.backend's choices are the names of TEACHERS"


def build_teacher(cfg: TeacherConfig, spec: ExtractSpec, device: torch.device) -> Teacher:
    if not cfg.path:
        raise ConfigError("teacher.path is empty; set it to a model directory or hub id")
    return TEACHERS[cfg.backend](cfg, spec, device)
