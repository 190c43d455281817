"""Memory and time of getting a model: converting the published Flax Mega, loading the converted
model for CPU (and CUDA) generation, and the first and second start through a Hub name.

Writes Mega-shape checkpoints with random weights in the published formats (Flax msgpack float32,
~10.4 GB + the Flax VQGAN; min-dalle float16 .pt, ~5.2 GB) under --work, then runs each
measurement in its own process and records its peak RSS (VmHWM) beside the RSS it started from:

  convert      Flax Mega -> bfloat16 model directory (`dallemini convert --dtype bfloat16`)
  load-bf16    that directory loaded for CPU generation in bfloat16 (the transient above the
               finished model shows tensors are read one at a time), then 8 decoding steps of
               one image and a VQGAN decode: the memory generation needs
  load-f32     the Flax folder loaded directly in float32 (no conversion), then the same
  load-min-dalle  min-dalle's float16 .pt files loaded for CPU generation in bfloat16
  stream-to-device  the bfloat16 directory built on the "meta" device: what a GPU load costs the
               host (each tensor read, cast and moved on its own), measurable without a GPU
  load-cuda    the bfloat16 directory loaded onto a GPU (host RSS beyond the baseline), when CUDA is there
  convert-int8 / load-int8 (--int8)  the same Flax Mega -> a model directory with 8-bit dense
               layers (`dallemini convert --dtype int8`), loaded with dtype="int8" and generating as
               load-bf16 does; --int8 runs convert, load-bf16 and these two only, under its own key
  hub-first / hub-second  TextToImage.from_pretrained("mega", dtype=bfloat16) against a local
               Hub-compatible server (tests/fakehub.py) serving those files: first start (download,
               hash checks, conversion, load) and second start (the converted cache, no network)

    python benchmarks/bench_load.py --work /var/tmp/dallemini-load      # ~40 GB of disk
    python benchmarks/bench_load.py --shape mini --work /tmp/load-mini  # the same at mini's shape
    python benchmarks/bench_load.py --int8 --work /var/tmp/dallemini-load  # int8 against bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, merge_results, run_child
from dallemini.checkpoints import convert, export, load_parts
from dallemini.checkpoints.flax_msgpack import write_msgpack
from dallemini.checkpoints.lazy import LazyTensor
from dallemini.checkpoints.native import build_from_state
from dallemini.config import preset
from dallemini.models.bart import DalleBart
from dallemini.models.vqgan import VQGAN
from dallemini.pipeline import TextToImage, default_model_path

RESULTS = Path(__file__).parent / "results" / "bench_load.json"
GB = 1e9


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _random_state(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, LazyTensor]:
    """Lazy random tensors with the module's names and shapes (made one at a time when written)."""
    out = {}
    for i, (name, t) in enumerate(module.state_dict().items()):

        def make(shape=tuple(t.shape), i=i) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            return (torch.randn(shape, generator=g) * 0.02).to(dtype)

        out[name] = LazyTensor(tuple(t.shape), dtype, make)
    return out


def make_checkpoints(work: Path, shape: str) -> dict[str, Any]:
    """The published files of a random DalleBart + VQGAN at `shape` (skipped when already there)."""
    done = work / "checkpoints.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = preset(shape)
    with torch.device("meta"):
        bart, vq = DalleBart(cfg.bart), VQGAN(cfg.vqgan)
    tok_json = (default_model_path() / "tokenizer.json").read_text()
    vocab, merges = export.bpe_files(tok_json)

    flax = work / "flax" / f"dalle-{shape}"
    flax.mkdir(parents=True, exist_ok=True)
    (flax / "config.json").write_text(json.dumps(export.flax_dalle_config(cfg.bart, True)))
    (flax / "tokenizer.json").write_text(tok_json)
    (flax / "vocab.json").write_text(vocab)
    (flax / "merges.txt").write_text(merges)
    tree = export.flax_dalle_tree(_random_state(bart, 1, torch.float32), cfg.bart, True)
    write_msgpack(flax / "flax_model.msgpack", tree)

    vq_dir = work / "flax" / "vqgan"
    vq_dir.mkdir(parents=True, exist_ok=True)
    vq_state = {k: v.load() for k, v in _random_state(vq, 2, torch.float32).items()}
    (vq_dir / "config.json").write_text(json.dumps(export.flax_vqgan_config(cfg.vqgan)))
    write_msgpack(vq_dir / "flax_model.msgpack", export.flax_vqgan_tree(vq_state))

    md = work / "min-dalle"
    (md / f"dalle_bart_{shape}").mkdir(parents=True, exist_ok=True)
    (md / "vqgan").mkdir(exist_ok=True)
    half = {k: v.load() for k, v in _random_state(bart, 1, torch.float16).items()}
    encoder, decoder = export.min_dalle_states(half)
    del half
    torch.save(encoder, md / f"dalle_bart_{shape}" / "encoder.pt")
    del encoder
    torch.save(decoder, md / f"dalle_bart_{shape}" / "decoder.pt")
    del decoder
    (md / f"dalle_bart_{shape}" / "vocab.json").write_text(vocab)
    (md / f"dalle_bart_{shape}" / "merges.txt").write_text(merges)
    torch.save(export.min_dalle_detoker(vq_state, cfg.vqgan), md / "vqgan" / "detoker.pt")
    info = {
        "flax_msgpack_bytes": (flax / "flax_model.msgpack").stat().st_size,
        "flax_vqgan_bytes": (vq_dir / "flax_model.msgpack").stat().st_size,
        "min_dalle_pt_bytes": sum(p.stat().st_size for p in md.rglob("*.pt")),
        "bart_params": sum(math.prod(t.shape) for t in bart.state_dict().values()),
        "vqgan_params": sum(math.prod(t.shape) for t in vq.state_dict().values()),
    }
    done.write_text(json.dumps(info, indent=2))
    return info


LOADS = (
    "load-bf16",
    "load-int8",
    "load-f32",
    "load-min-dalle",
    "load-cuda",
    "hub-first",
    "hub-second",
)


class _Stop(Exception):
    pass


def _generate_a_little(pipe: TextToImage, steps: int = 8) -> float:
    """Peak RSS (GB) of one image's first decoding steps and a VQGAN decode: generation's memory."""

    def progress(done: int, total: int) -> None:
        if done >= steps:
            raise _Stop

    with contextlib.suppress(_Stop):
        pipe("an armchair in the shape of an avocado", num_images=1, seed=0, progress=progress)
    grid = pipe.config.vqgan.grid_size
    pipe.decode(torch.randint(0, pipe.config.vqgan.n_embed, (1, grid * grid)))
    return round(_status_kib("VmHWM") * 1024 / GB, 3)


# ---------------------------------------------------------------------------------------------
# Children: one measurement each; the last stdout line is "RESULT {json}".


def child(step: str, work: Path, shape: str) -> None:
    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if step in ("convert", "convert-int8"):
        dtype = torch.int8 if step == "convert-int8" else torch.bfloat16
        dst = work / ("converted-int8" if step == "convert-int8" else "converted-bf16")
        shutil.rmtree(dst, ignore_errors=True)
        flax = work / "flax"
        convert(flax / f"dalle-{shape}", dst, vqgan=flax / "vqgan", dtype=dtype)
        out["weight_bytes"] = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    elif step == "stream-to-device":
        # What a GPU load does on the host, on any machine: each tensor is read, cast and moved to
        # the device ("meta" here: nowhere) on its own, so the host holds one tensor at a time.
        parts = load_parts(work / "converted-bf16", lazy=True)
        for part, cls in (("bart", DalleBart), ("vqgan", VQGAN)):
            cfg = getattr(parts.config, part)
            build_from_state(
                lambda cls=cls, cfg=cfg: cls(cfg),
                parts.states.pop(part),
                part,
                torch.bfloat16,
                "meta",
            )
    elif step in LOADS:
        device = "cuda" if step == "load-cuda" else "cpu"
        dtype = {"load-f32": "float32", "load-int8": "int8"}.get(step, "bfloat16")
        src: Any = {
            "load-int8": work / "converted-int8",
            "load-f32": work / "flax" / f"dalle-{shape}",
            "load-min-dalle": work / "min-dalle",
            "hub-first": shape,
            "hub-second": shape,
        }.get(step, work / "converted-bf16")
        vqgan = work / "flax" / "vqgan" if step == "load-f32" else None
        pipe = TextToImage.from_pretrained(src, device=device, dtype=dtype, vqgan=vqgan)
        if device == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = round(time.perf_counter() - t0, 2)
        sizes = [
            t.numel() * t.element_size()
            for m in (pipe.bart, pipe.vqgan)
            for t in m.state_dict().values()
        ]
        out["model_bytes"], out["largest_tensor_bytes"] = sum(sizes), max(sizes)
        out["final_rss_gb"] = round(_status_kib("VmRSS") * 1024 / GB, 3)
        out["load_peak_rss_gb"] = round(_status_kib("VmHWM") * 1024 / GB, 3)
        if step in ("load-bf16", "load-int8", "load-f32"):
            out["generation_peak_rss_gb"] = _generate_a_little(pipe)
    else:
        raise SystemExit(f"unknown step {step}")
    out.setdefault("seconds", round(time.perf_counter() - t0, 2))
    out["baseline_rss_gb"] = round(base_kib * 1024 / GB, 3)
    out["peak_rss_gb"] = round(_status_kib("VmHWM") * 1024 / GB, 3)
    out["peak_above_baseline_gb"] = round(out["peak_rss_gb"] - out["baseline_rss_gb"], 3)
    print("RESULT " + json.dumps(out), flush=True)


def serve_hub(work: Path, shape: str) -> Any:
    """A local Hub-compatible server with the Flax files under the published repository names."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fakehub import FakeHub  # a test helper: a Hub-compatible HTTP server on 127.0.0.1

    hub = FakeHub()

    def files(folder: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in sorted(folder.iterdir()):
            with open(p, "rb") as f:  # large files are served from the page cache, not copied
                out[p.name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return out

    hub.add_repo(f"dalle-mini/dalle-{shape}", files(work / "flax" / f"dalle-{shape}"))
    hub.add_repo("dalle-mini/vqgan_imagenet_f16_16384", files(work / "flax" / "vqgan"))
    return hub


def record_int8(args: argparse.Namespace, steps: dict[str, Any], run: Any) -> None:
    """--int8: the bfloat16 and int8 model directories' loads and generation, side by side."""
    for step in ("load-bf16", "convert-int8", "load-int8"):
        steps[step] = run(step)
    bf16, int8 = steps["load-bf16"], steps["load-int8"]
    summary = {
        key: round(int8[key] / bf16[key], 3)
        for key in ("load_peak_rss_gb", "generation_peak_rss_gb", "model_bytes")
    }
    summary["int8_weight_bytes_over_bf16"] = round(
        steps["convert-int8"]["weight_bytes"] / steps["convert"]["weight_bytes"], 3
    )
    print(f"int8 / bfloat16: {json.dumps(summary)}", flush=True)
    record = {
        "machine": machine_info(torch.device("cpu")),
        "shape": args.shape,
        "steps": steps,
        "int8_over_bf16": summary,
    }
    merge_results(args.json, f"{args.shape}-int8", record)
    if not args.keep:
        for name in ("converted-bf16", "converted-int8"):
            shutil.rmtree(args.work / name, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=["mega", "mini"], default="mega")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/dallemini-bench-load"))
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--int8", action="store_true", help="int8 against bfloat16 only (own key)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.shape)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = make_checkpoints(args.work, args.shape)
    info["write_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"checkpoints: {json.dumps(info)}", flush=True)

    def run(step: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--child", step, "--work", str(args.work)]
        r = run_child(step, [*cmd, "--shape", args.shape], env or dict(os.environ))
        print(f"{step}: {json.dumps(r)}", flush=True)
        return r

    steps: dict[str, Any] = {"convert": run("convert")}
    if args.int8:
        record_int8(args, steps, run)
        return
    for step in ("load-bf16", "load-f32", "load-min-dalle"):
        steps[step] = run(step)
    steps["stream-to-device"] = run("stream-to-device")
    if torch.cuda.is_available():
        steps["load-cuda"] = run("load-cuda")
    with serve_hub(args.work, args.shape) as hub:
        cache = args.work / "caches"
        shutil.rmtree(cache, ignore_errors=True)
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(cache / "hf"),
            "HF_HUB_CACHE": str(cache / "hf" / "hub"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DALLEMINI_CACHE": str(cache / "dallemini"),
            "NO_PROXY": "127.0.0.1",
        }
        steps["hub-first"] = run("hub-first", env)
        hub.clear_requests()
        steps["hub-second"] = run("hub-second", env)
        steps["hub-second"]["requests"] = len(hub.requests)
    if not args.keep:
        shutil.rmtree(args.work / "caches", ignore_errors=True)

    weights = steps["convert"]["weight_bytes"]
    load = steps["load-bf16"]
    summary = {
        "convert_peak_rss_gb": steps["convert"]["peak_rss_gb"],
        "load_bf16_peak_over_model_bytes": round(
            load["load_peak_rss_gb"] * GB / load["model_bytes"], 3
        ),
        "load_bf16_transient_over_largest_tensor": round(
            (load["load_peak_rss_gb"] - load["final_rss_gb"]) * GB / load["largest_tensor_bytes"], 2
        ),
        "load_f32_peak_over_model_bytes": round(
            steps["load-f32"]["load_peak_rss_gb"] * GB / steps["load-f32"]["model_bytes"], 3
        ),
        "second_over_first_start": round(
            steps["hub-second"]["seconds"] / steps["hub-first"]["seconds"], 4
        ),
    }
    summary["device_load_host_peak_above_baseline_gb"] = steps["stream-to-device"][
        "peak_above_baseline_gb"
    ]
    if "load-cuda" in steps:
        summary["cuda_host_rss_above_baseline_gb"] = steps["load-cuda"]["peak_above_baseline_gb"]
    record = {
        "machine": machine_info(torch.device("cpu")),
        "shape": args.shape,
        "checkpoints": info,
        "converted_weight_bytes": weights,
        "steps": steps,
        "summary": summary,
    }
    print(json.dumps(summary, indent=2))
    merge_results(args.json, args.shape, record)


if __name__ == "__main__":
    main()
