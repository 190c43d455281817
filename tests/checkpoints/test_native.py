"""Native model directories: round trip, atomic writes, and clear refusals of broken or foreign files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dallemini.checkpoints import detect_format, load_parts
from dallemini.checkpoints.lazy import LazyTensor
from dallemini.checkpoints.native import (
    EXAMPLES_FILE,
    VOCABULARY_FILE,
    ModelExamples,
    caption_words,
    read_config,
    read_examples,
    read_vocabulary,
    save_model_dir,
    write_examples,
    write_vocabulary,
)
from dallemini.config import PipelineConfig, preset
from dallemini.errors import CheckpointError
from dallemini.pipeline import TextToImage, load_pipeline
from dallemini.random_model import create_random_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", seed=0)


def test_round_trip(tiny_dir: Path) -> None:
    assert detect_format(tiny_dir) == "native"
    cfg = read_config(tiny_dir)
    assert cfg == preset("tiny")
    assert json.loads((tiny_dir / "config.json").read_text())["format"] == "dallemini"
    parts = load_parts(tiny_dir)
    assert set(parts.states) == {"bart", "vqgan"}
    pipe = load_pipeline(tiny_dir, device="cpu")
    sd = pipe.bart.state_dict()
    for k, v in parts.states["bart"].items():
        assert torch.equal(sd[k], v), k


def test_generation_is_reproducible(tiny_dir: Path) -> None:
    pipe = TextToImage.from_pretrained(tiny_dir, device="cpu")
    a = pipe("pizza on a blue background, top left", num_images=2, seed=3)
    b = pipe("pizza on a blue background, top left", num_images=2, seed=3)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.seed for r in a] == [3, 4]
    assert a[0].image.size == (64, 64)
    assert a[0].image.tobytes() == b[0].image.tobytes()
    many = pipe(["cat", "dog"], num_images=2, seed=3)
    assert len(many) == 2 and all(len(x) == 2 for x in many)
    assert many[0][0].tokens != many[1][0].tokens


def test_stream_frames(tiny_dir: Path) -> None:
    pipe = TextToImage.from_pretrained(tiny_dir, device="cpu")
    frames = list(pipe.stream("a cat", num_images=2, seed=1, every=4))
    assert [f.done for f in frames] == [4, 8, 12, 16]
    final = pipe("a cat", num_images=2, seed=1)
    assert frames[-1].images[1].tobytes() == final[1].image.tobytes()
    # the first frame has one token row: everything below the first 16 pixel rows is grey
    px = frames[0].images[0].crop((0, 16, 64, 64)).getextrema()
    assert px == ((128, 128), (128, 128), (128, 128))


def test_existing_destination_is_kept(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        save_model_dir(tiny_dir, preset("tiny"), {})
    assert (tiny_dir / "bart.safetensors").is_file()


def test_truncated_weights_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    data = (d / "bart.safetensors").read_bytes()
    (d / "bart.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"bart\.safetensors.*truncated or corrupt"):
        load_pipeline(d, device="cpu")
    (d / "bart.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"bart\.safetensors"):
        load_pipeline(d, device="cpu")


def test_shape_mismatch_names_the_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    cfg = read_config(tiny_dir)
    wrong = replace(cfg, bart=replace(cfg.bart, ffn_dim=cfg.bart.ffn_dim + 1))
    parts = load_parts(tiny_dir)
    save_model_dir(d, wrong, parts.states, parts.tokenizer_json)
    with pytest.raises(
        CheckpointError,
        match=r"encoder\.layers\.0\.glu\.fc0\.weight.*shape \(128, 64\).*\(129, 64\)",
    ):
        load_pipeline(d, device="cpu")


def test_foreign_and_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no known checkpoint"):
        load_pipeline(tmp_path / "x")
    (tmp_path / "y").mkdir()
    cfg = PipelineConfig().to_dict()
    cfg["version"] = 99
    (tmp_path / "y" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="version 99"):
        read_config(tmp_path / "y")


def test_loading_adopts_the_weights_and_takes_dtypes(tiny_dir: Path) -> None:
    """from_pretrained builds modules without a second copy of the weights; dtype and vqgan_dtype apply."""
    from dallemini.checkpoints.native import build_from_state
    from dallemini.models.vqgan import VQGAN

    parts = load_parts(tiny_dir)
    state = parts.states["vqgan"]
    key = "decoder.conv_in.weight"
    given = state[key]
    half = {k: v.half() for k, v in state.items()}
    vq = build_from_state(lambda: VQGAN(parts.config.vqgan), dict(state), "test")
    assert vq.state_dict()[key].data_ptr() == given.data_ptr()  # adopted, not copied
    assert build_from_state(
        lambda: VQGAN(parts.config.vqgan), half, "t"
    ).decoder.conv_in.weight.dtype == (torch.float32)
    assert not half  # consumed: each original can be freed once converted
    lazy = load_parts(tiny_dir, lazy=True).states["vqgan"]
    assert isinstance(lazy[key], LazyTensor)
    vq16 = build_from_state(lambda: VQGAN(parts.config.vqgan), lazy, "t", torch.bfloat16, "cpu")
    assert vq16.decoder.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(vq16.decoder.conv_in.weight, given.bfloat16())
    with pytest.raises(CheckpointError, match="missing"):
        build_from_state(
            lambda: VQGAN(parts.config.vqgan), {k: v for k, v in state.items() if k != key}, "t"
        )
    pipe = TextToImage.from_pretrained(
        tiny_dir, device="cpu", dtype="bfloat16", vqgan_dtype="bfloat16"
    )
    assert pipe.bart.decoder.lm_head.weight.dtype == torch.bfloat16
    assert pipe.vqgan.decoder.conv_in.weight.dtype == torch.bfloat16
    assert pipe.vqgan.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ref = TextToImage.from_pretrained(tiny_dir, device="cpu")
    assert ref.vqgan.decoder.conv_in.weight.dtype == torch.float32
    out = pipe("pizza on a blue background, top left", num_images=2, seed=3)
    assert len(out) == 2 and out[0].image.size == (64, 64)
    tokens = torch.tensor([r.tokens for r in out])
    # a bf16 decoder reproduces float32's pixels to within a few levels
    a = torch.tensor(np.asarray(pipe.decode(tokens)[0]), dtype=torch.float32)
    b = torch.tensor(np.asarray(ref.decode(tokens)[0]), dtype=torch.float32)
    assert (a - b).abs().mean() < 3.0


def test_loading_and_converting_hold_one_tensor_at_a_time(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lazy tensors are read one at a time: converting keeps none of them, loading onto a device
    (meta here, as a GPU would) keeps none on the host."""
    import weakref

    from dallemini.checkpoints import convert
    from dallemini.checkpoints.lazy import FileTensor
    from dallemini.checkpoints.native import build_from_state
    from dallemini.models.bart import DalleBart

    alive, most = [0], [0]
    read = FileTensor._read_file

    def counted(self: FileTensor) -> torch.Tensor:
        t = read(self)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(t.untyped_storage(), lambda: alive.__setitem__(0, alive[0] - 1))
        return t

    monkeypatch.setattr(FileTensor, "_read_file", counted)
    convert(tiny_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    assert most[0] == 1 and alive[0] == 0
    parts = load_parts(tmp_path / "bf16", lazy=True)
    most[0] = 0
    build_from_state(lambda: DalleBart(parts.config.bart), parts.states["bart"], "t", None, "meta")
    assert most[0] == 1 and alive[0] == 0


def test_vocabulary_and_examples_files(tmp_path: Path) -> None:
    assert caption_words(" man's red hat, top-left: 3 cats") == [
        "man's", "red", "hat", "top", "left", "3", "cats"
    ]  # fmt: skip
    assert read_vocabulary(tmp_path) is None and read_examples(tmp_path) is None  # optional files
    write_vocabulary(tmp_path, [" a red hat, top left", " a blue hat"])
    assert (tmp_path / VOCABULARY_FILE).read_text() == "a\nblue\nhat\nleft\nred\ntop\n"
    assert read_vocabulary(tmp_path) == {"a", "blue", "hat", "left", "red", "top"}
    write_examples(tmp_path, ["a red hat"], "hats")
    assert read_examples(tmp_path) == ModelExamples("hats", ("a red hat",))
    assert json.loads((tmp_path / EXAMPLES_FILE).read_text()) == {
        "description": "hats",
        "prompts": ["a red hat"],
    }
    (tmp_path / EXAMPLES_FILE).write_text('{"prompts": "a red hat"}')
    with pytest.raises(CheckpointError, match=r"examples\.json must be"):
        read_examples(tmp_path)
    (tmp_path / EXAMPLES_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_examples(tmp_path)
