"""The `encode` command (a caption–image dataset into VQGAN token shards), mounted by `mount`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..cli_options import DeviceOpt, DtypeOpt, ThreadsOpt
from ..extras import needs_extra
from ..models.loading import load_vqgan
from ..threads import apply_threads


def mount(app: typer.Typer) -> None:
    """Add `encode` to the `dallemini` app."""
    app.command()(encode)


def encode(
    src: Annotated[
        str,
        typer.Argument(
            help="image folder (+ .txt captions), webdataset .tar(s), parquet file(s), a glob, "
            "or URLs: s3://b/{00000..00099}.tar, https://…, hf://datasets/…, pipe:CMD"
        ),
    ],
    out: Annotated[
        str,
        typer.Argument(
            help="output folder (or s3:// / gs:// prefix) of parquet token shards + dataset.json"
        ),
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
    threads: ThreadsOpt = None,
) -> None:
    """Pre-encode a caption–image dataset into VQGAN token shards (resumable; split with --shard i/n or torchrun)."""
    with needs_extra("encode"):
        # optional extra [train]: the token shards are Parquet files written with pyarrow
        from .encode import check_has_records, encode_dataset, parse_worker, worker_from_env
        from .sources import open_source
    apply_threads(threads)
    worker = parse_worker(shard) if shard else worker_from_env()
    if device == "auto" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    source = open_source(src, kind, image_column=image_column, caption_column=caption_column)  # type: ignore[arg-type]
    check_has_records(source)  # before loading the model
    vq = load_vqgan(model, device=device, dtype=dtype)
    result = encode_dataset(
        source, out, vq, batch_size=batch_size, shard_size=shard_size, worker=worker
    )
    typer.echo(result.summary())
