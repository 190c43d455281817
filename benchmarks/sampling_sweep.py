"""Accuracy against variety of a model's sampling settings, judged on held-out emoji-scenes captions.

For each (temperature, top-k, condition scale) it runs `dallemini.emoji.evaluation.evaluate_model`
on `--limit` captions × `--candidates` images of each split (default: the built-in model,
heldout-triples and heldout-frames) and prints the judge's "all" for every image and for CLIP's
pick, the distinct images per caption and the share of captions with at least 3. Writes
benchmarks/results/sampling_sweep.json with the CPU model and load. `--keep-unknown-words` gives
the model prompts with the words it never saw (it reads them without those by default).

    python benchmarks/sampling_sweep.py
    python benchmarks/sampling_sweep.py --model runs/emoji/model --limit 512
    python benchmarks/sampling_sweep.py --settings 0.7/16/1.5 --keep-unknown-words --key as-written
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, merge_results
from dallemini.emoji.evaluation import evaluate_model, scenes_for_model
from dallemini.pipeline import TextToImage, default_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "sampling_sweep.json"
# (temperature, top_k, condition_scale); the first is the built-in model's default
SETTINGS = [
    (0.7, 16, 1.5),
    (0.7, 8, 1.5),
    (0.7, 4, 1.5),
    (0.5, 16, 1.5),
    (1.0, 16, 1.5),
    (0.7, 16, 1.0),
    (0.7, 16, 3.0),
]


def setting(text: str) -> tuple[float, int, float]:
    """T/K/C (temperature, top-k, condition scale) as a settings tuple."""
    try:
        t, k, cs = text.split("/")
        return float(t), int(k), float(cs)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TEMPERATURE/TOP_K/SCALE, got {text!r}"
        ) from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="model directory (default: built-in)")
    p.add_argument("--splits", nargs="+", default=["heldout-triples", "heldout-frames"])
    p.add_argument("--limit", type=int, default=128)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument(
        "--settings", nargs="+", type=setting, default=SETTINGS, help="T/K/C each (default: a set)"
    )
    p.add_argument("--key", default=None, help="results key (default: builtin or the model path)")
    p.add_argument(
        "--keep-unknown-words",
        action="store_true",
        help="give the model prompts with the words it never saw (by default it reads them without)",
    )
    args = p.parse_args()
    model = args.model or default_model_path()
    info = machine_info(torch.device("cpu"))
    print(f"{info['cpu']}, load {info.get('load_average_1m_before')}")
    pipe = TextToImage.from_pretrained(model, device="cpu")
    if args.keep_unknown_words:
        pipe.vocabulary = None  # read_prompt then leaves every word in
    scenes = scenes_for_model(model)
    base = pipe.config.sampling
    rows = []
    for t, k, cs in args.settings:
        pipe.config = replace(
            pipe.config, sampling=replace(base, temperature=t, top_k=k, condition_scale=cs)
        )
        row: dict = {"temperature": t, "top_k": k, "condition_scale": cs}
        line = f"temperature {t}, top-k {k}, condition scale {cs}:"
        for split in args.splits:
            r = evaluate_model(
                pipe, scenes, split, limit=args.limit, candidates=args.candidates, seed=0
            )
            v = r["variety"]
            row[split] = {
                "all": r["model"]["all"],
                "reranked": r["reranked"]["all"] if "reranked" in r else None,
                "distinct_mean": v["distinct_mean"],
                "share_at_least_3": v["share_at_least_3"],
            }
            line += (
                f" {split}: all {r['model']['all']:.3f}, reranked {row[split]['reranked']:.3f},"
                f" distinct {v['distinct_mean']:.2f}, >=3 {v['share_at_least_3']:.2f};"
            )
        rows.append(row)
        print(line, flush=True)
    info["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    record = {
        "benchmark": "sampling_sweep",
        "model": str(model),
        "captions": args.limit,
        "candidates": args.candidates,
        "unknown_words": "kept" if args.keep_unknown_words else "left out",
        "rows": rows,
        "machine": info,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    key = args.key or ("builtin" if args.model is None else str(args.model))
    merge_results(RESULTS, key, record)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
