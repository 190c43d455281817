"""CLIP rerankers: the built-in SmallClip (shapes, padding, loss, learning, save/load) and HF CLIP folders."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from dallemini.checkpoints.native import save_model_dir
from dallemini.config import ClipConfig, PipelineConfig, TextConfig
from dallemini.errors import CheckpointError, ConfigError, InputError
from dallemini.models.clip import (
    BuiltinClipScorer,
    HFClipScorer,
    ImageTextScorer,
    SmallClip,
    contrastive_loss,
)
from dallemini.models.loading import load_scorer, load_small_clip
from dallemini.text import TextEncoder, train_tokenizer

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "purple": (130, 30, 160),
    "orange": (250, 140, 0),
}
CAPTIONS = [f"a {name} square" for name in COLOURS]
TEXT_CONFIG = TextConfig(max_length=12, normalize=False)


def tiny_config(**overrides: object) -> ClipConfig:
    base = ClipConfig(
        vocab_size=320,
        max_text_length=12,
        embed_dim=32,
        text_width=32,
        text_layers=2,
        text_heads=2,
        image_size=16,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
    )
    return replace(base, **overrides)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models run fastest on one thread, above all on a busy machine (conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    tok = train_tokenizer(CAPTIONS * 4, vocab_size=300, min_frequency=1)
    return TextEncoder(tok, TEXT_CONFIG)


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_config_validation_and_round_trip() -> None:
    cfg = tiny_config(mlp_ratio=2.0)
    assert ClipConfig.from_dict(cfg.to_dict()) == cfg
    assert ClipConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    pipe = PipelineConfig(clip=cfg)
    assert PipelineConfig.from_dict(json.loads(json.dumps(pipe.to_dict()))).clip == cfg
    with pytest.raises(ConfigError, match=r"text_width .* divisible by text_heads"):
        tiny_config(text_heads=3)
    with pytest.raises(ConfigError, match=r"vision_width .* divisible by vision_heads"):
        tiny_config(vision_heads=5)
    with pytest.raises(ConfigError, match=r"image_size .* divisible by patch_size"):
        tiny_config(patch_size=5)
    with pytest.raises(ConfigError, match="pad_token_id"):
        tiny_config(pad_token_id=320)
    with pytest.raises(ConfigError, match="unknown field"):
        ClipConfig.from_dict({"nope": 1})


def test_shapes() -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SmallClip(cfg)
    ids = torch.randint(4, cfg.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    pixels = torch.rand(5, 3, 16, 16)
    assert model.encode_text(ids, mask).shape == (3, cfg.embed_dim)
    assert model.encode_image(pixels).shape == (5, cfg.embed_dim)
    logits = model(ids, mask, pixels)
    assert logits.shape == (3, 5)
    # logit_scale starts at log(1/0.07): logits are 1/0.07 times cosines
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert logits.abs().max().item() <= 1 / 0.07 + 1e-4
    # the fixed pixel statistics are buffers, not weights
    assert "pixel_mean" not in model.state_dict()
    with pytest.raises(InputError, match="pixels must be"):
        model.encode_image(torch.rand(2, 3, 32, 32))
    with pytest.raises(InputError, match="longer than"):
        model.encode_text(torch.ones(1, 13, dtype=torch.long))


def test_text_tower_ignores_padding() -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SmallClip(cfg).eval()
    ids = torch.tensor([[0, 17, 42, 99, 2], [0, 23, 2, 1, 1]])
    mask = (ids != cfg.pad_token_id).long()
    base = model.encode_text(ids, mask)
    padded = torch.cat([ids, torch.ones(2, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.encode_text(padded, padded_mask), base)
    # without a mask, padding is found from pad_token_id
    torch.testing.assert_close(model.encode_text(padded), base)
    # garbage after </s> changes nothing either: the causal tower never looks ahead
    junk = padded.clone()
    junk[:, 5:] = 77
    torch.testing.assert_close(model.encode_text(junk, padded_mask), base)


def test_contrastive_loss_by_hand() -> None:
    a, b, c, d = 2.0, 0.5, -1.0, 1.5
    logits = torch.tensor([[a, b], [c, d]])

    def nll(right: float, wrong: float) -> float:
        return -math.log(math.exp(right) / (math.exp(right) + math.exp(wrong)))

    per_text = (nll(a, b) + nll(d, c)) / 2
    per_image = (nll(a, c) + nll(d, b)) / 2
    assert contrastive_loss(logits).item() == pytest.approx((per_text + per_image) / 2, rel=1e-6)
    with pytest.raises(InputError, match="square"):
        contrastive_loss(torch.zeros(2, 3))


def test_training_makes_matching_pairs_win(text_encoder: TextEncoder) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(text_layers=1, vision_layers=1)
    model = SmallClip(cfg)
    ids, mask = text_encoder(CAPTIONS)
    pixels = torch.stack(
        [
            torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 16, 16)
            for rgb in COLOURS.values()
        ]
    )
    scorer = BuiltinClipScorer(model, text_encoder)
    images = [solid(rgb) for rgb in COLOURS.values()]
    before = scorer.score(images, CAPTIONS)
    assert not torch.equal(before.argmax(dim=1), torch.arange(8))

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = contrastive_loss(model(ids, mask, pixels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5

    after = scorer.score(images, CAPTIONS)
    assert after.shape == (8, 8)
    assert torch.equal(after.argmax(dim=1), torch.arange(8))
    assert torch.equal(after.argmax(dim=0), torch.arange(8))
    assert model.training  # the scorer restores the mode it found


def test_builtin_scorer_inputs(text_encoder: TextEncoder) -> None:
    torch.manual_seed(0)
    scorer = BuiltinClipScorer(SmallClip(tiny_config()), text_encoder, batch_size=2)
    assert isinstance(scorer, ImageTextScorer)
    assert scorer.device == torch.device("cpu")
    # other sizes and modes are cropped/resized inside the scorer; batching does not change scores
    images = [
        solid((10, 200, 30), (40, 30)),
        solid((0, 0, 0), (16, 16)),
        Image.new("L", (8, 8), 128),
    ]
    scores = scorer.score(images, ["a red square", "a blue square"])
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    one_batch = BuiltinClipScorer(scorer.model, text_encoder, batch_size=64)
    torch.testing.assert_close(one_batch.score(images, ["a red square", "a blue square"]), scores)
    # captions longer than the CLIP's context are cut, keeping </s>
    long_text = BuiltinClipScorer(SmallClip(tiny_config(max_text_length=4)), text_encoder)
    assert long_text.score(images[:1], ["a red square square square"]).shape == (1, 1)
    with pytest.raises(InputError, match="no images"):
        scorer.score([], ["a red square"])
    with pytest.raises(InputError, match="PIL image"):
        scorer.score([torch.zeros(3, 16, 16)], ["a red square"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="vocabulary"):
        BuiltinClipScorer(SmallClip(tiny_config(vocab_size=100)), text_encoder)


def test_save_load_round_trip(tmp_path: Path, text_encoder: TextEncoder) -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SmallClip(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    config = PipelineConfig(clip=cfg, text=TEXT_CONFIG)
    dst = save_model_dir(
        tmp_path / "m", config, {"clip": model.state_dict()}, text_encoder.tokenizer.to_str()
    )
    loaded = load_small_clip(dst)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    scorer = load_scorer(dst, device="cpu")
    assert isinstance(scorer, BuiltinClipScorer)
    images = [solid(rgb) for rgb in list(COLOURS.values())[:3]]
    expected = BuiltinClipScorer(model, text_encoder).score(images, CAPTIONS[:2])
    torch.testing.assert_close(scorer.score(images, CAPTIONS[:2]), expected)
    assert load_scorer(None) is None

    # a clip.safetensors that does not fit the config is refused, naming the tensor
    other = SmallClip(tiny_config(embed_dim=16))
    bad = save_model_dir(
        tmp_path / "bad", config, {"clip": other.state_dict()}, text_encoder.tokenizer.to_str()
    )
    with pytest.raises(CheckpointError, match=r"text_projection\.weight"):
        load_scorer(bad)
    # a model directory without a CLIP says so
    no_clip = save_model_dir(tmp_path / "none", PipelineConfig(text=TEXT_CONFIG), {})
    with pytest.raises(CheckpointError, match="no clip section"):
        load_scorer(no_clip)


# --------------------------------------------------------------------------------------------
# Hugging Face CLIP folders
# --------------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes 0..255 (unprintable bytes go above U+0100)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + shifted))
            shifted += 1
    return symbols


def write_tiny_clip_tokenizer(folder: Path) -> int:
    """vocab.json + merges.txt in CLIP's layout (bytes, bytes + </w>, merges, two specials); returns the vocab size."""
    symbols = _byte_symbols()
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("b", "l"), ("bl", "u")]
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(tokens)


def write_preprocessor_config(folder: Path, size: int) -> None:
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config))


def save_tiny_hf_clip(folder: Path) -> Path:
    """A tiny random transformers CLIPModel saved as a local Hugging Face CLIP folder (weights, tokenizer, preprocessor)."""
    import transformers

    vocab_size = write_tiny_clip_tokenizer(folder)
    eos = vocab_size - 1
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(folder, safe_serialization=True)
    write_preprocessor_config(folder, 32)
    return folder


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return save_tiny_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-clip")


def _hf_images() -> list[Image.Image]:
    return [
        solid((220, 30, 30), (48, 40)),
        solid((30, 60, 220), (32, 32)),
        Image.new("RGB", (20, 50), (250, 140, 0)),
    ]


HF_TEXTS = ["a red cat", "blue", "an orange thing, far longer than the others"]


def _reference_logits(folder: Path, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """Call the CLIPModel directly on the processor's inputs: what the scorer must reproduce."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tok = transformers.CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    proc = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    max_len = model.config.text_config.max_position_embeddings
    inputs = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=pixels,
        )
    return out.logits_per_text


def test_hf_clip_matches_direct_call(hf_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = HFClipScorer.from_folder(hf_clip_dir, device="cpu", dtype="float32", batch_size=2)
    assert isinstance(scorer, ImageTextScorer)
    images = _hf_images()
    scores = scorer.score(images, HF_TEXTS)
    assert scores.shape == (3, 3) and scores.dtype == torch.float32
    expected = _reference_logits(hf_clip_dir, images, HF_TEXTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # the same folder through load_scorer
    again = load_scorer(hf_clip_dir, device="cpu")
    assert isinstance(again, HFClipScorer)
    torch.testing.assert_close(again.score(images, HF_TEXTS), expected, rtol=1e-5, atol=1e-5)


def test_hf_clip_from_pytorch_bin(
    hf_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "bin-clip"
    folder.mkdir()
    # an older checkpoint: a pickled state dict (only ever read back with weights_only)
    model = transformers.CLIPModel.from_pretrained(hf_clip_dir, local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in ("config.json", "vocab.json", "merges.txt", "preprocessor_config.json"):
        (folder / name).write_bytes((hf_clip_dir / name).read_bytes())
    scores = HFClipScorer.from_folder(folder, device="cpu").score(_hf_images(), HF_TEXTS)
    expected = _reference_logits(hf_clip_dir, _hf_images(), HF_TEXTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_hf_clip_errors(hf_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        HFClipScorer.from_folder(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_scorer(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        HFClipScorer.from_folder(empty)
    with pytest.raises(CheckpointError, match="holds no CLIP"):
        load_scorer(empty)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="'bert' model, not a CLIP"):
        HFClipScorer.from_folder(bert)
    # a CLIP config without weights
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((hf_clip_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no CLIP weights"):
        load_scorer(no_weights)
    # corrupt weights are a CheckpointError too, not a raw library error
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_clip_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load the CLIP"):
        HFClipScorer.from_folder(broken)


def test_missing_transformers_names_the_extra(
    hf_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"pip install 'dallemini\[clip\]'"):
        HFClipScorer.from_folder(hf_clip_dir)
