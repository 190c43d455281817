"""The small-CLIP trainer: resumable pair stream, duplicate-aware loss, learning on emoji scenes, export, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dallemini.checkpoints.native import read_config
from dallemini.data.pairs import PairDataset, to_pixels
from dallemini.data.sources import open_source
from dallemini.emoji.scenes import write_emoji_dataset
from dallemini.errors import CheckpointError, ConfigError, InputError
from dallemini.models.clip import BuiltinClipScorer, contrastive_loss
from dallemini.models.loading import load_scorer, load_small_clip
from dallemini.random_model import create_random_model
from dallemini.training.clip import ClipTrainConfig, ClipTrainer, batch_positives
from dallemini.training.settings import load_config
from tests.train_utils import kill9_resume_and_compare

TINY_CLIP = {
    "embed_dim": 32,
    "text_width": 32,
    "text_layers": 1,
    "text_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "max_text_length": 24,
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models run fastest on one thread (conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def emoji(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """447 emoji scenes (8 subjects) at 32×32, two captions per image."""
    folder = tmp_path_factory.mktemp("emoji")
    write_emoji_dataset(folder, tier=8, resolution=32, splits="train")
    return folder


def _cfg(data: Path, out: Path, **kw: object) -> ClipTrainConfig:
    base: dict[str, object] = dict(
        data=str(data),
        out=str(out),
        steps=150,
        batch_size=32,
        lr=3e-3,
        warmup_steps=10,
        log_every=50,
        save_every=1000,
        clip=dict(TINY_CLIP),
        tensorboard=False,
        device="cpu",
    )
    base.update(kw)
    return load_config(ClipTrainConfig, None, base)


def _metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


# --- the pair stream ------------------------------------------------------------------------------


def test_pairs_resume_exactly_and_split_ranks(emoji: Path) -> None:
    source = open_source(emoji)
    ds = PairDataset(source, 16, 24, seed=3)
    it = iter(ds)
    for _ in range(40):  # crosses the end of epoch 0 (447 // 16 = 27 batches)
        next(it)
    state = ds.state_dict()
    assert state["epoch"] == 1 and state["position"] == 13 * 16
    expected = [next(it) for _ in range(3)]
    again = PairDataset(open_source(emoji), 16, 24, seed=3)
    again.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    it2 = iter(again)
    for a in expected:
        b = next(it2)
        assert a.captions == b.captions and torch.equal(a.pixels, b.pixels)
        assert torch.equal(a.record, b.record)
    batch = expected[0]
    assert batch.pixels.shape == (16, 3, 24, 24) and batch.pixels.dtype == torch.float32
    assert float(batch.pixels.min()) >= 0.0 and float(batch.pixels.max()) <= 1.0
    # a caption is drawn per epoch from the image's two captions: the epochs differ
    ep0 = {ds._caption(0, i) for i in range(ds.num_items)}
    ep1 = {ds._caption(1, i) for i in range(ds.num_items)}
    assert ep0 != ep1 and len(ep0 | ep1) > ds.num_items
    # two ranks take disjoint halves of each epoch's order
    r0, r1 = (PairDataset(source, 16, 24, seed=3, rank=r, world_size=2) for r in (0, 1))
    a, b = set(r0.rank_items(5).tolist()), set(r1.rank_items(5).tolist())
    assert not a & b and len(a | b) == ds.num_items
    with pytest.raises(ConfigError, match="batch_size changed"):
        PairDataset(source, 8, 24, seed=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="do not make one batch"):
        PairDataset(source, 300, 24, world_size=2)


def test_pairs_threads_all_captions_and_transforms(emoji: Path) -> None:
    source = open_source(emoji)
    plain = PairDataset(source, 8, 16, seed=1)
    threaded = PairDataset(source, 8, 16, seed=1, workers=2)
    for a, b, _ in zip(plain, threaded, range(4), strict=False):
        assert a.captions == b.captions and torch.equal(a.pixels, b.pixels)
    every = PairDataset(source, 8, 16, captions="all")
    assert every.num_items == 2 * len(every.records)  # two captions per emoji scene
    assert len(list(every.all_captions())) == sum(len(r["captions"]) for r in _metadata(emoji))

    def flip(img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        x = to_pixels(img, 16)
        return x.flip(-1) if rng.random() < 0.5 else x

    first = PairDataset(source, 8, 16, transform=flip)
    batches = [b for b, _ in zip(first, range(3), strict=False)]
    state = first.state_dict()
    later = next(iter(first))
    again = PairDataset(source, 8, 16, transform=flip)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again)).pixels, later.pixels)
    assert not torch.equal(batches[0].pixels, next(iter(PairDataset(source, 8, 16))).pixels)
    wrong = PairDataset(source, 8, 12, transform=flip)
    with pytest.raises(ConfigError, match="transform made pixels"):
        next(iter(wrong))


def test_pairs_skip_bad_images_and_captions(tmp_path: Path) -> None:
    for i in range(6):
        Image.new("RGB", (40, 20), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"colour {i}\n")
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # undecodable
    (tmp_path / "4.txt").unlink()  # no caption: never decoded
    ds = PairDataset(open_source(tmp_path), 2, 8, shuffle=False, epochs=1, drop_last=False)
    assert ds.index_stats.counts == {"missing_caption": 1}
    batches = list(ds)
    assert [b.captions for b in batches] == [[" colour 0", " colour 1"], [" colour 3", " colour 5"]]
    assert ds.stats.counts == {"undecodable": 1} and ds.stats.examples["undecodable"] == ["2.png"]
    assert batches[0].pixels.shape == (2, 3, 8, 8)
    # a source whose images all fail says so instead of looping forever
    for i in (0, 1, 3, 5):
        (tmp_path / f"{i}.png").write_bytes(b"")
    with pytest.raises(InputError, match="not one batch"):
        next(iter(PairDataset(open_source(tmp_path), 2, 8)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no usable"):
        PairDataset(open_source(tmp_path / "empty"), 2, 8)


def test_duplicate_captions_and_images_are_positives() -> None:
    pos = batch_positives([" a cat", " a dog", " a cat", " a fish"], torch.tensor([0, 1, 2, 1]))
    assert pos.tolist() == [
        [True, False, True, False],
        [False, True, False, True],
        [True, False, True, False],
        [False, True, False, True],
    ]
    logits = torch.randn(4, 4)
    unique = torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(contrastive_loss(logits, unique), contrastive_loss(logits))
    # rows 0 and 2 are the same caption: their targets are split over both images
    by_hand = torch.nn.functional.cross_entropy(logits, pos.float() / 2)
    by_hand = (by_hand + torch.nn.functional.cross_entropy(logits.t(), pos.t().float() / 2)) / 2
    torch.testing.assert_close(contrastive_loss(logits, pos), by_hand)
    # the best a model can do with two identical pairs is no longer penalised for tying them
    tie = torch.tensor([[9.0, 9.0], [9.0, 9.0]])
    both = torch.ones(2, 2, dtype=torch.bool)
    assert float(contrastive_loss(tie, both)) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    assert float(contrastive_loss(tie)) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    with pytest.raises(InputError, match="diagonal"):
        contrastive_loss(logits, torch.zeros(4, 4, dtype=torch.bool))


# --- training ---------------------------------------------------------------------------------------


def test_loss_falls_retrieval_rises_and_export_scores(emoji: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = ClipTrainer(_cfg(emoji, run, eval_data=str(emoji), eval_every=75))
    before = trainer.evaluate()
    last = trainer.fit()
    assert last["eval/loss"] < 0.6 * before["loss"], (before, last)
    chance = 1 / 447
    for key in ("text_to_image_top1", "image_to_text_top1"):
        assert last[f"eval/{key}"] > max(before[key] + 0.05, 20 * chance), (before, last)
    assert last["train/accuracy"] > 0.5 and last["train/images_per_s"] > 0

    model_dir = run / "model"
    config = read_config(model_dir)
    assert config.bart is None and config.vqgan is None and config.clip is not None
    assert config.text.max_length == config.clip.max_text_length == 24
    assert config.clip.vocab_size == trainer.text.vocab_size
    saved = json.loads((model_dir / "tokenizer.json").read_text())
    assert saved["model"] == json.loads((run / "tokenizer.json").read_text())["model"]
    assert saved.get("padding") is None and saved.get("truncation") is None
    clip = load_small_clip(model_dir)
    for name, tensor in clip.state_dict().items():
        torch.testing.assert_close(tensor, trainer.modules["model"].state_dict()[name])

    scorer = load_scorer(model_dir, device="cpu")
    assert isinstance(scorer, BuiltinClipScorer)
    rows = _metadata(emoji)[::28][:16]
    images = [Image.open(emoji / r["file"]) for r in rows]
    captions = [r["captions"][0] for r in rows]
    scores = scorer.score(images, captions)  # [texts, images]
    right = (scores.argmax(dim=0) == torch.arange(len(rows))).float().mean()
    assert right >= 0.75, scores.argmax(dim=0)


def test_fine_tune_clip_inside_a_model_dir(emoji: Path, tmp_path: Path) -> None:
    base = create_random_model(tmp_path / "base", preset="tiny")
    first = ClipTrainer(_cfg(emoji, tmp_path / "a", model=str(base), steps=3))
    assert first.text.config.max_length == 24  # min(the model's 32, the CLIP's 24)
    first.fit()
    out = tmp_path / "a" / "model"
    config, original = read_config(out), read_config(base)
    assert config.bart == original.bart and config.vqgan == original.vqgan
    assert config.text == original.text and config.clip is not None
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert not (tmp_path / "a" / "tokenizer.json").exists()  # the model's tokenizer was used
    assert torch.equal(
        load_file(str(out / "bart.safetensors"))["decoder.lm_head.weight"],
        load_file(str(base / "bart.safetensors"))["decoder.lm_head.weight"],
    )
    assert isinstance(load_scorer(out, device="cpu"), BuiltinClipScorer)

    # the exported CLIP is where a second run starts; its shape cannot change
    second = ClipTrainer(_cfg(emoji, tmp_path / "b", model=str(out), steps=2, clip={}))
    trained = load_small_clip(out).state_dict()
    for name, tensor in second.modules["model"].state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    with pytest.raises(ConfigError, match="keeps its shape"):
        ClipTrainer(_cfg(emoji, tmp_path / "c", model=str(out), clip={"embed_dim": 16}))
    other = tmp_path / "tok.json"
    ClipTrainer(_cfg(emoji, tmp_path / "d", steps=1)).tokenizer.save(str(other))
    with pytest.raises(ConfigError, match="differs from the one in"):
        ClipTrainer(_cfg(emoji, tmp_path / "e", model=str(out), tokenizer=str(other), clip={}))


def test_bad_settings_are_refused(
    emoji: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.test_cli import run_here

    with pytest.raises(ConfigError, match="data must name"):
        load_config(ClipTrainConfig, None, {})
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        _cfg(emoji, tmp_path, batch_size=1)
    with pytest.raises(ConfigError, match="captions must be one of"):
        _cfg(emoji, tmp_path, captions="some")
    with pytest.raises(ConfigError, match="ddp only"):
        _cfg(emoji, tmp_path, distributed="fsdp")
    with pytest.raises(ConfigError, match="clip: unknown field"):
        ClipTrainer(_cfg(emoji, tmp_path / "r", clip={"embed_dims": 8}))
    with pytest.raises(ConfigError, match="divisible by patch_size"):
        ClipTrainer(_cfg(emoji, tmp_path / "r", clip={**TINY_CLIP, "patch_size": 5}))
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        ClipTrainer(_cfg(emoji, tmp_path / "r", clip={**TINY_CLIP, "vocab_size": 50}))
    with pytest.raises(CheckpointError, match="does not exist"):
        ClipTrainer(_cfg(emoji, tmp_path / "r", model=str(tmp_path / "nope")))
    code, err = run_here(capsys, "train-clip", "--out", tmp_path / "x")
    assert code == 2 and "data must name" in err
    code, err = run_here(capsys, "train-clip", "--data", tmp_path / "missing", "--out", tmp_path)
    assert code == 2 and "does not exist" in err
    code, err = run_here(
        capsys, "train-clip", "--data", emoji, "--batch-size", "4096", "--out", tmp_path / "y"
    )
    assert code == 2 and "do not make one batch" in err


# --- exact resume -----------------------------------------------------------------------------------


def _cli(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    args = ["train-clip", "--data", str(data), "--out", str(out), "--steps", str(steps)]
    args += ["--batch-size", "32", "--lr", "0.003", "--device", "cpu", *extra]
    for key, value in TINY_CLIP.items():
        args += ["--set", f"clip.{key}={value}"]
    sets = (
        "tensorboard=false",
        "log_every=1000",
        "warmup_steps=10",
        "save_every=20",
        "keep_last=0",
    )
    for s in sets:
        args += ["--set", s]
    return [sys.executable, "-m", "dallemini.cli", *args]


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(emoji: Path, tmp_path: Path) -> None:
    steps = 150
    ta, _ = kill9_resume_and_compare(
        lambda out, more: _cli(emoji, out, steps, *more), tmp_path, steps, wait_for=2
    )
    assert ta["data"]["epoch"] >= 10
    run = tmp_path / "run"
    assert (run / "model" / "clip.safetensors").is_file()
