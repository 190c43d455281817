"""The optional extras (`pip install 'dallemini[serve]'`, `[train]`, ...): which packages each adds,
and the one-line error a command gives when the extra it needs is not installed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from .errors import ConfigError

# extra -> the top-level modules it installs (those the package imports)
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "starlette", "prometheus_client"),
    "train": ("tensorboardX", "pyarrow", "braceexpand"),
    "clip": ("transformers",),
    "wandb": ("wandb",),
}


def extra_of(error: ImportError) -> str | None:
    """The extra that installs the module an ImportError could not find, or None."""
    root = (error.name or "").split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if root in modules), None)


def missing_extra(what: str, extra: str) -> ConfigError:
    """The error of a command or feature whose extra is not installed."""
    return ConfigError(f"{what} needs the [{extra}] extra: pip install 'dallemini[{extra}]'")


@contextlib.contextmanager
def needs_extra(what: str) -> Iterator[None]:
    """Imports of optional modules in the block: one missing raises `missing_extra` naming its extra."""
    try:
        yield
    except ImportError as e:
        extra = extra_of(e)
        if extra is None:
            raise
        raise missing_extra(what, extra) from e


def add_stand_in(app: typer.Typer, name: str, extra: str, help: str) -> None:
    """Add a command `name` whose extra is not installed: whatever it is given, it says which to install."""

    def command() -> None:
        raise missing_extra(name, extra)

    command.__doc__ = f"{help} Needs the {extra} extra (not installed)."
    loose = {"allow_extra_args": True, "ignore_unknown_options": True}
    app.command(name, context_settings=loose, add_help_option=False)(command)
