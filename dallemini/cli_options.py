"""Command-line options that several `dallemini` commands share (typer `Annotated` types)."""

from __future__ import annotations

from typing import Annotated

import typer

ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="CPU threads (default: $DALLEMINI_THREADS, else the CPUs this process may use: its "
        "affinity and cgroup quota)"
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
VqganDtypeOpt = Annotated[
    str,
    typer.Option(
        help="the VQGAN decoder's dtype: bfloat16 about halves its time on CPUs with avx512_bf16 "
        "and on GPUs (pixels a few levels off float32's)"
    ),
]
ImageStoreOpt = Annotated[
    str | None,
    typer.Option(
        help="keep the PNGs of response='url' requests in this directory (created if missing) "
        "instead of memory: replicas that share it serve each other's images"
    ),
]
