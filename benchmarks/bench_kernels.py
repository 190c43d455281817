"""The native CPU decoding kernels (dallemini/models/kernels) measured side by side, on the mini shape.

Three measurements, each interleaved over rounds so that a change in the machine's speed hits every
variant alike (the figures kept are medians over rounds):

1. weight streaming: a decoder's per-step weights (12 layers x 9 matrices) times two rows through the
   float32 and bfloat16 products, from ordinary 4 KiB pages and from transparent huge pages;
2. single-query attention over 12 layers' caches of 9 images (18 rows): native.attend1 against
   PyTorch's scaled_dot_product_attention, float32 and bfloat16 caches;
3. one image's decoding step (mini DalleBart, random weights, position 128), one child process per
   variant: native decoder layers; PyTorch ops per layer with the native products (no layer
   fusion); no native kernels at all (DALLEMINI_NATIVE_KERNELS=0); and float32 native layers of
   the AVX2 build (DALLEMINI_KERNEL_MARCH=x86-64-v3, where the CPU has AVX2). Also two and nine
   images' float32 steps (4 and 18 rows) through the native layers and op by op on oneDNN's packed
   weights (DALLEMINI_FEW_ROWS=onednn).

    python benchmarks/bench_kernels.py            # ~4 minutes on 2 cores
    python benchmarks/bench_kernels.py --rounds 3

Writes benchmarks/results/bench_kernels.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import best_time, machine_info, merge_results, run_child
from dallemini.models import kernels
from dallemini.models.kernels import native

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernels.json"
LAYERS, D, FFN = 12, 1024, 2730
SHAPES = [(D, D)] * 6 + [(FFN, D), (FFN, D), (D, FFN)]  # q k v out, cross q out, fc0 fc1 fc2


def _products(ws: list[tuple[torch.Tensor, int, int]], xs: dict[int, torch.Tensor]) -> None:
    """Every weight times its two rows (bfloat16 weights in the kernel's layout: pack_bf16)."""
    for w, n, k in ws:
        bf16 = w.dtype == torch.bfloat16
        y = native.gemv_bf16(xs[k], w, n, k) if bf16 else native.gemv(xs[k], w)
        if y is None:  # a product the kernel declined would time nothing
            raise RuntimeError(f"the native kernel declined a {tuple(w.shape)} {w.dtype} product")


def _attend(
    fn: Any, q: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], t: int
) -> None:
    """One query per row and head against the first t slots of every cache (each read cold)."""
    for k, v in caches:
        fn(q, k[:, :, :t], v[:, :, :t])


def streaming(rounds: int) -> dict[str, Any]:
    """GB/s of weights through the 2-row products, 4 KiB pages against huge pages, per dtype."""
    out: dict[str, Any] = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if native.available(torch.bfloat16) else [])
    for dtype in dtypes:
        weights: dict[str, list[tuple[torch.Tensor, int, int]]] = {"4k": [], "huge": []}
        for _ in range(LAYERS):
            for n, k in SHAPES:
                w = torch.randn(n, k) * 0.02
                if dtype == torch.bfloat16:
                    packed = native.pack_bf16(w.bfloat16())
                    assert packed is not None  # native.available(bfloat16) said so
                    plain = packed.clone()  # an ordinary allocation: 4 KiB pages
                else:
                    plain = w
                huge = native.huge_page_empty(tuple(plain.shape), plain.dtype).copy_(plain)
                weights["4k"].append((plain, n, k))
                weights["huge"].append((huge, n, k))
        xs = {k: torch.randn(2, k).to(dtype) for k in (D, FFN)}

        nbytes = sum(w.numel() * w.element_size() for w, _, _ in weights["4k"])
        rates: dict[str, list[float]] = {"4k": [], "huge": []}
        for _ in range(rounds):
            for pages, ws in weights.items():
                run = functools.partial(_products, ws, xs)
                rates[pages].append(nbytes / best_time(run) / 1e9)
        name = str(dtype).replace("torch.", "")
        out[name] = {
            "weight_bytes": nbytes,
            "gb_per_s_4k_median": statistics.median(rates["4k"]),
            "gb_per_s_huge_median": statistics.median(rates["huge"]),
            "huge_over_4k": statistics.median(rates["huge"]) / statistics.median(rates["4k"]),
            "rounds": rates,
        }
        print(
            f"  {name:8s} products: {out[name]['gb_per_s_4k_median']:5.1f} GB/s on 4 KiB pages, "
            f"{out[name]['gb_per_s_huge_median']:5.1f} on huge pages ({out[name]['huge_over_4k']:.2f}x)"
        )
        del weights
    return out


def attention(rounds: int) -> dict[str, Any]:
    """Microseconds per single-query attention call over 18 rows, attend1 against SDPA."""
    out: dict[str, Any] = {}
    rows, heads, slots, dh = 18, 16, 256, 64
    dtypes = [torch.float32] + ([torch.bfloat16] if native.available(torch.bfloat16) else [])
    for dtype in dtypes:
        caches = [
            (
                torch.randn(rows, heads, slots, dh).to(dtype),
                torch.randn(rows, heads, slots, dh).to(dtype),
            )
            for _ in range(LAYERS)
        ]
        q = torch.randn(rows, heads, 1, dh).to(dtype)
        for t in (32, 128, 228):
            times: dict[str, list[float]] = {"attend1": [], "sdpa": []}
            fns = {"attend1": native.attend1, "sdpa": F.scaled_dot_product_attention}
            with torch.inference_mode():
                for _ in range(rounds):
                    for name, fn in fns.items():
                        run = functools.partial(_attend, fn, q, caches, t)
                        times[name].append(best_time(run) / LAYERS * 1e6)
            a, s = statistics.median(times["attend1"]), statistics.median(times["sdpa"])
            key = f"{str(dtype).replace('torch.', '')}_t{t}"
            out[key] = {"attend1_us": a, "sdpa_us": s, "sdpa_over_attend1": s / a, "rounds": times}
            print(f"  attention {key:13s}: attend1 {a:7.0f} us, SDPA {s:7.0f} us ({s / a:.2f}x)")
        del caches
    return out


# --- decoding steps, one child process per variant ---------------------------------------------------
def child(dtype_name: str, per_op: bool, steps: int, rows: int) -> None:
    """Time decoding steps of `rows` rows (two per image) at position 128; print them as JSON."""
    from dallemini.config import BartConfig
    from dallemini.models.bart import DalleBart
    from dallemini.models.kernels import cpu

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    model = kernels.accelerate(DalleBart(BartConfig()).eval().to(dtype))
    ids = torch.randint(3, 50000, (rows, 14))
    mask = torch.ones(rows, 14, dtype=torch.long)
    with torch.inference_mode():
        enc = model.encode(ids, mask)
        cache = model.init_cache(enc, mask, dtype=kernels.cache_dtype(dtype, enc.device))
        token = torch.full((rows, 1), 5)
        times = []
        step = None
        for i in range(steps + 3):
            t0 = time.perf_counter()
            if i == 0 and not per_op:  # binds the native layers where they apply
                cache.length = 128
                step = cpu.native_step(model, cache, 128)
            if step is None:
                cache.length = 128
                model.decode_step(token, cache)
            else:
                step(token, 128)
            if i >= 3:  # the first steps bind the kernels and make packed copies
                times.append(time.perf_counter() - t0)
    print(
        "RESULT " + json.dumps({"ms": statistics.median(times) * 1e3, "native": step is not None})
    )


def decode_steps(rounds: int, steps: int) -> dict[str, Any]:
    """ms per decoding step (one image unless named) for each variant, children interleaved over
    rounds."""
    has_avx2 = "avx2" in (
        Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    )
    avx2_cache = tempfile.mkdtemp(prefix="dallemini-avx2-kernels-")
    off = {"DALLEMINI_NATIVE_KERNELS": "0"}
    onednn = {"DALLEMINI_FEW_ROWS": "onednn"}  # the op-by-op step, its products on oneDNN
    variants: dict[str, tuple[str, list[str], dict[str, str]]] = {
        "float32 native layers": ("float32", [], {}),
        "float32 per-op, native products": ("float32", ["--per-op"], {}),
        "float32 no native kernels": ("float32", [], off),
        # two and nine images (4 and 18 rows): native layers, and oneDNN's matmuls on packed weights
        "float32 2 images, native layers": ("float32", ["--rows", "4"], {}),
        "float32 2 images, oneDNN packed": ("float32", ["--rows", "4"], onednn),
        "float32 9 images, native layers": ("float32", ["--rows", "18"], {}),
        "float32 9 images, oneDNN packed": ("float32", ["--rows", "18"], onednn),
    }
    if has_avx2:
        variants["float32 native layers, AVX2 build"] = (
            "float32",
            [],
            {"DALLEMINI_KERNEL_MARCH": "x86-64-v3", "DALLEMINI_CACHE": avx2_cache},
        )
    if native.available(torch.bfloat16):
        variants |= {
            "bfloat16 native layers": ("bfloat16", [], {}),
            "bfloat16 per-op, native products": ("bfloat16", ["--per-op"], {}),
            "bfloat16 no native kernels": ("bfloat16", [], off),
        }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(rounds):
        for name, (dtype, extra, env) in variants.items():
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                dtype,
                "--steps",
                str(steps),
                *extra,
            ]
            runs[name].append(run_child(name, cmd, dict(os.environ, **env)))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        ms = statistics.median(r["ms"] for r in rs)
        out[name] = {"ms_per_step_median": ms, "native_layers": rs[-1]["native"], "rounds": rs}
        print(f"  {name:36s}: {ms:6.1f} ms per step")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    p.add_argument("--steps", type=int, default=20, help="decoding steps timed per child")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--key", default="cpu", help="results key (another machine's keeps its own)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--per-op", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        child(args.child, args.per_op, args.steps, args.rows)
        return
    if not native.available():
        raise SystemExit("no native kernels here (no C compiler, no AVX-512/AVX2, or switched off)")
    info = machine_info(torch.device("cpu"))
    print(
        f"{info['cpu']}, {torch.get_num_threads()} threads, load {info.get('load_average_1m_before')}"
    )
    record = {
        "benchmark": "bench_kernels",
        "streaming": streaming(args.rounds),
        "attention": attention(args.rounds),
        "decode_step": decode_steps(args.rounds, args.steps),
        "machine": info,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    merge_results(args.output, args.key, record)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
