"""The emoji-scenes commands: `dataset emoji`, `eval` (the judge) and `recipe emoji`, mounted by `mount`."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image
from tqdm import tqdm

from ..checkpoints import hub
from ..cli_options import DeviceOpt, DtypeOpt
from ..errors import ConfigError, InputError
from ..pipeline import TextToImage
from ..training.settings import parse_overrides
from .evaluation import accuracy_table, evaluate_model, format_report, scenes_for_model
from .judge import EmojiJudge
from .recipe import run_recipe
from .scenes import SPLITS, write_emoji_dataset

# The dataset settings: options of `dataset emoji` and of `eval --images`, which takes them only
# for a folder that does not record them (default None there: not given).
TierOpt = Annotated[str | None, typer.Option(help="subjects: 64, 256, any count, or all")]
ResolutionOpt = Annotated[int | None, typer.Option(help="image side in pixels")]
SubjectSizeOpt = Annotated[
    int | None, typer.Option(help="emoji side in pixels (default: half the image side)")
]
SeedOpt = Annotated[int | None, typer.Option(help="seed of the splits and caption choice")]


def mount(app: typer.Typer) -> None:
    """Add the emoji commands to the `dallemini` app: `dataset emoji`, `eval`, `recipe emoji`."""
    app.add_typer(dataset_app, name="dataset")
    app.command("eval")(eval_)
    app.add_typer(recipe_app, name="recipe")


dataset_app = typer.Typer(
    no_args_is_help=True, help="Build a captioned image dataset as an image folder (+ .txt)."
)


def _parse_tier(tier: str | None) -> int | str | None:
    """An emoji tier option as EmojiScenes takes it: a subject count, or 'all' (None: not given)."""
    if tier is None:
        return None
    return int(tier) if tier.strip().isdigit() else tier.strip()


# The options of `dataset emoji` (and the dataset settings above).
SplitsOpt = Annotated[str, typer.Option(help=f"comma list of {', '.join(SPLITS)}, or all")]
CaptionsPerImageOpt = Annotated[
    int,
    typer.Option(help="captions per image (distinct frames): 1 to 6, or 12 with --version 2 to 4"),
]
VersionOpt = Annotated[
    int,
    typer.Option(
        "--version",
        help="captions: 1 (six templates), 2 (plain language), 3 (2 in free word order, held-out "
        "synonyms) or 4 (2 with held-out synonyms)",
    ),
]
VariantsOpt = Annotated[
    int, typer.Option(help="images per training scene (turned glyph, shaded background)")
]
LooksOpt = Annotated[
    str,
    typer.Option(
        help="how variants differ: turn-shade (a turn and a shade each), shade (a background "
        "shade of its own each: every two variants differ) or tile (as shade, with the glyph's "
        "square kept on the plain colour)"
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option(help="replace OUT if it holds an emoji dataset written before")
]


@dataset_app.command("emoji")
def dataset_emoji(
    out: Annotated[Path, typer.Argument(help="output folder (new or empty)")],
    tier: TierOpt = "64",
    resolution: ResolutionOpt = 64,
    subject_size: SubjectSizeOpt = None,
    seed: SeedOpt = 0,
    splits: SplitsOpt = "all",
    captions_per_image: CaptionsPerImageOpt = 2,
    version: VersionOpt = 1,
    variants: VariantsOpt = 1,
    looks: LooksOpt = "turn-shade",
    overwrite: OverwriteOpt = False,
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
            version=version,
            variants=variants,
            looks=looks,
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


def _eval_items(folder: Path) -> tuple[str, list[tuple[Path, str]]]:
    """What `eval --images` scores: (folder kind, [(image path, caption)])."""
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist or is not a folder")
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
    return kind, items


# The options of `eval` (and the dataset settings above).
ImagesOpt = Annotated[
    Path | None,
    typer.Option(
        help="folder to score: an emoji dataset (`dallemini dataset emoji`) or the output "
        "folder of `dallemini generate`"
    ),
]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="also write the report as JSON to FILE (- = stdout)")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(help="model (directory or Hub name) to generate for held-out captions and judge"),
]
SplitOpt = Annotated[
    str,
    typer.Option(
        help="with --model: heldout-triples, heldout-colour, heldout-frames (new sentence "
        "frames), heldout-synonyms (synonyms, colour words, place phrases), train or all"
    ),
]
LimitOpt = Annotated[
    int, typer.Option(help="with --model: captions sampled from the split (0 = all)")
]
CandidatesOpt = Annotated[
    int, typer.Option(help="with --model: images per caption (CLIP picks the best)")
]
ClipOpt = Annotated[
    str | None,
    typer.Option(help="with --model: CLIP reranker, a path or Hub name (default: the model's)"),
]


def eval_(
    images: ImagesOpt = None,
    tier: TierOpt = None,
    resolution: ResolutionOpt = None,
    subject_size: SubjectSizeOpt = None,
    seed: SeedOpt = None,
    json_file: JsonOpt = None,
    model: ModelOpt = None,
    split: SplitOpt = "heldout-triples",
    limit: LimitOpt = 512,
    candidates: CandidatesOpt = 4,
    clip: ClipOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Score images against their emoji-scenes captions with the judge: colour, position, subject, all.

    With --model, generate for a held-out split's captions and report the model beside the ceiling
    (its VQGAN's reconstructions), the floor (mismatched captions) and the CLIP reranking lift.
    --tier, --resolution, --subject-size and --seed describe the dataset only where the folder or
    model does not say (it has no emoji_scenes.json).
    """
    given = {
        "tier": _parse_tier(tier),
        "resolution": resolution,
        "subject_size": subject_size,
        "seed": seed,
    }
    if model is not None:
        if images is not None:
            raise InputError("give --images DIR or --model DIR, not both")
        _eval_model(model, split, limit, candidates, clip, device, dtype, json_file, given)
    elif images is None:
        raise InputError(
            "nothing to score: pass --images DIR (a folder of images) or --model DIR (a model)"
        )
    else:
        _eval_images(images, given, json_file)


def _read_images(items: list[tuple[Path, str]]) -> Iterator[tuple[Image.Image, str]]:
    """(RGB image, caption) for each listed image, read as it is scored."""
    for path, caption in items:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e}") from e
        yield image, caption


def _json_report(report: dict[str, Any], json_file: Path | None) -> bool:
    """Write the report as JSON to `json_file` (if given); True when that was stdout (`-`)."""
    if json_file is not None and str(json_file) == "-":
        typer.echo(json.dumps(report, indent=2))
        return True
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return False


def _eval_images(images: Path, given: dict[str, Any], json_file: Path | None) -> None:
    """`eval --images`: judge a folder's images against their captions, print the table (and JSON)."""
    kind, items = _eval_items(images)
    scenes = scenes_for_model(images, **given)
    judge = EmojiJudge(scenes)
    for _, caption in items:  # every caption must parse before any image is scored
        judge.parse_caption(caption)
    report = judge.evaluate(_read_images(items))
    report = {"images": str(images), "kind": kind, "scenes": scenes.config(), **report}
    if _json_report(report, json_file):
        return
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
    given: dict[str, Any],
) -> None:
    """`eval --model`: generate for a split's captions, judge, print the table (and JSON)."""
    model_dir = hub.local_path(model)
    scenes = scenes_for_model(model_dir, **given)
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
    if not _json_report(report, json_file):
        typer.echo(format_report(report))


recipe_app = typer.Typer(
    help="Build a model end to end with the project's own commands.", no_args_is_help=True
)


# The options of `recipe emoji`.
RecipeOpt = Annotated[
    str, typer.Option("--config", help="recipe YAML or a packaged name: default, tiny")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a setting: --set bart.steps=100 --set seed=1"),
]
RerunChangedOpt = Annotated[
    bool,
    typer.Option(
        "--rerun-changed",
        help="OUT holds a run with other settings: redo the changed steps and those that use their results",
    ),
]


@recipe_app.command("emoji")
def recipe_emoji(
    out: Annotated[Path, typer.Argument(help="run folder: data, tokens, each model, eval, model")],
    config: RecipeOpt = "default",
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    rerun_changed: RerunChangedOpt = False,
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
