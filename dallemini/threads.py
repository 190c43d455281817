"""How many CPU threads to compute with: what the process may use (affinity, cgroup CPU quota), or
`--threads` / $DALLEMINI_THREADS, applied to PyTorch's intra-op pool and the native kernels."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .errors import InputError

ENV = "DALLEMINI_THREADS"
# cgroup v2 exposes the CPU quota here ("max 100000" = none, "150000 100000" = 1.5 CPUs).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> float | None:
    """The container's CPU quota in CPUs (cgroup v2 cpu.max), or None when there is none."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, lowered to the cgroup quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def choose_threads(requested: int | str | None = None) -> int:
    """`requested` (--threads), else $DALLEMINI_THREADS, else $OMP_NUM_THREADS's choice, else the
    CPUs the process may use (shared among torchrun's local ranks)."""
    source = "--threads"
    if requested is None:
        requested, source = os.environ.get(ENV), ENV
    if requested is None or requested == "":
        if os.environ.get("OMP_NUM_THREADS"):  # the user already chose, the OpenMP way
            return torch.get_num_threads()
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: share the machine
        return max(1, available_cpus() // max(1, ranks))
    try:
        n = int(requested)
    except (TypeError, ValueError):
        raise InputError(f"{source} must be a whole number of threads, got {requested!r}") from None
    if not 1 <= n <= 1024:
        raise InputError(f"{source} must be between 1 and 1024, got {n}")
    return n


def apply_threads(requested: int | str | None = None) -> int:
    """Choose the thread count (see choose_threads) and give it to PyTorch; returns it."""
    n = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
