"""Several students from one cache: a run that trains and evaluates on another run's prepared
data and caches, in place (``run.inputs_from``).

    python run_pipeline.py run --config configs/my.yaml run.name=student_b run.inputs_from=runs/student_a

The source is checked by identity, never copied or linked: its prepare stage (and its cache
stage, when this run has a teacher or trains on the cache) is done, with the fingerprint this
run's config gives that stage (pipeline/stage_inputs.py: the data section and source, the
tokenizer, the teacher and cache sections, the prepared data); the tokenizer has the content
the data was prepared with, and the teacher the config its cache was made from. Anything else
is one line naming what differs. Then train and eval read the source's data/, cache/ and
cache_eval/ (PipelineConfig.inputs_dir) and `run` skips prepare and cache.
"""

from __future__ import annotations

from pathlib import Path

from cache.schema import MANIFEST_NAME, read_manifest
from pipeline.config import ConfigError
from pipeline.data import tokenizer_fingerprint
from pipeline.models import load_tokenizer, teacher_identity
from pipeline.run_paths import cache_dir
from pipeline.splits import read_data_manifest
from pipeline.stage_inputs import stage_inputs
from pipeline.state import read_state


def source_stages(cfg) -> tuple[str, ...]:
    """The source's stages this run needs: the cache too when it has a teacher or trains on the cache."""
    return ("prepare", "cache") if cfg.teacher.path or cfg.train.uses_cache() else ("prepare",)


def check_inputs_from(cfg) -> None:
    """Refuse (one line) unless run.inputs_from names a run whose data and caches are this config's (no-op without)."""
    if not cfg.run.inputs_from:
        return
    source = Path(cfg.run.inputs_from)
    head = f"run.inputs_from={cfg.run.inputs_from}"
    if not (source / "state").is_dir():
        raise ConfigError(f"{head} is not a run directory (runs/<name> with a state/ folder); name the run that "
                          f"prepared and cached the data")
    stages = source_stages(cfg)
    for stage in stages:
        recorded = read_state(source, stage)
        if recorded is None or recorded["status"] != "done":
            status = "not started" if recorded is None else recorded["status"]
            raise ConfigError(f"{head}: its {stage} stage is {status}; finish it there first "
                              f"(the same config with run.name={source.name} and no run.inputs_from)")
        inputs = stage_inputs(stage, cfg, run_dir=source)
        if not inputs.matches(recorded["inputs"]):
            raise ConfigError(f"{head}: its {stage} stage ran with other inputs than this config gives it: "
                              f"{inputs.changes()}; so its data and caches are not this run's: match its "
                              f"settings, or unset run.inputs_from to prepare and cache this run itself")
    check_tokenizer(cfg, source, head)
    if "cache" in stages:
        check_teacher(cfg, source, head)


def check_tokenizer(cfg, source: Path, head: str) -> None:
    """The tokenizer at this config's path still has the content the source's data was prepared with."""
    prepared = read_data_manifest(source)["tokenizer"]
    if tokenizer_fingerprint(load_tokenizer(cfg.tokenizer_path())) != prepared:
        raise ConfigError(f"{head}: the tokenizer at {cfg.tokenizer_path()!r} is not the one {source}'s data was "
                          f"prepared with (its content changed); prepare and cache this run itself")


def check_teacher(cfg, source: Path, head: str) -> None:
    """The teacher at teacher.path still has the config (architecture, vocabulary) its caches were made from."""
    from transformers import AutoConfig  # lazy: transformers costs seconds at CLI start

    if not cfg.teacher.path:
        return  # a cache read without a teacher: its fingerprint (teacher.path) already matched
    try:
        config = AutoConfig.from_pretrained(cfg.teacher.path, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the teacher config {cfg.teacher.path!r}: {str(err).splitlines()[0]}") from None
    expected = teacher_identity(cfg.teacher.path, config)
    for split in cfg.cache.splits:
        directory = cache_dir(source, split)
        if not (directory / MANIFEST_NAME).exists():
            continue  # an empty split is not cached
        identity = read_manifest(directory).identity
        differ = [key for key, value in expected.items() if identity.get(key) != value]
        if differ:
            raise ConfigError(f"{head}: {directory} was cached from another teacher than teacher.path="
                              f"{cfg.teacher.path!r} ({', '.join(differ)} differ); cache this run itself")
