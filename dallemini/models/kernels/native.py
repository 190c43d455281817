"""Optional native CPU kernels for decoding: a weight times one or two rows (or any number of
float32 rows), and a whole decoder layer of a decoding step (see gemv.c).

No library streams a few-row matmul at the memory's speed on CPU (oneDNN reaches ~2/3 of it), so
small C functions are compiled on first use with the system's C compiler and cached per CPU under
~/.cache/dallemini/kernels: float32 (`gemv`, needs AVX-512 or AVX2+FMA), bfloat16 (`pack_bf16` +
`gemv_bf16`: pair dot products on a blocked copy of the weight with AVX512-BF16, else the weight
itself widened to float32 in cache, which halves the bytes a float32 step reads), single-query attention
(`attend1`) and `DecoderLayerKernel`, which runs a NormFormer decoder layer for one new token per
row in one call. Without them (no compiler, another CPU, or DALLEMINI_NATIVE_KERNELS=0) these
return None / report unavailable and callers use PyTorch's ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import mmap
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
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


def _arch_flag() -> str:
    """-march=native, or the target in $DALLEMINI_KERNEL_MARCH (e.g. x86-64-v3 to build and test the
    AVX2 variant on an AVX-512 machine)."""
    return "-march=" + (os.environ.get("DALLEMINI_KERNEL_MARCH") or "native")


_LOCK = threading.Lock()
# "fn", "bf16" (blocked), "bf16w" (plain, widened), "layer", "attend", "int8": the loaded functions
# (None where unavailable)
_STATE: dict[str, object] = {}
# The bfloat16 kernel's weight layout: blocks of ROWS (gemv.c) rows, 32 columns (one pair-dot vector).
_BLOCK_ROWS, _BLOCK_COLS = 8, 32


def _cpu_identity() -> str | None:
    """The CPU's model name and flags (the cache key: -march=native code runs only on its CPU), or None
    without AVX-512 or AVX2+FMA (AVX2 builds use 8-wide vectors where AVX-512 builds use 16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    words = set(flags.split())
    return f"{model}\n{flags}" if "avx512f" in words or {"avx2", "fma"} <= words else None


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (without it, oneDNN's bfloat16 matmuls ran at 0.3 GFLOP/s against
    185 for float32 on an AVX2-only AMD EPYC: benchmarks/bench_generate.py's limits)."""
    ident = _cpu_identity()
    return ident is not None and "avx512f" in ident.split()


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
    flags = [_arch_flag(), *_FLAGS]
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), cpu.encode()]))
    out = cache_dir() / f"gemv-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: other processes see the whole library or none.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        subprocess.run(
            [cc, *flags, str(_SOURCE), "-o", str(built)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(built, out)
    return out


def _run_bf16(fn: object, weight: Tensor, x: Tensor, n: int, k: int, threads: int) -> Tensor:
    """y [2, n] float32 from one bfloat16 C call: `weight` (blocked layout, k columns) times x's first
    and last rows."""
    y = torch.empty(2, n)
    fn(  # type: ignore[operator]
        weight.data_ptr(),
        x[0].data_ptr(),
        x[-1].data_ptr(),
        y[0].data_ptr(),
        y[1].data_ptr(),
        n,
        k,
        threads,
    )
    return y


def _load() -> object | None:
    """The float32 C product (and into _STATE the other kernels), each checked against torch on a
    small product; None where unavailable."""
    try:
        path = _compile()
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
        fn = lib.dallemini_gemm_f32
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        log.info("native CPU kernel unavailable, using PyTorch's matmul: %s", e)
        return None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
    fn.restype = None
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(37, 50, generator=g), torch.randn(7, 50, generator=g)
    if not torch.allclose(_run_gemm(fn, x, w), x @ w.t(), rtol=1e-5, atol=1e-5):
        log.warning("native CPU kernel gives wrong results here; using PyTorch's matmul")
        return None
    layer = lib.dallemini_decoder_layer
    layer.argtypes = [ctypes.POINTER(_LayerParams), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    layer.argtypes += [ctypes.c_void_p] * 6 + [ctypes.c_int]
    layer.restype = ctypes.c_int
    work = lib.dallemini_layer_work
    work.argtypes = [ctypes.POINTER(_LayerParams), ctypes.c_long]
    work.restype = ctypes.c_long
    _STATE["layer"] = (layer, work)
    attend = lib.dallemini_attend1
    attend.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_long] * 6
    attend.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int]
    attend.restype = None
    _STATE["attend"] = attend
    i8 = lib.dallemini_gemv_i8
    i8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    i8.restype = None
    _STATE["int8"] = i8
    wq = torch.randint(-127, 128, (37, 50), generator=g, dtype=torch.int8)
    sc = torch.rand(37, generator=g) + 0.5
    x5 = torch.randn(5, 50, generator=g)
    yq = _run_int8(i8, x5, wq, sc)
    if not torch.allclose(yq, x5 @ (wq.float() * sc[:, None]).t(), rtol=1e-4, atol=1e-4):
        log.warning("native int8 kernel gives wrong results here; using PyTorch's matmul")
        _STATE["int8"] = None
    # Built on AVX512-BF16 CPUs only.
    bf16 = getattr(lib, "dallemini_gemv2_bf16", None)
    if bf16 is not None:
        bf16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
        bf16.restype = None
        _STATE["bf16"] = bf16
        wb, xb = w.bfloat16(), x.bfloat16()
        yb = gemv_bf16(xb[:2], _pack(wb), 37, 50)
        if yb is None or not torch.allclose(
            yb.float(), (xb.float() @ wb.float().t()).bfloat16().float(), rtol=1e-2, atol=1e-2
        ):
            log.warning("native bfloat16 kernel gives wrong results here; using PyTorch's matmul")
            _STATE["bf16"] = None
    if _STATE.get("bf16") is None:  # no pair dot products: plain bfloat16 weights, widened
        bf16w = lib.dallemini_gemm_bf16w
        bf16w.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
        bf16w.restype = ctypes.c_int
        _STATE["bf16w"] = bf16w
        wb, xb = w.bfloat16(), x.bfloat16()
        yb = gemv_bf16(xb, wb, 37, 50)
        if yb is None or not torch.allclose(
            yb.float(), (xb.float() @ wb.float().t()).bfloat16().float(), rtol=1e-2, atol=1e-2
        ):
            log.warning("native bfloat16 kernel gives wrong results here; using PyTorch's matmul")
            _STATE["bf16w"] = None
    return fn


def _function(kind: str = "fn") -> object | None:
    with _LOCK:
        if "fn" not in _STATE:
            # _load sets these once the float32 function passed its check
            for name in ("bf16", "bf16w", "layer", "attend", "int8"):
                _STATE[name] = None
            _STATE["fn"] = _load()
        return _STATE[kind]


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the native kernel for `dtype` weights runs on this machine (compiles it on the first call)."""
    if dtype == torch.bfloat16:
        return bf16_layout() is not None
    if dtype == torch.int8:
        return _function("int8") is not None
    return dtype == torch.float32 and _function() is not None


def bf16_layout() -> str | None:
    """How the native bfloat16 kernels read weights here: "blocked" (AVX512-BF16 pair dot products
    on a `pack_bf16` copy), "plain" (the [N, K] weight, widened to float32 in cache), or None."""
    if _function("bf16") is not None:
        return "blocked"
    return "plain" if _function("bf16w") is not None else None


class _LayerParams(ctypes.Structure):
    """gemv.c's dallemini_layer: one decoder layer's sizes and parameter addresses."""

    _fields_ = [
        *((name, ctypes.c_long) for name in ("d", "heads", "head_dim", "ffn", "kp_d", "kp_f")),
        ("max_len", ctypes.c_long),
        ("text_len", ctypes.c_long),
        ("eps", ctypes.c_float),
        ("bf16", ctypes.c_int),
        ("kv16", ctypes.c_int),
        ("w", ctypes.c_void_p * 9),
        ("ln_w", ctypes.c_void_p * 6),
        ("ln_b", ctypes.c_void_p * 6),
        ("i8", ctypes.c_int),
        ("scale", ctypes.c_void_p * 9),
    ]


class DecoderLayerKernel:
    """One NormFormer decoder layer (models.bart.DecoderLayer in eval mode) bound to one sampling
    run's cache, for steps that feed one token to each row (any number of rows).

    weights: q, k, v, out, cross q, cross out, fc0, fc1, fc2; float32 [N, K] contiguous, or their
    `pack_bf16` copies when `bf16`. norms: (weight or None, bias) of the six layer norms in the
    order pre-self, self, pre-cross, cross, GLU ln0, GLU ln1. Caches: self [R, H, max_len, Dh] and
    cross [R, H, text_len, Dh], contiguous, all float32 or all bfloat16 (bfloat16 needs the bfloat16
    kernel); cross_mask [R, text_len] additive.
    Every tensor is held here, so the addresses given to C stay valid while this object lives.
    """

    def __init__(
        self,
        weights: list[Tensor],
        norms: list[tuple[Tensor | None, Tensor]],
        eps: float,
        heads: int,
        self_k: Tensor,
        self_v: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_mask: Tensor,
        bf16: bool,
        scales: list[Tensor] | None = None,
    ) -> None:
        kind = torch.bfloat16 if bf16 else torch.int8 if scales is not None else torch.float32
        funcs = _STATE.get("layer") if available(kind) else None
        if funcs is None:
            raise RuntimeError("the native decoder-layer kernel is not available here")
        self._fn, work_size = funcs  # type: ignore[misc]
        rows, _, max_len, head_dim = self_k.shape
        text_len = cross_k.shape[2]
        norms = [
            (None if w is None else w.float().contiguous(), b.float().contiguous())
            for w, b in norms
        ]
        d, ffn = heads * head_dim, norms[5][1].shape[0]  # GLU ln1 normalizes the GLU width
        kv16 = self_k.dtype == torch.bfloat16
        if kv16 and not available(torch.bfloat16):
            raise RuntimeError("a bfloat16 cache needs the native bfloat16 kernel")
        kept = [self_k, self_v, cross_k, cross_v]
        for t in kept:
            if t.dtype not in (torch.float32, torch.bfloat16) or t.dtype != self_k.dtype:
                raise ValueError("decoder-layer kernel caches must be all float32 or all bfloat16")
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("decoder-layer kernel caches must be contiguous CPU tensors")
        kept.append(cross_mask.float().contiguous())
        if rows < 1 or cross_mask.numel() != rows * text_len:
            raise ValueError(f"decoder-layer kernel needs a cross mask [{rows}, {text_len}]")
        p = _LayerParams()
        p.d, p.heads, p.head_dim, p.ffn = d, heads, head_dim, ffn
        plain = bf16 and bf16_layout() == "plain"
        p.kp_d, p.kp_f = -(-d // _BLOCK_COLS) * _BLOCK_COLS, -(-ffn // _BLOCK_COLS) * _BLOCK_COLS
        if plain:  # the [N, K] weights themselves: no padded columns
            p.kp_d, p.kp_f = d, ffn
        p.max_len, p.text_len, p.eps, p.kv16 = max_len, text_len, eps, int(kv16)
        p.bf16 = (2 if plain else 1) if bf16 else 0
        for i, w in enumerate(weights):
            want = torch.bfloat16 if bf16 else torch.int8 if scales is not None else torch.float32
            if w.dtype != want or not w.is_contiguous() or w.device.type != "cpu":
                raise ValueError(
                    f"decoder-layer kernel weight {i} must be contiguous {want} on CPU"
                )
            p.w[i] = w.data_ptr()
        if scales is not None:  # int8 weights: one float32 scale per output row
            scales = [sc.float().contiguous() for sc in scales]
            for i, (w, sc) in enumerate(zip(weights, scales, strict=True)):
                if sc.shape != w.shape[:1]:
                    raise ValueError(f"decoder-layer kernel scale {i} must have {w.shape[0]} rows")
                p.scale[i] = sc.data_ptr()
            p.i8 = 1
        for i, (w, b) in enumerate(norms):
            p.ln_w[i] = None if w is None else w.data_ptr()
            p.ln_b[i] = b.data_ptr()
        self._params = p
        self._ref = ctypes.byref(p)
        self._work = torch.empty(work_size(self._ref, rows))
        self._rows = rows
        self._ptrs = [t.data_ptr() for t in kept] + [self._work.data_ptr()]
        self._keep = (weights, norms, kept, scales)

    def __call__(self, x: Tensor, pos: int | Tensor) -> None:
        """x [n, d] float32 contiguous (the cache's first n <= rows rows), the new token of each row
        at position `pos` (one for all, or int64 [n], one per row), through the layer in place (the
        token's keys/values go into the cache at its position)."""
        n, d = x.shape if x.dim() == 2 else (0, 0)
        if (
            not 0 < n <= self._rows
            or d != self._params.d
            or x.dtype != torch.float32
            or not x.is_contiguous()
        ):
            raise ValueError(f"expected x [<= {self._rows}, {self._params.d}] float32 contiguous")
        if isinstance(pos, int):
            pos = torch.full((n,), pos, dtype=torch.long)
        if (
            pos.shape != (n,)
            or pos.dtype != torch.long
            or not pos.is_contiguous()
            or pos.device.type != "cpu"
        ):
            raise ValueError(f"expected positions int64 [{n}] contiguous on CPU")
        rc = self._fn(
            self._ref, x.data_ptr(), n, pos.data_ptr(), *self._ptrs, torch.get_num_threads()
        )
        if rc == -2:
            raise ValueError(f"a position outside the cache's {self._params.max_len}: {pos}")
        if rc != 0:
            raise RuntimeError("the native decoder-layer kernel refused its arguments")


_HUGE = 2 << 20  # a transparent huge page


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialized CPU tensor on memory advised for transparent huge pages (MADV_HUGEPAGE), else
    torch.empty's. Streaming a weight from 2 MiB pages skips most TLB misses: the products read
    7-13% faster here (benchmarks/bench_kernels.py; kernel THP mode "madvise", which PyTorch's
    allocator never asks for)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    try:
        # Anonymous and private: freed when the last view of the tensor goes (frombuffer holds it).
        size = -(-nbytes // _HUGE) * _HUGE + _HUGE
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE  # the first 2 MiB boundary: only whole aligned pages are huge
    return raw[start : start + nbytes].view(dtype).view(shape)


def move_to_huge_pages(param: torch.nn.Parameter) -> None:
    """Re-home a CPU parameter's values onto huge pages (huge_page_empty), once; same values, one
    weight's worth of extra memory while it moves. Made outside inference mode, so that the model
    still trains afterwards."""
    if getattr(param, "_dallemini_huge", False) or param.device.type != "cpu":
        return
    with torch.inference_mode(False), torch.no_grad():
        param.data = huge_page_empty(tuple(param.shape), param.dtype).copy_(param.data)
    param._dallemini_huge = True  # type: ignore[attr-defined]


def _pack(weight: Tensor) -> Tensor:
    """[N, K] -> the bfloat16 kernel's blocked layout [ceil(N/8), Kp/32, 8, 32], zero-padded."""
    n, k = weight.shape
    rb, cb = _BLOCK_ROWS, _BLOCK_COLS
    padded = torch.zeros(-(-n // rb) * rb, -(-k // cb) * cb, dtype=weight.dtype)
    padded[:n, :k] = weight
    blocked = padded.view(-1, rb, padded.shape[1] // cb, cb).transpose(1, 2)
    return huge_page_empty(tuple(blocked.shape), weight.dtype).copy_(blocked)


def pack_bf16(weight: Tensor) -> Tensor | None:
    """A bfloat16 [N, K] CPU weight in the layout `gemv_bf16` reads (blocked: a copy; plain: the
    weight itself, contiguous), or None without the kernel."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
        return None
    layout = bf16_layout()
    if layout is None:
        return None
    return _pack(weight.detach()) if layout == "blocked" else weight.detach().contiguous()


def gemv_bf16(x: Tensor, packed: Tensor, n: int, k: int) -> Tensor | None:
    """x [..., k] bfloat16 times the `pack_bf16` [n, k] weight (blocked: one or two rows in all;
    plain: any number), float32 accumulation, bfloat16 out; None where the kernel does not apply."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[-1] != k:
        return None
    rows = x.numel() // k if k else 0
    plain = _STATE.get("bf16w")
    if plain is not None and packed.shape == (n, k) and rows > 0:
        y = torch.empty(rows, n)
        xf = x.reshape(rows, k).float().contiguous()  # exact: bfloat16 values
        if plain(
            packed.data_ptr(), xf.data_ptr(), y.data_ptr(), rows, n, k, torch.get_num_threads()
        ):  # type: ignore[operator]
            return None  # no scratch memory
        return y.to(torch.bfloat16).reshape(*x.shape[:-1], n)
    fn = _STATE.get("bf16")
    if fn is None or rows not in (1, 2):
        return None
    kp = packed.shape[1] * _BLOCK_COLS
    xp = torch.zeros(rows, kp, dtype=torch.bfloat16)
    xp[:, :k] = x.reshape(rows, k)
    y = _run_bf16(fn, packed, xp, n, kp, torch.get_num_threads())
    return y[:rows].to(torch.bfloat16).reshape(*x.shape[:-1], n)


def attend1(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor | None:
    """scaled_dot_product_attention for one query per row and head: q [B, H, 1, Dh], k and v
    [B, H, T, Dh] on CPU, both float32 or both bfloat16 (e.g. views of a longer cache: each key
    contiguous, same strides), mask None or additive float [B, 1, 1, T]; float32 arithmetic, out
    [B, H, 1, Dh] float32. None where it does not apply."""
    if q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or q.device.type != "cpu":
        return None
    b, h, t, dh = k.shape
    if (
        k.dtype not in (torch.float32, torch.bfloat16)
        or v.dtype != k.dtype
        or not q.is_floating_point()
        or k.device.type != "cpu"
        or v.device.type != "cpu"
        or q.shape != (b, h, 1, dh)
        or v.shape != k.shape
        or v.stride() != k.stride()
        or k.stride(3) != 1
        or k.stride(2) != dh
        or t == 0
    ):
        return None
    if mask is not None:
        if not mask.is_floating_point() or mask.numel() != b * t or mask.shape[-1] != t:
            return None
        mask = mask.reshape(b, t).float().contiguous()
    fn = _function("attend")
    if fn is None or (k.dtype == torch.bfloat16 and not available(torch.bfloat16)):
        return None
    qc = q.reshape(b, h * dh).float().contiguous()
    out = torch.empty(b, h, 1, dh)
    scores = torch.empty(b * h * t)
    fn(  # type: ignore[operator]
        qc.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        int(k.dtype == torch.bfloat16),
        b,
        h,
        dh,
        t,
        k.stride(0),
        k.stride(1),
        None if mask is None else mask.data_ptr(),
        scores.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


# Rows of X the int8 kernel takes: it re-reads each block of weight rows (from cache) per four X
# rows, so past this a float matmul on the dequantized weight is faster.
INT8_MAX_ROWS = 32


def gemv_int8(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor | None:
    """x [R, K] float32 times the int8 weight [N, K]^T, times scale [N]: [R, N] float32 on CPU
    (weights widened in registers); None where the kernel does not apply."""
    fn = _function("int8")
    if (
        fn is None
        or x.dtype != torch.float32
        or weight.dtype != torch.int8
        or scale.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.dim() != 2
        or not 0 < x.shape[0] <= INT8_MAX_ROWS
        or x.shape[1] != weight.shape[1]
        or scale.shape != weight.shape[:1]
        or not (weight.is_contiguous() and scale.is_contiguous())
    ):
        return None
    return _run_int8(fn, x.contiguous(), weight, scale)


def _run_int8(fn: object, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """The C int8 product for contiguous x [R, K], weight [N, K], scale [N]."""
    (r, k), n = x.shape, weight.shape[0]
    y = torch.empty(r, n)
    fn(  # type: ignore[operator]
        weight.data_ptr(),
        scale.data_ptr(),
        x.data_ptr(),
        y.data_ptr(),
        r,
        n,
        k,
        torch.get_num_threads(),
    )
    return y


def gemm(x: Tensor, weight: Tensor) -> Tensor | None:
    """x [R, K] float32 (any R) times weight [N, K]^T on CPU, each row's arithmetic that of `gemv`
    (bitwise: a row's result does not depend on the rows beside it); None where it does not apply."""
    fn = _function()
    if (
        fn is None
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.dim() != 2
        or x.shape[0] == 0
        or x.shape[1] != weight.shape[1]
        or not weight.is_contiguous()
    ):
        return None
    return _run_gemm(fn, x.contiguous(), weight)


def _run_gemm(fn: object, x: Tensor, weight: Tensor) -> Tensor:
    """The C multi-row float32 product for contiguous x [R, K], weight [N, K]."""
    (r, k), n = x.shape, weight.shape[0]
    y = torch.empty(r, n)
    fn(weight.data_ptr(), x.data_ptr(), y.data_ptr(), r, n, k, torch.get_num_threads())  # type: ignore[operator]
    return y


def gemv(x: Tensor, weight: Tensor) -> Tensor | None:
    """x [..., K] (one or two rows in all) times weight [N, K]^T in float32 on CPU; None where the kernel does not apply."""
    k = weight.shape[-1]
    rows = x.numel() // k if k else 0
    if x.shape[-1] != k or rows not in (1, 2):
        return None
    y = gemm(x.reshape(rows, k), weight)  # the same product and checks, for one or two rows
    return None if y is None else y.reshape(*x.shape[:-1], weight.shape[0])
