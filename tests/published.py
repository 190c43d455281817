"""Tiny random models published under the real Hub repo names and file names (a test helper, not tests).

`tiny_model(seed)` builds a small random DalleBart + VQGAN + tokenizer; `publish(hub)` writes such
models in the published formats (dallemini.checkpoints.export) into a tests.fakehub.FakeHub as
`dalle-mini/dalle-mini`, `dalle-mini/dalle-mega`, `dalle-mini/vqgan_imagenet_f16_16384`,
`kuprel/min-dalle` and `openai/clip-vit-base-patch32`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dallemini.checkpoints.export import (
    bpe_files,
    flax_dalle_config,
    flax_dalle_tree,
    flax_vqgan_config,
    flax_vqgan_tree,
    min_dalle_detoker,
    min_dalle_states,
)
from dallemini.checkpoints.flax_msgpack import msgpack_bytes
from dallemini.config import VQGAN_PRESETS, BartConfig, PipelineConfig, TextConfig
from dallemini.models.bart import DalleBart
from dallemini.models.vqgan import VQGAN
from dallemini.random_model import seed_captions
from dallemini.text import TextNormalizer, train_tokenizer
from tests.fakehub import FakeHub

DALLE_MINI = "dalle-mini/dalle-mini"
DALLE_MEGA = "dalle-mini/dalle-mega"
VQGAN_REPO = "dalle-mini/vqgan_imagenet_f16_16384"
MIN_DALLE = "kuprel/min-dalle"
CLIP_REPO = "openai/clip-vit-base-patch32"
REPOS = (DALLE_MINI, DALLE_MEGA, VQGAN_REPO, MIN_DALLE, CLIP_REPO)

WORD_LIST_FILE = "enwiki-words-frequency.txt"
_WORDS = ["the", "of", "and", "in", "a", "to", "on", "hot", "dog", "stand", "pizza", "cat", "red"]


@dataclass
class TinyModel:
    """A model as the loaders should give it back: configs, state dicts, tokenizer.json text."""

    config: PipelineConfig
    states: dict[str, dict[str, Tensor]]
    tokenizer_json: str | None = None


@dataclass
class Published:
    """One repo added to the hub: its commit, its files, and the models its files hold."""

    repo_id: str
    sha: str
    files: dict[str, bytes]
    models: dict[str, TinyModel] = field(default_factory=dict)


def _bart_config(image_length: int) -> BartConfig:
    # d_model / attention_heads == 64, the head width min-dalle's loader assumes.
    return BartConfig(
        encoder_vocab_size=512,
        image_vocab_size=64,
        max_text_length=32,
        image_length=image_length,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        attention_heads=2,
        ffn_dim=96,
        decoder_start_token_id=64,
    )


# A VQGAN vqgan-jax can describe (32 groups, pixels in [0, 1]): 64x64 images -> 4x4 = 16 tokens.
TINY_VQGAN = dataclasses.replace(VQGAN_PRESETS["tiny"], num_groups=32)


def _random_state(shapes: dict[str, torch.Size], g: torch.Generator) -> dict[str, Tensor]:
    """Values that tell tensors apart: norm scales near 1, biases and matrices small and random."""
    out = {}
    for k, shape in shapes.items():
        if len(shape) == 1 and k.endswith(".weight"):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[k] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.05 * torch.randn(shape, generator=g)
    return out


def _shared_storage_state(shapes: dict[str, torch.Size], g: torch.Generator) -> dict[str, Tensor]:
    """Random values whose matrices are windows of one buffer, so torch.save stores it once (a small
    stand-in for the 170 MB f16_16384 decoder that min-dalle's detoker.pt must be)."""
    big = [s for s in shapes.values() if len(s) > 1]
    base = 0.05 * torch.randn(max(s.numel() for s in big) + 4096, generator=g)
    out = _random_state({k: s for k, s in shapes.items() if len(s) == 1}, g)
    for i, (k, s) in enumerate(shapes.items()):
        if len(s) > 1:
            off = (i * 997) % 4096
            out[k] = base[off : off + s.numel()].view(s)
    return {k: out[k] for k in shapes}


def _tokenizer_json(vocab_size: int) -> str:
    tok = train_tokenizer(seed_captions(), vocab_size=vocab_size, normalizer=TextNormalizer())
    return tok.to_str()


def tiny_model(
    seed: int, min_dalle: bool = False
) -> tuple[PipelineConfig, dict[str, dict[str, Tensor]], str]:
    """A random tiny (config, {"bart", "vqgan"} states, tokenizer.json); VQGAN grid² == image_length.

    min_dalle: the shapes min-dalle hard-wires: 256 image tokens and an f16_16384 decoder-only VQGAN
    (its matrices share one storage, so its detoker.pt is ~10 MB).
    """
    g = torch.Generator().manual_seed(seed)
    if min_dalle:
        vq = dataclasses.replace(
            VQGAN_PRESETS["f16_16384"], n_embed=64, decoder_only=True, pixel_range="0,1"
        )
    else:
        vq = TINY_VQGAN
    bart = _bart_config(vq.grid_size**2)
    with torch.device("meta"):
        bart_shapes = {k: v.shape for k, v in DalleBart(bart).state_dict().items()}
        vq_shapes = {k: v.shape for k, v in VQGAN(vq).state_dict().items()}
    states = {
        "bart": _random_state(bart_shapes, g),
        "vqgan": (_shared_storage_state if min_dalle else _random_state)(vq_shapes, g),
    }
    cfg = PipelineConfig(bart=bart, vqgan=vq, text=TextConfig(max_length=bart.max_text_length))
    return cfg, states, _tokenizer_json(bart.encoder_vocab_size)


def _readme(license: str, title: str) -> bytes:
    return (
        f"---\nlicense: {license}\n---\n\n# {title}\n\nA tiny random stand-in for tests.\n".encode()
    )


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _torch_bytes(state: dict[str, Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _tokenizer_files(tokenizer_json: str, max_length: int) -> dict[str, bytes]:
    vocab, merges = bpe_files(tokenizer_json)
    mask = {
        "content": "<mask>",
        "lstrip": True,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    specials = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": mask,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    config = {
        **specials,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": max_length,
        "normalize_text": True,
        "special_tokens_map_file": None,
        "tokenizer_class": "DalleBartTokenizer",
        "trim_offsets": True,
    }
    return {
        "vocab.json": vocab.encode(),
        "merges.txt": merges.encode(),
        "tokenizer.json": tokenizer_json.encode(),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(specials),
    }


def _dalle_repo(
    seed: int, use_scan: bool, title: str
) -> tuple[dict[str, bytes], TinyModel, TinyModel]:
    cfg, states, tok = tiny_model(seed)
    assert cfg.bart is not None and cfg.vqgan is not None
    files = {
        "config.json": _json(flax_dalle_config(cfg.bart, use_scan)),
        "flax_model.msgpack": msgpack_bytes(flax_dalle_tree(states["bart"], cfg.bart, use_scan)),
        **_tokenizer_files(tok, cfg.bart.max_text_length),
        WORD_LIST_FILE: "".join(f"{w} {1000 - 7 * i}\n" for i, w in enumerate(_WORDS)).encode(),
        "README.md": _readme("apache-2.0", title),
    }
    bart = TinyModel(dataclasses.replace(cfg, vqgan=None), {"bart": states["bart"]}, tok)
    vqgan = TinyModel(PipelineConfig(vqgan=cfg.vqgan), {"vqgan": states["vqgan"]})
    return files, bart, vqgan


def _min_dalle_repo(seed: int) -> tuple[dict[str, bytes], dict[str, TinyModel]]:
    files: dict[str, bytes] = {}
    models: dict[str, TinyModel] = {}
    for name, suffix, s, dtype in (
        ("mini", "_mini", seed, None),
        ("mega", "", seed + 1, torch.float16),
    ):
        cfg, states, tok = tiny_model(s, min_dalle=True)
        assert cfg.bart is not None and cfg.vqgan is not None
        bart = {k: v.to(dtype) if dtype else v for k, v in states["bart"].items()}
        enc, dec = min_dalle_states(bart)
        vocab, merges = bpe_files(tok)
        files[f"encoder{suffix}.pt"] = _torch_bytes(enc)
        files[f"decoder{suffix}.pt"] = _torch_bytes(dec)
        files[f"vocab{suffix}.json"] = vocab.encode()
        files[f"merges{suffix}.txt"] = merges.encode()
        files[f"config{suffix}.json"] = _json({})
        if name == "mini":  # one detokenizer serves both, float32 as published
            files["detoker.pt"] = _torch_bytes(min_dalle_detoker(states["vqgan"], cfg.vqgan))
            vqgan = states["vqgan"]
        models[name] = TinyModel(cfg, {"bart": bart, "vqgan": vqgan}, tok)
    files["README.md"] = _readme("mit", "min-dalle")
    return files, models


def _clip_files() -> dict[str, bytes]:
    from tests.models.test_clip import save_tiny_hf_clip

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        folder = save_tiny_hf_clip(Path(tmp) / "clip")
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def publish(
    hub: FakeHub,
    seed: int = 0,
    repos: Collection[str] = REPOS,
    mini_use_scan: bool = False,
    mega_use_scan: bool = True,
) -> dict[str, Published]:
    """Add tiny stand-ins of the published repos (`repos`, default all of REPOS) to `hub`.

    dalle-mini uses tiny_model(seed) (its VQGAN goes to the vqgan repo), dalle-mega
    tiny_model(seed + 1), min-dalle tiny_model(seed + 2 / seed + 3, min_dalle=True) (mini float32,
    mega-named files float16). Returns repo id -> Published (commit, files, models to compare).
    """
    out: dict[str, Published] = {}

    def add(repo_id: str, files: dict[str, bytes], models: dict[str, TinyModel]) -> None:
        out[repo_id] = Published(repo_id, hub.add_repo(repo_id, files), files, models)

    if DALLE_MINI in repos or VQGAN_REPO in repos:
        files, bart, vqgan = _dalle_repo(seed, mini_use_scan, "DALL·E mini")
        if DALLE_MINI in repos:
            add(DALLE_MINI, files, {"mini": bart})
        if VQGAN_REPO in repos:
            vq = vqgan.config.vqgan
            assert vq is not None
            vq_files = {
                "config.json": _json(flax_vqgan_config(vq)),
                "flax_model.msgpack": msgpack_bytes(flax_vqgan_tree(vqgan.states["vqgan"])),
                "README.md": _readme("apache-2.0", "VQGAN f16 16384"),
            }
            add(VQGAN_REPO, vq_files, {"vqgan": vqgan})
    if DALLE_MEGA in repos:
        files, bart, _ = _dalle_repo(seed + 1, mega_use_scan, "DALL·E mega")
        add(DALLE_MEGA, files, {"mega": bart})
    if MIN_DALLE in repos:
        files, models = _min_dalle_repo(seed + 2)
        add(MIN_DALLE, files, models)
    if CLIP_REPO in repos:
        add(CLIP_REPO, _clip_files(), {})
    unknown = sorted(set(repos) - set(REPOS))
    if unknown:
        raise ValueError(f"unknown repos {unknown}; choose from {REPOS}")
    return out
