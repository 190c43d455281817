"""`dallemini recipe emoji OUT`: the built-in default model, made end to end by the project's own commands.

Steps, each skipped when its result exists (and each trainer resuming from its checkpoints), so an
interrupted recipe continues where it stopped:
1. dataset: emoji scenes rendered into OUT/data/{train,heldout} (held-out = the heldout-triples split);
2. vqgan: the emoji VQGAN trainer (`training.py`) on the training images -> OUT/vqgan/model;
3. encode: both image folders into VQGAN token shards OUT/tokens/{train,heldout} (with
   `encode.glyph_donor: true`, also OUT/tokens/train-donor: every row's glyph cells with the codes
   of its glyph donor colour, see `donors.py`, which the DalleBart trains on instead);
4. bart: `train` (DalleBart) on the tokens -> OUT/bart/model (with the VQGAN);
5. decoder (only with a `decoder` section): the emoji VQGAN trainer with train_encoder=false on the VQGAN
   (every code stays, so the DalleBart stays valid) -> OUT/decoder/model;
6. clip: `train-clip` on the images, inside the bart model dir (or OUT/decoder/pipeline: the bart
   model dir with the decoder step's VQGAN) -> OUT/clip/model;
7. eval: `eval --model` on the eval section's splits (default: heldout-triples and heldout-colour)
   -> OUT/eval.json;
8. OUT/model: the clip step's model dir plus emoji_scenes.json, MODEL_CARD.md (config, seed,
   time per step, evaluation), vocabulary.txt and examples.json (the words of the training captions,
   and a few of them that the model draws right as example prompts: `vocabulary.py`).
Settings come from a recipe YAML (packaged: `dallemini/emoji/recipes/<name>.yaml`) with sections
dataset, vqgan, encode, bart, decoder, clip, sampling, eval, and `section.key=value` overrides. `sampling`
(temperature, top_k, top_p, condition_scale) is what eval uses and what OUT/model's config.json keeps.
Continuing a run whose settings changed is refused unless `rerun_changed`, which redoes every step
whose section changed and every step that reads its results (`STEP_INPUTS`): a new DalleBart setting
redoes bart, clip, eval and model, not the decoder fine-tune. The steps kept are deterministic, so
the result is what a fresh run of the new settings makes.
"""

from __future__ import annotations

import filecmp
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoints.native import WEIGHT_FILES
from ..config import PipelineConfig, SamplingConfig
from ..data.encode import encode_dataset
from ..data.sources import open_source
from ..errors import ConfigError
from ..pipeline import TextToImage, load_vqgan
from ..synonyms import Synonyms
from ..training import trainer_class
from ..training.checkpointing import list_checkpoints
from ..training.settings import load_config
from .donors import write_glyph_donors
from .evaluation import METRICS, evaluate_model, format_report
from .scenes import EmojiScenes, write_emoji_dataset
from .training import EmojiVQGANTrainer
from .vocabulary import model_synonyms, write_model_vocabulary, written_captions

log = logging.getLogger("dallemini.recipe")

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
# heldout-synonyms judged without the model's synonym list: the prompt's words as written
AS_WRITTEN = "heldout-synonyms, without synonyms.json"
SECTIONS = ("dataset", "vqgan", "encode", "bart", "decoder", "clip", "sampling", "eval")
STEPS = ("dataset", "vqgan", "encode", "bart", "decoder", "clip", "eval", "model")
# The sections each step's result depends on (beyond the seed and the steps before it), and what it writes.
STEP_SECTIONS = {
    "dataset": ("dataset",),
    "vqgan": ("vqgan",),
    "encode": ("encode",),
    "bart": ("bart",),
    "decoder": ("decoder",),
    "clip": ("clip",),
    "eval": ("sampling", "eval"),
    "model": (),
}
# The earlier steps whose results each step reads.
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "dataset": (),
    "vqgan": ("dataset",),
    "encode": ("dataset", "vqgan"),
    "bart": ("encode", "vqgan"),
    "decoder": ("dataset", "vqgan"),
    "clip": ("dataset", "bart", "decoder"),  # the bart model dir's tokenizer and config
    "eval": ("dataset", "bart", "clip"),
    "model": ("dataset", "bart", "clip", "eval"),
}
STEP_OUTPUT = {
    "dataset": "data",
    "vqgan": "vqgan",
    "encode": "tokens",
    "bart": "bart",
    "decoder": "decoder",
    "clip": "clip",
    "eval": "eval.json",
    "model": "model",
}


def load_recipe(
    name_or_path: str | Path, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A recipe's settings: a packaged name (default, tiny) or a YAML path, with dotted overrides."""
    p = Path(name_or_path)
    if not p.is_file():
        p = RECIPE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        names = sorted(f.stem for f in RECIPE_DIR.glob("*.yaml"))
        raise ConfigError(f"no recipe {str(name_or_path)!r}: give a YAML file or one of {names}")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p} must hold a mapping of sections")
    unknown = sorted(set(cfg) - {*SECTIONS, "seed"})
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {unknown}; sections are {list(SECTIONS)}")
    for key, value in (overrides or {}).items():
        if key == "seed":
            cfg["seed"] = value
            continue
        section, dot, field = key.partition(".")
        if not dot or section not in SECTIONS:
            raise ConfigError(
                f"recipe override {key!r} must be seed or SECTION.key, SECTION in {SECTIONS}"
            )
        target = cfg.setdefault(section, {})
        *path, last = field.split(".")
        for part in path:  # e.g. bart.bart.d_model: a mapping inside a trainer's settings
            target = target.setdefault(part, {})
        target[last] = value
    sampling = cfg.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ConfigError(f"{p}: the sampling section must be a mapping")
    bad = sorted(set(sampling) - set(SamplingConfig.__dataclass_fields__))
    if bad:
        raise ConfigError(
            f"unknown sampling setting(s) {bad}; known: {sorted(SamplingConfig.__dataclass_fields__)}"
        )
    SamplingConfig(**sampling)  # validates the values
    cfg.setdefault("seed", 0)
    cfg["source"] = str(p)
    return cfg


def _marker(out: Path, step: str) -> Path:
    return out / "steps" / f"{step}.json"


def _train(kind: str, settings: dict[str, Any]) -> None:
    """Run one trainer in this process, resuming its own checkpoints when it was interrupted."""
    cls = EmojiVQGANTrainer if kind == "vqgan" else trainer_class(kind)
    settings = dict(settings)
    settings["resume"] = bool(list_checkpoints(Path(settings["out"]) / "checkpoints"))
    cls(load_config(cls.config_class, None, settings)).fit()


def changed_steps(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The steps whose results differ between two recipe settings, in STEPS order: those whose
    sections changed and those that read their results (all of them when the seed changed)."""
    if before.get("seed") != now.get("seed"):
        return list(STEPS)
    redo: list[str] = []
    for step in STEPS:
        if any(before.get(sec) != now.get(sec) for sec in STEP_SECTIONS[step]) or any(
            dep in redo for dep in STEP_INPUTS[step]
        ):
            redo.append(step)
    return redo


def _forget(out: Path, steps: list[str], echo: Callable[[str], object]) -> None:
    """Delete the results (markers and outputs) of `steps`."""
    for step in steps:
        _marker(out, step).unlink(missing_ok=True)
        target = out / STEP_OUTPUT[step]
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    echo(f"recipe: settings changed; redoing {', '.join(steps)}")


def _check_saved_settings(
    out: Path, cfg: dict[str, Any], rerun_changed: bool, echo: Callable[[str], object]
) -> None:
    """Refuse to continue a run in `out` made with other settings, or (`rerun_changed`) forget the
    results of its changed steps."""
    saved = out / "recipe.json"
    if not saved.is_file():
        return
    try:
        before = json.loads(saved.read_text())
    except ValueError as e:
        raise ConfigError(f"{saved} is not valid JSON ({e}); use a new OUT folder") from e
    redo = changed_steps(before, cfg)
    if not redo:
        return
    if not rerun_changed:
        raise ConfigError(
            f"{out} holds a recipe run with other settings ({saved}; the {', '.join(redo)} "
            "step(s) differ): use a new OUT folder, or --rerun-changed to redo them (their "
            "results in OUT are deleted)"
        )
    _forget(out, redo, echo)


class _RecipeRun:
    """The steps of one recipe run into `out`, one method each (see the module doc)."""

    def __init__(
        self, out: Path, cfg: dict[str, Any], device: str, echo: Callable[[str], object]
    ) -> None:
        self.out, self.cfg, self.device, self.echo = out, cfg, device, echo
        self.seed = int(cfg["seed"])
        self.data, self.tokens = out / "data", out / "tokens"
        self.sec = {s: dict(cfg.get(s) or {}) for s in SECTIONS}
        self.donor = bool(self.sec["encode"].pop("glyph_donor", False))
        self.tuned = out / "decoder" / "pipeline"  # the bart model dir with the tuned VQGAN decoder

    def _sampling(self, base: SamplingConfig) -> SamplingConfig:
        """The model's sampling defaults with the recipe's `sampling` section on top."""
        return replace(base, **dict(self.cfg.get("sampling") or {}))

    def _trainer(
        self, kind: str, section: str, fixed: dict[str, Any] | None = None, **paths: Path
    ) -> None:
        """Run one trainer on the section's settings with the recipe's paths, `fixed` settings,
        seed and device."""
        settings = {k: str(v) for k, v in paths.items()}
        _train(
            kind,
            {
                **self.sec[section],
                **(fixed or {}),
                **settings,
                "seed": self.seed,
                "device": self.device,
            },
        )

    def dataset(self) -> None:
        d = self.sec["dataset"]
        for folder, split in (("train", "train"), ("heldout", "heldout-triples")):
            dst = self.data / folder
            shutil.rmtree(dst, ignore_errors=True)
            write_emoji_dataset(
                dst,
                tier=d.get("tier", 256),
                resolution=d.get("resolution", 64),
                splits=split,
                captions_per_image=d.get("captions_per_image", 2),
                seed=self.seed,
                subject_size=d.get("subject_size"),
                version=d.get("version", 1),
                variants=d.get("variants", 1),
                looks=d.get("looks", "turn-shade"),
            )

    def vqgan(self) -> None:
        data = self.data
        self._trainer(
            "vqgan",
            "vqgan",
            data=data / "train",
            eval_data=data / "heldout",
            out=self.out / "vqgan",
        )

    def encode(self) -> None:
        data, tokens = self.data, self.tokens
        vq = load_vqgan(self.out / "vqgan" / "model", device=self.device)
        for folder in ("train", "heldout"):
            encode_dataset(
                open_source(data / folder),
                tokens / folder,
                vq,
                **self.sec["encode"],
                progress=False,
            )
        if self.donor:
            write_glyph_donors(data / "train", tokens / "train", tokens / "train-donor")

    def bart(self) -> None:
        self._trainer(
            "seq2seq",
            "bart",
            data=self.tokens / ("train-donor" if self.donor else "train"),
            eval_data=self.tokens / "heldout",
            vqgan=self.out / "vqgan" / "model",
            out=self.out / "bart",
        )

    def decoder(self) -> None:
        if not self.sec["decoder"]:
            return  # nothing to fine-tune: the CLIP step takes the bart model dir as it is
        out = self.out
        self._trainer(
            "vqgan",
            "decoder",
            {"train_encoder": False},
            model=out / "vqgan" / "model",
            data=self.data / "train",
            eval_data=self.data / "heldout",
            out=out / "decoder",
        )

    def _tuned_pipeline(self) -> Path:
        """OUT/decoder/pipeline: the bart model dir with the decoder step's VQGAN (made afresh, so a
        DalleBart trained again after the decoder step joins it), or the bart model dir itself."""
        out, tuned = self.out, self.tuned
        if not (out / "decoder" / "model").is_dir():
            return out / "bart" / "model"
        before = json.loads((out / "bart" / "model" / "config.json").read_text())["vqgan"]
        after = json.loads((out / "decoder" / "model" / "config.json").read_text())["vqgan"]
        if before != after:  # cannot happen unless a file was edited: the shape is the model's
            raise ConfigError(f"{out / 'decoder' / 'model'} is not the bart model's VQGAN shape")
        tmp = tuned.with_name(".pipeline.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out / "bart" / "model", tmp)
        shutil.copy(out / "decoder" / "model" / "vqgan.safetensors", tmp / "vqgan.safetensors")
        shutil.rmtree(tuned, ignore_errors=True)  # an earlier one, or one left by a stopped run
        tmp.rename(tuned)
        return tuned

    def clip(self) -> None:
        self._trainer(
            "clip",
            "clip",
            data=self.data / "train",
            eval_data=self.data / "heldout",
            model=self._tuned_pipeline(),
            out=self.out / "clip",
        )

    def _pipeline(self) -> Path:
        """The CLIP step's pipeline directory with the bart step's DalleBart in it: the decoder and
        CLIP steps never read the DalleBart's weights, so one trained again after them joins too."""
        name = WEIGHT_FILES["bart"]
        src = self.out / "bart" / "model" / name
        dst = self.out / "clip" / "model" / name
        if not filecmp.cmp(src, dst, shallow=False):
            tmp = dst.with_name(f".{name}.tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        return dst.parent

    def evaluate(self) -> None:
        scenes_cfg = json.loads((self.data / "train" / "emoji_scenes.json").read_text())
        scenes = EmojiScenes.from_config(scenes_cfg)
        pipe = TextToImage.from_pretrained(self._pipeline(), device=self.device)
        pipe.config = replace(pipe.config, sampling=self._sampling(pipe.config.sampling))
        synonyms = Synonyms(*model_synonyms(scenes))  # prompts read as OUT/model reads them
        e = self.sec["eval"]
        splits = e.get("splits", ("heldout-triples", "heldout-colour"))
        runs = [(split, split, synonyms) for split in splits]
        if "heldout-synonyms" in splits:  # and what the DalleBart makes of words it never saw
            runs.append((AS_WRITTEN, "heldout-synonyms", None))
        reports = {}
        for name, split, reading in runs:
            pipe.synonyms = reading
            reports[name] = evaluate_model(
                pipe,
                scenes,
                split,
                limit=e.get("limit", 512),
                candidates=e.get("candidates", 4),
                seed=self.seed,
            )
            self.echo(format_report(reports[name]))
        (self.out / "eval.json").write_text(json.dumps(reports, indent=2) + "\n")

    def model(self) -> None:
        out = self.out
        dst = out / "model"
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self._pipeline(), tmp)
        config = PipelineConfig.from_dict(json.loads((tmp / "config.json").read_text()))
        config = replace(config, sampling=self._sampling(config.sampling))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        scenes_json = self.data / "train" / "emoji_scenes.json"
        shutil.copy(scenes_json, tmp / "emoji_scenes.json")
        # what the model knows: its training captions' words, and example prompts it draws right
        pipe = TextToImage.from_pretrained(tmp, device=self.device)
        captions = written_captions(self.data / "train")  # what the model trained on
        write_model_vocabulary(tmp, json.loads(scenes_json.read_text()), pipe, captions)
        (tmp / "MODEL_CARD.md").write_text(model_card(out, self.cfg))
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)

    def run(self) -> Path:
        """Each step in STEPS order, skipping those whose marker says they are done; returns OUT/model."""
        actions: dict[str, Callable[[], None]] = {
            "dataset": self.dataset,
            "vqgan": self.vqgan,
            "encode": self.encode,
            "bart": self.bart,
            "decoder": self.decoder,
            "clip": self.clip,
            "eval": self.evaluate,
            "model": self.model,
        }
        for step in STEPS:
            marker = _marker(self.out, step)
            if marker.is_file():
                self.echo(f"recipe: {step} done before, skipped")
                continue
            self.echo(f"recipe: {step} ...")
            t0 = time.perf_counter()
            actions[step]()
            seconds = time.perf_counter() - t0
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"step": step, "seconds": round(seconds, 1)}) + "\n")
            self.echo(f"recipe: {step} took {seconds:.0f} s")
        return self.out / "model"


def run_recipe(
    out: str | Path,
    recipe: str | Path = "default",
    overrides: dict[str, Any] | None = None,
    *,
    device: str = "auto",
    rerun_changed: bool = False,
    echo: Callable[[str], object] = log.info,
) -> Path:
    """Run (or continue) the recipe into `out`; returns OUT/model."""
    cfg = load_recipe(recipe, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_saved_settings(out, cfg, rerun_changed, echo)
    (out / "recipe.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return _RecipeRun(out, cfg, device, echo).run()


def _table(report: dict[str, Any]) -> list[str]:
    """The report's accuracies as a Markdown table (model, reranked, ceiling, floor)."""
    cols = [c for c in ("model", "reranked", "ceiling", "floor") if c in report]
    rows = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in METRICS:
        rows.append(f"| {label} | " + " | ".join(f"{report[c][key]:.3f}" for c in cols) + " |")
    return rows


def model_card(out: Path, cfg: dict[str, Any]) -> str:
    """MODEL_CARD.md: what the model is, how it was made (settings, seed, time) and how it scores."""
    times = {
        s: json.loads(_marker(out, s).read_text())["seconds"]
        for s in STEPS
        if _marker(out, s).is_file()
    }
    reports = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    lines = [
        "# dallemini built-in model: emoji scenes",
        "",
        "A small VQGAN + DalleBart + CLIP reranker trained from scratch by `dallemini recipe emoji` on",
        "the emoji-scenes dataset (Noto Color Emoji glyphs on 8 background colours at 9 positions;",
        "glyphs OFL-1.1 / Apache-2.0, see dallemini/emoji/assets/LICENSE-emoji.txt). It draws prompts",
        'like "strawberry on a blue background, top left"; it knows nothing else.',
        "`vocabulary.txt` lists every word of its training captions (prompts with other words get",
        "a note saying which it does not know), `synonyms.json` the everyday words it reads as",
        'words of its captions ("kitty" as "cat", "navy" as "blue"; every split below but the last',
        "is judged reading prompts so), and `examples.json` a few captions that it draws right.",
        "",
        "## How it was made",
        "",
        f"- recipe: `{Path(cfg['source']).name}`, seed {cfg['seed']}; settings in `recipe.json` below",
        f"- machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "- time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        f"- total: {sum(times.values()) / 60:.1f} min",
        "",
        "## Evaluation (held-out captions, judged by `dallemini eval`)",
        "",
        "`model`: every sampled image; `reranked`: the CLIP's pick of the candidates; `ceiling`: the",
        "true image through the VQGAN; `floor`: images judged against another scene's caption.",
    ]
    for split, report in reports.items():
        lines += [
            "",
            f"### {split} ({report['captions']} captions × {report['candidates']} images)",
            "",
            *_table(report),
            "",
            f"model / ceiling (all): {report['ratio_to_ceiling']:.3f}"
            if report.get("ratio_to_ceiling") is not None
            else "model / ceiling: no ceiling (the VQGAN reconstructions never pass)",
        ]
        if "rerank_lift" in report:
            lines[-1] += f"; CLIP rerank lift (all): {report['rerank_lift']:+.3f}"
        if "variety" in report:
            v = report["variety"]
            lines[-1] += (
                f"; distinct images per caption: {v['distinct_mean']:.2f} of {report['candidates']}"
                f", captions with >= 3 distinct: {v['share_at_least_3']:.2f}"
            )
    frames, triples = reports.get("heldout-frames"), reports.get("heldout-triples")
    if frames and triples and triples["model"]["all"] > 0:
        ratio = frames["model"]["all"] / triples["model"]["all"]
        lines += ["", f"heldout-frames / heldout-triples (all; the same scenes): {ratio:.3f}"]
    lines += ["", "## recipe.json", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    return "\n".join(lines)
