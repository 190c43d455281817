"""Optional native CPU kernel for decoding: float32 weight times one or two rows (see gemv.c).

No library streams a few-row float32 matmul at the memory's speed on CPU (oneDNN reaches ~2/3 of
it), so this one small C function is compiled on first use with the system's C compiler and cached
per CPU under ~/.cache/dallemini/kernels. Without a compiler, on a CPU without AVX-512, or with
DALLEMINI_NATIVE_KERNELS=0, `gemv` returns None and callers use PyTorch's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("gemv.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "fn": the loaded function or None once tried


def _cpu_identity() -> str | None:
    """The CPU's model name and flags (the cache key: -march=native code runs only on its CPU), or None without AVX-512."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    return f"{model}\n{flags}" if " avx512f" in flags else None


def cache_dir() -> Path:
    """Where compiled kernels live: $DALLEMINI_CACHE, else $XDG_CACHE_HOME/dallemini, else ~/.cache/dallemini."""
    root = os.environ.get("DALLEMINI_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dallemini" / "kernels"


def _compile() -> Path | None:
    """Build (or find) the shared library for this CPU; None where it cannot be built here."""
    if os.environ.get("DALLEMINI_NATIVE_KERNELS", "1") == "0":
        return None
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    cpu = _cpu_identity()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cpu is None or cc is None:
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(), cpu.encode()]))
    out = cache_dir() / f"gemv-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: other processes see the whole library or none.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        subprocess.run(
            [cc, *_FLAGS, str(_SOURCE), "-o", str(built)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(built, out)
    return out


def _load() -> object | None:
    """The C function, checked against torch on a small product; None where unavailable."""
    try:
        path = _compile()
        if path is None:
            return None
        fn = ctypes.CDLL(str(path)).dallemini_gemv2
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        log.info("native CPU kernel unavailable, using PyTorch's matmul: %s", e)
        return None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
    fn.restype = None
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 50, generator=g), torch.randn(2, 50, generator=g)
    y = torch.empty(2, 37)
    fn(w.data_ptr(), x[0].data_ptr(), x[1].data_ptr(), y[0].data_ptr(), y[1].data_ptr(), 37, 50, 1)
    if not torch.allclose(y, x @ w.t(), rtol=1e-5, atol=1e-5):
        log.warning("native CPU kernel gives wrong results here; using PyTorch's matmul")
        return None
    return fn


def _function() -> object | None:
    with _LOCK:
        if "fn" not in _STATE:
            _STATE["fn"] = _load()
        return _STATE["fn"]


def available() -> bool:
    """Whether the native kernel runs on this machine (compiles it on the first call)."""
    return _function() is not None


def gemv(x: Tensor, weight: Tensor) -> Tensor | None:
    """x [..., K] (one or two rows in all) times weight [N, K]^T in float32 on CPU; None where the kernel does not apply."""
    fn = _function()
    k = weight.shape[-1]
    if (
        fn is None
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.shape[-1] != k
        or not weight.is_contiguous()
    ):
        return None
    rows = x.numel() // k if k else 0
    if rows not in (1, 2):
        return None
    x2 = x.reshape(rows, k).contiguous()
    n = weight.shape[0]
    y = torch.empty(2, n)
    x1 = x2[rows - 1]
    fn(  # type: ignore[operator]
        weight.data_ptr(),
        x2[0].data_ptr(),
        x1.data_ptr(),
        y[0].data_ptr(),
        y[1].data_ptr(),
        n,
        k,
        torch.get_num_threads(),
    )
    return y[:rows].reshape(*x.shape[:-1], n)
