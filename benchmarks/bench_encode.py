"""Images/s of VQGAN encoding on this machine: the model alone, and the whole `encode_dataset` pipeline.

A VQGAN with random weights (the f16_16384 shape at 256x256 by default, the tiny test preset with
`--small`) encodes synthetic images: first as ready tensors (model only), then as JPEG files in
an image folder (decode + resize/crop + VQGAN + Parquet shards). Prints the figures and writes
them, with the machine's CPU, cores, load and torch version, to benchmarks/results/bench_encode.json.

    python benchmarks/bench_encode.py            # f16_16384, 256x256 (slow on 2 CPU cores)
    python benchmarks/bench_encode.py --small    # tiny preset, 64x64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, merge_results, sync
from dallemini.config import VQGAN_PRESETS
from dallemini.data.encode import encode_dataset
from dallemini.models.vqgan import VQGAN

RESULTS = Path(__file__).resolve().parent / "results" / "bench_encode.json"


def bench_model(
    vqgan: VQGAN, n: int, batch: int, size: int, device: torch.device
) -> dict[str, float]:
    """Encode `n` random images already in memory, after one warm-up batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    vqgan.encode(x[:1])  # warm-up
    sync(device)
    done = 0
    start = time.perf_counter()
    while done < n:
        b = min(batch, n - done)
        vqgan.encode(x[:b])
        done += b
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": done, "seconds": round(seconds, 3), "images_per_s": round(done / seconds, 3)}


def bench_pipeline(
    vqgan: VQGAN, n: int, batch: int, size: int, threads: int | None
) -> dict[str, float]:
    """encode_dataset over a folder of `n` synthetic 1.5x-oversized JPEGs with captions."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        rng = np.random.default_rng(0)
        h, w = int(size * 1.5), int(size * 2)
        for i in range(n):
            base = rng.integers(
                0, 256, (h // 8, w // 8, 3), dtype=np.uint8
            )  # smooth-ish, like photos
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
            img.save(src / f"{i:06d}.jpg", quality=90)
            (src / f"{i:06d}.txt").write_text(f"synthetic picture number {i}\n")
        result = encode_dataset(
            src,
            Path(tmp) / "out",
            vqgan,
            batch_size=batch,
            shard_size=max(batch * 4, 64),
            threads=threads,
            progress=False,
        )
    return {
        "images": result.images,
        "seconds": round(result.seconds, 3),
        "images_per_s": round(result.images_per_s, 3),
        "decode_threads": threads or min(8, os.cpu_count() or 1),
        "source_image_size": f"{w}x{h} JPEG",
    }


def main() -> None:
    """Parse flags, run both measurements, print and save them."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--small", action="store_true", help="tiny preset (64x64 -> 4x4) instead of f16_16384"
    )
    p.add_argument("-n", "--images", type=int, default=None, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    p.add_argument("--threads", type=int, default=None, help="decode threads in the pipeline run")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()

    preset = "tiny" if args.small else "f16_16384"
    cfg = VQGAN_PRESETS[preset]
    n = args.images or (128 if args.small else 8)
    batch = args.batch_size or (32 if args.small else 4)
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    vqgan = VQGAN(cfg).to(device).eval()
    size = cfg.resolution
    print(
        f"VQGAN {preset}: {size}x{size} -> {cfg.grid_size}x{cfg.grid_size} codes, "
        f"{sum(p.numel() for p in vqgan.parameters()) / 1e6:.1f}M parameters, {device}, "
        f"{torch.get_num_threads()} torch threads, {n} images, batch {batch}"
    )
    info = machine_info(device)
    model = bench_model(vqgan, n, batch, size, device)
    print(
        f"model only : {model['images_per_s']:8.2f} images/s ({model['images']} in {model['seconds']}s)"
    )
    pipe = bench_pipeline(vqgan, n, batch, size, args.threads)
    print(
        f"pipeline   : {pipe['images_per_s']:8.2f} images/s ({pipe['images']} in {pipe['seconds']}s, "
        f"JPEG decode + resize + encode + write)"
    )
    if hasattr(os, "getloadavg"):
        info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "bench_encode",
        "vqgan_preset": preset,
        "resolution": size,
        "grid_size": cfg.grid_size,
        "batch_size": batch,
        "dtype": "float32",
        "model_only": model,
        "pipeline": pipe,
        "machine": info,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    merge_results(args.output, preset, record)  # keep the other preset's figures
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
