"""The CPU extraction kernel (topk_lse.cpp): top-k and log-partitions in one pass per row.

The C++ file is compiled once per machine with the system compiler (``$CXX``, default
``c++``) into ``$KDCACHE_BUILD_DIR`` (default ``~/.cache/kdcache``), keyed by a hash of the
source and flags, and loaded with ctypes. It needs no torch headers, so it builds in about
a second (``torch.utils.cpp_extension`` compiles against torch's headers: about a minute on
two cores, on every fresh machine). Calls run on row ranges in a thread pool: ctypes drops
the GIL for the call, so the ranges run in parallel.

The library's sha256 is recorded beside it when it is built (``topk_lse-<key>.so.sha256``) and
checked before it is loaded: a library whose bytes changed since, or that has no record, is
never loaded but rebuilt, with one warning line.

``cache.extract_kernel``: ``auto`` uses it on CPU when it builds and falls back to torch
(with one warning naming why) when it does not; ``native`` insists; ``torch`` never uses it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from cache.schema import atomic_file, write_json_atomic
from pipeline.config import ConfigError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("topk_lse.cpp")
KERNELS = ("auto", "native", "torch", "triton")
MIN_ROWS_PER_THREAD = 16


class KernelUnavailable(RuntimeError):
    pass


def build_dir() -> Path:
    if os.environ.get("KDCACHE_BUILD_DIR"):
        return Path(os.environ["KDCACHE_BUILD_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcache"


def compile_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        flags += ["-mavx2", "-mfma"]  # the capability torch itself dispatches to (AVX2 or AVX512)
    return flags


def build() -> Path:
    """Path of the shared library, compiled first if this source + flags were never built here."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    flags = compile_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    lib = build_dir() / f"topk_lse-{key}.so"
    if lib.exists():
        why = changed_since_built(lib)
        if why is None:
            return lib
        log.warning("not loading %s: %s; rebuilding it", lib, why)
    lib.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(lib) as tmp:  # ranks building at once: last rename wins
        proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise KernelUnavailable(f"{compiler} could not build {SOURCE.name}: {first}")
        # the hash of what this process built, written before the library is in place
        write_json_atomic(hash_record(lib), file_sha256(tmp) + "\n")
    return lib


def hash_record(lib: Path) -> Path:
    """The side file holding the sha256 of the library as built (keyed, like the library, by source + flags)."""
    return lib.with_name(lib.name + ".sha256")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_since_built(lib: Path) -> str | None:
    """None when the library's bytes are the ones recorded at build time, else why not."""
    record = hash_record(lib)
    if not record.exists():
        return f"no build record {record.name} beside it"
    if file_sha256(lib) != record.read_text().strip():
        return f"its sha256 differs from the one recorded when it was built ({record.name})"
    return None


@lru_cache(maxsize=1)
def _function():
    fn = ctypes.CDLL(str(build())).kd_topk_lse
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr]
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="kdcache-extract")


def available() -> str | None:
    """None when the kernel loads here, else why not (one line)."""
    try:
        _function()
    except (KernelUnavailable, OSError) as err:
        return str(err)
    return None


def resolve_kernel(setting: str, device: torch.device) -> str:
    """'native', 'torch' or 'triton' for this device; 'native' on a GPU or without a compiler is an
    error, and so is 'triton' where it cannot run. 'auto' never picks triton: no GPU measurement
    of it exists yet (docs/kernels.md)."""
    if setting not in KERNELS:
        raise ConfigError(f"cache.extract_kernel={setting!r} is not allowed; allowed: {', '.join(KERNELS)}")
    if setting == "triton":
        from pipeline.kernels import unavailable

        why = unavailable(device)
        if why:
            raise ConfigError(f"cache.extract_kernel=triton: {why}; use cache.extract_kernel=auto")
        return "triton"
    if setting == "torch" or (setting == "auto" and device.type != "cpu"):
        return "torch"
    if device.type != "cpu":
        raise ConfigError(f"cache.extract_kernel=native runs on CPU only; the teacher is on {device.type} (use auto)")
    why = available()
    if why is None:
        return "native"
    if setting == "native":
        raise ConfigError(f"cache.extract_kernel=native: {why}; install a C++ compiler or use extract_kernel=torch")
    log.warning("CPU extraction kernel unavailable (%s); using the torch path", why)
    return "torch"


def topk_lse(z_CV: torch.Tensor, k: int, temperatures: tuple[float, ...]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs at t=1 [C, K] fp32, their ids [C, K] int32, log-partitions [C, P] fp32).

    z_CV: fp32 CPU logits whose rows are contiguous (a row slice or column prefix of a
    contiguous tensor is fine). temperatures[0] must be 1.0. k = 0 gives log-partitions only.
    A row holding a NaN gets NaN log-partitions (the caller checks them).
    """
    if z_CV.dtype != torch.float32 or z_CV.device.type != "cpu" or z_CV.stride(-1) != 1:
        raise ValueError(f"topk_lse needs fp32 CPU logits with contiguous rows, got {z_CV.dtype} on {z_CV.device}")
    if temperatures[0] != 1.0:
        raise ValueError("topk_lse: temperatures[0] must be 1.0")
    rows, vocab = z_CV.shape
    if not 0 <= k <= vocab:
        raise ValueError(f"k={k} must be in 0..{vocab}")
    lse_CP = torch.empty(rows, len(temperatures))
    lp_CK, ids_CK = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int32)
    inv_t = torch.tensor([1.0 / t for t in temperatures], dtype=torch.float32)
    fn, ld, p = _function(), z_CV.stride(0), len(temperatures)

    def run(a: int, b: int) -> int:
        return fn(z_CV.data_ptr() + 4 * a * ld, b - a, vocab, ld, inv_t.data_ptr(), p, k,
                  lse_CP.data_ptr() + 4 * a * p, lp_CK.data_ptr() + 4 * a * k, ids_CK.data_ptr() + 4 * a * k)

    parts = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    bounds = [rows * i // parts for i in range(parts + 1)]
    if parts == 1:
        run(0, rows)
    else:
        list(_pool().map(run, bounds[:-1], bounds[1:]))
    return lp_CK, ids_CK, lse_CP
