"""A run directory and the state of each stage in it.

``runs/<name>/state/<stage>.json`` records status (running | done), the stage's input
fingerprint (pipeline/stage_inputs.py) and its progress. Re-running skips a done stage with
unchanged inputs, resumes a running one, and refuses (unless ``--force``) when inputs changed
under it, naming what changed (``Inputs.changes``); a stage that stopped before committing any
output (``committed``: a manifest, a journalled shard, a complete checkpoint) starts afresh.

``runs/<name>/state/<stage>.lock`` keeps two processes out of one stage of one run: the
process that runs the stage (rank 0 under a launcher) holds a POSIX record lock on it
(``lockf``) and writes its pid and host into it, and removes it when the stage ends. The
kernel drops the lock the moment the process dies, and, unlike ``flock``, its forked children
(DataLoader workers, which outlive a killed parent by seconds) never hold it; so a lock file
left by a killed run is taken over at once (with one line saying so), and a live holder is
a one-line refusal. A POSIX lock is also dropped when its process closes *any* descriptor of
the file, so the holder never opens it again (``lock_holder`` answers from ``_HELD``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from cache.schema import write_json_atomic
from pipeline.config import ConfigError

STAGES = ("prepare", "init", "cache", "train", "evaluate")
_HELD: dict[str, dict] = {}  # lock files this process holds → their owner record


def state_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "state" / f"{stage}.json"


def read_state(run_dir: Path, stage: str) -> dict | None:
    path = state_path(run_dir, stage)
    return json.loads(path.read_text()) if path.exists() else None


def write_state(run_dir: Path, stage: str, status: str, inputs: str, **progress) -> None:
    """Record the stage's status; the first record after a deferred ``--force`` sets the old outputs aside."""
    path = state_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = read_state(run_dir, stage)
    if old is not None and old.get("aside_for") == inputs:
        set_aside([Path(p) for p in old["aside"]])
    _record(run_dir, stage, {"stage": stage, "status": status, "inputs": inputs,
                             "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **progress})


def _record(run_dir: Path, stage: str, state: dict) -> None:
    write_json_atomic(state_path(run_dir, stage), json.dumps(state, indent=1, sort_keys=True))


def set_aside(outputs: list[Path]) -> None:
    """Rename outputs to <name>.old-<time>: never deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in outputs:
        if path.exists():
            target, n = path.with_name(f"{path.name}.old-{stamp}"), 1
            while target.exists():  # set aside twice within a second
                target, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
            path.rename(target)


class Inputs(str):
    """A stage's input fingerprint (the str its state records) that also knows the fingerprints an
    older kdcache recorded for the same inputs (``aliases``: recognised as unchanged) and how to
    name what changed (``changes()``: one clause for the refusal)."""

    def __new__(cls, fingerprint: str, aliases: tuple[str, ...] = (), changes=lambda: ""):
        inputs = super().__new__(cls, fingerprint)
        inputs.aliases, inputs.changes = tuple(a for a in aliases if a != fingerprint), changes
        return inputs

    def matches(self, recorded: str) -> bool:
        return recorded == self or recorded in self.aliases


def _same_inputs(run_dir: Path, stage: str, state: dict, inputs: str) -> bool:
    """Recorded with these inputs; one recorded under an alias (an older fingerprint rule) is
    re-recorded under the current fingerprint, so the next look needs no alias."""
    if state["inputs"] == inputs:
        return True
    if not (isinstance(inputs, Inputs) and inputs.matches(state["inputs"])):
        return False
    _record(run_dir, stage, {**state, "inputs": str(inputs)})
    return True


def refusal(run_dir: Path, stage: str, state: dict, inputs: str) -> ConfigError:
    what = inputs.changes() if isinstance(inputs, Inputs) else ""
    return ConfigError(
        f"stage '{stage}' in {run_dir} was {state['status']} with other inputs{': ' + what if what else ''}; "
        f"re-run with --force to set its outputs aside and start again, revert those settings, or pick "
        f"another run.name")


def begin(run_dir: Path, stage: str, inputs: str, outputs: list[Path], force: bool, defer: bool = False,
          committed: list[Path] | None = None) -> bool:
    """True if the stage must run; False if it is done with these inputs.

    With changed inputs: refuse, unless the stage stopped before committing any output
    (``committed``: the paths whose existence means finished work, such as a manifest, a
    journalled shard, a complete checkpoint; default: ``outputs``): then what it left (a
    journal, a half-written folder) is set aside like ``force`` does and it starts afresh. With
    ``force``: set the old outputs aside (renamed, never deleted) and start afresh, whatever
    the inputs (e.g. to rebuild a damaged cache). With ``defer`` the setting aside waits for
    the stage's first ``write_state`` (after its checks): a forced command that fails a check
    (a typo in a path) leaves the old outputs and state where they were.
    """
    state = read_state(run_dir, stage)
    if state is None:
        return True
    if not force and _same_inputs(run_dir, stage, state, inputs):
        return state["status"] != "done"
    if not force and outputs and state["status"] != "done":
        if not any(path.exists() for path in outputs):
            state_path(run_dir, stage).unlink()  # stopped before writing anything: nothing to protect
            return True
        if not any(path.exists() for path in (outputs if committed is None else committed)):
            print(f"{stage}: the interrupted run with other inputs committed no output; what it left in "
                  f"{', '.join(str(p) for p in outputs if p.exists())} is set aside and the stage starts afresh",
                  flush=True)
            force = True
    if not force:
        raise refusal(run_dir, stage, state, inputs)
    if defer:
        pending = {k: v for k, v in state.items() if k not in ("aside_for", "aside")}
        pending.update(aside_for=str(inputs), aside=[str(p) for p in outputs])
        _record(run_dir, stage, pending)
        return True
    set_aside(outputs)
    state_path(run_dir, stage).unlink()
    return True


def begin_on_all_ranks(run_dir: Path, stage: str, inputs: str, outputs: list[Path], force: bool,
                       is_main: bool, barrier, defer: bool = False, committed: list[Path] | None = None) -> bool:
    """Rank 0 decides (and sets old outputs aside on --force, or marks them to be) before the other ranks look.

    With ``defer`` the caller must barrier after rank 0's first ``write_state``, before any
    rank touches the outputs."""
    must_run = begin(run_dir, stage, inputs, outputs, force, defer, committed) if is_main else False
    barrier()
    if is_main:
        return must_run
    state = read_state(run_dir, stage)
    if state is not None and state.get("aside_for") == inputs:
        return True  # rank 0 forced a fresh start with these inputs
    return begin(run_dir, stage, inputs, [], False)


def lock_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "state" / f"{stage}.lock"


def _owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?"}


def _open_locked(path: Path, stage: str, run_dir: Path) -> int:
    """An fd holding the lock on the file now at ``path`` (a released lock file is unlinked, so
    check that the inode locked is still the one the path names; else try again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            owner = _owner(fd)
            os.close(fd)
            raise ConfigError(
                f"stage '{stage}' of {run_dir} is running in another process (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, lock {path}); wait for it to finish or stop it") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder released (and unlinked) it between our open and our lock


@contextlib.contextmanager
def stage_lock(run_dir: Path, stage: str, is_main: bool = True):
    """Hold the stage's lock while the body runs (only the main rank takes it: one lock per stage).

    A clean release (the body returned or raised) removes the lock file, and the folders it
    made, so a refused command leaves nothing behind; a killed holder leaves its pid in it.
    """
    if not is_main:
        yield
        return
    path = lock_path(run_dir, stage)
    if str(path.resolve()) in _HELD:  # a POSIX lock never refuses its own process: check here
        raise ConfigError(f"stage '{stage}' of {run_dir} is already running in this process (lock {path})")
    made = [d for d in (path.parent.parent, path.parent) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, stage, run_dir)
    try:
        previous = _owner(fd)
        if previous:
            print(f"{stage}: taking over the lock {path} of pid {previous.get('pid', '?')} on "
                  f"{previous.get('host', '?')}, which stopped without releasing it", flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        _HELD[str(path.resolve())] = me
        yield
    finally:
        path.unlink()  # still holding the lock: a waiter that opened this inode sees it unlinked and retries
        _HELD.pop(str(path.resolve()), None)
        os.close(fd)
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty: the stage wrote something there
                folder.rmdir()


def lock_holder(run_dir: Path, stage: str) -> dict | None:
    """The live process holding a stage's lock ({pid, host, since}), or None when nobody holds it."""
    path = lock_path(run_dir, stage)
    if path.exists() and str(path.resolve()) in _HELD:
        return _HELD[str(path.resolve())]  # opening (and closing) the file here would drop our own lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return _owner(fd) or {"pid": "?", "host": "?"}
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
