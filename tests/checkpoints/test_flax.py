"""Flax checkpoints: the msgpack format, dalle-mini DalleBart parity with the original, the Flax VQGAN.

The DalleBart fixtures under tests/fixtures/flax_dalle/ were written by the ORIGINAL dalle-mini 0.1.5
code (tests/fixtures/make_flax_fixtures.py, run once in a separate JAX venv) together with its
logits for fixed inputs, so these tests compare against the original without needing JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from dallemini.checkpoints.flax_dalle import load_flax_dalle
from dallemini.checkpoints.flax_msgpack import (
    CHUNKED_KEY,
    flatten_tree,
    msgpack_bytes,
    read_msgpack,
    unflatten_tree,
    write_msgpack,
)
from dallemini.checkpoints.flax_vqgan import load_flax_vqgan
from dallemini.checkpoints.lazy import materialize
from dallemini.config import VQGANConfig
from dallemini.errors import CheckpointError, ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DALLE = {name: FIXTURES / "flax_dalle" / name for name in ("scan", "unscanned")}
FLAX_WRITTEN = FIXTURES / "flax_msgpack" / "flax_written.msgpack"


# ------------------------------------------------------------------------------------------------
# msgpack format


def _sample_tree() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "params": {
            "w": torch.randn(3, 5, generator=g),
            "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
            "half": torch.randn(7, generator=g).half(),
            "ints": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
            "u8": np.arange(200, 210, dtype=np.uint8),
            "mask": torch.tensor([True, False, True]),
            "c": np.array([1 + 1j, 2 - 3j], dtype=np.complex128),
            "big": torch.randn(10, 13, generator=g),  # 520 bytes: chunked below
            "big_bf16": torch.randn(9, 9, generator=g).to(torch.bfloat16),  # 162 bytes: chunked
            "empty": torch.zeros(0, 4),
            "zero_d": torch.tensor(2.5),
            "deep": {"er": {"still": np.ones((2, 2), dtype=np.float64)}},
        },
        "step": np.int64(12),
        "scale": np.float32(0.5),
        "cplx": 3 - 4j,
        "natives": [1, -1, 2**40, 1.25, "text", b"raw", True, None],
        "long_key" * 10: 1,
    }


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and set(a) == set(b), where
        for k in b:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(b, (torch.Tensor, np.ndarray)):
        bt = b if isinstance(b, torch.Tensor) else torch.from_numpy(b)
        assert isinstance(a, torch.Tensor), where
        assert a.dtype == bt.dtype and a.shape == bt.shape, where
        assert torch.equal(a, bt), where
    elif isinstance(b, (np.generic, complex)):  # flax stores Python complex as a complex128 scalar
        want = np.complex128(b) if type(b) is complex else b
        assert type(a) is type(want) and a == want, where
    else:
        assert type(a) is type(b) and a == b, where


@pytest.mark.parametrize("chunk_size", [64, 2**30])
def test_msgpack_round_trip(tmp_path: Path, chunk_size: int) -> None:
    tree = _sample_tree()
    path = tmp_path / "t.msgpack"
    write_msgpack(path, tree, chunk_size=chunk_size)
    back = read_msgpack(path)
    _assert_same(back, tree)
    assert back["params"]["bf16"].dtype == torch.bfloat16
    if chunk_size == 64:  # the chunked form really is in the file
        raw = msgpack.unpackb(path.read_bytes(), ext_hook=lambda c, d: None, strict_map_key=False)
        assert raw["params"]["big"][CHUNKED_KEY] is True
        assert len(raw["params"]["big"]["chunks"]) == math.ceil(130 / 16)
        assert raw["params"]["big_bf16"][CHUNKED_KEY] is True


def test_msgpack_reads_what_the_msgpack_library_reads(tmp_path: Path) -> None:
    """Our parser against the msgpack package on every native type and size class."""
    tree = {
        "ints": [
            0,
            127,
            128,
            255,
            256,
            65535,
            65536,
            2**32,
            2**63,
            -1,
            -32,
            -33,
            -128,
            -129,
            -(2**31) - 1,
            -(2**63),
        ],
        "floats": [0.0, -1.5, 1e300],
        "str": ["", "a" * 31, "b" * 32, "c" * 300, "d" * 70000, "ünï"],
        "bin": [b"", b"x" * 300, b"y" * 70000],
        "list16": list(range(20)),
        "map16": {str(i): i for i in range(20)},
        "nested": {"a": [{"b": [None, True, False]}]},
    }
    path = tmp_path / "n.msgpack"
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    assert read_msgpack(path) == tree
    path.write_bytes(msgpack.packb({"f": 1.5}, use_single_float=True))
    assert read_msgpack(path) == {"f": 1.5}


def _flax_tree() -> dict:
    """The values make_flax_fixtures.msgpack_tree() gave flax (see that script)."""
    f32 = np.float32
    return {
        "params": {
            "dense": {
                "kernel": np.arange(12, dtype=f32).reshape(3, 4) * 0.5,
                "bias": np.array([1, -2, 3], dtype=np.int32),
            },
            "bf16": torch.from_numpy(np.arange(10, dtype=f32) * 0.25 - 1.0).to(torch.bfloat16),
            "big": np.arange(100, dtype=f32).reshape(4, 25) - 50.0,
            "big_bf16": torch.from_numpy((np.arange(40, dtype=f32) - 20.0).reshape(5, 8)).to(
                torch.bfloat16
            ),
            "f16": np.array([0.5, -1.5, 2.0], dtype=np.float16),
            "f64": np.array([[1.0 / 3.0]], dtype=np.float64),
            "u8": np.array([0, 255, 7], dtype=np.uint8),
            "flags": np.array([True, False, True]),
            "i64": np.array([-(2**40), 2**40], dtype=np.int64),
            "c64": np.array([1 + 2j, -3.5j], dtype=np.complex64),
            "empty": np.zeros((0, 3), dtype=f32),
            "zero_d": np.array(3.5, dtype=f32),
        },
        "step": np.int32(7),
        "lr": np.float32(0.25),
        "py_float": 1.5,
        "py_int": 3,
        "neg": -5,
        "big_int": 2**40,
        "flag": True,
        "none": None,
        "name": "hello",
        "cplx": 1 + 2j,
        "list": [1, 2.0, "x"],
        "nested": {"a": {"b": {"c": np.ones(2, dtype=f32)}}},
    }


def test_msgpack_reads_a_file_written_by_flax() -> None:
    """flax 0.7.0 msgpack_serialize output (chunked with MAX_CHUNK_SIZE=64, bfloat16, scalars, complex)."""
    _assert_same(read_msgpack(FLAX_WRITTEN), _flax_tree())


def test_msgpack_writer_matches_flax_byte_for_byte() -> None:
    assert msgpack_bytes(_flax_tree(), chunk_size=64) == FLAX_WRITTEN.read_bytes()
    assert msgpack_bytes(read_msgpack(FLAX_WRITTEN), chunk_size=64) == FLAX_WRITTEN.read_bytes()


def test_msgpack_chunked_keys_in_any_order(tmp_path: Path) -> None:
    """The one-buffer fast path needs 'shape' before 'chunks'; other orders still load."""
    x = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    flat = x.reshape(-1)
    odd = {"chunks": {"0": flat[:4], "1": flat[4:8], "2": flat[8:]}, "shape": {"0": 2, "1": 5}}
    odd[CHUNKED_KEY] = True
    write_msgpack(tmp_path / "c.msgpack", {"x": odd})
    assert torch.equal(read_msgpack(tmp_path / "c.msgpack")["x"], x)


def test_msgpack_bfloat16_values_without_ml_dtypes(tmp_path: Path) -> None:
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0000], dtype=np.uint16)  # 1, -2, inf, 0
    payload = msgpack.packb(((4,), "bfloat16", bits.tobytes()), use_bin_type=True)
    data = msgpack.packb({"b": msgpack.ExtType(1, payload)}, use_bin_type=True)
    (tmp_path / "b.msgpack").write_bytes(data)
    t = read_msgpack(tmp_path / "b.msgpack")["b"]
    assert t.dtype == torch.bfloat16
    assert t.float().tolist() == [1.0, -2.0, math.inf, 0.0]


def test_msgpack_native_complex_extension(tmp_path: Path) -> None:
    """Ext type 2 (flax's native_complex) is read although flax writes complex as ext 3."""
    data = msgpack.packb({"z": msgpack.ExtType(2, msgpack.packb((1.5, -2.0)))}, use_bin_type=True)
    (tmp_path / "z.msgpack").write_bytes(data)
    assert read_msgpack(tmp_path / "z.msgpack") == {"z": complex(1.5, -2.0)}


def test_msgpack_writer_sorts_keys_like_flax() -> None:
    tree = {"b": 1, "a": {"d": 2, "c": 3}}
    assert msgpack.unpackb(msgpack_bytes(tree)) == tree
    assert list(msgpack.unpackb(msgpack_bytes(tree))) == ["a", "b"]
    assert list(msgpack.unpackb(msgpack_bytes(tree, sort_keys=False))) == ["b", "a"]


def test_flatten_unflatten() -> None:
    tree = {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
    assert flatten_tree(tree) == {"a/b/c": 1, "a/d": 2, "e": 3}
    assert unflatten_tree(flatten_tree(tree)) == tree


def test_msgpack_truncated_files_are_named_errors(tmp_path: Path) -> None:
    data = msgpack_bytes(_sample_tree(), chunk_size=64)
    path = tmp_path / "cut.msgpack"
    for n in sorted({0, 1, 2, 5, 17, 100, len(data) // 3, len(data) // 2, len(data) - 1}):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as e:
            read_msgpack(path)
        assert "empty" in str(e.value) or "truncated" in str(e.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        (
            b"PK\x03\x04" + b"\0" * 60,
            "does not start with a msgpack map",
        ),  # a zip / torch.save file
        (b"\x89HDF\r\n\x1a\n" + b"\0" * 8, "truncated"),  # 0x89 happens to open a msgpack map
        (msgpack.packb({"a": 1}) + b"\x00", "trailing"),
        (msgpack.packb({"a": msgpack.ExtType(9, b"xyz")}), "extension type 9"),
        (b"\x81\xa1a\xc1", "invalid msgpack byte"),
        (
            msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2,), "float8_e4m3fn", b"xy")))}),
            "float8_e4m3fn",
        ),
        (
            msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((3,), "float32", b"\0" * 8)))}),
            "needs 12 bytes",
        ),
        (msgpack.packb({"a": 1, "b": {"c": 2}})[:-1] + b"\xdf\xff\xff\xff\xff", "truncated"),
    ],
)
def test_msgpack_foreign_or_corrupt_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.msgpack"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as e:
        read_msgpack(path)
    assert reason in str(e.value)


def test_msgpack_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be opened"):
        read_msgpack(tmp_path / "nope.msgpack")


# ------------------------------------------------------------------------------------------------
# DalleBart: a numpy forward written from the original's code, straight from the Flax parameters


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def _np_reference_logits(
    folder: Path, ids: np.ndarray, mask: np.ndarray, dec_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, encoder states) of the original DalleBart (normformer, GLU, no biases) in float64."""
    cfg = json.loads((folder / "config.json").read_text())
    flat = flatten_tree(read_msgpack(folder / "flax_model.msgpack"))
    p = {k: v.double().numpy() for k, v in flat.items()}
    heads = cfg["encoder_attention_heads"]
    scale = math.sqrt(cfg["d_model"]) if cfg["scale_embedding"] else 1.0

    def sub(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}

    def ln(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
        if f"{name}/scale" in w:
            y = y * w[f"{name}/scale"]
        return y + w[f"{name}/bias"]

    def attention(
        x: np.ndarray, kv: np.ndarray, w: dict[str, np.ndarray], name: str, allowed: np.ndarray
    ) -> np.ndarray:
        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(t.shape[0], t.shape[1], heads, -1)

        q = split(x @ w[f"{name}/q_proj/kernel"])
        k = split(kv @ w[f"{name}/k_proj/kernel"])
        v = split(kv @ w[f"{name}/v_proj/kernel"])
        a = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        a = np.where(allowed, a, -np.inf)
        a = np.exp(a - a.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        return np.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape) @ w[f"{name}/out_proj/kernel"]

    def glu(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
        h = ln(x, w, "GLU_0/LayerNorm_0")
        a = h @ w["GLU_0/Dense_0/kernel"]
        h = 0.5 * a * (1 + _erf(a / math.sqrt(2))) * (h @ w["GLU_0/Dense_1/kernel"])
        return ln(h, w, "GLU_0/LayerNorm_1") @ w["GLU_0/Dense_2/kernel"]

    def layers(side: str, n: int) -> list[dict[str, np.ndarray]]:
        name = "FlaxBartEncoder" if side == "encoder" else "FlaxBartDecoder"
        base = f"model/{side}/layers/"
        if cfg["use_scan"]:
            stacked = sub(f"{base}{name}Layers/")
            return [{k: v[i] for k, v in stacked.items()} for i in range(n)]
        return [sub(f"{base}{name}Layer_{i}/") for i in range(n)]

    def embed(top: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
        x = top["embed_tokens/embedding"][tokens] * scale
        x = x + top["embed_positions/embedding"][np.arange(tokens.shape[1])]  # offset 0
        return ln(x, top, "layernorm_embedding")

    keys = mask.astype(bool)[:, None, None, :]
    top = sub("model/encoder/")
    h = embed(top, ids)
    for w in layers("encoder", cfg["encoder_layers"]):
        x = ln(h, w, "LayerNorm_0")
        h = h + ln(attention(x, x, w, "FlaxBartAttention_0", keys), w, "LayerNorm_1")
        h = h + glu(h, w)
    enc = ln(h, top, "final_ln")

    n = dec_ids.shape[1]
    causal = np.tril(np.ones((n, n), dtype=bool))[None, None]
    top = sub("model/decoder/")
    h = embed(top, dec_ids)
    for w in layers("decoder", cfg["decoder_layers"]):
        x = ln(h, w, "LayerNorm_0")
        h = h + ln(attention(x, x, w, "FlaxBartAttention_0", causal), w, "LayerNorm_1")
        x = ln(h, w, "LayerNorm_2")
        h = h + ln(attention(x, enc, w, "FlaxBartAttention_1", keys), w, "LayerNorm_3")
        h = h + glu(h, w)
    return ln(h, top, "final_ln") @ p["lm_head/kernel"], enc


@pytest.mark.parametrize("name", sorted(DALLE))
def test_fixture_matches_an_independent_numpy_forward(name: str) -> None:
    """Our reading of the original (positions at 0, LN order, GLU, final_ln) reproduces its logits."""
    ref = np.load(DALLE[name] / "reference.npz")
    logits, enc = _np_reference_logits(
        DALLE[name], ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"]
    )
    np.testing.assert_allclose(enc, ref["encoder_hidden_states"], atol=1e-4)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)
    assert np.abs(ref["logits"]).max() > 1.0  # the reference is not trivially small


# ------------------------------------------------------------------------------------------------
# DalleBart: our loader + our model against the original's logits


def _inputs(ref: np.lib.npyio.NpzFile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(ref["input_ids"]).long(),
        torch.from_numpy(ref["attention_mask"]).long(),
        torch.from_numpy(ref["decoder_input_ids"]).long(),
    )


EXPECTED_CONFIGS = {
    "scan": dict(encoder_layers=2, decoder_layers=3, force_ln_scale=False, scale_embedding=False),
    "unscanned": dict(
        encoder_layers=3, decoder_layers=2, force_ln_scale=True, scale_embedding=True
    ),
}


@pytest.mark.parametrize("name", sorted(DALLE))
def test_load_flax_dalle_config_and_names(name: str) -> None:
    cfg, state = load_flax_dalle(DALLE[name])
    state = materialize(state)
    want = dict(
        encoder_vocab_size=100,
        image_vocab_size=40,
        max_text_length=12,
        image_length=9,
        d_model=32,
        attention_heads=4,
        ffn_dim=48,
        decoder_start_token_id=40,
        dropout=0.0,
        **EXPECTED_CONFIGS[name],
    )
    assert {k: getattr(cfg, k) for k in want} == want
    from dallemini.models.bart import DalleBart

    expected = DalleBart(cfg).state_dict()
    assert set(state) == set(expected)
    for k, v in state.items():
        assert v.shape == expected[k].shape, k
        assert v.dtype == torch.float32 and v.is_contiguous(), k
    # no tensor shares storage with another (safetensors refuses that)
    ptrs = [v.untyped_storage().data_ptr() for v in state.values()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("name", sorted(DALLE))
def test_flax_dalle_logits_match_the_original(name: str) -> None:
    from dallemini.models.bart import DalleBart

    cfg, state = load_flax_dalle(DALLE[name])
    state = materialize(state)
    model = DalleBart(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    ref = np.load(DALLE[name] / "reference.npz")
    ids, mask, dec = _inputs(ref)
    with torch.no_grad():
        enc = model.encode(ids, mask)
        logits = model(ids, mask, decoder_input_ids=dec).logits
    np.testing.assert_allclose(enc.numpy(), ref["encoder_hidden_states"], atol=1e-4)
    np.testing.assert_allclose(logits.numpy(), ref["logits"], atol=1e-4)

    # the incremental path (KV cache, one token at a time) gives the same logits
    cache = model.init_cache(enc, mask)
    steps = [model.decode_step(dec[:, i : i + 1], cache) for i in range(dec.shape[1])]
    np.testing.assert_allclose(torch.cat(steps, 1).numpy(), ref["logits"], atol=1e-4)


def _copy(tmp_path: Path, name: str = "scan", **changes: object) -> Path:
    folder = tmp_path / name
    shutil.copytree(DALLE[name], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "flag, value",
    [
        ("ln_type", "rmsnorm"),
        ("ln_positions", "swinv2"),
        ("ln_positions", "deepnet"),
        ("ln_positions", "preln"),
        ("use_bias", True),
        ("use_glu", False),
        ("use_head_scale", True),
        ("use_cosine_attention", True),
        ("use_alibi", True),
        ("use_swin_position_embeddings", True),
        ("use_absolute_position_embeddings", False),
        ("use_deepnet_scaling", True),
        ("use_final_ln_encoder", False),
        ("use_final_ln_decoder", False),
        ("tie_word_embeddings", True),
        ("activation_function", "gelu_new"),
        ("sinkhorn_iters", 2),
    ],
)
def test_unsupported_flags_are_refused_by_name(tmp_path: Path, flag: str, value: object) -> None:
    folder = _copy(tmp_path, **{flag: value})
    with pytest.raises(ConfigError, match=flag):
        load_flax_dalle(folder)


def test_other_config_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="decoder_ffn_dim"):
        load_flax_dalle(_copy(tmp_path / "a", decoder_ffn_dim=64))
    with pytest.raises(ConfigError, match="decoder_attention_heads"):
        load_flax_dalle(_copy(tmp_path / "b", decoder_attention_heads=2))
    with pytest.raises(CheckpointError, match="model_type"):
        load_flax_dalle(_copy(tmp_path / "c", model_type="bart"))
    with pytest.raises(ConfigError, match="d_model"):
        load_flax_dalle(_copy(tmp_path / "d", d_model="32"))
    # use_subln_init only changes the initialisation: accepted
    cfg, _ = load_flax_dalle(_copy(tmp_path / "e", use_subln_init=True))
    assert cfg.d_model == 32


def test_config_that_does_not_match_the_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model/encoder/final_ln/scale' is missing"):
        load_flax_dalle(_copy(tmp_path / "a", force_ln_scale=True))
    with pytest.raises(
        CheckpointError,
        match=r"LayerNorm_0/bias. has shape \(3, 32\), config.json implies \(2, 32\)",
    ):
        load_flax_dalle(_copy(tmp_path / "b", decoder_layers=2))
    with pytest.raises(CheckpointError, match="does not describe"):
        load_flax_dalle(_copy(tmp_path / "c", "unscanned", encoder_layers=2))
    with pytest.raises(CheckpointError, match="embed_tokens/embedding"):
        load_flax_dalle(_copy(tmp_path / "d", encoder_vocab_size=101))


def test_truncated_dalle_checkpoint(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    weights = folder / "flax_model.msgpack"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_flax_dalle(folder)
    assert str(weights) in str(e.value)


def test_missing_files(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "flax_model.msgpack").unlink()
    with pytest.raises(CheckpointError, match=r"flax_model\.msgpack"):
        load_flax_dalle(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_flax_dalle(folder)


def test_sharded_and_half_precision_checkpoints(tmp_path: Path) -> None:
    """transformers' sharded layout (index.json + shards) and a bfloat16 file load the same tensors."""
    want = materialize(load_flax_dalle(DALLE["scan"])[1])
    flat = flatten_tree(read_msgpack(DALLE["scan"] / "flax_model.msgpack"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(DALLE["scan"] / "config.json", folder)
    keys = list(flat)
    shards = {
        "flax_model-00001-of-00002.msgpack": keys[:20],
        "flax_model-00002-of-00002.msgpack": keys[20:],
    }
    for file, ks in shards.items():
        write_msgpack(folder / file, unflatten_tree({k: flat[k] for k in ks}))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    got = materialize(load_flax_dalle(folder)[1])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    half = tmp_path / "bf16"
    half.mkdir()
    shutil.copy(DALLE["scan"] / "config.json", half)
    write_msgpack(
        half / "flax_model.msgpack", unflatten_tree({k: v.bfloat16() for k, v in flat.items()})
    )
    got = materialize(load_flax_dalle(half)[1])
    assert all(
        got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()) for k in want
    )


def test_detected_as_flax_dalle() -> None:
    from dallemini.checkpoints import detect_format

    assert detect_format(DALLE["scan"]) == "flax-dalle"


# ------------------------------------------------------------------------------------------------
# Flax VQGAN

# Small, with the Flax model's fixed 32 norm groups: 16x16 images -> 8x8 codes, attention at 8x8.
VQ_JSON = {
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "z_channels": 32,
    "embed_dim": 16,
    "n_embed": 24,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "double_z": False,
    "dropout": 0.0,
    "resamp_with_conv": True,
    "give_pre_end": False,
    "transformers_version": "4.12.0",
}


def _random_taming_state(cfg: VQGANConfig) -> dict[str, torch.Tensor]:
    from dallemini.models.vqgan import VQGAN

    g = torch.Generator().manual_seed(0)
    return {
        k: torch.randn(v.shape, generator=g) * (0.2 if v.dim() > 1 else 1.0)
        for k, v in VQGAN(cfg).state_dict().items()
    }


def _to_flax(state: dict[str, torch.Tensor], old_norm_shape: bool = False) -> dict:
    """taming names -> vqgan-jax tree, written independently of the loader (as vqgan-jax's converter)."""
    flat = {}
    for key, t in state.items():
        for pat in re.findall(r"\w+[.]\d+", key):
            key = key.replace(pat, "_".join(pat.split(".")))
        parts = key.split(".")
        if parts[-1] == "weight" and t.dim() == 4:
            parts[-1], t = "kernel", t.permute(2, 3, 1, 0)
        elif parts[-1] == "weight" and t.dim() == 2:
            parts[-1] = "embedding"
        elif parts[-1] == "weight":  # GroupNorm
            parts[-1] = "scale"
        if old_norm_shape and "norm" in key and t.dim() == 1:
            t = t.reshape(1, 1, 1, -1)
        flat["/".join(parts)] = t.contiguous()
    return unflatten_tree(flat)


def _vq_folder(tmp_path: Path, tree: dict, **changes: object) -> Path:
    folder = tmp_path / "vqgan"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**VQ_JSON, **changes}))
    write_msgpack(folder / "flax_model.msgpack", tree)
    return folder


def _vq_config() -> VQGANConfig:
    return VQGANConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        z_channels=32,
        embed_dim=16,
        n_embed=24,
        resolution=16,
        num_groups=32,
        pixel_range="0,1",
    )


@pytest.mark.parametrize("old_norm_shape", [False, True])
def test_flax_vqgan_round_trip(tmp_path: Path, old_norm_shape: bool) -> None:
    cfg = _vq_config()
    state = _random_taming_state(cfg)
    tree = _to_flax(state, old_norm_shape)
    assert (
        "quantize" in tree and "down_1" in tree["encoder"] and "block_1" in tree["decoder"]["mid"]
    )
    assert tuple(tree["encoder"]["conv_in"]["kernel"].shape) == (3, 3, 3, 32)  # HWIO
    cfg_loaded, loaded = load_flax_vqgan(_vq_folder(tmp_path, tree))
    assert cfg_loaded == cfg
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].shape == v.shape and torch.equal(loaded[k], v), k

    from dallemini.models.vqgan import VQGAN

    model = VQGAN(cfg_loaded)
    model.load_state_dict(loaded, strict=True)
    model.eval()
    codes = torch.randint(0, cfg.n_embed, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        images = model.decode(codes)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    "flag, value", [("double_z", True), ("resamp_with_conv", False), ("give_pre_end", True)]
)
def test_flax_vqgan_refuses_flags(tmp_path: Path, flag: str, value: bool) -> None:
    tree = _to_flax(_random_taming_state(_vq_config()))
    with pytest.raises(ConfigError, match=flag):
        load_flax_vqgan(_vq_folder(tmp_path, tree, **{flag: value}))


def test_flax_vqgan_mismatches(tmp_path: Path) -> None:
    tree = _to_flax(_random_taming_state(_vq_config()))
    del tree["decoder"]["up_1"]["attn_0"]["q"]["kernel"]
    with pytest.raises(CheckpointError, match="decoder/up_1/attn_0/q/kernel"):
        load_flax_vqgan(_vq_folder(tmp_path / "a", tree))
    tree = _to_flax(_random_taming_state(_vq_config()))
    with pytest.raises(CheckpointError, match="quantize/embedding/embedding"):
        load_flax_vqgan(_vq_folder(tmp_path / "b", tree, n_embed=32))
    with pytest.raises(CheckpointError, match="does not describe"):
        load_flax_vqgan(_vq_folder(tmp_path / "c", tree, attn_resolutions=[]))


def test_flax_vqgan_default_preset_names() -> None:
    """Every parameter of the real f16_16384 layout maps to a vqgan-jax name (facts §2.5)."""
    from dallemini.checkpoints.flax_vqgan import flax_name
    from dallemini.checkpoints.taming import expected_shapes
    from dallemini.config import VQGAN_PRESETS

    names = {flax_name(k) for k in expected_shapes(VQGAN_PRESETS["f16_16384"])}
    for want in (
        "encoder/down_2/block_0/nin_shortcut/bias",
        "encoder/down_4/block_0/nin_shortcut/bias",
        "encoder/down_4/attn_1/proj_out/bias",
        "encoder/down_3/downsample/conv/bias",
        "encoder/mid/attn_1/norm/bias",
        "decoder/up_4/attn_2/q/bias",
        "decoder/up_1/upsample/conv/bias",
        "decoder/up_0/block_2/conv2/bias",
        "quantize/embedding/embedding",
    ):
        assert want in names, want
    assert not any(n.startswith("encoder/down_4/downsample") or "up_0/upsample" in n for n in names)
    assert dataclasses.replace(VQGAN_PRESETS["f16_16384"]).num_groups == 32


def test_convert_flax_dalle_with_flax_vqgan(tmp_path: Path) -> None:
    """`convert` joins a Flax DalleBart and a Flax VQGAN into one model directory that keeps the logits."""
    from dataclasses import replace

    from dallemini.checkpoints import convert, detect_format, load_parts
    from dallemini.checkpoints.native import load_into
    from dallemini.models.bart import DalleBart

    cfg = replace(
        _vq_config(), resolution=6, attn_resolutions=(3,)
    )  # grid 3x3 = the fixture's 9 image tokens
    vq_dir = _vq_folder(
        tmp_path, _to_flax(_random_taming_state(cfg)), resolution=6, attn_resolutions=[3]
    )
    assert detect_format(vq_dir) == "flax-vqgan"
    out = convert(DALLE["scan"], tmp_path / "model", vqgan=vq_dir)
    assert detect_format(out) == "native"
    parts = load_parts(out)
    assert parts.config.vqgan.grid_size**2 == parts.config.bart.image_length == 9
    model = load_into(DalleBart(parts.config.bart), parts.states["bart"], "converted").eval()
    ref = np.load(DALLE["scan"] / "reference.npz")
    ids, mask, dec = _inputs(ref)
    with torch.no_grad():
        logits = model(ids, mask, decoder_input_ids=dec).logits
    np.testing.assert_allclose(logits.numpy(), ref["logits"], atol=1e-4)
