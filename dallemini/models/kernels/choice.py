"""Which path is faster on this CPU for decoding: the native kernels or oneDNN.

CPU families differ: the native kernel streams weights faster than oneDNN's small-batch matmul on
AMD Zen 4 and on AVX-512 Xeons without AMX, while on others oneDNN's own kernels win. So each weight
shape's product, and each model shape's whole decoding step (the native layer kernels against the
layers op by op, per number of rows), is timed once per CPU model and thread count (a few
milliseconds for a product; a few steps for a step), and the faster is kept in the kernels' cache
folder (`choices.json`), so later runs start with it.
$DALLEMINI_FEW_ROWS=native or onednn forces one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ...files import atomic_write_json
from . import native

log = logging.getLogger(__name__)
PATHS = ("native", "onednn")
ENV = "DALLEMINI_FEW_ROWS"
_CHOICES: dict[str, str] = {}
_LOCK = threading.RLock()  # a step race times products that may be raced in turn
_LOADED: list[bool] = []


def choices_file() -> Path:
    """Where the measured choices are kept."""
    return native.cache_dir() / "choices.json"


@functools.cache  # /proc/cpuinfo once: this is asked at every few-row product
def _cpu_key() -> str:
    """A short name of this CPU model and its flags (the choices hold for it alone)."""
    ident = native._cpu_identity() or "unknown"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(weight: Tensor, onednn: Callable[[Tensor], Tensor], repeats: int = 5) -> str:
    """Time two rows times `weight` both ways; the faster path's name."""
    x = torch.randn(2, weight.shape[1])
    if native.gemv(x, weight) is None:
        return "onednn"
    t_native = _best_of(lambda: native.gemv(x, weight), repeats)
    t_onednn = _best_of(lambda: onednn(x), repeats)
    return "native" if t_native <= t_onednn else "onednn"


def few_rows_path(weight: Tensor, onednn: Callable[[Tensor], Tensor]) -> str:
    """The faster path for one or two float32 rows times `weight` on this CPU (measured once)."""
    n, k = weight.shape
    return remembered(f"float32|{n}x{k}", lambda: measure(weight, onednn))


def step_path(
    kind: str, shape: str, native_step: Callable[[], object], op_by_op: Callable[[], object]
) -> str:
    """The faster decoding step of a model `shape` with `kind` (float32, int8) weights on this CPU
    (measured once): the native layer kernels or the layers op by op, each call one step."""

    def race() -> str:
        t_native = _best_of(native_step, 3)
        t_ops = _best_of(op_by_op, 3)
        return "native" if t_native <= t_ops else "onednn"

    return remembered(f"{kind}|step|{shape}", race)


def remembered(what: str, measure_now: Callable[[], str]) -> str:
    """The path named for `what` on this CPU model and thread count: forced, known, or measured now."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in PATHS:
        return forced
    key = f"{_cpu_key()}|{what}|threads{torch.get_num_threads()}"
    known = _CHOICES.get(key)
    if known is not None:  # the common case, on the decoding hot path: no lock
        return known
    with _LOCK:
        if not _LOADED:
            _LOADED.append(True)
            try:
                saved = json.loads(choices_file().read_text())
                _CHOICES.update({k: v for k, v in saved.items() if v in PATHS})
            except (OSError, ValueError, AttributeError):
                pass
        if key in _CHOICES:
            return _CHOICES[key]
        _CHOICES[key] = measure_now()
        log.info("%s: %s is faster here", what, _CHOICES[key])
        try:
            native.cache_dir().mkdir(parents=True, exist_ok=True)
            atomic_write_json(choices_file(), dict(sorted(_CHOICES.items())))
        except OSError as e:  # a read-only home: measured again next time
            log.info("cannot keep the kernel choices in %s: %s", choices_file(), e)
        return _CHOICES[key]
