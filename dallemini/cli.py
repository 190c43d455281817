"""The `dallemini` command line: generate, convert, download, create (a random model directory),
serve and info; encode (data/cli.py), dataset emoji, eval, recipe emoji (emoji/cli.py) and the
trainers (training/cli.py) are mounted from their packages. Commands whose extra ([serve],
[train]) is not installed say which one to install."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .checkpoints import convert as convert_checkpoint
from .checkpoints import detect_format, hub, load_parts
from .cli_options import (
    ApiKeyOpt,
    BatchingOpt,
    CacheImagesOpt,
    DeviceOpt,
    DrainOpt,
    DtypeOpt,
    HostOpt,
    ImageStoreOpt,
    MaxBatchOpt,
    MaxImagesOpt,
    MaxQueueOpt,
    MaxWaitOpt,
    PortOpt,
    ServeClipOpt,
    ThreadsOpt,
    TimeoutOpt,
    VqganDtypeOpt,
)
from .config import PipelineConfig, SamplingConfig
from .data.cli import mount as mount_data
from .devices import resolve_dtype
from .errors import DalleMiniError, InputError
from .extras import add_stand_in, extra_of, needs_extra
from .generate_run import GenerateRun, Interrupted, earlier_run_files
from .memory import keep_freed_memory
from .pipeline import TextToImage, default_model_path, load_image
from .random_model import create_random_model
from .threads import apply_threads
from .training.cli import mount as mount_training

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="DALL·E Mini in PyTorch: generate images from text, convert checkpoints, train and serve.",
    pretty_exceptions_enable=False,
)

_MODEL_HELP = (
    "a model directory, a checkpoint, or a Hub name (mini, mega, min-dalle-mini, min-dalle-mega, "
    "owner/name[@revision]; downloaded and converted once); default: the built-in emoji-scenes model"
)
_BUILTIN_NOTE = (
    "using the built-in emoji-scenes model (--model DIR for another): it draws prompts like "
    "'strawberry on a blue background, top left' (emoji on 8 colours at 9 positions) and nothing "
    "else"
)
ModelOpt = Annotated[str | None, typer.Option(help=_MODEL_HELP)]
VqganOpt = Annotated[str | None, typer.Option(help="separate VQGAN: a path or a Hub name")]
DstArg = Annotated[Path, typer.Argument(help="output model directory")]
OverwriteOpt = Annotated[bool, typer.Option(help="replace dst if it exists")]
StoreDtypeOpt = Annotated[
    str | None,
    typer.Option(help="store the DalleBart in this dtype, convert: also int8 (default: its own)"),
]


def _print_version(value: bool) -> None:
    """--version: print the package version and exit."""
    if value:
        typer.echo(f"dallemini {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """DALL·E Mini in PyTorch: generate images from text, convert checkpoints, train and serve."""


def _model_or_builtin(model: str | None) -> str | Path:
    """The --model given (a path or a Hub name), else the built-in model directory (saying so)."""
    if model is not None:
        return model
    path = default_model_path()
    typer.echo(_BUILTIN_NOTE, err=True)
    return path


# TextToImage takes first seeds below this (image k of a prompt then uses first + k).
_SEED_END = 2**63 - 2**20


def _check_out_folder(out: Path, overwrite: bool) -> None:
    """--out must be a folder or a path one can be made at, without an earlier run's images unless
    --overwrite; checked before loading the model."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" ({path} is a file)"
                raise InputError(
                    f"--out {out} is not a folder{where}: give a folder for the images"
                )
            break
    if not overwrite and earlier_run_files(out):
        raise InputError(
            f"--out {out} already holds an earlier run's images and generation.json: give another "
            "--out folder, or --overwrite to replace them"
        )


def _native_grid(model: str | os.PathLike[str], vqgan: object) -> int | None:
    """The token grid side of a dallemini model directory, from its config.json alone (else None)."""
    if vqgan is not None:
        return None
    try:
        data = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        cfg = PipelineConfig.from_dict(data)
    except Exception:  # only a hint for early checks: loading reports what is really wrong
        return None
    return None if cfg.vqgan is None else cfg.vqgan.grid_size


def _read_prompts(prompts: list[str] | None, prompt_file: Path | None) -> list[str]:
    """The prompt arguments, then --prompt-file's lines: at least one, none empty."""
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
    return texts


def _check_counts(
    texts: list[str], n: int, seed: int | None, max_batch: int | None, init: bool, keep: bool
) -> None:
    """Check --num-images, --max-batch, --seed and that --init-image comes with --keep-rows."""
    if not 1 <= n <= 1024:
        raise InputError(f"--num-images (-n) must be between 1 and 1024, got {n}")
    if max_batch is not None and max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {max_batch}")
    if init != keep:
        raise InputError(
            "--init-image and --keep-rows go together: --init-image FILE --keep-rows K keeps the "
            "image's top K token rows and samples the rest"
        )
    seed_max = _SEED_END - 1 - n * (len(texts) - 1)
    if seed is not None and not 0 <= seed <= seed_max:
        raise InputError(
            f"--seed must be from 0 to {seed_max} (image k of the run uses seed + k), got {seed}"
        )


def _sampling_options(**options: float | None) -> dict[str, Any]:
    """The sampling options given (not None), checked before the model loads."""
    given = {k: v for k, v in options.items() if v is not None}
    SamplingConfig(**given)
    return given


def _check_keep_rows(keep_rows: int | None, model: str | Path, vqgan: str | None) -> None:
    """--keep-rows within the token grid, when the model's config.json tells the grid cheaply."""
    if keep_rows is None:
        return
    g = _native_grid(model, vqgan)
    if keep_rows < 0 or (g is not None and keep_rows > g):
        bound = f"{g} (the token grid is {g}x{g})" if g is not None else "the token grid's side"
        raise InputError(f"--keep-rows must be from 0 to {bound}, got {keep_rows}")


@app.command()
def generate(
    prompts: Annotated[list[str] | None, typer.Argument(help="one or more prompts")] = None,
    model: ModelOpt = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="text file with one prompt per line")
    ] = None,
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", "--n", help="images per prompt")
    ] = 4,
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
    overwrite: Annotated[
        bool,
        typer.Option(help="replace the images and generation.json of an earlier run in --out"),
    ] = False,
    vqgan: VqganOpt = None,
    clip: Annotated[
        str | None,
        typer.Option(
            help="reranker: `clip` (openai/clip-vit-base-patch32), another Hub CLIP, a Hugging Face "
            "CLIP folder or a model directory with a built-in CLIP (default: the model's own, if any)"
        ),
    ] = None,
    rerank: Annotated[
        bool, typer.Option("--rerank/--no-rerank", help="sort each prompt's images by CLIP score")
    ] = True,
    init_image: Annotated[
        Path | None, typer.Option(help="image to complete: its top --keep-rows token rows are kept")
    ] = None,
    keep_rows: Annotated[
        int | None,
        typer.Option(help="token rows of --init-image to keep, 0..grid (0 = plain generation)"),
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="sample at most N images at a time (same images)")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    vqgan_dtype: VqganDtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """Generate images for prompts: one PNG per image (best first when reranked, prompt, seed and settings in its text chunks), a grid per prompt, generation.json."""
    # What can be checked without the model is checked before loading it (minutes for big ones).
    texts = _read_prompts(prompts, prompt_file)
    apply_threads(threads)
    n = num_images
    _check_counts(texts, n, seed, max_batch, init_image is not None, keep_rows is not None)
    given = _sampling_options(
        temperature=temperature, top_k=top_k, top_p=top_p, condition_scale=condition_scale
    )
    _check_out_folder(out, overwrite)
    image = None if init_image is None else load_image(init_image)  # fail before loading a model
    model = _model_or_builtin(model)
    _check_keep_rows(keep_rows, model, vqgan)
    pipe = TextToImage.from_pretrained(
        model, device=device, dtype=dtype, vqgan=vqgan, clip=clip, vqgan_dtype=vqgan_dtype
    )
    if keep_rows == 0:
        typer.echo(
            "note: --keep-rows 0 keeps nothing of --init-image: this is plain generation", err=True
        )
    _note_unknown_words(pipe, texts)
    first = seed if seed is not None else secrets.randbelow(2**31)
    settings = pipe.sampling(**given)  # the model's defaults under the options given: one object
    run = GenerateRun(
        pipe, texts, n, first, out, settings, rerank, image, keep_rows or 0, max_batch, overwrite
    )
    run.start_record(model, clip, init_image)
    run.sample()


def _note_unknown_words(pipe: TextToImage, texts: list[str]) -> None:
    """Say which words of each prompt the model reads as others, and which it never saw in training."""
    whose = "the built-in model" if pipe.is_builtin else "this model"
    for text in texts:
        where = f" ({text!r})" if len(texts) > 1 else ""
        read = ", ".join(f"{a!r} as {b!r}" for a, b in pipe.read_prompt(text)[1])
        if read:
            typer.echo(f"note: {whose} reads {read}{where}", err=True)
        unknown = pipe.unknown_words(text)
        if unknown:
            reads = pipe.read_prompt(text)[0].strip()
            typer.echo(
                f"note: {whose} does not know: {', '.join(unknown)}{where}; it reads {reads!r}",
                err=True,
            )


@app.command()
def convert(
    src: Annotated[
        str,
        typer.Argument(
            help="min-dalle folder, Flax model folder, taming .ckpt, model dir, or a Hub name"
        ),
    ],
    dst: DstArg,
    vqgan: Annotated[
        str | None,
        typer.Option(help="VQGAN to add (Flax folder, taming .ckpt, ..., or a Hub name)"),
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
    overwrite: OverwriteOpt = False,
    dtype: StoreDtypeOpt = None,
) -> None:
    """Convert a checkpoint people already have into a dallemini model directory."""
    path = convert_checkpoint(
        src,
        dst,
        vqgan=vqgan,
        tokenizer=tokenizer,
        attention_heads=heads,
        taming_config=taming_config,
        overwrite=overwrite,
        dtype=None if dtype is None else resolve_dtype(dtype, weights=True),
    )
    typer.echo(f"wrote {path}")


@app.command()
def download(
    name: Annotated[
        str,
        typer.Argument(
            help="mini, mega, min-dalle-mini, min-dalle-mega, clip, or a Hub repo "
            "owner/name[@revision]"
        ),
    ],
    dtype: StoreDtypeOpt = None,
) -> None:
    """Download a Hub model (checking for a newer revision) and convert it once; print its folder."""
    if not hub.is_hub_name(name):
        raise InputError(
            f"{name!r} is not a Hub name: give one of {', '.join(hub.SHORT_NAMES)} or "
            "owner/name[@revision] (a local folder needs no download)"
        )
    dt = None if dtype is None else resolve_dtype(dtype)
    typer.echo(hub.local_path(name, dtype=dt, refresh=True))


@app.command()
def create(
    dst: DstArg,
    preset: Annotated[str, typer.Option(help="tiny, mini or mega")] = "tiny",
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a model directory with randomly initialised weights (a starting point for training, or a smoke test)."""
    path = create_random_model(dst, preset=preset, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {path} (random weights: its images are noise until it is trained)")


# The emoji commands without their extra: name -> help.
_EMOJI_COMMANDS = {
    "dataset": "Write a dataset (dataset emoji: the built-in model's emoji scenes).",
    "eval": "Judge a model's emoji-scene images.",
    "recipe": "Run a training recipe (recipe emoji: the built-in model's).",
}


def _mount_emoji(app: typer.Typer) -> None:
    """Add `dataset emoji`, `eval` and `recipe emoji`; without their extra, stand-ins naming it."""
    try:
        # optional extra [train]: the emoji commands' module imports the recipe's trainers and pyarrow
        from .emoji.cli import mount as mount_emoji
    except ImportError as e:
        extra = extra_of(e)
        if extra is None:
            raise
        for name, help in _EMOJI_COMMANDS.items():
            add_stand_in(app, name, extra, help)
        return
    mount_emoji(app)


mount_data(app)  # encode
_mount_emoji(app)  # dataset emoji, eval, recipe emoji
mount_training(app)  # train-clip, train, train-vqgan

T = TypeVar("T")


def _from_fields(cls: type[T], values: dict[str, Any]) -> T:
    """A dataclass made of the values named like its fields (the others are left out)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in values.items() if k in names})


@app.command()
def serve(
    model: ModelOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    clip: ServeClipOpt = None,
    vqgan: VqganOpt = None,
    batching: BatchingOpt = "continuous",
    max_batch_images: MaxBatchOpt = 16,
    max_wait_ms: MaxWaitOpt = 10.0,
    max_queue: MaxQueueOpt = 64,
    timeout_s: TimeoutOpt = 300.0,
    max_images: MaxImagesOpt = 16,
    drain_timeout_s: DrainOpt = 60.0,
    api_key: ApiKeyOpt = None,
    image_store: ImageStoreOpt = None,
    cache_images: CacheImagesOpt = 512,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    vqgan_dtype: VqganDtypeOpt = "float32",
    threads: ThreadsOpt = None,
) -> None:
    """Serve the model over HTTP: JSON API, server-sent events, the original demo's /generate and a web page."""
    with needs_extra("serve"):
        # optional extra [serve]: FastAPI and uvicorn
        from .serve.app import create_app
        from .serve.server import bind_socket
        from .serve.server import run as run_server
        from .serve.settings import ServeSettings
    settings = _from_fields(ServeSettings, {**locals(), "api_key": api_key or None})
    if not 0 < port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {port}")
    settings.check()  # before loading the model
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # access log: JSON lines
    apply_threads(threads)
    sock = bind_socket(host, port)  # a busy port fails here, before loading the model
    try:
        model = _model_or_builtin(model)
        application = create_app(
            model,
            settings,
            device=device,
            dtype=dtype,
            vqgan=vqgan,
            clip=clip,
            vqgan_dtype=vqgan_dtype,
        )
        typer.echo(
            f"serving {model} on http://{host}:{port} (Ctrl-C stops it gracefully)", err=True
        )
        run_server(application, host=host, port=port, sock=sock)
    finally:
        sock.close()


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="model directory, checkpoint or Hub name")],
) -> None:
    """Print a model's format, configuration and, for a Hub model, where it came from."""
    folder = hub.cached_folder(path)  # a Hub model must be downloaded first: info never fetches
    fmt = detect_format(folder)
    parts = load_parts(folder, lazy=True)  # nothing but the configs is read
    record = {
        "path": str(folder),
        "format": fmt,
        "config": parts.config.to_dict(),
        "tokenizer": parts.tokenizer_json is not None,
        "hashtag_word_list": parts.word_list is not None,
    }
    source = hub.describe(folder)
    if source is not None:
        record["source"] = source
    typer.echo(json.dumps(record, indent=2))


def main() -> None:
    """Entry point: run the app; user errors print one line and exit 2, without a traceback."""
    keep_freed_memory()  # generation steps and training steps allocate the same blocks again
    try:
        code = app(standalone_mode=False)
    except Interrupted as e:
        typer.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
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
    # Without standalone mode click returns exit codes instead of exiting: Ctrl-C comes back as 130.
    if code == 130:
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
