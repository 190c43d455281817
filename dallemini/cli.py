"""The `dallemini` command line: generate, convert, create (a random model directory), info."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import DalleMiniError, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DALL·E Mini in PyTorch: generate images from text, convert checkpoints, train and serve.",
    pretty_exceptions_enable=False,
)

DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]


@app.command()
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="one or more prompts")] = None,
    model: Annotated[
        Path | None, typer.Option(help="model directory or a foreign checkpoint")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="text file with one prompt per line")
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="images per prompt")] = 4,
    seed: Annotated[int | None, typer.Option(help="seed; image k of the run uses seed + k")] = None,
    temperature: Annotated[float | None, typer.Option(help="softmax temperature (> 0)")] = None,
    top_k: Annotated[
        int | None, typer.Option(help="keep the k most likely tokens (0 = all)")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass in (0, 1]")] = None,
    condition_scale: Annotated[
        float | None, typer.Option(help="super-conditioning scale (1 = off)")
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("out"),
    vqgan: Annotated[Path | None, typer.Option(help="separate VQGAN checkpoint")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Generate images for prompts: one PNG per image, a grid per prompt and a JSON record of the run."""
    from .pipeline import TextToImage, make_grid

    texts = list(prompts or [])
    if prompt_file is not None:
        try:
            texts += [line.strip() for line in prompt_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise InputError(f"cannot read prompt file {prompt_file}: {e}") from e
    if not texts:
        raise InputError("no prompt given: pass prompts as arguments or --prompt-file FILE")
    if any(not t.strip() for t in texts):
        raise InputError("empty prompt given")
    if not 1 <= n <= 1024:
        raise InputError(f"--n must be between 1 and 1024, got {n}")
    if model is None:
        raise InputError(
            "no model given: pass --model DIR (a model directory or a checkpoint to convert)"
        )
    pipe = TextToImage.from_pretrained(model, device=device, dtype=dtype, vqgan=vqgan)
    settings = pipe.sampling(
        temperature=temperature, top_k=top_k, top_p=top_p, condition_scale=condition_scale
    )
    out.mkdir(parents=True, exist_ok=True)
    results = pipe(texts, num_images=n, seed=seed, **settings.to_dict())
    record = {
        "model": str(model),
        "settings": settings.to_dict(),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "images": [],
    }
    for i, per_prompt in enumerate(results):
        for j, r in enumerate(per_prompt):
            name = f"{i:03d}-{j:03d}.png"
            r.image.save(out / name)
            record["images"].append(
                {"file": name, "prompt": r.prompt, "seed": r.seed, "score": r.score}
            )
        grid = f"grid-{i:03d}.png"
        make_grid([r.image for r in per_prompt]).save(out / grid)
        typer.echo(f"{texts[i]!r}: {len(per_prompt)} images, grid {out / grid}")
    (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n")


@app.command()
def convert(
    src: Annotated[
        Path, typer.Argument(help="min-dalle folder, Flax model folder, taming .ckpt, or model dir")
    ],
    dst: Annotated[Path, typer.Argument(help="output model directory")],
    vqgan: Annotated[
        Path | None, typer.Option(help="VQGAN checkpoint to add (Flax folder, taming .ckpt, ...)")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json or folder with vocab.json + merges.txt")
    ] = None,
    heads: Annotated[
        int | None, typer.Option(help="attention heads, if not d_model/64 (min-dalle)")
    ] = None,
    taming_config: Annotated[
        Path | None, typer.Option(help="YAML config of a taming .ckpt")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace dst if it exists")] = False,
) -> None:
    """Convert a checkpoint people already have into a dallemini model directory."""
    from .checkpoints import convert as do_convert

    path = do_convert(
        src,
        dst,
        vqgan=vqgan,
        tokenizer=tokenizer,
        attention_heads=heads,
        taming_config=taming_config,
        overwrite=overwrite,
    )
    typer.echo(f"wrote {path}")


@app.command()
def create(
    dst: Annotated[Path, typer.Argument(help="output model directory")],
    preset: Annotated[str, typer.Option(help="tiny, mini or mega")] = "tiny",
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace dst if it exists")] = False,
) -> None:
    """Write a model directory with randomly initialised weights (a starting point for training, or a smoke test)."""
    from .random_model import create_random_model

    path = create_random_model(dst, preset=preset, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {path} (random weights: its images are noise until it is trained)")


@app.command()
def encode(
    src: Annotated[
        str,
        typer.Argument(
            help="image folder (+ .txt captions), webdataset .tar(s), parquet file(s) or a glob"
        ),
    ],
    out: Annotated[
        Path, typer.Argument(help="output folder of parquet token shards + dataset.json")
    ],
    model: Annotated[
        Path, typer.Option(help="model directory or VQGAN checkpoint whose encoder to use")
    ],
    kind: Annotated[str, typer.Option(help="auto, folder, tar or parquet")] = "auto",
    image_column: Annotated[
        str | None, typer.Option(help="parquet column with image bytes")
    ] = None,
    caption_column: Annotated[str | None, typer.Option(help="parquet column with captions")] = None,
    batch_size: Annotated[int, typer.Option(help="images per VQGAN batch")] = 32,
    shard_size: Annotated[int, typer.Option(help="source records per output shard")] = 10_000,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n: encode only shards k with k % n == i (default: torchrun rank)"),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Pre-encode a caption–image dataset into VQGAN token shards (resumable; split with --shard i/n or torchrun)."""
    import os

    import torch

    from .data.encode import encode_dataset, parse_worker, worker_from_env
    from .data.sources import open_source
    from .pipeline import load_vqgan

    worker = parse_worker(shard) if shard else worker_from_env()
    if device == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    vq = load_vqgan(model, device=device, dtype=dtype)
    source = open_source(src, kind, image_column=image_column, caption_column=caption_column)  # type: ignore[arg-type]
    result = encode_dataset(
        source, out, vq, batch_size=batch_size, shard_size=shard_size, worker=worker
    )
    typer.echo(result.summary())


@app.command()
def info(path: Annotated[Path, typer.Argument(help="model directory or checkpoint")]) -> None:
    """Print the detected format and the configuration of a model."""
    from .checkpoints import detect_format, load_parts

    fmt = detect_format(path)
    parts = load_parts(path)
    typer.echo(
        json.dumps(
            {
                "format": fmt,
                "config": parts.config.to_dict(),
                "tokenizer": parts.tokenizer_json is not None,
            },
            indent=2,
        )
    )


def main() -> None:
    """Entry point: run the app; user errors print one line and exit 2, without a traceback."""
    try:
        app(standalone_mode=False)
    except DalleMiniError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown option, bad value) from click or typer's vendored copy of it.
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
