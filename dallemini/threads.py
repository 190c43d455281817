"""How many CPU threads to compute with: what the process may use (affinity, cgroup CPU quota), or
`--threads` / $DALLEMINI_THREADS, applied to PyTorch's intra-op pool and the native kernels; and,
when nobody chose a count, `tuner(loop)`: while a loop runs, use whichever of all those threads or
one thread makes its steps fastest now (on a CPU shared with other work, every parallel region
waits for the thread the OS has descheduled, and one thread is often several times faster)."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def user_chose_threads(requested: int | str | None = None) -> bool:
    """Whether the thread count was given (--threads, $DALLEMINI_THREADS or $OMP_NUM_THREADS)."""
    return requested is not None or bool(os.environ.get(ENV) or os.environ.get("OMP_NUM_THREADS"))


def apply_threads(requested: int | str | None = None) -> int:
    """Choose the thread count (see choose_threads) and give it to PyTorch; returns it. A count the
    user gave is kept as it is; a chosen one is the most that `tuner` loops use."""
    n = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _STATE["fixed"], _STATE["most"] = user_chose_threads(requested), n
    _TUNERS.clear()  # they start again from the new count
    return n


class ThreadTuner:
    """Per step of one loop: the thread count (all of them, or one) whose steps are fastest now.

    At the start it times up to two steps with one thread and two with all, taking turns, one
    thread first (a short loop, such as one small image, has few steps to spare, and on a busy CPU
    a parallel step can take many times a serial one). After `probe_every` steps, and again and
    again, it times `trials` steps with each count, taking turns, and keeps the count whose steps
    took least on average (not the luckiest step: on a shared CPU a parallel step is sometimes
    quick and often very slow); a later probe changes the count only where the other's steps took
    under `switch` times as long (a few lucky parallel steps on a busy CPU would otherwise win a
    probe, and the next hundred steps would wait on a descheduled thread). A probe ends early once
    one count's steps take `decisive` times the other's. A probe that confirms the count doubles
    the wait before the next (up to `max_every`); one that changes it starts again from
    `probe_every`. Steps of one loop are alike,
    so probing costs little on an idle machine and still notices when other work takes cores.
    """

    def __init__(
        self,
        threads: int,
        probe_every: int = 64,
        trials: int = 3,
        max_every: int = 1024,
        decisive: float = 3.0,
        switch: float = 0.8,
    ) -> None:
        self.counts = sorted({max(1, threads), 1}, reverse=True)
        self.probe_every, self.trials, self.max_every = probe_every, trials, max_every
        self.decisive, self.switch = decisive, switch
        self.best = self.counts[0]
        self._probed = False  # the first probe has no count to defend
        self._every = probe_every
        # the first probe: one thread, then all, taking turns (it stops as soon as it is clear)
        self._queue: list[int] = self.counts[::-1] * 2 if len(self.counts) > 1 else []
        self._times: dict[int, list[float]] = {}
        self._since = 0

    def _next(self) -> int:
        """The thread count of the coming step."""
        if not self._queue and self._since >= self._every and len(self.counts) > 1:
            self._queue = self.counts * self.trials
            self._times = {}
        return self._queue[0] if self._queue else self.best

    def _mean(self, n: int) -> float:
        return sum(self._times[n]) / len(self._times[n])

    def _record(self, n: int, seconds: float) -> None:
        if not self._queue:
            self._since += 1
            return
        self._queue.pop(0)
        self._times.setdefault(n, []).append(seconds)
        if len(self._times) == len(self.counts):
            means = sorted(self._mean(c) for c in self._times)
            if means[-1] >= self.decisive * means[0]:
                self._queue = []  # no doubt left: one count is far slower
        if not self._queue:
            best = min(self._times, key=self._mean)
            if (
                self._probed
                and best != self.best
                and self.best in self._times
                and self._mean(best) > self.switch * self._mean(self.best)
            ):
                best = self.best  # not clearly faster: keep the count that was doing well
            self._probed = True
            same = best == self.best
            self._every = min(2 * self._every, self.max_every) if same else self.probe_every
            self.best, self._since = best, 0

    @contextmanager
    def step(self) -> Iterator[int]:
        """Run one step of the loop with the count chosen for it (yielded). The count stays after
        the step, for the small work between steps; `tuned` puts it back after the call."""
        n = self._next()
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield n
        finally:
            self._record(n, time.perf_counter() - start)


def tuning(loop: str) -> bool:
    """Whether `loop` may choose its thread count (nobody chose it, and tuning is on)."""
    return isinstance(tuner(loop), ThreadTuner)


def settle(loop: str, probe: Callable[[], object], rounds: int = 3) -> int:
    """For a loop that must keep one count while it runs (training: a resumed run repeats the same
    arithmetic): all threads, unless `probe` calls on them do not take under the tuners' `switch`
    times as long as on one (other work holds a core), then one. Set for PyTorch and returned;
    unchanged where the user chose the count or tuning is off."""
    chosen = tuner(loop)
    if not isinstance(chosen, ThreadTuner) or len(chosen.counts) == 1:
        return torch.get_num_threads()
    most = chosen.counts[0]
    spent = {most: 0.0, 1: 0.0}
    for _ in range(rounds):
        for n in (1, most):
            torch.set_num_threads(n)
            start = time.perf_counter()
            probe()
            spent[n] += time.perf_counter() - start
    best = most if spent[most] < chosen.switch * spent[1] else 1
    torch.set_num_threads(best)
    return best


@contextmanager
def tuned(loop: str) -> Iterator[None]:
    """For a whole call around a tuned loop: PyTorch's thread count set to what the loop's tuner
    found fastest (the work between and around its steps runs as its steps do), and put back when
    the call ends (whatever runs next, a trainer after an evaluation, keeps its own count)."""
    n = torch.get_num_threads()
    chosen = tuner(loop)
    if isinstance(chosen, ThreadTuner) and chosen.best != n:
        torch.set_num_threads(chosen.best)
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


class _FixedThreads:
    """tuner() where the user chose the thread count: steps run with it, untouched."""

    @contextmanager
    def step(self) -> Iterator[int]:
        yield torch.get_num_threads()


# fixed: the user chose the count; most: the count tuners start from (apply_threads', else torch's)
FIXED = _FixedThreads()  # for loops that never tune (not on a CPU)
_STATE: dict[str, int] = {"fixed": user_chose_threads(), "most": torch.get_num_threads()}
_TUNERS: dict[tuple[str, int], ThreadTuner] = {}
_LOCK = threading.Lock()


def tuner(loop: str) -> ThreadTuner | _FixedThreads:
    """The thread tuner of a kind of loop ("decode", "vqgan", "train", ...), kept across calls;
    one that changes nothing when the user chose the thread count or $DALLEMINI_TUNE_THREADS=0."""
    if _STATE["fixed"] or os.environ.get("DALLEMINI_TUNE_THREADS", "1") == "0":
        return FIXED
    key = (loop, threading.get_ident())
    with _LOCK:
        if key not in _TUNERS:
            _TUNERS[key] = ThreadTuner(_STATE["most"])
        return _TUNERS[key]
