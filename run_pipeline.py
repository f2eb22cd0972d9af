"""kdcache command line: one subcommand per stage.

    python run_pipeline.py                                   # the embedded demo, on CPU
    python run_pipeline.py cache --config configs/x.yaml cache.k=32
    python run_pipeline.py inspect runs/x/cache --verify --plots runs/x/plots
    python run_pipeline.py status runs/x
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from pipeline.openmp import short_spin
from pipeline.quiet import quiet_progress_bars

short_spin()  # before anything imports torch
quiet_progress_bars()  # before anything imports transformers or datasets

STAGE_COMMANDS = ("run", "prepare", "init", "cache", "train", "eval")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=f"the '{name}' stage" if name != "run" else "every stage in order")
        p.add_argument("--config", action="append", default=[], help="YAML file(s); later ones win")
        p.add_argument("--force", action="store_true", help="redo the stage(s): existing outputs are renamed aside, never deleted")
        p.add_argument("overrides", nargs="*", help="section.key=value")
    p = sub.add_parser("inspect", help="statistics of a cache")
    p.add_argument("cache_dir")
    p.add_argument("--verify", action="store_true", help="re-check every shard's checksum")
    p.add_argument("--plots", default="", help="write PNG charts to this directory")
    p.add_argument("--max-tokens", type=int, default=2_000_000, help="tokens sampled for the statistics")
    p = sub.add_parser("status", help="the state of each stage of a run")
    p.add_argument("run_dir")
    sub.add_parser("demo", help="the embedded demo (the default)")
    return parser.parse_args(argv)


def stage_command(args) -> None:
    from pipeline.config import ConfigError, load_config
    from stages import cache_teacher, evaluate, init_student, prepare, train_student
    from stages.config import PipelineConfig

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    if args.command == "run" and cfg.student.init == "svd" and cfg.init.mode != "full":
        raise ConfigError("student.init=svd inside `run` needs init.mode=full (a LoRA adapter is not trained here)")
    if args.command == "run" and cfg.eval.split == "eval" and cfg.data.eval_fraction == 0 and not cfg.data.eval_source:
        raise ConfigError("data.eval_fraction=0 leaves no eval split for the eval stage of `run`; "
                          "set data.eval_fraction > 0 (e.g. 0.05) or eval.split=train")
    force = args.force
    if cfg.run.inputs_from:
        inputs_from(cfg, args.command)
    if args.command in ("prepare", "run") and not cfg.run.inputs_from:
        in_stage(cfg, "prepare", lambda: prepare.run(cfg, force=force))
    if args.command == "init" or (args.command == "run" and cfg.student.init == "svd"):
        initialised = in_stage(cfg, "init", lambda: init_student.run_stage(cfg, force=force))
        if args.command == "run":
            cfg.student.path = str(initialised)
    if args.command in ("cache", "run") and cfg.teacher.path and not cfg.run.inputs_from:
        in_stage(cfg, "cache", lambda: cache_teacher.run(cfg, force=force))
    if args.command in ("train", "run"):
        in_stage(cfg, "train", lambda: train_student.run(cfg, force=force))
    if args.command in ("eval", "run"):
        in_stage(cfg, "evaluate", lambda: evaluate.run(cfg, force=force))


def inputs_from(cfg, command: str) -> None:
    """A run on another run's data and caches (pipeline/inputs_from.py) makes none of its own: `prepare`
    and `cache` are refused, `run` checks the source once and skips them."""
    from pipeline.config import ConfigError
    from pipeline.inputs_from import check_inputs_from, source_stages

    if command in ("prepare", "cache"):
        raise ConfigError(f"run.inputs_from={cfg.run.inputs_from}: this run trains and evaluates on that run's "
                          f"prepared data and caches and makes none of its own; run `{command}` for "
                          f"{cfg.run.inputs_from} (run.name={Path(cfg.run.inputs_from).name}), or unset "
                          f"run.inputs_from")
    if command == "run":
        check_inputs_from(cfg)
        print(f"{' and '.join(source_stages(cfg))}: done in {cfg.run.inputs_from} (run.inputs_from); this run reads "
              f"its data/, cache/ and cache_eval/ in place", flush=True)


def in_stage(cfg, stage: str, body):
    """One stage under its lock (global rank 0 holds it; the other ranks wait on rank 0 inside the stage);
    a full disk is one line naming the run directory."""
    from pipeline.config import ConfigError
    from pipeline.state import stage_lock

    try:
        with stage_lock(cfg.run_dir, stage, int(os.environ.get("RANK", "0")) == 0):
            return body()
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ConfigError(f"no space left on device writing {err.filename or cfg.run_dir} in the '{stage}' stage; "
                          f"free some space and re-run the same command (finished work is kept)") from None


def main(argv: list[str] | None = None) -> int:
    from cache.location import StorageError
    from cache.schema import CacheError
    from pipeline.config import ConfigError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in STAGE_COMMANDS:
            stage_command(args)
        elif args.command == "inspect":
            from stages import inspect_cache

            inspect_cache.main(args.cache_dir, verify=args.verify, plots=args.plots, max_tokens=args.max_tokens)
        elif args.command == "status":
            from stages import status

            status.main(args.run_dir)
        else:
            from stages import demo

            demo.main()
    except (ConfigError, CacheError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on device writing {err.filename or 'a file'}; free some space and re-run "
              f"the same command (finished work is kept)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
