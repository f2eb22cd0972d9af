"""The whole pipeline's config: one section per component, each defined beside its owner.

    python run_pipeline.py run --config configs/demo.yaml cache.k=32
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, choice, ranged
from pipeline.data import DataConfig
from pipeline.teachers.base import TeacherConfig
from stages.cache_teacher import CacheConfig
from stages.evaluate import EvalConfig
from stages.init_student import InitConfig
from stages.train_student import StudentConfig, TrainConfig


@dataclass
class RunConfig:
    name: str = "demo"
    """Run name: outputs go to <root>/<name>."""
    root: str = "runs"
    """Directory that holds the runs."""
    seed: int = ranged(0, min=0)
    """Seed of everything random in the run."""
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    """'auto' = CUDA when available."""
    inputs_from: str = ""
    """A run directory (runs/<name>) whose data/, cache/, cache_eval/ train and eval read in place ('' = this run's)."""

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name={self.name!r} must be a non-empty name without '/'")
        if self.inputs_from and Path(self.inputs_from).resolve() == (Path(self.root) / self.name).resolve():
            raise ConfigError(f"run.inputs_from={self.inputs_from!r} is this run itself; name another run's directory "
                              f"or leave it empty")


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    init: InitConfig = field(default_factory=InitConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    @property
    def inputs_dir(self) -> Path:
        """Where train and eval read data/, cache/ and cache_eval/: run.inputs_from, else the run itself."""
        return Path(self.run.inputs_from) if self.run.inputs_from else self.run_dir

    def init_config(self) -> InitConfig:
        """The init section with its paths filled from the teacher and student sections."""
        return dataclasses.replace(self.init, teacher_path=self.init.teacher_path or self.teacher.path,
                                   student_path=self.init.student_path or self.student.path,
                                   output_dir=self.init.output_dir or str(self.run_dir / "init"))

    def tokenizer_path(self) -> str:
        return self.data.tokenizer or self.teacher.path or self.student.path
