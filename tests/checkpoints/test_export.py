"""Exporters to the published formats: every round trip through the package's loaders gives back
the same configs and bit-identical tensors; lazy trees write the same bytes as eager ones."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from torch import Tensor

from dallemini.checkpoints import load_parts
from dallemini.checkpoints.export import (
    bpe_files,
    flax_dalle_config,
    flax_dalle_tree,
    flax_vqgan_config,
    flax_vqgan_tree,
    min_dalle_detoker,
    min_dalle_states,
)
from dallemini.checkpoints.flax_dalle import bart_config_from_flax
from dallemini.checkpoints.flax_msgpack import msgpack_bytes, read_msgpack, write_msgpack
from dallemini.checkpoints.flax_vqgan import vqgan_config_from_flax
from dallemini.checkpoints.lazy import LazyTensor
from dallemini.config import BartConfig, PipelineConfig
from dallemini.models.bart import DalleBart
from dallemini.text import load_tokenizer
from tests.fakehub import FakeHub
from tests.published import (
    CLIP_REPO,
    DALLE_MEGA,
    DALLE_MINI,
    MIN_DALLE,
    REPOS,
    VQGAN_REPO,
    publish,
    tiny_model,
)

Tiny = tuple[PipelineConfig, dict[str, dict[str, Tensor]], str]
CAPTIONS = ["pizza on a red background, top left", "a cat", "#hotdog ünïcode 🍕"]


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return tiny_model(0)


@pytest.fixture(scope="module")
def tiny_md() -> Tiny:
    return tiny_model(1, min_dalle=True)


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_states_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        g = got[k]
        assert isinstance(g, Tensor), k
        assert g.dtype == v.dtype and g.shape == v.shape, k
        assert torch.equal(_bits(g), _bits(v)), k


def _same_tokens(a: str, b: str) -> None:
    """Two tokenizer.json texts encode the test captions to the same ids."""
    ta, tb = Tokenizer.from_str(a), Tokenizer.from_str(b)
    for c in CAPTIONS:
        assert ta.encode(c).ids == tb.encode(c).ids, c


def _write_flax_dalle(
    folder: Path, cfg: BartConfig, state: dict[str, Tensor], tok: str, use_scan: bool
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(flax_dalle_config(cfg, use_scan)))
    write_msgpack(folder / "flax_model.msgpack", flax_dalle_tree(state, cfg, use_scan))
    (folder / "tokenizer.json").write_text(tok)
    return folder


@pytest.mark.parametrize("use_scan", [False, True])
@pytest.mark.parametrize("variant", ["float32", "float16", "force_ln_scale"])
def test_flax_dalle_round_trip(tmp_path: Path, tiny: Tiny, use_scan: bool, variant: str) -> None:
    cfg, states, tok = tiny
    bart, state = cfg.bart, states["bart"]
    if variant == "float16":
        state = {k: v.half() for k, v in state.items()}
    if variant == "force_ln_scale":
        bart = dataclasses.replace(bart, force_ln_scale=True)
        with torch.device("meta"):
            shapes = DalleBart(bart).state_dict()
        g = torch.Generator().manual_seed(3)
        state = {
            k: state.get(k, 1 + 0.1 * torch.randn(v.shape, generator=g)) for k, v in shapes.items()
        }
    raw = flax_dalle_config(bart, use_scan)
    assert raw["model_type"] == "dallebart" and raw["use_scan"] is use_scan
    assert bart_config_from_flax(raw) == bart
    folder = _write_flax_dalle(tmp_path / "dalle", bart, state, tok, use_scan)
    flat = read_msgpack(folder / "flax_model.msgpack")
    layers = flat["model"]["encoder"]["layers"]
    assert list(layers) == (
        ["FlaxBartEncoderLayers"]
        if use_scan
        else ["FlaxBartEncoderLayer_0", "FlaxBartEncoderLayer_1"]
    )
    parts = load_parts(folder)
    assert parts.config.bart == bart and parts.config.vqgan is None
    _assert_states_equal(parts.states["bart"], state)
    assert parts.tokenizer_json is not None
    _same_tokens(parts.tokenizer_json, tok)


def test_flax_dalle_tree_layout(tiny: Tiny) -> None:
    cfg, states, _ = tiny
    b = cfg.bart
    tree = flax_dalle_tree(states["bart"], b, use_scan=True)
    assert set(tree) == {"model", "lm_head"}
    k = tree["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]["FlaxBartAttention_1"][
        "q_proj"
    ]["kernel"]
    assert tuple(k.shape) == (b.decoder_layers, b.d_model, b.d_model)
    assert torch.equal(k[1], states["bart"]["decoder.layers.1.encoder_attn.q_proj.weight"].t())
    assert tuple(tree["lm_head"]["kernel"].shape) == (b.d_model, b.decoder_vocab_size)
    with pytest.raises(ValueError, match="does not describe"):
        flax_dalle_tree({**states["bart"], "extra.weight": torch.zeros(1)}, b, use_scan=False)
    with pytest.raises(KeyError, match="lm_head"):
        flax_dalle_tree({k: v for k, v in states["bart"].items() if "lm_head" not in k}, b, False)


def test_flax_vqgan_round_trip(tmp_path: Path, tiny: Tiny) -> None:
    cfg, states, _ = tiny
    raw = flax_vqgan_config(cfg.vqgan)
    assert vqgan_config_from_flax(raw) == cfg.vqgan
    folder = tmp_path / "vqgan"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    write_msgpack(folder / "flax_model.msgpack", flax_vqgan_tree(states["vqgan"]))
    parts = load_parts(folder)
    assert parts.config.vqgan == cfg.vqgan and parts.config.bart is None
    _assert_states_equal(parts.states["vqgan"], states["vqgan"])
    with pytest.raises(ValueError, match="num_groups"):
        flax_vqgan_config(dataclasses.replace(cfg.vqgan, num_groups=8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_min_dalle_round_trip(tmp_path: Path, tiny_md: Tiny, dtype: torch.dtype) -> None:
    cfg, states, tok = tiny_md
    bart = {k: v.to(dtype) for k, v in states["bart"].items()}
    enc, dec = min_dalle_states(bart)
    assert torch.equal(enc["layers.0.glu.ln0.weight"], torch.ones(cfg.bart.d_model, dtype=dtype))
    assert "final_ln.weight" in dec and "encoder.final_ln.weight" not in bart
    folder = tmp_path / "min-dalle"
    folder.mkdir()
    torch.save(enc, folder / "encoder_mini.pt")
    torch.save(dec, folder / "decoder_mini.pt")
    detoker = min_dalle_detoker(states["vqgan"], cfg.vqgan)
    assert "embedding.weight" in detoker and not any(k.startswith("encoder.") for k in detoker)
    torch.save(detoker, folder / "detoker.pt")
    vocab, merges = bpe_files(tok)
    (folder / "vocab_mini.json").write_text(vocab)
    (folder / "merges_mini.txt").write_text(merges)
    assert (folder / "detoker.pt").stat().st_size < 16e6  # the shared-storage stand-in stays small
    parts = load_parts(folder)
    assert parts.config.bart == cfg.bart and parts.config.vqgan == cfg.vqgan
    _assert_states_equal(parts.states["bart"], bart)
    _assert_states_equal(parts.states["vqgan"], states["vqgan"])
    _same_tokens(parts.tokenizer_json, tok)
    with pytest.raises(ValueError, match="f16_16384"):
        min_dalle_detoker(tiny_model(0)[1]["vqgan"], tiny_model(0)[0].vqgan)


def test_bpe_files(tmp_path: Path, tiny: Tiny) -> None:
    _, _, tok = tiny
    vocab, merges = bpe_files(tok)
    assert merges.startswith("#version: 0.2\n")
    ids = json.loads(vocab)
    assert (
        ids["<s>"] == 0
        and ids["<pad>"] == 1
        and ids["</s>"] == 2
        and ids["<mask>"] == max(ids.values())
    )
    (tmp_path / "vocab.json").write_text(vocab)
    (tmp_path / "merges.txt").write_text(merges)
    rebuilt = load_tokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    _same_tokens(rebuilt.to_str(), tok)


def _lazy(state: dict[str, Tensor], loads: list[str]) -> dict[str, LazyTensor]:
    def read(k: str, t: Tensor) -> Callable[[], Tensor]:
        def f() -> Tensor:
            loads.append(k)
            return t.clone()

        return f

    return {k: LazyTensor(tuple(t.shape), t.dtype, read(k, t)) for k, t in state.items()}


@pytest.mark.parametrize("use_scan", [False, True])
@pytest.mark.parametrize("chunk_size", [2**30, 1000])
def test_lazy_trees_write_the_same_bytes(
    tmp_path: Path, tiny: Tiny, use_scan: bool, chunk_size: int
) -> None:
    cfg, states, _ = tiny
    loads: list[str] = []
    lazy = flax_dalle_tree(_lazy(states["bart"], loads), cfg.bart, use_scan)
    assert not loads  # building the tree reads nothing
    eager = msgpack_bytes(
        flax_dalle_tree(states["bart"], cfg.bart, use_scan), chunk_size=chunk_size
    )
    write_msgpack(tmp_path / "lazy.msgpack", lazy, chunk_size=chunk_size)
    assert (tmp_path / "lazy.msgpack").read_bytes() == eager
    assert sorted(loads) == sorted(states["bart"])  # each tensor read once
    vq_lazy = flax_vqgan_tree(_lazy(states["vqgan"], []))
    vq_eager = flax_vqgan_tree(states["vqgan"])
    assert msgpack_bytes(vq_lazy, chunk_size=chunk_size) == msgpack_bytes(
        vq_eager, chunk_size=chunk_size
    )


def test_write_msgpack_leaves_nothing_on_failure(tmp_path: Path) -> None:
    def boom() -> Tensor:
        raise RuntimeError("read failed")

    path = tmp_path / "x.msgpack"
    with pytest.raises(RuntimeError, match="read failed"):
        write_msgpack(path, {"a": torch.zeros(2), "b": LazyTensor((2,), torch.float32, boom)})
    assert list(tmp_path.iterdir()) == []


def test_publish_files(tmp_path: Path) -> None:
    with FakeHub() as hub:
        out = publish(hub, seed=0, repos=[r for r in REPOS if r != CLIP_REPO])
    assert set(out) == {DALLE_MINI, DALLE_MEGA, VQGAN_REPO, MIN_DALLE}
    for repo_id, pub in out.items():
        folder = tmp_path / repo_id
        folder.mkdir(parents=True)
        for name, data in pub.files.items():
            (folder / name).write_bytes(data)
        assert pub.files["README.md"].startswith(b"---\nlicense: ")
        parts = load_parts(folder)
        model = (
            pub.models["mega"]
            if repo_id in (DALLE_MEGA, MIN_DALLE)
            else next(iter(pub.models.values()))
        )
        for part, state in model.states.items():
            _assert_states_equal(parts.states[part], state)
            assert getattr(parts.config, part) == getattr(model.config, part)
    mini = out[DALLE_MINI].files
    assert {
        "config.json",
        "flax_model.msgpack",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "enwiki-words-frequency.txt",
    } <= set(mini)
    assert mini["enwiki-words-frequency.txt"].split(b"\n")[0] == b"the 1000"
    assert json.loads(out[DALLE_MEGA].files["config.json"])["use_scan"] is True
    md = out[MIN_DALLE].files
    assert {
        "encoder_mini.pt",
        "decoder_mini.pt",
        "detoker.pt",
        "vocab_mini.json",
        "merges_mini.txt",
        "config_mini.json",
        "encoder.pt",
        "decoder.pt",
        "vocab.json",
        "merges.txt",
    } <= set(md)
    assert b"license: mit" in md["README.md"]


def test_publish_clip() -> None:
    pytest.importorskip("transformers")
    with FakeHub() as hub:
        out = publish(hub, repos=[CLIP_REPO])
    files = out[CLIP_REPO].files
    assert {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
    } <= set(files)
