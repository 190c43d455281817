"""The trainer commands `train`, `train-vqgan` and `train-clip`, built from their config dataclasses:
every field made with `loop.option` is an option (left out: the config file's or the default value),
next to --config FILE and --set key=value. `mount(app)` adds them to the `dallemini` app."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from ..cli_options import ThreadsOpt
from ..extras import add_stand_in, extra_of
from ..threads import apply_threads
from . import trainer_class
from .distributed import shutdown
from .loop import TrainConfig
from .settings import load_config, parse_overrides

# command -> (trainer kind, help), in the order `dallemini --help` lists them
COMMANDS = {
    "train-clip": (
        "clip",
        "Train or fine-tune the built-in small CLIP reranker on caption–image pairs (resumable; DDP "
        "under torchrun).",
    ),
    "train": (
        "seq2seq",
        "Train DalleBart on encoded shards (resumable; data-parallel under torchrun).",
    ),
    "train-vqgan": (
        "vqgan",
        "Train or fine-tune a VQGAN on images (L1 + perceptual + codebook + patch-GAN; resumable, "
        "DDP under torchrun).",
    ),
}

_KEYWORD = inspect.Parameter.KEYWORD_ONLY
# The options every trainer command takes besides its config's fields.
COMMON = (
    inspect.Parameter(
        "config",
        _KEYWORD,
        default=None,
        annotation=Annotated[
            Path | None, typer.Option("--config", help="YAML or JSON file of settings (see --set)")
        ],
    ),
    inspect.Parameter(
        "set_",
        _KEYWORD,
        default=None,
        annotation=Annotated[
            list[str] | None,
            typer.Option(
                "--set", help="override any setting: --set lr=0.001 --set bart.d_model=256"
            ),
        ],
    ),
    inspect.Parameter("threads", _KEYWORD, default=None, annotation=ThreadsOpt),
)


def option_metadata(cls: type, name: str) -> Mapping[str, Any] | None:
    """The `loop.option` metadata of a config field, from the nearest class declaring it with some
    (a subclass that only changes a field's default keeps its option); None: not an option."""
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata.get("cli"):
            return field.metadata
    return None


def config_options(cls: type[TrainConfig]) -> list[inspect.Parameter]:
    """One keyword parameter per option field of a config class, default None (= not given): the
    trainer's own fields first, then the ones every trainer shares, each in declaration order."""
    hints = typing.get_type_hints(cls)
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    params = []
    for field in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared):
        meta = option_metadata(cls, field.name)
        if meta is None:
            continue
        hint = hints[field.name]
        flags = [meta["flag"]] if meta.get("flag") else []
        if hint is bool and not flags:
            flags = ["--" + field.name.replace("_", "-")]  # a flag alone: no --no-... form
        option = typer.Option(*flags, help=meta["help"])
        params.append(
            inspect.Parameter(
                field.name, _KEYWORD, default=None, annotation=Annotated[hint | None, option]
            )
        )
    return params


def fit(kind: str, options: dict[str, Any]) -> None:
    """Build a trainer from --config + --set overrides + the explicit options (which win) and run it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dict(options)
    config, sets = options.pop("config"), options.pop("set_")
    apply_threads(options.pop("threads"))
    cls = trainer_class(kind)
    overrides = parse_overrides(sets)
    overrides.update({k: v for k, v in options.items() if v is not None})
    trainer = cls(load_config(cls.config_class, config, overrides))
    try:
        trainer.fit()
    finally:
        shutdown()


def trainer_command(kind: str, help: str) -> Callable[..., None]:
    """The command function of a trainer kind: its signature lists the config's options (typer reads
    them from it), and calling it runs `fit`."""

    def command(**options: Any) -> None:
        fit(kind, options)

    command.__doc__ = help
    params = [*config_options(trainer_class(kind).config_class), *COMMON]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


def mount(app: typer.Typer) -> None:
    """Add the trainer commands (`train-clip`, `train`, `train-vqgan`) to the `dallemini` app; without
    the [train] extra they are stand-ins that say how to install it."""
    for name, (kind, help) in COMMANDS.items():
        try:
            # optional extra [train]: the trainers import pyarrow (token shards) and tensorboardX
            command = trainer_command(kind, help)
        except ImportError as e:
            extra = extra_of(e)
            if extra is None:
                raise
            add_stand_in(app, name, extra, help)
            continue
        app.command(name)(command)
