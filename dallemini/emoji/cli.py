"""The emoji-scenes commands: `dataset emoji`, `eval` (the judge) and `recipe emoji`, mounted by `mount`."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image
from tqdm import tqdm

from ..checkpoints import hub
from ..errors import ConfigError, InputError
from ..pipeline import TextToImage
from ..training.settings import parse_overrides
from .evaluation import accuracy_table, evaluate_model, format_report, scenes_for_model
from .judge import EmojiJudge
from .recipe import run_recipe
from .scenes import SPLITS, EmojiScenes, write_emoji_dataset

DeviceOpt = Annotated[str, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]


def mount(app: typer.Typer) -> None:
    """Add the emoji commands to the `dallemini` app: `dataset emoji`, `eval`, `recipe emoji`."""
    app.add_typer(dataset_app, name="dataset")
    app.command("eval")(eval_)
    app.add_typer(recipe_app, name="recipe")


dataset_app = typer.Typer(
    no_args_is_help=True, help="Build a captioned image dataset as an image folder (+ .txt)."
)


def _parse_tier(tier: str) -> int | str:
    """An emoji tier option as EmojiScenes takes it: a subject count, or 'all'."""
    return int(tier) if tier.strip().isdigit() else tier.strip()


@dataset_app.command("emoji")
def dataset_emoji(
    out: Annotated[Path, typer.Argument(help="output folder (new or empty)")],
    tier: Annotated[str, typer.Option(help="subjects: 64, 256, any count, or all")] = "64",
    resolution: Annotated[int, typer.Option(help="image side in pixels")] = 64,
    subject_size: Annotated[
        int | None, typer.Option(help="emoji side in pixels (default: half the image side)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the splits and caption choice")] = 0,
    splits: Annotated[
        str, typer.Option(help="comma list of train, heldout-triples, heldout-colour, or all")
    ] = "all",
    captions_per_image: Annotated[
        int, typer.Option(help="captions per image (distinct templates), 1 to 6")
    ] = 2,
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it holds an emoji dataset written before")
    ] = False,
) -> None:
    """Write the emoji-scenes dataset: NNNNNN.png + NNNNNN.txt, metadata.jsonl and emoji_scenes.json."""
    names = [s.strip() for s in splits.split(",") if s.strip()]
    names = list(SPLITS) if "all" in names else names
    if not names or any(n not in SPLITS for n in names):
        raise ConfigError(f"--splits must list {', '.join(SPLITS)} or all, got {splits!r}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    replace = out.is_dir() and any(out.iterdir())
    if replace and not overwrite:
        raise InputError(
            f"{out} is not empty; pass --overwrite to replace it, or pick a new folder"
        )
    if replace and not (out / "emoji_scenes.json").is_file():
        raise InputError(
            f"{out} holds files that are not an emoji dataset; --overwrite only replaces a folder "
            "written by `dallemini dataset emoji`, so pick an empty or new folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        counts = write_emoji_dataset(
            tmp,
            tier=_parse_tier(tier),
            resolution=resolution,
            splits=names,
            captions_per_image=captions_per_image,
            seed=seed,
            subject_size=subject_size,
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for name, count in counts.items():
        typer.echo(f"{name}: {count} images")
    total = sum(counts.values())
    typer.echo(f"wrote {out}: {total} images, {total * captions_per_image} captions")


def _eval_items(folder: Path) -> tuple[str, list[tuple[Path, str]], dict[str, object] | None]:
    """What `eval --images` scores: (folder kind, [(image path, caption)], emoji_scenes.json or None)."""
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist or is not a folder")
    cfg = None
    if (folder / "emoji_scenes.json").is_file():
        try:
            cfg = json.loads((folder / "emoji_scenes.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{folder / 'emoji_scenes.json'} is not valid JSON: {e}") from e
    try:
        if (folder / "generation.json").is_file():
            kind = "generate"
            record = json.loads((folder / "generation.json").read_text(encoding="utf-8"))
            items = [(folder / r["file"], r["prompt"]) for r in record.get("images", [])]
        elif (folder / "metadata.jsonl").is_file():
            kind = "dataset"
            lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            items = [(folder / r["file"], r["captions"][0]) for r in rows if r.get("captions")]
        else:
            raise InputError(
                f"{folder} has neither generation.json (from `dallemini generate`) nor "
                "metadata.jsonl (from `dallemini dataset emoji`)"
            )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"cannot read the image list of {folder}: {e!r}") from e
    if not items:
        raise InputError(f"no captioned images listed in {folder}")
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} listed images are missing, e.g. {missing[0]}")
    return kind, items, cfg


def eval_(
    images: Annotated[
        Path | None,
        typer.Option(
            help="folder to score: an emoji dataset (`dallemini dataset emoji`) or the output "
            "folder of `dallemini generate`"
        ),
    ] = None,
    tier: Annotated[
        str | None, typer.Option(help="emoji tier of the captions, if the folder does not say")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="emoji scene side in pixels, if the folder does not say")
    ] = None,
    subject_size: Annotated[
        int | None, typer.Option(help="emoji side in pixels, if the folder does not say")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="dataset seed, if the folder does not say")
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="also write the report as JSON to FILE (- = stdout)"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="model (directory or Hub name) to generate for held-out captions and judge"
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="with --model: heldout-triples, heldout-colour, train or all")
    ] = "heldout-triples",
    limit: Annotated[
        int, typer.Option(help="with --model: captions sampled from the split (0 = all)")
    ] = 512,
    candidates: Annotated[
        int, typer.Option(help="with --model: images per caption (CLIP picks the best)")
    ] = 4,
    clip: Annotated[
        str | None,
        typer.Option(help="with --model: CLIP reranker, a path or Hub name (default: the model's)"),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Score images against their emoji-scenes captions with the judge: colour, position, subject, all.

    With --model, generate for a held-out split's captions and report the model beside the ceiling
    (its VQGAN's reconstructions), the floor (mismatched captions) and the CLIP reranking lift.
    """
    if model is not None:
        if images is not None:
            raise InputError("give --images DIR or --model DIR, not both")
        _eval_model(
            model,
            split,
            limit,
            candidates,
            clip,
            device,
            dtype,
            json_file,
            tier,
            resolution,
            subject_size,
            seed,
        )
        return

    if images is None:
        raise InputError(
            "nothing to score: pass --images DIR (a folder of images) or --model DIR (a model)"
        )
    kind, items, cfg = _eval_items(images)
    given = {"tier": tier, "resolution": resolution, "subject_size": subject_size, "seed": seed}
    given = {k: v for k, v in given.items() if v is not None}
    if "tier" in given:
        given["tier"] = _parse_tier(str(given["tier"]))
    if cfg is not None:
        clash = [f"--{k.replace('_', '-')}" for k, v in given.items() if cfg.get(k) != v]
        if clash:
            raise ConfigError(
                f"{' '.join(clash)} differ from {images / 'emoji_scenes.json'}, which fixes the "
                "dataset settings; leave them out"
            )
        scenes = EmojiScenes.from_config(cfg)
    else:
        scenes = EmojiScenes(
            given.get("tier", 64), given.get("resolution", 64), subject_size, given.get("seed", 0)
        )
    judge = EmojiJudge(scenes)
    for _, caption in items:  # every caption must parse before any image is scored
        judge.parse_caption(caption)

    def pairs() -> Iterator[tuple[Image.Image, str]]:
        for path, caption in items:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except OSError as e:
                raise InputError(f"cannot read image {path}: {e}") from e
            yield image, caption

    report = judge.evaluate(pairs())
    report = {"images": str(images), "kind": kind, "scenes": scenes.config(), **report}
    if json_file is not None and str(json_file) == "-":
        typer.echo(json.dumps(report, indent=2))
        return
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for line in accuracy_table({"accuracy": report, "chance": report["chance"]}):
        typer.echo(line)
    typer.echo(f"{'count':<14} {report['n']:>10d}")
    low = report["low_contrast"]
    if low["n"]:
        typer.echo(f"(low-contrast scenes: {low['n']}, all = {low['all']:.3f})")


def _eval_model(
    model: str,
    split: str,
    limit: int,
    candidates: int,
    clip: str | None,
    device: str,
    dtype: str,
    json_file: Path | None,
    tier: str | None,
    resolution: int | None,
    subject_size: int | None,
    seed: int | None,
) -> None:
    """`eval --model`: generate for a split's captions, judge, print the table (and JSON)."""
    model_dir = hub.local_path(model)
    scenes = scenes_for_model(
        model_dir,
        tier=_parse_tier(tier) if tier is not None else None,
        resolution=resolution,
        subject_size=subject_size,
        seed=seed,
    )
    pipe = TextToImage.from_pretrained(model_dir, device=device, dtype=dtype, clip=clip)
    bar = tqdm(total=0, unit="caption", disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    report = evaluate_model(
        pipe, scenes, split, limit=limit or None, candidates=candidates, progress=progress
    )
    bar.close()
    report["model_dir"] = str(model)
    if json_file is not None and str(json_file) == "-":
        typer.echo(json.dumps(report, indent=2))
        return
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    typer.echo(format_report(report))


recipe_app = typer.Typer(
    help="Build a model end to end with the project's own commands.", no_args_is_help=True
)


@recipe_app.command("emoji")
def recipe_emoji(
    out: Annotated[Path, typer.Argument(help="run folder: data, tokens, each model, eval, model")],
    config: Annotated[
        str, typer.Option("--config", help="recipe YAML or a packaged name: default, tiny")
    ] = "default",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a setting: --set bart.steps=100 --set seed=1"),
    ] = None,
    device: DeviceOpt = "auto",
    rerun_changed: Annotated[
        bool,
        typer.Option(
            "--rerun-changed",
            help="OUT holds a run with other settings: redo the first changed step and those after it",
        ),
    ] = False,
) -> None:
    """The built-in default model: emoji dataset -> VQGAN -> tokens -> DalleBart -> CLIP -> eval -> OUT/model."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = run_recipe(
        out,
        config,
        parse_overrides(set_),
        device=device,
        rerun_changed=rerun_changed,
        echo=typer.echo,
    )
    typer.echo(f"model: {path}")
