"""DalleBart training throughput on this machine, and how close it comes to the machine's own matmul FLOP/s.

Runs the real trainer step (`Seq2SeqTrainer.train_step`: forward, cross-entropy, backward, clipping, optimizer)
on synthetic encoded shards, for a tiny model and for the mini shape (12+12 layers, d 1024, 16 heads, GLU 2730,
64 text tokens -> 256 image tokens over 16,384 codes). FLOPs per step are counted once with
torch.utils.flop_counter on the same step; the peak is a large float32 (or --precision) matmul measured in
the same run. Prints the figures and writes them to benchmarks/results/bench_train.json.

    python benchmarks/bench_train.py                  # tiny + mini (a few steps; ~2 min on 2 CPU cores)
    python benchmarks/bench_train.py --only tiny
    python benchmarks/bench_train.py --device cuda --precision bfloat16 --mini-batch 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import competitor
from benchmarks.common import machine_info, matmul_peak, merge_results, sync
from dallemini.data.shards import MANIFEST_NAME, write_shard
from dallemini.threads import apply_threads
from dallemini.training.seq2seq import Seq2SeqConfig, Seq2SeqTrainer
from dallemini.training.settings import load_config

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.json"

SHAPES = {
    "tiny": {
        "bart": {
            "d_model": 256,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "attention_heads": 4,
            "ffn_dim": 512,
            "max_text_length": 32,
        },
        "grid": 8,
        "n_embed": 1024,
        "text_length": 32,
    },
    "mini": {
        "bart": {"encoder_vocab_size": 50264},
        "grid": 16,
        "n_embed": 16384,
        "text_length": 64,
    },
}


def write_data(folder: Path, rows: int, grid: int, n_embed: int) -> Path:
    """Random codes with varied captions: throughput does not depend on what is learned."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "tree", "car", "on", "a", "the", "green", "house", "boat"]
    captions = [" ".join(rng.choice(words, size=int(rng.integers(4, 12)))) for _ in range(rows)]
    codes = rng.integers(0, n_embed, size=(rows, grid * grid))
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(
        folder / "part-00000.parquet",
        [str(i) for i in range(rows)],
        captions,
        codes,
        n_embed=n_embed,
    )
    manifest = {
        "grid_size": grid,
        "n_embed": n_embed,
        "count": rows,
        "shards": [{"file": "part-00000.parquet", "rows": rows}],
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def bench_shape(
    name: str, args: argparse.Namespace, device: torch.device, work: Path
) -> dict[str, object]:
    """Time `args.steps` real trainer steps of one model shape after warm-up; count FLOPs of one step."""
    shape = SHAPES[name]
    batch = args.mini_batch or (16 if name == "tiny" else 2)
    data = write_data(work / f"data-{name}", 8 * batch, shape["grid"], shape["n_embed"])
    cfg = load_config(
        Seq2SeqConfig,
        None,
        {
            "data": str(data),
            "out": str(work / f"run-{name}"),
            "preset": "mini",
            "bart": shape["bart"],
            "text_length": shape["text_length"],
            "steps": 10_000,
            "batch_size": batch,
            "optimizer": args.optimizer,
            "precision": args.precision,
            "device": str(device),
            "tensorboard": False,
            "shuffle_buffer": 0,
        },
    )
    trainer = Seq2SeqTrainer(cfg)
    trainer.settle_threads()  # as `fit` does: one thread where other work holds a core
    params = sum(p.numel() for p in trainer.modules["model"].parameters())
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()  # also the warm-up
    flops = counter.get_total_flops()
    trainer.train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    tokens = batch * trainer.bart_config.image_length
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "parameters": params,
        "batch_size": batch,
        "image_tokens_per_sample": trainer.bart_config.image_length,
        "text_tokens_per_sample": shape["text_length"],
        "steps_timed": args.steps,
        "seconds_per_step": round(seconds, 4),
        "samples_per_s": round(batch / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / seconds,
        "peak_gpu_memory_bytes": peak_mem,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SHAPES), action="append", help="shape(s) to run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per shape")
    p.add_argument("--mini-batch", type=int, default=None, help="per-step batch (tiny 16, mini 2)")
    p.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument(
        "--competitor",
        action="store_true",
        help="also time each shape beside a process spinning on one core (the slowdown is recorded)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        apply_threads(args.threads)  # a chosen count: kept, not settled
    device = torch.device(args.device)
    info = machine_info(device)
    mm_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.precision
    ]
    peak = matmul_peak(device, mm_dtype, 2048 if device.type == "cpu" else 8192)
    print(f"{info['cpu']} / {device}: {torch.get_num_threads()} threads")
    print(f"matmul peak ({args.precision}): {peak / 1e9:10.1f} GFLOP/s")
    shapes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(SHAPES):
            r = bench_shape(name, args, device, Path(tmp))
            if args.competitor:
                with competitor(True):
                    busy = bench_shape(name, args, device, Path(tmp) / "busy")
                r["contended_seconds_per_step"] = busy["seconds_per_step"]
                r["contended_threads"] = busy["threads"]
                r["contended_slowdown"] = round(busy["seconds_per_step"] / r["seconds_per_step"], 2)
                print(
                    f"{name:5s} beside a busy core: {busy['seconds_per_step']:.3f} s/step "
                    f"({r['contended_slowdown']:.2f}x)"
                )
            r["fraction_of_matmul_peak"] = round(r["achieved_flops_per_s"] / peak, 3)
            shapes[name] = r
            print(
                f"{name:5s} ({r['parameters'] / 1e6:7.1f}M params, batch {r['batch_size']}): "
                f"{r['seconds_per_step']:8.3f} s/step  {r['samples_per_s']:8.2f} samples/s  "
                f"{r['tokens_per_s']:10.1f} image tokens/s  "
                f"{r['achieved_flops_per_s'] / 1e9:8.1f} GFLOP/s = {r['fraction_of_matmul_peak']:.0%} of matmul peak"
            )
    if hasattr(os, "getloadavg"):
        info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "bench_train",
        "optimizer": args.optimizer,
        "precision": args.precision,
        "matmul_peak_flops_per_s": peak,
        "shapes": shapes,
        "machine": info,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    key = f"{device.type}-{args.precision}" + ("-contention" if args.competitor else "")
    merge_results(args.output, key, record)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
