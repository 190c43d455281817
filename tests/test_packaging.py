"""What `pip install dallemini` gives without extras: `generate`, `--help` and `--version` work, and a
command that needs an extra ([serve], [train]) says which one in one line, exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from PIL import Image

import dallemini
from dallemini.errors import ConfigError
from dallemini.extras import EXTRAS, add_stand_in, extra_of, missing_extra, needs_extra

ROOT = Path(__file__).resolve().parent.parent

# The extras' modules that generating images must not need.
BLOCKED = (
    "fastapi",
    "uvicorn",
    "starlette",
    "prometheus_client",
    "tensorboardX",
    "pyarrow",
    "transformers",
    "wandb",
)

# Runs `dallemini ARGS` with the modules in BLOCKED refused, as if they were not installed.
_WITHOUT_EXTRAS = """
import importlib.abc
import sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
sys.argv = ["dallemini", *sys.argv[1:]]
from dallemini.cli import main
main()
"""


def without_extras(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`dallemini ARGS` in a fresh interpreter that cannot import the extras' modules."""
    code = f"BLOCKED = {BLOCKED!r}\n{_WITHOUT_EXTRAS}"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_generate_needs_no_extra(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prompt = "strawberry on a blue background, top left"
    r = without_extras("generate", "--n", "1", "--seed", "0", "--out", out, prompt)
    assert r.returncode == 0, r.stderr
    with Image.open(out / "000-000.png") as im:
        assert im.format == "PNG" and im.text["prompt"] == prompt and im.text["seed"] == "0"
    assert json.loads((out / "generation.json").read_text())["images"][0]["seed"] == 0


def test_serve_without_its_extra_says_which_to_install() -> None:
    r = without_extras("serve", "--port", "8123")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: serve needs the [serve] extra: pip install 'dallemini[serve]'"
    ]


def test_help_and_version_need_no_extra() -> None:
    r = without_extras("--help")
    assert r.returncode == 0, r.stderr
    assert "generate" in r.stdout and "serve" in r.stdout
    r = without_extras("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"dallemini {dallemini.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", dallemini.__version__)


def test_tensorboard_logging_without_the_train_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dallemini.training.tracker import Tracker

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX now fails
    with pytest.raises(ConfigError, match=re.escape("pip install 'dallemini[train]'")):
        Tracker(tmp_path, total_steps=1, progress=False)
    Tracker(tmp_path, total_steps=1, tensorboard=False, progress=False).close()


def test_parquet_source_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dallemini.data.sources import ParquetSource

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"reading Parquet files needs the \[train\] extra"):
        ParquetSource([tmp_path / "part-00000.parquet"])


def test_extras_helpers() -> None:
    assert extra_of(ModuleNotFoundError("x", name="uvicorn.config")) == "serve"
    assert extra_of(ModuleNotFoundError("x", name="pyarrow")) == "train"
    assert extra_of(ModuleNotFoundError("x", name="numpy")) is None
    assert str(missing_extra("train", "train")) == (
        "train needs the [train] extra: pip install 'dallemini[train]'"
    )
    with pytest.raises(ModuleNotFoundError), needs_extra("x"):  # not an extra's: left alone
        raise ModuleNotFoundError("x", name="numpy")
    app = typer.Typer()
    add_stand_in(app, "train", "train", "Train.")
    add_stand_in(app, "other", "train", "Other.")
    with pytest.raises(ConfigError, match=r"train needs the \[train\] extra"):
        app(["train", "--lr", "1", "data/", "--help"], standalone_mode=False)


def test_pyproject_extras_and_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    meta = project["project"]

    def names(requirements: list[str]) -> set[str]:
        return {
            re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("-", "_")  # type: ignore[union-attr]
            for r in requirements
        }

    core = names(meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert "torch>=2.6" in meta["dependencies"]
    for extra, modules in EXTRAS.items():
        listed = names(extras[extra])
        for module in modules:
            if module != "starlette":  # comes with fastapi
                assert module.lower() in listed, (extra, module)
                assert module.lower() not in core, (extra, module)
    assert "dallemini[serve,train,clip,wandb]" in extras["dev"]
    assert set(meta["urls"]) >= {"Homepage", "Documentation", "Issues"}
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["dallemini"]
    assert (ROOT / "dallemini" / "py.typed").is_file()


def test_the_cli_does_not_import_distributed_training_machinery() -> None:
    # torch.distributed.checkpoint and fsdp take about a second to import (sympy): a command that
    # does not train must not pay for them.
    code = (
        "import sys, dallemini.cli\n"
        "print(sorted(m for m in ('torch.distributed.checkpoint', 'torch.distributed.fsdp', 'sympy')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
