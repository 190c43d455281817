"""Text-to-image speed, ours against min-dalle on the same weights: one process per side, same threads, same dtype.

Builds the DALL·E Mini shape (12+12 layers, d 1024, 16 heads, GLU 2730, 64 text tokens -> 256 image tokens over
16,384 codes; `--shape mega`: Mega's 24+24 layers, d 2048, 32 heads, GLU 4096, 16,415 image rows) and the
f16/16,384 VQGAN decoder with random weights (std 0.02, so sampling is not degenerate),
saved in min-dalle's .pt layout (encoder.pt, decoder.pt, detoker.pt, vocab.json, merges.txt). Then, in one run,
one child process per side and dtype loads them and generates for one prompt at batch 1 and for 9 images:
min-dalle with its own MinDalle.generate_raw_image_stream (its encoder, its sampling loop, its detokenizer), ours
with TextToImage.__call__. Each phase is timed from inside the child (text encoding, token decoding, VQGAN
decoding) and peak memory is the child's own (resource.getrusage, plus the peak of each generation alone from
/proc VmHWM). Sampling: top-k 256, temperature 1, condition scale 16 (min-dalle's defaults) on both sides.

The decoding phase is compared with this machine's limits, measured in the same run: weight bytes per second
at batch 1 against memory bandwidth (the sum of a 1 GiB tensor; 4 GiB on a GPU), FLOP/s at 9 images against a
large matmul.

    python benchmarks/bench_generate.py                 # full 256 steps everywhere (~8 min on 2 cores)
    python benchmarks/bench_generate.py --steps 32      # 32 timed steps per run, extrapolated to 256 (~3 min)
    python benchmarks/bench_generate.py --variants ours ours-bf16 --work /tmp/gen-weights
    python benchmarks/bench_generate.py --device cuda --shape mega   # GPU: fp16 and fp32 pairs by default

On a GPU every phase boundary and every decoding step waits for the device (torch.cuda.synchronize) on both
sides alike, and peak memory is the device's (torch.cuda.max_memory_allocated). `--layers N` builds the shape
with N layers per stack instead (a quick check of the plumbing, e.g. the mega shape on a small machine; such
runs are recorded under their own key and check no targets).

With --steps N < 256 the token-decoding figures are extrapolated and marked so: min-dalle's per-step cost does
not depend on the position (it always attends over all 256 slots), so its N steps are scaled to 256; ours
attends over the generated prefix only, so it is timed on the first N steps and on the last N (a forced
prefix of 256 - N tokens), and the mean of both windows is scaled to 256 (exact when cost grows linearly).
`--competitor both` also runs every variant and batch a second time with a busy process beside it (a
plain spinning loop pinned to one core, started before the child and stopped after it), and prints the
slowdown of each side under contention and ours against min-dalle under contention (`one-core`: only
contended runs). Ours then runs with its default thread settings (no OMP_NUM_THREADS), as a user's
`dallemini generate` would, and times all 256 steps (its thread tuner probes now and then, which a
short window would weigh wrongly).
Writes benchmarks/results/bench_generate.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    best_time,
    machine_info,
    matmul_peak,
    memory_bandwidth,
    merge_results,
    run_child,
    sync,
)

RESULTS = Path(__file__).resolve().parent / "results" / "bench_generate.json"
PROMPT = "a red apple on a wooden table, top left, photograph"
IMAGE_TOKENS = 256
MINI = {
    "layers": 12,
    "d_model": 1024,
    "heads": 16,
    "glu": 2730,
    "text_vocab": 50264,
    "text_tokens": 64,
    "image_vocab": 16384,
}
# min-dalle's is_mega sizes (its decoder has 16,415 image rows; only the first 16,384 are codes).
MEGA = {
    "layers": 24,
    "d_model": 2048,
    "heads": 32,
    "glu": 4096,
    "text_vocab": 50272,
    "text_tokens": 64,
    "image_vocab": 16415,
}
SHAPES = {"mini": MINI, "mega": MEGA}
CODES = 16384  # the VQGAN's codebook: what both sides sample from
# name: (side, DalleBart dtype, VQGAN dtype). min-dalle runs its VQGAN in float32 whatever its dtype.
VARIANTS = {
    "min-dalle": ("min-dalle", "float32", "float32"),
    "ours": ("ours", "float32", "float32"),
    "ours-bf16": ("ours", "bfloat16", "bfloat16"),
    "ours-bf16-vqgan32": ("ours", "bfloat16", "float32"),  # --dtype bfloat16's default VQGAN
    "min-dalle-fp16": ("min-dalle", "float16", "float32"),
    "ours-fp16": ("ours", "float16", "float16"),
    "min-dalle-bf16": ("min-dalle", "bfloat16", "float32"),
    "ours-int8": ("ours", "int8", "float32"),  # 8-bit DalleBart weights, float32 activations
}
DEFAULT_VARIANTS = {
    "cpu": ["min-dalle", "ours", "ours-bf16"],
    "cuda": ["min-dalle-fp16", "ours-fp16", "min-dalle", "ours"],
}


def shape_of(name: str, layers: int | None = None) -> dict[str, Any]:
    """The model sizes of `name` (mini or mega), with `layers` per stack where given."""
    shape = dict(SHAPES[name], name=name)
    if layers:
        shape["layers"] = layers
    return shape


# --- weights -------------------------------------------------------------------------------------
def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Dense/conv/embedding weights ~ N(0, 0.02), biases 0, norm scales 1: a fresh model of the original's init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def write_weights(root: Path, shape: dict[str, Any]) -> Path:
    """min-dalle's own modules at `shape` with random weights, saved as its .pt files + a small BPE.

    The folder is min-dalle's models_root for that shape (dalle_bart_mini|mega/ + vqgan/); a folder made
    for another layer count is rebuilt."""
    from tokenizers import ByteLevelBPETokenizer

    from dallemini.random_model import seed_captions

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer

    torch.set_grad_enabled(grad)  # importing min_dalle switches these process-wide
    torch.set_num_threads(threads)
    bart = root / f"dalle_bart_{shape['name']}"
    done = bart / "merges.txt"
    made_for = bart / "shape.json"
    if done.is_file() and made_for.is_file() and json.loads(made_for.read_text()) == shape:
        return root
    done.unlink(missing_ok=True)
    bart.mkdir(parents=True, exist_ok=True)
    (root / "vqgan").mkdir(exist_ok=True)
    m = shape
    with torch.device("meta"):
        parts = {
            bart / "encoder.pt": DalleBartEncoder(
                layer_count=m["layers"],
                embed_count=m["d_model"],
                attention_head_count=m["heads"],
                text_vocab_count=m["text_vocab"],
                text_token_count=m["text_tokens"],
                glu_embed_count=m["glu"],
                device="meta",
            ),
            bart / "decoder.pt": DalleBartDecoder(
                image_vocab_count=m["image_vocab"],
                embed_count=m["d_model"],
                attention_head_count=m["heads"],
                glu_embed_count=m["glu"],
                layer_count=m["layers"],
                device="meta",
            ),
            root / "vqgan" / "detoker.pt": VQGanDetokenizer(),
        }
    for seed, (path, module) in enumerate(parts.items()):
        module.to_empty(device="cpu")
        _randomize(module, seed)
        torch.save(module.state_dict(), path)
        del module
    parts.clear()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(  # the prompt's words become whole tokens, as with the real 50k vocabulary
        [*seed_captions(), *[PROMPT] * 200],
        vocab_size=2000,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    made_for.write_text(json.dumps(shape))
    bpe.save_model(str(bart))  # vocab.json, then merges.txt (the marker of a complete folder)
    return root


def weight_streaming(nbytes: int = 512 << 20, repeats: int = 3) -> float:
    """Bytes/s of 2 rows times float32 GLU-sized weights (2730 x 1024, `nbytes` in all) through oneDNN's
    linear: what a library matmul, not a plain sum, gets out of the memory (the native kernel of
    dallemini/models/kernels, which one-image float32 decoding uses, streams faster)."""
    import torch.nn.functional as F

    ws = [torch.randn(2730, 1024) for _ in range(max(1, nbytes // (2730 * 1024 * 4)))]
    x = torch.randn(2, 1024)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():

        def run() -> None:
            for w in ws:
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    else:

        def run() -> None:
            for w in ws:
                F.linear(x, w)

    return sum(w.numel() * 4 for w in ws) / best_time(run, repeats)


def gpu_memory_bandwidth(device: torch.device, nbytes: int = 4 << 30, repeats: int = 10) -> float:
    """The GPU's read bandwidth in bytes/s: the best of `repeats` sums over `nbytes` of float32."""
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del x
    torch.cuda.empty_cache()
    return nbytes / best


def measure_limits(matmul: bool, device: torch.device) -> dict[str, Any]:
    """This machine's read bandwidth (sum over 1 GiB) and 2-row matmul weight streaming, now; with `matmul`
    also float32/bfloat16 matmul FLOP/s (2048^3, ~3 s each). On a GPU: its read bandwidth and (8192^3)
    float32/float16/bfloat16 matmul FLOP/s."""
    if device.type == "cuda":
        with torch.no_grad():
            out = {
                "memory_bandwidth_bytes_per_s": gpu_memory_bandwidth(device),
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
            if matmul:
                out["matmul_flops_per_s"] = {
                    dt: matmul_peak(device, getattr(torch, dt), 8192)
                    for dt in ("float32", "float16", "bfloat16")
                }
        return out
    cpu = torch.device("cpu")
    with torch.no_grad():
        out: dict[str, Any] = {
            "memory_bandwidth_bytes_per_s": memory_bandwidth(),
            "weight_streaming_bytes_per_s": weight_streaming(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
        if matmul:
            out["matmul_flops_per_s"] = {
                "float32": matmul_peak(cpu, torch.float32, 2048),
                "bfloat16": matmul_peak(cpu, torch.bfloat16, 2048),
            }
    return out


def _limits_line(lim: dict[str, Any]) -> str:
    line = f"memory {lim['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (sum)"
    if "weight_streaming_bytes_per_s" in lim:
        line += f", {lim['weight_streaming_bytes_per_s'] / 1e9:.1f} GB/s (2-row matmul)"
    if "matmul_flops_per_s" in lim:
        mm = lim["matmul_flops_per_s"]
        line += ", matmul " + " / ".join(f"{v / 1e9:.0f}" for v in mm.values())
        line += " GFLOP/s " + " / ".join(mm)
    return line


# --- accounting ------------------------------------------------------------------------------------
def step_costs(
    text_tokens: int, rows: int, element_size: int, shape: dict[str, Any]
) -> dict[str, float]:
    """Weight bytes and FLOPs of one decoding step, averaged over the 256 positions, that any implementation needs.

    Weights: every decoder dense layer but the cross-attention K/V projections (a function of the prompt only)
    plus the output head. FLOPs: 2 per weight per row (cond + uncond rows), plus attention over the prefix
    and over the prompt's real tokens.
    """
    m = shape
    d, f, layers = m["d_model"], m["glu"], m["layers"]
    params = layers * (6 * d * d + 3 * d * f) + (m["image_vocab"] + 1) * d
    mean_prefix = (IMAGE_TOKENS + 1) / 2
    attn = layers * 4 * rows * d * (mean_prefix + text_tokens)
    return {
        "weight_bytes": params * element_size,
        "flops": 2 * rows * params + attn,
    }


def _hwm_kib() -> int:
    """Peak resident memory of this process since the last reset (VmHWM), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


_PEAK_KIB = [0]  # the process's peak RSS across all VmHWM windows so far


def _reset_hwm() -> None:
    """Start a new VmHWM window (Linux clear_refs 5), keeping the lifetime peak; harmless where unsupported.

    The reset also resets what getrusage reports, so the lifetime peak is carried in _PEAK_KIB.
    """
    _PEAK_KIB[0] = max(_PEAK_KIB[0], _hwm_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# Other processes' (or the hypervisor's) CPU use while a side ran, in cores, above which its figures
# are flagged: a quarter core slows a 2-thread run by up to ~12%.
OTHER_WORK_CORES = 0.25


class _Stop(Exception):
    """Raised from inside a sampling loop once enough steps were timed."""


def _marking_end(fn: Any, marks: dict[str, Any], key: str, device: torch.device) -> Any:
    """fn, recording in marks[key] when its (GPU) work ended."""

    def wrapped(*a: Any, **k: Any) -> Any:
        out = fn(*a, **k)
        sync(device)
        marks[key] = time.perf_counter()
        return out

    return wrapped


def _adding_time(fn: Any, marks: dict[str, Any], key: str, device: torch.device) -> Any:
    """fn, adding the seconds each call's (GPU) work took to marks[key]."""

    def wrapped(*a: Any, **k: Any) -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **k)
        sync(device)
        marks[key] = marks.get(key, 0.0) + time.perf_counter() - t0
        return out

    return wrapped


def _phases(
    t_start: float,
    t_encoded: float,
    t_end: float,
    vqgan_s: float,
    step_ends: list[float],
    late_steps: list[float] | None,
    steps: int,
) -> dict[str, Any]:
    """Split one generation's wall time; extrapolate the decoding when fewer than 256 steps ran."""
    text_s = t_encoded - t_start
    intervals = [b - a for a, b in zip([t_encoded, *step_ends[:-1]], step_ends, strict=True)]
    out: dict[str, Any] = {"text_encoding_s": text_s, "vqgan_s": vqgan_s}
    if steps >= IMAGE_TOKENS:
        # Everything between the encoder and the VQGAN (set-up, 256 steps, bookkeeping) is token decoding.
        out["token_decoding_s"] = (t_end - t_start) - text_s - vqgan_s
        out["extrapolated"] = False
    else:
        rest = intervals[1:]
        per_step = sum(rest) / len(rest)
        if late_steps:
            per_step = (per_step + sum(late_steps) / len(late_steps)) / 2
        out["token_decoding_s"] = intervals[0] + per_step * (IMAGE_TOKENS - 1)
        out["extrapolated"] = True
        out["timed_steps"] = len(intervals) + len(late_steps or [])
    out["step_ms_first"] = intervals[0] * 1e3
    out["step_ms_mean"] = (
        sum(intervals[1:]) / max(1, len(intervals) - 1) * 1e3 if len(intervals) > 1 else None
    )
    if late_steps:
        out["step_ms_mean_last_window"] = sum(late_steps) / len(late_steps) * 1e3
    out["total_s"] = out["text_encoding_s"] + out["token_decoding_s"] + out["vqgan_s"]
    return out


# --- min-dalle side ------------------------------------------------------------------------------
def _gpu_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_kib(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) // 1024 if device.type == "cuda" else None


def run_min_dalle(
    root: Path,
    batches: list[int],
    steps: int,
    seed: int,
    dtype: str,
    device: torch.device,
    shape: dict[str, Any],
) -> dict[str, Any]:
    """min-dalle's MinDalle object (minus its downloads) and its own generate_raw_image_stream, timed per phase."""
    threads = torch.get_num_threads()
    from min_dalle import MinDalle
    from min_dalle.text_tokenizer import TextTokenizer

    torch.set_num_threads(threads)  # min_dalle sets os.cpu_count() threads on import
    _reset_hwm()
    md = MinDalle.__new__(MinDalle)  # its __init__ always asks the network for config.json
    md.device, md.dtype, md.is_mega, md.is_reusable, md.is_verbose = (
        str(device),
        getattr(torch, dtype),
        shape["name"] == "mega",
        True,
        False,
    )
    md.text_token_count = shape["text_tokens"]
    md.layer_count, md.attention_head_count = shape["layers"], shape["heads"]
    md.embed_count, md.glu_embed_count = shape["d_model"], shape["glu"]
    md.text_vocab_count, md.image_vocab_count = shape["text_vocab"], shape["image_vocab"]
    bart = root / f"dalle_bart_{shape['name']}"
    md.vocab_path, md.merges_path = str(bart / "vocab.json"), str(bart / "merges.txt")
    md.encoder_params_path = str(bart / "encoder.pt")
    md.decoder_params_path = str(bart / "decoder.pt")
    md.detoker_params_path = str(root / "vqgan" / "detoker.pt")
    with open(md.vocab_path, encoding="utf8") as f:
        vocab = json.load(f)
    with open(md.merges_path, encoding="utf8") as f:
        merges = f.read().split("\n")[1:-1]
    md.tokenizer = TextTokenizer(vocab, merges)  # what its init_tokenizer builds
    md.init_encoder()
    md.init_decoder()
    md.init_detokenizer()
    loaded = {"load_peak_kib": _hwm_kib(), "resident_after_load_kib": _rss_kib()}

    marks: dict[str, Any] = {}
    sample = md.decoder.sample_tokens

    def timed_sample(*a: Any, **k: Any) -> Any:
        out = sample(*a, **k)
        sync(device)
        marks["steps"].append(time.perf_counter())
        if len(marks["steps"]) >= marks["limit"]:
            raise _Stop
        return out

    md.encoder.forward = _marking_end(md.encoder.forward, marks, "encoded", device)
    md.decoder.sample_tokens = timed_sample
    md.detokenizer.forward = _adding_time(md.detokenizer.forward, marks, "vqgan_s", device)

    def generate(n: int, limit: int, vqgan: bool = True) -> float:
        grid = round(n**0.5)
        assert grid * grid == n, "min-dalle generates square grids only"
        marks.update(steps=[], limit=limit, vqgan_s=0.0)
        sync(device)
        t0 = time.perf_counter()
        try:
            for _ in md.generate_raw_image_stream(
                PROMPT,
                seed=seed,
                grid_size=grid,
                temperature=1,
                top_k=256,
                supercondition_factor=16,
            ):
                pass
        except _Stop:
            if vqgan:  # its VQGAN step, on stand-in tokens
                tokens = torch.randint(0, CODES, (n, IMAGE_TOKENS), device=device)
                md.image_grid_from_tokens(tokens, is_seamless=False)
        sync(device)
        return t0

    for n in batches:  # warm-up: allocator, thread pool, kernels for this batch
        generate(n, 2, vqgan=False)
    md.detokenizer.forward(False, torch.randint(0, CODES, (1, IMAGE_TOKENS), device=device))
    results = {}
    for n in batches:
        _reset_hwm()
        _gpu_reset(device)
        t0 = generate(n, steps if steps < IMAGE_TOKENS else IMAGE_TOKENS + 1)
        t_end = time.perf_counter()
        r = _phases(t0, marks["encoded"], t_end, marks["vqgan_s"], marks["steps"], None, steps)
        r["images"] = n
        r["peak_kib"] = _hwm_kib()
        r["gpu_peak_kib"] = _gpu_peak_kib(device)
        results[str(n)] = r
    text_tokens = len(md.tokenizer.tokenize(PROMPT))
    return {"load": loaded, "batches": results, "prompt_tokens": text_tokens}


# --- our side ------------------------------------------------------------------------------------
def run_ours(
    root: Path,
    batches: list[int],
    steps: int,
    seed: int,
    dtype: str,
    vqgan_dtype: str,
    device: torch.device,
) -> dict[str, Any]:
    """TextToImage.from_pretrained on the min-dalle folder, then pipe(prompt, num_images=n), timed per phase."""
    from dallemini.config import SamplingConfig
    from dallemini.generate import iter_image_tokens
    from dallemini.pipeline import TextToImage

    _reset_hwm()
    pipe = TextToImage.from_pretrained(root, device=device, dtype=dtype, vqgan_dtype=vqgan_dtype)
    loaded = {"load_peak_kib": _hwm_kib(), "resident_after_load_kib": _rss_kib()}
    marks: dict[str, Any] = {}
    pipe.bart.encode = _marking_end(pipe.bart.encode, marks, "encoded", device)
    pipe.decode = _adding_time(pipe.decode, marks, "vqgan_s", device)
    settings = dict(temperature=1.0, top_k=256, condition_scale=16.0, rerank=False)

    def progress(done: int, total: int) -> None:
        sync(device)
        marks["steps"].append(time.perf_counter())
        if len(marks["steps"]) >= marks["limit"]:
            raise _Stop

    def generate(n: int, limit: int, vqgan: bool = True) -> float:
        marks.update(steps=[], limit=limit, vqgan_s=0.0)
        sync(device)
        t0 = time.perf_counter()
        try:
            pipe(PROMPT, num_images=n, seed=seed, progress=progress, **settings)
        except _Stop:
            if vqgan:
                pipe.decode(torch.randint(0, CODES, (n, IMAGE_TOKENS), device=device))
        sync(device)
        return t0

    def last_window(n: int, count: int) -> list[float]:
        """Per-step seconds of the last `count` positions, after a forced prefix of 256 - count tokens."""
        ids, mask = (t.to(device) for t in pipe.text([PROMPT]))
        u_ids, u_mask = pipe.text.unconditional(1)
        prefix = torch.randint(0, CODES, (n, IMAGE_TOKENS - count), device=device)
        stream = iter_image_tokens(
            pipe.bart,
            ids,
            mask,
            u_ids,
            u_mask,
            list(range(seed, seed + n)),
            SamplingConfig(temperature=1.0, top_k=256, condition_scale=16.0),
            num_codes=pipe.config.vqgan.n_embed,
            prompt_index=torch.zeros(n, dtype=torch.long),
            prefix=prefix,
            stream_every=1,
        )
        ends = [time.perf_counter() for _ in stream if sync(device) is None]
        return [b - a for a, b in itertools.pairwise(ends)]  # the first one holds the prefill

    for n in batches:  # warm-up, as on min-dalle's side
        generate(n, 2, vqgan=False)
    pipe.decode(torch.randint(0, CODES, (1, IMAGE_TOKENS), device=device))
    results = {}
    for n in batches:
        _reset_hwm()
        _gpu_reset(device)
        t0 = generate(n, steps if steps < IMAGE_TOKENS else IMAGE_TOKENS + 1)
        t_end = time.perf_counter()
        encoded, vqgan_s, step_ends = marks["encoded"], marks["vqgan_s"], list(marks["steps"])
        late = last_window(n, steps + 1) if steps < IMAGE_TOKENS else None
        r = _phases(t0, encoded, t_end, vqgan_s, step_ends, late, steps)
        r["images"] = n
        r["peak_kib"] = _hwm_kib()
        r["gpu_peak_kib"] = _gpu_peak_kib(device)
        results[str(n)] = r
    _ids, mask = pipe.text([PROMPT])
    return {"load": loaded, "batches": results, "prompt_tokens": int(mask.sum())}


def child(args: argparse.Namespace) -> None:
    """One side in its own process: print its figures as one JSON line."""
    if args.auto_threads:  # as `dallemini generate` chooses (and tunes) them
        from dallemini.threads import apply_threads

        apply_threads()
    else:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    side, dtype, vqgan_dtype = VARIANTS[args.child]
    device = torch.device(args.device)
    shape = shape_of(args.shape, args.layers)
    if side == "min-dalle":
        out = run_min_dalle(args.work, args.batches, args.steps, args.seed, dtype, device, shape)
    else:
        out = run_ours(args.work, args.batches, args.steps, args.seed, dtype, vqgan_dtype, device)
    _reset_hwm()
    out["max_rss_kib"] = _PEAK_KIB[0]  # getrusage's ru_maxrss, taken before every window reset
    out["threads"] = torch.get_num_threads()
    out["dtype"], out["vqgan_dtype"] = dtype, vqgan_dtype
    print("RESULT " + json.dumps(out), flush=True)


# --- parent ----------------------------------------------------------------------------------------
def spawn(variant: str, images: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant at one batch size in a fresh interpreter and parse its figures."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--work",
        str(args.work),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--batches",
        str(images),
        "--device",
        args.device,
        "--shape",
        args.shape,
    ]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    if args.competitor != "none" and VARIANTS[variant][0] != "min-dalle":
        env.pop("OMP_NUM_THREADS")  # ours as a user runs it: threads chosen (and tuned) by itself
        cmd += ["--auto-threads"]
        # Every step timed: the thread tuner probes now and then (a few slower steps), and a short
        # window extrapolated to 256 steps would weigh those probes wrongly.
        cmd[cmd.index("--steps") + 1] = str(IMAGE_TOKENS)
    return run_child(variant, cmd, env)


@contextlib.contextmanager
def competitor(on: bool) -> Any:
    """A plain spinning process on one core (the last this process may use) while the block runs."""
    if not on:
        yield
        return
    cpu = max(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)  # spinning before the child starts
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        help="default: min-dalle ours ours-bf16 on CPU; min-dalle-fp16 ours-fp16 min-dalle ours on a GPU",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    p.add_argument("--layers", type=int, default=None, help="layers per stack (plumbing checks)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 9], help="images per run")
    p.add_argument(
        "--steps", type=int, default=IMAGE_TOKENS, help="decoding steps timed (<256: extrapolated)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per variant and batch; the fastest is kept"
    )
    p.add_argument("--work", type=Path, default=None, help="keep/reuse the weights here")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the README table of the results file's full run for --device/--shape (else its "
        "latest run) and exit",
    )
    p.add_argument(
        "--competitor",
        choices=("none", "one-core", "both"),
        default="none",
        help="a spinning process on one core beside each run (both: idle and contended runs)",
    )
    p.add_argument(
        "--key-suffix", default="", help="appended to the results key (keeps another run's figures)"
    )
    p.add_argument("--auto-threads", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    full_key = f"{device.type}-{args.shape}" + (f"-{args.layers}layers" if args.layers else "")
    if args.markdown:
        results = json.loads(args.output.read_text())
        key = (
            full_key
            if full_key in results
            else max(results, key=lambda k: results[k]["measured_at"])
        )
        print(markdown(results[key]))
        return
    if args.variants is None:
        args.variants = DEFAULT_VARIANTS["cuda" if device.type == "cuda" else "cpu"]
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU here")
    half = [v for v in args.variants if v.startswith("min-dalle-")]
    if half and device.type != "cuda":
        # its attention state is float32 and only torch.cuda.amp.autocast casts it to match
        p.error(f"{', '.join(half)}: min-dalle runs reduced precision on CUDA only (--device cuda)")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be positive")
    if not 2 <= args.steps <= IMAGE_TOKENS:
        p.error(f"--steps must be in [2, {IMAGE_TOKENS}]")
    for n in args.batches:
        if n < 1 or round(n**0.5) ** 2 != n:
            p.error("--batches must be square numbers (min-dalle makes square grids): 1, 4, 9, ...")
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    info = machine_info(device)
    shape = shape_of(args.shape, args.layers)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
        args.work = Path(tmp.name)
    # One models_root per shape: ours would find either dalle_bart_* folder in a shared one.
    args.work = args.work / full_key.split("-", 1)[1]
    try:
        t0 = time.perf_counter()
        write_weights(args.work, shape)
        print(f"weights (min-dalle .pt layout) in {args.work} ({time.perf_counter() - t0:.0f} s)")
        # Interleaved, one process per (side, batch): comparable runs follow each other closely, so a
        # change in the box's load hits all sides alike; the limits are measured between runs.
        limits_seen = [measure_limits(True, device)]
        print(f"{info['cpu']}, {args.threads} threads, load {info.get('load_average_1m_before')}")
        print(f"  limits: {_limits_line(limits_seen[0])}")
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {} for v in args.variants}
        contended: dict[str, dict[str, list[dict[str, Any]]]] = {v: {} for v in args.variants}
        modes = {"none": [False], "one-core": [True], "both": [False, True]}[args.competitor]
        for rep, n, v, busy in itertools.product(
            range(args.repeats), args.batches, args.variants, modes
        ):
            load, t1 = round(os.getloadavg()[0], 2), time.perf_counter()
            with competitor(busy):
                out = spawn(v, n, args)
            r = out["batches"][str(n)]
            r.update(
                repeat=rep,
                load_average_1m_before=load,
                load_average_1m_after=round(os.getloadavg()[0], 2),
                max_rss_kib=out["max_rss_kib"],
                load=out["load"],
                host_cpu=out.get("host_cpu"),
            )
            for k in ("prompt_tokens", "dtype", "vqgan_dtype", "threads"):
                r[k] = out[k]
            (contended if busy else runs)[v].setdefault(str(n), []).append(r)
            other = r["host_cpu"]["other_cores"] if r["host_cpu"] else float("nan")
            print(
                f"  {v} x{n} (run {rep + 1}{', contended' if busy else ''}): "
                f"{r['total_s'] / n:.2f} s/image, other work {other:.2f} cores "
                f"({time.perf_counter() - t1:.0f} s)"
            )
            limits_seen.append(measure_limits(False, device))
        limits_seen.append(measure_limits(True, device))
        print(f"  limits: {_limits_line(limits_seen[-1])}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    # The machine's capability: the best of all measurements (other work on the box only lowers them).
    mm = [lim for lim in limits_seen if "matmul_flops_per_s" in lim]
    limits = {
        "memory_bandwidth_bytes_per_s": max(
            lim["memory_bandwidth_bytes_per_s"] for lim in limits_seen
        ),
        "weight_streaming_bytes_per_s": max(
            (lim.get("weight_streaming_bytes_per_s", 0.0) for lim in limits_seen), default=0.0
        )
        or None,
        "matmul_flops_per_s": {
            k: max(lim["matmul_flops_per_s"][k] for lim in mm) for k in mm[0]["matmul_flops_per_s"]
        },
        "measured": limits_seen,
    }
    sides = _sides(runs if False in modes else contended)
    report(sides, limits, args, shape)
    contention = _contention(_sides(runs), _sides(contended)) if modes == [False, True] else None
    if contention is not None:
        _print_contention(contention)
    targets = [] if args.layers else check_targets(sides, summarize(sides, limits, shape), device)
    for t in targets:
        print(f"  {t['target']}: {t['measured']} -> {'met' if t['met'] else 'NOT met'}")
    record = {
        "benchmark": "bench_generate",
        "shape": args.shape,
        "layers": shape["layers"],
        "prompt": PROMPT,
        "sampling": {"top_k": 256, "temperature": 1.0, "condition_scale": 16.0},
        "steps_timed": args.steps,
        "extrapolated": args.steps < IMAGE_TOKENS,
        "limits": limits,
        "sides": sides,
        "summary": summarize(sides, limits, shape),
        "targets": targets,
        "competitor": args.competitor,
        "contended_sides": _sides(contended) if True in modes else None,
        "contention": contention,
        "machine": info,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    key = full_key if args.steps >= IMAGE_TOKENS else f"{full_key}-steps{args.steps}"
    key += {"none": "", "one-core": "-contended", "both": "-contention"}[args.competitor]
    suffix = args.key_suffix.lstrip("-")  # "-avx2" and "avx2" name the same key
    key += f"-{suffix}" if suffix else ""
    merge_results(args.output, key, record)
    print(f"wrote {args.output}")


def _sides(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per variant: the fastest run of each batch size, every run, and what the runs share."""
    sides = {}
    for v, by_n in runs.items():
        if not by_n:
            continue
        best = {n: min(rs, key=lambda r: r["total_s"]) for n, rs in by_n.items()}
        first = next(iter(best.values()))
        sides[v] = {
            "batches": best,
            "all_runs": by_n,
            "max_rss_kib": max(r["max_rss_kib"] for rs in by_n.values() for r in rs),
            **{k: first[k] for k in ("prompt_tokens", "dtype", "vqgan_dtype", "threads")},
        }
    return sides


def _contention(idle: dict[str, Any], busy: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant and batch: seconds per image idle and beside the competitor, the slowdown, and
    ours against min-dalle (same dtype) under contention."""
    rows = []
    for v, side in busy.items():
        for n, r in side["batches"].items():
            quiet = idle[v]["batches"][n]["total_s"]
            row = {
                "variant": v,
                "images": int(n),
                "idle_s_per_image": round(quiet / int(n), 3),
                "contended_s_per_image": round(r["total_s"] / int(n), 3),
                "slowdown": round(r["total_s"] / quiet, 2),
            }
            md = busy.get("min-dalle", {}).get("batches", {}).get(n)
            if VARIANTS[v][0] != "min-dalle" and md is not None:
                row["contended_speedup_vs_min_dalle"] = round(md["total_s"] / r["total_s"], 2)
            rows.append(row)
    return rows


def _print_contention(rows: list[dict[str, Any]]) -> None:
    print("\nbeside a spinning process on one core (same run):")
    print(
        f"{'variant':14s} {'imgs':>4s} {'idle s/img':>10s} {'busy s/img':>10s} "
        f"{'slowdown':>8s} {'x min-dalle':>11s}"
    )
    for r in rows:
        vs = r.get("contended_speedup_vs_min_dalle")
        print(
            f"{r['variant']:14s} {r['images']:4d} {r['idle_s_per_image']:10.2f} "
            f"{r['contended_s_per_image']:10.2f} {r['slowdown']:7.2f}x "
            f"{(f'{vs:.2f}x' if vs else '-'):>11s}"
        )


def check_targets(
    sides: dict[str, Any], rows: list[dict[str, Any]], device: torch.device
) -> list[dict[str, Any]]:
    """The issue's targets (CPU or GPU), checked against this run's figures (only those the run measured)."""
    out: list[dict[str, Any]] = []

    def per_s(v: str, n: str) -> float | None:
        r = sides.get(v, {}).get("batches", {}).get(n)
        return None if r is None else int(n) / r["total_s"]

    if device.type == "cuda":
        for n in ("1", "9"):
            for dt in ("", "-fp16", "-bf16"):
                a, b = per_s("ours" + dt, n), per_s("min-dalle" + dt, n)
                if a and b:
                    out.append(
                        {
                            "target": f"{VARIANTS['ours' + dt][1]} images/s ours/min-dalle >= 3x "
                            f"at {n} image(s)",
                            "measured": f"{a / b:.2f}x",
                            "met": a / b >= 3.0,
                        }
                    )
        for r in rows:
            if r["variant"].startswith("ours") and r["images"] == 1:
                out.append(
                    {
                        "target": f"{r['dtype']} batch-1 decoding >= 60% of the GPU's memory bandwidth",
                        "measured": f"{r['fraction_of_memory_bandwidth']:.0%}",
                        "met": r["fraction_of_memory_bandwidth"] >= 0.6,
                    }
                )
        return out
    for n, goal in (("1", 4.0), ("9", 5.0)):
        a, b = per_s("ours", n), per_s("min-dalle", n)
        if a and b:
            out.append(
                {
                    "target": f"float32 images/s ours/min-dalle >= {goal:g}x at {n} image(s)",
                    "measured": f"{a / b:.2f}x",
                    "met": a / b >= goal,
                }
            )
        for variant, what in (("ours-bf16", ""), ("ours-bf16-vqgan32", " (float32 VQGAN)")):
            c = per_s(variant, n)
            if a and c:
                out.append(
                    {
                        "target": f"bfloat16{what} images/s >= 1.6x our float32 at {n} image(s)",
                        "measured": f"{c / a:.2f}x",
                        "met": c / a >= 1.6,
                    }
                )
    if "ours" in sides and "min-dalle" in sides:
        mine, theirs = sides["ours"]["max_rss_kib"], sides["min-dalle"]["max_rss_kib"]
        out.append(
            {
                "target": "float32 peak memory <= min-dalle's",
                "measured": f"{mine / 1024:.0f} MiB vs {theirs / 1024:.0f} MiB",
                "met": mine <= theirs,
            }
        )
    return out


def summarize(
    sides: dict[str, Any], limits: dict[str, Any], shape: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per (variant, batch): seconds per image, phases, peak memory, ratios and fractions of the limits.

    Ratios compare with min-dalle in the same dtype (min-dalle-fp16 for ours-fp16, ...) where it ran,
    else with min-dalle in float32."""
    rows = []
    streaming = limits.get("weight_streaming_bytes_per_s")
    for v, s in sides.items():
        dtype = VARIANTS[v][1]
        same = "min-dalle" + {"float16": "-fp16", "bfloat16": "-bf16"}.get(dtype, "")
        base = sides.get(same, sides.get("min-dalle"))
        for n, r in s["batches"].items():
            images = int(n)
            elt = {"float32": 4, "int8": 1}.get(s["dtype"], 2)  # bytes a weight streams
            costs = step_costs(s["prompt_tokens"], 2 * images, elt, shape)
            step_s = r["token_decoding_s"] / IMAGE_TOKENS
            # weights widened to float32 in the CPU (int8; bfloat16 without native bfloat16
            # arithmetic) compute at float32's rate: the faster of the two is the limit
            peaks = limits["matmul_flops_per_s"]
            peak = max(peaks.get(s["dtype"]) or 0.0, peaks.get("float32") or 0.0) or None
            row = {
                "variant": v,
                "dtype": s["dtype"],
                "vqgan_dtype": s["vqgan_dtype"],
                "images": images,
                "text_encoding_s": round(r["text_encoding_s"], 3),
                "token_decoding_s": round(r["token_decoding_s"], 2),
                "vqgan_s": round(r["vqgan_s"], 2),
                "total_s": round(r["total_s"], 2),
                "s_per_image": round(r["total_s"] / images, 3),
                "images_per_s": round(images / r["total_s"], 4),
                "decoding_ms_per_step": round(step_s * 1e3, 1),
                "extrapolated": r["extrapolated"],
                "peak_rss_mib": round(r["max_rss_kib"] / 1024),  # this (side, batch) process
                "generation_peak_mib": round(r["peak_kib"] / 1024),
                "weight_bytes_per_s": costs["weight_bytes"] / step_s,
                "fraction_of_memory_bandwidth": round(
                    costs["weight_bytes"] / step_s / limits["memory_bandwidth_bytes_per_s"], 3
                ),
                "fraction_of_weight_streaming": round(costs["weight_bytes"] / step_s / streaming, 3)
                if streaming
                else None,
                "flops_per_s": costs["flops"] / step_s,
                "fraction_of_matmul_peak": round(costs["flops"] / step_s / peak, 3)
                if peak
                else None,
                "matmul_peak_flops_per_s": peak,
            }
            if r.get("gpu_peak_kib") is not None:
                row["gpu_peak_mib"] = round(r["gpu_peak_kib"] / 1024)
            if base is not None and n in base["batches"]:
                b = base["batches"][n]
                row["speedup_vs_min_dalle"] = round(b["total_s"] / r["total_s"], 2)
                row["decoding_speedup_vs_min_dalle"] = round(
                    b["token_decoding_s"] / r["token_decoding_s"], 2
                )
                row["peak_rss_vs_min_dalle"] = round(r["max_rss_kib"] / b["max_rss_kib"], 2)
            rows.append(row)
    return rows


def _limit_text(r: dict[str, Any], gpu: bool) -> str:
    """The decoding phase against this machine's limit: memory read at 1 image, matmul FLOP/s beyond."""
    if r["images"] == 1:
        text = f"{r['fraction_of_memory_bandwidth']:.0%} of memory read"
        if r.get("fraction_of_weight_streaming") is not None and not gpu:
            text += f", {r['fraction_of_weight_streaming']:.0%} of oneDNN streaming"
        return text
    if r.get("fraction_of_matmul_peak") is None:
        return "-"
    return f"{r['fraction_of_matmul_peak']:.0%} of matmul FLOP/s"


def markdown(record: dict[str, Any]) -> str:
    """The README's table for one recorded run: per variant and batch, phases, s/image, ratio, memory."""
    m, lim = record["machine"], record["limits"]
    gpu = "gpu" in m
    star = " (token decoding extrapolated from {} timed steps)".format(record["steps_timed"])
    mm = lim["matmul_flops_per_s"]
    where = (
        f"{m['gpu']} (torch {m['torch']})"
        if gpu
        else f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads, torch {m['torch']}; "
        f"1-min load {m.get('load_average_1m_before')} before, {m.get('load_average_1m_after')} after)"
    )
    machine = f"{lim['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s memory read, "
    if lim.get("weight_streaming_bytes_per_s"):
        machine += (
            f"{lim['weight_streaming_bytes_per_s'] / 1e9:.1f} GB/s through oneDNN's 2-row matmul, "
        )
    machine += (
        " / ".join(f"{v / 1e9:.0f}" for v in mm.values()) + " GFLOP/s " + " / ".join(mm) + " matmul"
    )
    layers = f" ({record['layers']} layers)" if record.get("layers") else ""
    lines = [
        f"Measured {record['measured_at'][:10]} on {where}{star if record['extrapolated'] else ''}; "
        f"{record.get('shape', 'mini')} shape{layers}, random weights, top-k 256, condition scale 16. "
        f"This machine: {machine}.",
        "",
        "| | DalleBart / VQGAN | images | text s | tokens s | VQGAN s | s per image | vs min-dalle "
        f"| ms per step | decoding vs limit | peak {'GPU' if gpu else 'RSS'} MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["summary"]:
        ratio = f"{r['speedup_vs_min_dalle']:.2f}x" if "speedup_vs_min_dalle" in r else "-"
        peak = r.get("gpu_peak_mib") if gpu else r["peak_rss_mib"]
        lines.append(
            f"| {r['variant']} | {_short(r['dtype'])} / {_short(r['vqgan_dtype'])} | {r['images']} "
            f"| {r['text_encoding_s']:.2f} | {r['token_decoding_s']:.1f} | {r['vqgan_s']:.2f} "
            f"| {r['s_per_image']:.2f} | {ratio} | {r['decoding_ms_per_step']:.0f} "
            f"| {_limit_text(r, gpu)} | {peak} |"
        )
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def report(
    sides: dict[str, Any], limits: dict[str, Any], args: argparse.Namespace, shape: dict[str, Any]
) -> None:
    """Print the table: per variant and batch, phases, s/image, ratio to min-dalle, memory, limits."""
    rows = summarize(sides, limits, shape)
    ex = args.steps < IMAGE_TOKENS
    print(
        "\nprompt tokens: "
        + ", ".join(f"{v} {s['prompt_tokens']}" for v, s in sides.items())
        + (f"; token decoding EXTRAPOLATED from {args.steps} timed steps to 256 (*)" if ex else "")
    )
    gpu = args.device != "cpu"
    head = (
        f"{'variant':14s} {'dtype/vqgan':11s} {'imgs':>4s} {'text s':>7s} {'tokens s':>9s} {'vqgan s':>8s} "
        f"{'s/image':>8s} {'x min-dalle':>11s} {'ms/step':>8s} {'peak MiB':>9s} "
        + (f"{'GPU MiB':>8s}" if gpu else f"{'gen MiB':>8s}")
    )
    print(head)
    for r in rows:
        star = "*" if r["extrapolated"] else " "
        ratio = f"{r['speedup_vs_min_dalle']:.2f}x" if "speedup_vs_min_dalle" in r else "-"
        last = r.get("gpu_peak_mib", 0) if gpu else r["generation_peak_mib"]
        print(
            f"{r['variant']:14s} {_short(r['dtype']) + '/' + _short(r['vqgan_dtype']):11s} {r['images']:4d} {r['text_encoding_s']:7.2f} "
            f"{r['token_decoding_s']:8.1f}{star} {r['vqgan_s']:8.2f} {r['s_per_image']:8.2f} "
            f"{ratio:>11s} {r['decoding_ms_per_step']:8.1f} {r['peak_rss_mib']:9d} "
            f"{last:8d}"
        )
    print(
        "\nother work on the CPUs while each kept run ran (cores busy / stolen by the hypervisor): "
        + ", ".join(
            f"{v} x{n} {h['other_cores']:.2f} / {h['stolen_cores']:.2f}"
            for v, s in sides.items()
            for n, r in s["batches"].items()
            if (h := r.get("host_cpu"))
        )
    )
    busy = [
        f"{v} x{n} ({h['other_cores']:.2f} cores, {h['stolen_cores']:.2f} stolen)"
        for v, s in sides.items()
        for n, r in s["batches"].items()
        if (h := r.get("host_cpu")) and h["other_cores"] + h["stolen_cores"] >= OTHER_WORK_CORES
    ]
    if busy:
        print(
            f"WARNING: other work on this machine's CPUs beside {', '.join(busy)}: those figures "
            "may be slowed; compare runs with as little other work, or use --repeats"
        )
    print("decoding phase against this machine's limits (best of the before/after measurements):")
    for r in rows:
        if r["images"] == 1:
            line = (
                f"  {r['variant']:14s} batch 1: {r['weight_bytes_per_s'] / 1e9:6.1f} GB/s of weights = "
                f"{r['fraction_of_memory_bandwidth']:.0%} of memory bandwidth "
                f"({limits['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)"
            )
            if r.get("fraction_of_weight_streaming") is not None:
                line += (
                    f", {r['fraction_of_weight_streaming']:.0%} of 2-row matmul streaming "
                    f"({limits['weight_streaming_bytes_per_s'] / 1e9:.1f} GB/s)"
                )
            print(line)
        elif r.get("fraction_of_matmul_peak") is not None:
            peak = r["matmul_peak_flops_per_s"]
            print(
                f"  {r['variant']:14s} {r['images']} images: {r['flops_per_s'] / 1e9:6.1f} GFLOP/s = "
                f"{r['fraction_of_matmul_peak']:.0%} of matmul peak ({peak / 1e9:.0f} GFLOP/s)"
            )


if __name__ == "__main__":
    main()
