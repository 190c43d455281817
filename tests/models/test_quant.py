"""8-bit DalleBart weights: Int8Linear, quantize_, loading with dtype="int8", int8 model directories."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dallemini.checkpoints import convert, load_parts
from dallemini.checkpoints.lazy import LazyTensor
from dallemini.checkpoints.native import read_config
from dallemini.checkpoints.quantized import build_bart, float_layers_to_quantize
from dallemini.checkpoints.safetensors_io import read_header, read_safetensors, write_safetensors
from dallemini.config import BART_PRESETS
from dallemini.devices import resolve_dtype
from dallemini.errors import CheckpointError, ConfigError
from dallemini.models.bart import DalleBart
from dallemini.models.kernels import cpu
from dallemini.models.quant import (
    Int8Embedding,
    Int8Linear,
    dequantize_weight,
    int8_layers,
    quantizable_layers,
    quantize_,
    quantize_weight,
)
from dallemini.pipeline import TextToImage
from dallemini.random_model import create_random_model
from tests.test_cli import run_cli

PROMPTS = ["pizza on a blue background", "a red car"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("quant") / "tiny", preset="tiny", seed=3)


@pytest.fixture(scope="module")
def int8_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny_dir, tmp_path_factory.mktemp("quant") / "int8", dtype=torch.int8)


@torch.inference_mode()
def logits(pipe: TextToImage, seed: int = 0) -> torch.Tensor:
    """Teacher-forced logits [2, image_length, V] of the prompts on seeded random image tokens."""
    ids, mask = pipe.text(PROMPTS)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(
        0, pipe.config.vqgan.n_embed, (2, pipe.config.bart.image_length), generator=g
    )
    return pipe.bart(ids, mask, labels=labels).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 9])
@pytest.mark.parametrize(("k", "n"), [(64, 48), (17, 5), (100, 33), (2730, 24), (48, 1)])
def test_int8_linear_matches_the_dequantized_product(
    dtype: torch.dtype, rows: int, k: int, n: int
) -> None:
    g = torch.Generator().manual_seed(k * 1000 + n)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    q = Int8Linear.from_linear(linear)
    x = torch.randn(rows, k, generator=g).to(dtype)
    with torch.inference_mode():
        y = q(x)
        y3 = q(x.view(1, rows, k))  # any leading shape
    ref = x.double() @ q.dequantized(torch.float64).t()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: rounded output and scales
    assert y.dtype == dtype and y.shape == (rows, n)
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(y3.view(rows, n), y)
    # ... and close to the float layer itself: int8 rounding only
    full = F.linear(x.double(), linear.weight.double())
    assert (ref - full).abs().max() <= 0.02 * full.abs().max()


def test_int8_linear_takes_unaligned_and_strided_inputs() -> None:
    """A bfloat16 view that does not start on a 64-byte boundary (the CPU kernel would crash on it)
    or is not contiguous gives the values of a fresh copy."""
    q = Int8Linear.from_linear(nn.Linear(48, 32, bias=False))
    big = torch.randn(5, 48).bfloat16()
    view = big[1:3]  # 96 bytes in
    assert view.data_ptr() % 64 != 0
    with torch.inference_mode():
        ref = view.double() @ q.dequantized(torch.float64).t()
        for got in (q(view), q(view.clone())):
            assert (got.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
        wide = torch.randn(2, 96).bfloat16()
        assert torch.equal(q(wide[:, ::2]), q(wide[:, ::2].contiguous()))


def test_int8_linear_backpropagates_into_its_input() -> None:
    q = Int8Linear.from_linear(nn.Linear(16, 8, bias=False))
    x = torch.randn(2, 16, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.dequantized().sum(0).expand(2, -1), atol=1e-5)
    assert not list(q.parameters())  # int8 weights are buffers: nothing to train


def test_quantize_weight_rounds_each_row_to_its_own_scale() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.0, -2.9]])
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q[0].abs().max() == q[2].abs().max() == 127 and q[1].abs().max() == 0
    assert torch.allclose(scale, torch.tensor([1 / 127, 1.0, 3 / 127]))  # a zero row: any scale
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-7


def test_quantize_replaces_the_layers_and_keeps_logits_close(tiny_dir: Path) -> None:
    pipe = TextToImage.from_pretrained(tiny_dir, device="cpu")
    ref = logits(pipe)
    names = quantizable_layers(pipe.bart)
    assert "decoder.lm_head" in names and len(names) == 2 * 7 + 2 * 11 + 1 + 1  # 2 + 2 layers
    # the text embedding is int8 (one scale per token); the image-token one stays float
    assert [n for n in names if "embed" in n] == ["encoder.embed_tokens"]
    quantize_(pipe.bart)  # an accelerated model that has run: its fused layers follow the swap
    assert int8_layers(pipe.bart) == names
    got = logits(pipe)
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean() < 1e-3
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    # the same model as loading with dtype="int8": identical logits
    assert torch.equal(got, logits(TextToImage.from_pretrained(tiny_dir, dtype="int8")))


def test_from_pretrained_int8_generates(tiny_dir: Path) -> None:
    pipe = TextToImage.from_pretrained(tiny_dir, device="cpu", dtype="int8")
    assert pipe.dtype == torch.int8
    assert int8_layers(pipe.bart) == quantizable_layers(pipe.bart)  # with the output head
    assert pipe.bart.decoder.embed_tokens.weight.dtype == torch.float32  # activations in float32
    assert next(pipe.vqgan.parameters()).dtype == torch.float32
    with torch.inference_mode():
        ids, mask = pipe.text(["a cat"])
        cache = pipe.bart.init_cache(pipe.bart.encode(ids, mask), mask)
    step = cpu.native_step(
        pipe.bart, cache, cache.length
    )  # the native layer kernel reads the int8 weights
    assert step is None or all(k._params.i8 == 1 for k in step.layers)
    one = pipe("a cat", num_images=1, seed=4)  # one image: the one-image decoding step
    two = pipe(PROMPTS, num_images=2, seed=4, max_batch=1)
    assert one[0].image.size == (64, 64) and len(two) == 2 and len(two[1]) == 2
    assert one[0].tokens == pipe("a cat", num_images=1, seed=4)[0].tokens  # seeded: repeatable


def test_int8_loading_frees_each_float_weight_before_reading_the_next(tiny_dir: Path) -> None:
    """Peak memory while loading with dtype="int8": the int8 model plus one float layer."""
    state = load_parts(tiny_dir, lazy=True).states["bart"]
    layers = set(float_layers_to_quantize(state))
    alive: list[weakref.ref] = []

    def watched(t: LazyTensor) -> LazyTensor:
        def read() -> torch.Tensor:
            assert all(r() is None for r in alive), "a float weight outlived its int8 copy"
            value = t.load()
            alive.append(weakref.ref(value))
            return value

        return LazyTensor(tuple(t.shape), t.dtype, read)

    state = {k: watched(v) if k[: -len(".weight")] in layers else v for k, v in state.items()}
    cfg = read_config(tiny_dir).bart
    model = build_bart(cfg, state, "test", torch.int8)
    assert len(alive) == len(layers) == len(int8_layers(model))


def test_int8_directory_round_trip(tiny_dir: Path, int8_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((int8_dir / "config.json").read_text())
    assert cfg["bart"]["quantization"] == "int8"
    assert "quantization" not in json.loads((tiny_dir / "config.json").read_text())["bart"]
    header, _ = read_header(int8_dir / "bart.safetensors")
    assert header["decoder.layers.0.glu.fc2.weight"]["dtype"] == "I8"
    assert header["decoder.layers.0.glu.fc2.weight_scale"]["dtype"] == "F32"
    assert header["decoder.embed_tokens.weight"]["dtype"] == "F32"
    assert header["encoder.embed_tokens.weight"]["dtype"] == "I8"
    assert header["encoder.embed_tokens.weight_scale"]["shape"] == [
        BART_PRESETS["tiny"].encoder_vocab_size
    ]
    assert (int8_dir / "bart.safetensors").stat().st_size < (
        tiny_dir / "bart.safetensors"
    ).stat().st_size
    stored = TextToImage.from_pretrained(int8_dir, dtype="int8")
    assert stored.dtype == torch.int8 and isinstance(stored.bart.decoder.lm_head, Int8Linear)
    quantized_at_load = logits(TextToImage.from_pretrained(tiny_dir, dtype="int8"))
    assert torch.equal(logits(stored), quantized_at_load)
    # float32 from an int8 directory: the weights dequantized (a float model of the int8 values)
    floats = TextToImage.from_pretrained(int8_dir, dtype="float32")
    assert not int8_layers(floats.bart) and floats.dtype == torch.float32
    assert torch.allclose(logits(floats), quantized_at_load, atol=1e-4, rtol=1e-4)
    # and back: convert --dtype float32 writes the dequantized float weights
    back = convert(int8_dir, tmp_path / "back", dtype=torch.float32)
    assert "quantization" not in json.loads((back / "config.json").read_text())["bart"]
    assert torch.equal(logits(TextToImage.from_pretrained(back)), logits(floats))
    # converting int8 to int8 keeps it as it is
    again = convert(int8_dir, tmp_path / "again", dtype=torch.int8)
    assert torch.equal(logits(TextToImage.from_pretrained(again, dtype="int8")), quantized_at_load)


def test_int8_embedding_looks_up_the_dequantized_rows() -> None:
    emb = nn.Embedding(10, 6)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[1, 2, 2], [9, 0, 3]])
    want = dequantize_weight(q.weight, q.weight_scale)[ids]
    assert q.weight.dtype == torch.int8 and torch.equal(q(ids), want)
    assert (q(ids) - emb(ids)).abs().max() <= q.weight_scale.max() / 2 + 1e-6
    assert q.to(torch.bfloat16)(ids).dtype == torch.bfloat16  # the model's float dtype
    assert not list(q.parameters())


def test_int8_directory_with_a_float_text_embedding_still_loads(
    int8_dir: Path, tmp_path: Path
) -> None:
    # directories written before the text embedding was quantized store it in float32
    old = tmp_path / "old"
    old.mkdir()
    for f in int8_dir.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    state = read_safetensors(old / "bart.safetensors")
    name = "encoder.embed_tokens.weight"
    state[name] = dequantize_weight(state[name], state.pop(name + "_scale"))
    write_safetensors(old / "bart.safetensors", state)
    pipe = TextToImage.from_pretrained(old, dtype="int8")
    assert type(pipe.bart.encoder.embed_tokens) is nn.Embedding
    assert isinstance(pipe.bart.decoder.lm_head, Int8Linear)
    # the float table holds the int8 values times their scales: the same logits
    assert torch.equal(logits(pipe), logits(TextToImage.from_pretrained(int8_dir, dtype="int8")))


def test_int8_state_and_config_must_agree(int8_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((int8_dir / "config.json").read_text())
    del cfg["bart"]["quantization"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in int8_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization"):
        TextToImage.from_pretrained(bad, dtype="int8")


def test_int8_is_for_the_dallebart_only(tiny_dir: Path) -> None:
    assert resolve_dtype("int8", weights=True) == torch.int8
    with pytest.raises(ConfigError, match="int8 applies to the DalleBart's weights only"):
        resolve_dtype("int8")
    with pytest.raises(ConfigError, match="int8 applies to the DalleBart's weights only"):
        TextToImage.from_pretrained(tiny_dir, vqgan_dtype="int8")
    with pytest.raises(ConfigError, match="int8"):
        resolve_dtype("int4", weights=True)


def test_fused_projections_run_int8_layers_one_by_one() -> None:
    torch.manual_seed(0)
    model = DalleBart(BART_PRESETS["tiny"]).eval()
    cpu.accelerate(model)
    attn = model.decoder.layers[0].self_attn
    quantize_(model)
    x = torch.randn(1, 3, model.config.d_model)
    with torch.inference_mode():
        q = attn.project_qkv(x)[0]
    assert attn.qkv.layers == (attn.q_proj, attn.k_proj, attn.v_proj)  # re-bound to the int8 layers
    assert torch.equal(q, attn.split(attn.q_proj(x)))
    assert attn.qkv.weight(x) is None


def test_cli_generate_and_convert_int8(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ("generate", "--model", tiny_dir, "-n", "1", "--seed", "0", "--out", out, "a cat")
    code, _, err = run_cli(capsys, *args, "--dtype", "int8", "--device", "cpu")
    assert code == 0, err
    assert json.loads((out / "generation.json").read_text())["dtype"] == "int8"
    dst = tmp_path / "int8"
    code, _, err = run_cli(capsys, "convert", tiny_dir, dst, "--dtype", "int8")
    assert code == 0, err
    assert json.loads((dst / "config.json").read_text())["bart"]["quantization"] == "int8"
    code, _, err = run_cli(capsys, "download", "mini", "--dtype", "int8")
    assert code == 2 and "int8" in err


def test_quantize_weight_in_blocks_of_rows_gives_the_whole_weights_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = torch.randn(37, 11)
    whole = quantize_weight(w)
    monkeypatch.setattr("dallemini.models.quant._QUANTIZE_BLOCK", 11 * 5)  # 5 rows a block
    blocks = quantize_weight(w)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])
