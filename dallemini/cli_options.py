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
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="the DalleBart's dtype: float32, bfloat16, float16, or int8 (8-bit weights, float32 "
        "activations)"
    ),
]
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

# ---- `serve` -------------------------------------------------------------------------------------
HostOpt = Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")]
PortOpt = Annotated[int, typer.Option(help="TCP port")]
ServeClipOpt = Annotated[
    str | None,
    typer.Option(
        help="reranker: `clip`, another Hub CLIP, a Hugging Face CLIP folder or a model dir "
        "with a built-in CLIP"
    ),
]
BatchingOpt = Annotated[
    str,
    typer.Option(
        help="continuous: requests join the running decoder batch at every step, with any "
        "settings; request: requests with equal settings share a batch from start to end"
    ),
]
MaxBatchOpt = Annotated[int, typer.Option(help="images sampled together in one decoder batch")]
MaxWaitOpt = Annotated[
    float,
    typer.Option(help="request batching: how long a request waits for others to share its batch"),
]
MaxQueueOpt = Annotated[int, typer.Option(help="images waiting at most; past it requests get 429")]
TimeoutOpt = Annotated[float, typer.Option(help="per request, queueing included; past it 504")]
MaxImagesOpt = Annotated[int, typer.Option(help="largest num_images of one request")]
DrainOpt = Annotated[
    float, typer.Option(help="on Ctrl-C/SIGTERM, seconds requests in flight may take")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        envvar="DALLEMINI_API_KEY",
        help="require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (env DALLEMINI_API_KEY)",
    ),
]
CacheImagesOpt = Annotated[
    int, typer.Option(help="PNGs of response='url' requests kept (memory or --image-store)")
]
