"""One `dallemini generate` run once its options are checked: the prompts are sampled in groups and
each group's PNGs, grids and the generation.json record are written as soon as it finishes, whole
(Ctrl-C waits for the files and then stops the run, keeping what is done). Each PNG carries its
prompt, seed and settings as text chunks."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from . import __version__
from .config import SamplingConfig
from .errors import InputError
from .files import atomic_write, atomic_write_json
from .images import make_grid
from .pipeline import GeneratedImage, TextToImage


class Interrupted(Exception):
    """Ctrl-C stopped a command after it kept what had finished; the CLI prints it and exits 130."""


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold Ctrl-C while files are written: it takes effect (KeyboardInterrupt) once the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)


# The files a run writes: images NNN-MMM.png, grids grid-NNN.png and generation.json.
_RUN_FILE = re.compile(r"(\d{3,}-\d{3,}|grid-\d{3,})\.png|generation\.json")


def earlier_run_files(out: Path) -> list[Path]:
    """The images, grids and generation.json an earlier run left in a folder (none: [])."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if _RUN_FILE.fullmatch(p.name) and p.is_file())


def png_info(fields: dict[str, Any]) -> PngInfo:
    """PNG text chunks: one per field (strings as they are, anything else as JSON) and all of them
    as JSON `parameters`."""
    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            text = value if isinstance(value, str) else json.dumps(value)  # True: "true"
            info.add_text(key, text)  # iTXt (UTF-8) where the text is not Latin-1
    info.add_text("parameters", json.dumps(fields, ensure_ascii=False))
    info.add_text("Software", f"dallemini {__version__}")
    return info


def save_png(image: Any, path: Path, info: PngInfo | None = None) -> None:
    """Write an image as a PNG, with text chunks if given, whole or not at all."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def prompt_groups(prompts: int, n: int, max_batch: int | None) -> list[range]:
    """Prompts sampled together: all at once, or as many whole prompts as fit in max_batch images."""
    per = prompts if max_batch is None else max(1, max_batch // n)
    return [range(i, min(i + per, prompts)) for i in range(0, prompts, per)]


@dataclass
class GenerateRun:
    """The prompts, how they are sampled, where the images go, and the record of what was written."""

    pipe: TextToImage
    texts: list[str]
    n: int  # images per prompt
    first: int  # image k of the run uses seed first + k
    out: Path
    settings: SamplingConfig
    rerank: bool
    image: Image.Image | None  # --init-image
    keep_rows: int
    max_batch: int | None
    overwrite: bool = False  # replace an earlier run's files in `out` (removed at the first write)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def reranked(self) -> bool:
        return self.rerank and self.pipe.scorer is not None

    def start_record(self, model: str | Path, clip: str | None, init_image: Path | None) -> None:
        """generation.json's settings; each image is added as its group finishes."""
        pipe = self.pipe
        init = None
        if self.image is not None:
            init = {"file": str(init_image), "size": list(self.image.size)}
        self.record = {
            "model": str(model),
            "settings": self.settings.to_dict(),
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "vqgan_dtype": str(next(pipe.vqgan.parameters()).dtype).removeprefix("torch."),
            "clip": None
            if pipe.scorer is None
            else (str(clip) if clip is not None else "built-in"),
            "rerank": self.reranked,
            "init_image": None if init is None else {**init, "keep_rows": self.keep_rows},
            "max_batch": self.max_batch,
            "threads": torch.get_num_threads(),
            "images": [],
        }

    def sample(self) -> None:
        """Sample the prompts in groups (whole prompts, at most max_batch images each) and write each
        group when it finishes. Image k of the run still uses seed first + k: the images of one call."""
        groups = prompt_groups(len(self.texts), self.n, self.max_batch)
        cfg = self.pipe.config
        steps = cfg.bart.image_length - self.keep_rows * cfg.vqgan.grid_size
        per_call = self.max_batch or len(self.texts) * self.n
        chunks = [-(-len(group) * self.n // per_call) for group in groups]
        bar = None
        if sys.stderr.isatty():
            bar = tqdm(desc="sampling", unit="step", dynamic_ncols=True, total=sum(chunks) * steps)
        base = 0

        def progress(done: int, total: int) -> None:
            bar.update(base + done - bar.n)

        try:
            for group, chunk_count in zip(groups, chunks, strict=True):
                results = self.pipe(
                    [self.texts[i] for i in group],
                    num_images=self.n,
                    seed=self.first + group.start * self.n,
                    rerank=self.rerank,
                    init_image=self.image,
                    keep_rows=self.keep_rows,
                    max_batch=self.max_batch,
                    progress=progress if bar is not None else None,
                    sampling=self.settings,
                )
                base += chunk_count * steps
                self.write(group, results)
        except KeyboardInterrupt:
            kept = len(self.record["images"])
            if not kept:
                raise Interrupted("no image had finished: nothing was written") from None
            raise Interrupted(f"kept {kept} finished images in {self.out}") from None
        finally:
            if bar is not None:
                bar.close()

    def png_fields(self, prompt: str) -> dict[str, Any]:
        """What a PNG of a prompt records besides its seed: the settings that made it."""
        rec = self.record
        return {
            "prompt": prompt,
            "model": rec["model"],
            **rec["settings"],
            "clip": rec["clip"],
            "rerank": rec["rerank"],
            "init_image": rec["init_image"],
            "dtype": rec["dtype"],
            "vqgan_dtype": rec["vqgan_dtype"],
            "dallemini": __version__,
        }

    def write(self, group: range, results: list[list[GeneratedImage]]) -> None:
        """A finished group's images and grids, and the record so far: each file whole."""
        out = self.out
        with sigint_held():
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot make the output folder {out}: {e}") from e
            if self.overwrite and not self.record["images"]:
                for earlier in earlier_run_files(out):  # the new run's first files replace them
                    earlier.unlink(missing_ok=True)
            for i, per_prompt in zip(group, results, strict=True):
                fields = self.png_fields(self.texts[i])
                for j, r in enumerate(per_prompt):
                    name = f"{i:03d}-{j:03d}.png"
                    image_fields = {"prompt": r.prompt, "seed": r.seed, **fields, "score": r.score}
                    save_png(r.image, out / name, png_info(image_fields))
                    self.record["images"].append(
                        {"file": name, "prompt": r.prompt, "seed": r.seed, "score": r.score}
                    )
                grid = f"grid-{i:03d}.png"
                seeds = [r.seed for r in per_prompt]
                grid_info = png_info({"prompt": fields["prompt"], "seeds": seeds, **fields})
                save_png(make_grid([r.image for r in per_prompt]), out / grid, grid_info)
                order = " (best first)" if self.reranked else ""
                typer.echo(f"{self.texts[i]!r}: {len(per_prompt)} images{order}, grid {out / grid}")
            atomic_write_json(out / "generation.json", self.record)
