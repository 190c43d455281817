"""`dallemini recipe emoji`: every step of the built-in model's recipe at test size, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dallemini.emoji.recipe import STEPS, changed_steps, load_recipe, run_recipe
from dallemini.errors import ConfigError, InputError
from dallemini.pipeline import TextToImage, load_vqgan
from tests.test_cli import run_here


def test_recipe_settings_and_overrides() -> None:
    cfg = load_recipe("tiny", {"seed": 3, "bart.steps": 5, "bart.bart.d_model": 16})
    assert cfg["seed"] == 3 and cfg["bart"]["steps"] == 5 and cfg["bart"]["bart"]["d_model"] == 16
    with pytest.raises(ConfigError, match=r"SECTION\.key"):
        load_recipe("tiny", {"steps": 5})
    with pytest.raises(ConfigError, match="no recipe"):
        load_recipe("nonexistent")
    with pytest.raises(ConfigError, match="unknown sampling setting"):
        load_recipe("tiny", {"sampling.top_q": 5})
    with pytest.raises(InputError, match="top_k must be a number >= 0"):
        load_recipe("tiny", {"sampling.top_k": -1})


def test_changed_steps_are_those_that_read_a_changed_result() -> None:
    base = load_recipe("tiny")
    assert changed_steps(base, load_recipe("tiny")) == []
    assert changed_steps(base, load_recipe("tiny", {"seed": 1})) == list(STEPS)
    # the decoder fine-tune never reads the DalleBart: a DalleBart setting leaves it alone
    bart = ["bart", "clip", "eval", "model"]
    assert changed_steps(base, load_recipe("tiny", {"bart.lr": 0.1})) == bart
    assert changed_steps(base, load_recipe("tiny", {"decoder.lr": 0.1})) == [
        "decoder",
        "clip",
        "eval",
        "model",
    ]
    assert changed_steps(base, load_recipe("tiny", {"encode.batch_size": 8})) == ["encode", *bart]
    assert changed_steps(base, load_recipe("tiny", {"vqgan.lr": 0.1})) == list(STEPS[1:])
    assert changed_steps(base, load_recipe("tiny", {"sampling.top_k": 3})) == ["eval", "model"]
    assert changed_steps(base, load_recipe("tiny", {"eval.limit": 3})) == ["eval", "model"]


@pytest.mark.slow
def test_tiny_recipe_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, err = run_here(capsys, "recipe", "emoji", out, "--config", "tiny", "--device", "cpu")
    assert code == 0, err
    model = out / "model"
    for name in ("config.json", "bart.safetensors", "vqgan.safetensors", "clip.safetensors"):
        assert (model / name).is_file(), name
    card = (model / "MODEL_CARD.md").read_text()
    assert "heldout-triples" in card and "heldout-colour" in card and "seed 0" in card
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"heldout-triples", "heldout-colour"}
    assert report["heldout-colour"]["captions"] == 4 and "reranked" in report["heldout-colour"]
    assert json.loads((model / "emoji_scenes.json").read_text())["tier"] == 8
    # what the model knows: the DalleBart's export read its words from the token shards, the
    # model step from the dataset's captions; the same words either way
    words = (model / "vocabulary.txt").read_text()
    assert (
        "background" in words.split() and words == (out / "bart/model/vocabulary.txt").read_text()
    )
    synonyms = json.loads((model / "synonyms.json").read_text())  # colour words at least
    assert synonyms["phrases"]["navy"] == "blue" and "panda" in synonyms["keep"]
    examples = json.loads((model / "examples.json").read_text())
    assert "one of 8" in examples["description"] and isinstance(examples["prompts"], list)
    # the DalleBart trained on the donor-coded rows (encode.glyph_donor), the VQGAN on donor pairs
    donor = json.loads((out / "tokens" / "train-donor" / "dataset.json").read_text())
    plain = json.loads((out / "tokens" / "train" / "dataset.json").read_text())
    assert donor["count"] == plain["count"] and donor["glyph_donor"]["rows_changed"] >= 0
    bart_cfg = json.loads((out / "bart" / "train_config.json").read_text())
    assert Path(bart_cfg["data"]) == out / "tokens" / "train-donor"
    vqgan_cfg = json.loads((out / "vqgan" / "train_config.json").read_text())
    assert vqgan_cfg["background_donor"] and vqgan_cfg["background_swap"]
    # the decoder step: only the decoder changed, and the CLIP (so the model) uses it
    tuned = load_vqgan(out / "decoder" / "pipeline").state_dict()
    first = load_vqgan(out / "vqgan" / "model").state_dict()
    shipped = load_vqgan(model).state_dict()
    assert all(torch.equal(tuned[k], shipped[k]) for k in tuned)
    changed = {k.split(".")[0] for k in tuned if not torch.equal(tuned[k], first[k])}
    assert "decoder" in changed and not changed & {"encoder", "quant_conv", "quantize"}
    clip_cfg = json.loads((out / "clip" / "train_config.json").read_text())
    assert Path(clip_cfg["model"]) == out / "decoder" / "pipeline"
    pipe = TextToImage.from_pretrained(model, device="cpu")
    assert pipe.scorer is not None
    images = pipe("cat on a red background, top left", num_images=2, seed=0)
    assert images[0].image.size == (32, 32) and images[0].score is not None
    # A second run finds every step done; other settings in the same folder are refused.
    said: list[str] = []
    assert run_recipe(out, "tiny", device="cpu", echo=said.append) == model
    assert said == [f"recipe: {step} done before, skipped" for step in STEPS]
    code, err = run_here(capsys, "recipe", "emoji", out, "--config", "tiny", "--set", "seed=1")
    assert code == 2 and "other settings" in err and "--rerun-changed" in err
    assert len(list((out / "steps").glob("*.json"))) == len(STEPS)
    # Changed sampling settings redo only eval and the model, and reach the model's config.json.
    vqgan_before = (out / "vqgan" / "model" / "vqgan.safetensors").read_bytes()
    said.clear()
    run_recipe(
        out, "tiny", {"sampling.top_k": 3}, device="cpu", rerun_changed=True, echo=said.append
    )
    assert "recipe: settings changed; redoing eval, model" in said
    assert [m for m in said if m.endswith("skipped")] == [
        f"recipe: {step} done before, skipped" for step in STEPS[: STEPS.index("eval")]
    ]
    assert json.loads((model / "config.json").read_text())["sampling"]["top_k"] == 3
    assert (out / "vqgan" / "model" / "vqgan.safetensors").read_bytes() == vqgan_before
    assert json.loads((out / "recipe.json").read_text())["sampling"] == {"top_k": 3}
    # A DalleBart trained again after the decoder and CLIP steps (which never read its weights)
    # is the one eval scores and the model ships.
    bart = out / "bart" / "model" / "bart.safetensors"
    weights = load_file(bart)
    weights = {k: v * 0.5 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, bart)
    weights_bytes = bart.read_bytes()
    for step in ("eval", "model"):
        (out / "steps" / f"{step}.json").unlink()
    run_recipe(out, "tiny", {"sampling.top_k": 3}, device="cpu", echo=said.append)
    assert (model / "bart.safetensors").read_bytes() == bart.read_bytes()
    # A new DalleBart setting trains the DalleBart and the CLIP again, and keeps the decoder step.
    decoder_before = (out / "decoder" / "model" / "vqgan.safetensors").read_bytes()
    said.clear()
    changed = {"sampling.top_k": 3, "bart.steps": 20}
    run_recipe(out, "tiny", changed, device="cpu", rerun_changed=True, echo=said.append)
    assert "recipe: settings changed; redoing bart, clip, eval, model" in said
    assert "recipe: decoder done before, skipped" in said
    assert (out / "decoder" / "model" / "vqgan.safetensors").read_bytes() == decoder_before
    assert (model / "bart.safetensors").read_bytes() == bart.read_bytes() != weights_bytes
    assert json.loads((out / "bart" / "train_config.json").read_text())["steps"] == 20
    tuned = load_vqgan(out / "decoder" / "pipeline").state_dict()
    shipped = load_vqgan(model).state_dict()
    assert all(torch.equal(tuned[k], shipped[k]) for k in tuned)
