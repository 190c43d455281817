"""Quality of 8-bit DalleBart weights (dtype="int8", models/quant.py) against float32, teacher-forced.

1. The built-in model (or --model DIR) on held-out emoji-scenes captions (the heldout-triples split,
   captions as the evaluation makes them): each scene is rendered and encoded with the pipeline's
   VQGAN, and those tokens are fed teacher-forced. At every position the next-token distributions
   over the VQGAN codebook are compared with float32's: mean KL(float32 || variant) in nats (target
   <= 0.01 for int8), its largest value, top-1 agreement, and each model's cross-entropy on the true
   tokens. Variants: int8 as loaded (dtype="int8": encoder/decoder layers and the output head), int8
   with a float output head, int8 layers with bfloat16 activations, and a bfloat16 model for scale.
2. --accuracy N: the emoji judge's accuracy (dallemini.emoji.evaluation.evaluate_model) of the
   float32 and int8 pipelines on N held-out captions.
3. --random-shape mini|mega|tiny: a randomly initialised DalleBart of that shape on random captions
   and image tokens (--random-tokens positions): top-1 agreement and KL of float32 against int8
   (quantized in place after the float32 pass, so memory holds one model). mega needs ~11 GB and
   minutes per caption on 2 cores.

    python benchmarks/int8_quality.py                          # built-in model, 64 captions, mini
    python benchmarks/int8_quality.py --accuracy 64 --random-shape mega --random-captions 2
    python benchmarks/int8_quality.py --captions 4 --random-shape tiny   # a plumbing check

Writes benchmarks/results/int8_quality.json (with the CPU model and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info
from dallemini.config import preset
from dallemini.emoji.evaluation import evaluate_model, sample_scenes, scenes_for_model
from dallemini.models import kernels
from dallemini.models.bart import DalleBart
from dallemini.models.quant import quantizable_layers, quantize_
from dallemini.pipeline import TextToImage, default_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "int8_quality.json"
SPLIT = "heldout-triples"
KL_TARGET = 0.01  # nats, mean over captions and positions


@torch.inference_mode()
def teacher_forced(
    model: DalleBart, ids: Tensor, mask: Tensor, targets: Tensor, codes: int, chunk: int = 16
) -> Tensor:
    """Log-probabilities [N, L, codes] (float64) of the next token at every position, over the codebook."""
    out = []
    for s in range(0, ids.shape[0], chunk):
        logits = model(
            ids[s : s + chunk], mask[s : s + chunk], labels=targets[s : s + chunk]
        ).logits
        out.append(F.log_softmax(logits[..., :codes].double(), dim=-1))
    return torch.cat(out)


def compare(ref: Tensor, other: Tensor, targets: Tensor) -> dict[str, float]:
    """KL(ref || other) per position (mean, max), top-1 agreement, and both cross-entropies on targets."""
    kl = (ref.exp() * (ref - other)).sum(-1)
    t = targets[..., None]
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": (ref.argmax(-1) == other.argmax(-1)).double().mean().item(),
        "ce_float32": -ref.gather(-1, t).mean().item(),
        "ce_variant": -other.gather(-1, t).mean().item(),
    }


def builtin(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher-forced comparison on held-out emoji captions (section 1 of the module doc)."""
    path = args.model or default_model_path()
    ref = TextToImage.from_pretrained(path, device="cpu", dtype="float32")
    scenes = scenes_for_model(path)
    todo = sample_scenes(scenes, SPLIT, args.captions, args.seed)
    captions = [scenes.eval_caption(sc, SPLIT) for sc in todo]
    targets = ref.encode_images([scenes.render_scene(sc) for sc in todo])
    ids, mask = ref.text(captions)
    codes = ref.config.vqgan.n_embed
    base = teacher_forced(ref.bart, ids, mask, targets, codes)

    def load(dtype: str) -> DalleBart:
        return TextToImage.from_pretrained(path, device="cpu", dtype=dtype).bart

    # Fresh loads, not copies: accelerated models hold packed weights that cannot be deep-copied.
    head_float = load("float32")
    quantize_(head_float, quantizable_layers(head_float, lm_head=False))
    variants: dict[str, DalleBart] = {
        "int8 (layers + lm_head)": load("int8"),
        "int8 layers, float lm_head": head_float,
        "int8, bfloat16 activations": load("int8").to(torch.bfloat16),
        "bfloat16 (no int8)": load("bfloat16"),
    }
    rows = {}
    for name, model in variants.items():
        rows[name] = compare(base, teacher_forced(model, ids, mask, targets, codes), targets)
    return {
        "model": str(path),
        "split": SPLIT,
        "captions": len(captions),
        "positions": int(targets.shape[1]),
        "codebook": codes,
        "seed": args.seed,
        "variants": rows,
        "kl_target": KL_TARGET,
        "int8_meets_target": rows["int8 (layers + lm_head)"]["kl_mean"] <= KL_TARGET,
    }


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """The emoji judge's accuracy of the float32 and int8 pipelines (section 2)."""
    path = args.model or default_model_path()
    scenes = scenes_for_model(path)
    out = {}
    for dtype in ("float32", "int8"):
        pipe = TextToImage.from_pretrained(path, device="cpu", dtype=dtype)
        report = evaluate_model(
            pipe, scenes, SPLIT, limit=args.accuracy, candidates=args.candidates, seed=args.seed
        )
        out[dtype] = {k: report[k] for k in ("captions", "candidates", "model", "ceiling", "floor")}
        if "reranked" in report:
            out[dtype]["reranked"] = report["reranked"]
    return out


@torch.inference_mode()
def random_shape(args: argparse.Namespace) -> dict[str, Any]:
    """A random DalleBart of a preset shape, float32 against int8 (section 3)."""
    cfg = preset(args.random_shape).bart
    assert cfg is not None
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = kernels.accelerate(DalleBart(cfg).eval())
    n, t = args.random_captions, min(args.random_tokens, cfg.image_length)
    text_len = min(32, cfg.max_text_length)
    ids = torch.randint(0, cfg.encoder_vocab_size, (n, text_len), generator=g)
    mask = torch.ones_like(ids)
    targets = torch.randint(0, cfg.image_vocab_size, (n, t), generator=g)
    codes = cfg.image_vocab_size
    base = teacher_forced(model, ids, mask, targets, codes, chunk=1)
    quantize_(model)  # in place, layer by layer: one model in memory
    row = compare(base, teacher_forced(model, ids, mask, targets, codes, chunk=1), targets)
    return {
        "shape": args.random_shape,
        "parameters": cfg.param_count(),
        "captions": n,
        "text_tokens": text_len,
        "positions": t,
        "seed": args.seed,
        **row,
    }


def table(results: dict[str, Any]) -> list[str]:
    """The figures as text lines."""
    lines = []
    b = results.get("builtin")
    if b:
        lines.append(
            f"built-in model, {b['captions']} {b['split']} captions x {b['positions']} positions "
            f"(codebook {b['codebook']}), against float32:"
        )
        lines.append(
            f"  {'variant':28s} {'KL mean':>9s} {'KL max':>8s} {'top-1':>7s} {'CE f32':>7s} {'CE':>7s}"
        )
        for name, r in b["variants"].items():
            lines.append(
                f"  {name:28s} {r['kl_mean']:9.5f} {r['kl_max']:8.4f} {r['top1_agreement']:7.2%} "
                f"{r['ce_float32']:7.3f} {r['ce_variant']:7.3f}"
            )
        met = "met" if b["int8_meets_target"] else "NOT met"
        lines.append(f"  int8 target: mean KL <= {b['kl_target']} nats: {met}")
    a = results.get("accuracy")
    if a:
        lines.append("emoji judge accuracy ('all'), held-out captions:")
        for dtype, r in a.items():
            rr = f", reranked {r['reranked']['all']:.3f}" if "reranked" in r else ""
            lines.append(
                f"  {dtype:8s} model {r['model']['all']:.3f}{rr} (ceiling {r['ceiling']['all']:.3f}, "
                f"floor {r['floor']['all']:.3f}; {r['captions']} captions x {r['candidates']})"
            )
    r = results.get("random")
    if r:
        lines.append(
            f"random {r['shape']} DalleBart ({r['parameters'] / 1e9:.2f}B parameters), {r['captions']} "
            f"captions x {r['positions']} positions: top-1 agreement {r['top1_agreement']:.2%}, "
            f"KL mean {r['kl_mean']:.5f} (max {r['kl_max']:.4f})"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: built-in)")
    p.add_argument("--captions", type=int, default=64, help="held-out captions (teacher-forced)")
    p.add_argument("--accuracy", type=int, default=0, help="captions for the judge (0: skip)")
    p.add_argument("--candidates", type=int, default=2, help="images per caption for the judge")
    p.add_argument(
        "--random-shape",
        choices=["none", "tiny", "mini", "mega"],
        default="mini",
        help="random model",
    )
    p.add_argument("--random-captions", type=int, default=4)
    p.add_argument("--random-tokens", type=int, default=256, help="teacher-forced positions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(torch.device("cpu"))}
    results["builtin"] = builtin(args)
    if args.accuracy:
        results["accuracy"] = accuracy(args)
    if args.random_shape != "none":
        results["random"] = random_shape(args)
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print("\n".join(table(results)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
