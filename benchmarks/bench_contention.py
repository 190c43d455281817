"""The built-in model on a busy CPU: generation as a user runs it, idle and beside a busy process.

For 1 and 9 images, one child process per run loads the built-in model (TextToImage.from_pretrained())
and times `pipe(prompt, num_images=n)` (median of --repeats, after a warm-up), with the threads
`dallemini generate` chooses (all the CPUs it may use, tuned while it runs: `auto`) and with that
count fixed (`DALLEMINI_TUNE_THREADS=0`: `fixed`, the behaviour without tuning). Each runs once on
the idle machine and once beside a plain spinning process pinned to one core (the competitor of
bench_generate). Prints seconds per image and slowdowns, and writes
benchmarks/results/bench_contention.json with the CPU model and load.

    python benchmarks/bench_contention.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_generate import competitor
from benchmarks.common import machine_info, merge_results, run_child

RESULTS = Path(__file__).resolve().parent / "results" / "bench_contention.json"
PROMPT = "strawberry on a blue background, top left"


def child(images: int, repeats: int) -> None:
    """Time the built-in model in this process; print one RESULT line."""
    from dallemini.pipeline import TextToImage
    from dallemini.threads import apply_threads

    threads = apply_threads()
    pipe = TextToImage.from_pretrained()
    pipe(PROMPT, num_images=images, seed=0)  # warm-up (and the first thread probes)
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        pipe(PROMPT, num_images=images, seed=k)
        times.append(time.perf_counter() - t0)
    times.sort()
    out = {
        "images": images,
        "threads": threads,
        "seconds": times,
        "median_s": times[len(times) // 2],
    }
    print("RESULT " + json.dumps(out), flush=True)


def run(images: int, mode: str, busy: bool, repeats: int) -> dict:
    """One child run: `mode` auto (tuned) or fixed, idle or beside the competitor."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(images)]
    cmd += ["--repeats", str(repeats)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DALLEMINI_THREADS")}
    env["DALLEMINI_TUNE_THREADS"] = "1" if mode == "auto" else "0"
    with competitor(busy):
        return run_child(f"{mode} x{images}", cmd, env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="+", type=int, default=[1, 9])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.repeats)
        return
    info = machine_info(torch.device("cpu"))
    print(f"{info['cpu']}, load {info.get('load_average_1m_before')}")
    rows = []
    for n in args.images:
        for mode in ("auto", "fixed"):
            row: dict = {"images": n, "mode": mode}
            for busy in (False, True):
                out = run(n, mode, busy, args.repeats)
                key = "contended" if busy else "idle"
                row[f"{key}_s_per_image"] = round(out["median_s"] / n, 4)
                row[f"{key}_host_cpu"] = out.get("host_cpu")
                row["threads"] = out["threads"]
            row["slowdown"] = round(row["contended_s_per_image"] / row["idle_s_per_image"], 2)
            rows.append(row)
            print(
                f"  {mode:5s} x{n}: idle {row['idle_s_per_image']:.3f} s/image, beside a busy core "
                f"{row['contended_s_per_image']:.3f} s/image ({row['slowdown']:.2f}x)"
            )
    info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "bench_contention",
        "model": "built-in",
        "prompt": PROMPT,
        "repeats": args.repeats,
        "rows": rows,
        "machine": info,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    merge_results(RESULTS, "builtin", record)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
