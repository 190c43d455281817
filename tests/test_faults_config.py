"""Absurd or mistyped config values and pickled stand-ins in checkpoints: refused with one clear error."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dallemini.config as config_module
from dallemini.checkpoints.min_dalle import load_min_dalle
from dallemini.checkpoints.safe_load import ForeignObject, load_torch_file, require_tensors
from dallemini.checkpoints.taming import load_taming
from dallemini.config import (
    BART_PRESETS,
    VQGAN_PRESETS,
    BartConfig,
    ClipConfig,
    PipelineConfig,
    SamplingConfig,
    TextConfig,
    VQGANConfig,
    check_memory,
    preset,
)
from dallemini.errors import CheckpointError, ConfigError
from dallemini.models.bart import DalleBart
from dallemini.models.clip import SmallClip
from dallemini.models.vqgan import VQGAN
from dallemini.random_model import create_random_model
from tests.test_cli import run_here
from tests.train_utils import subprocess_env, tiny_bart_overrides, write_token_dataset

CONFIGS = (BartConfig, VQGANConfig, ClipConfig, TextConfig, SamplingConfig)
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "dallemini" / "default_model"


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process (a native abort or a long allocation cannot take pytest down)."""
    return subprocess.run(
        [sys.executable, "-m", "dallemini.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and a single `error: ...` line that contains every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("faults") / "tiny", preset="tiny")


def _edited_copy(src: Path, dst: Path, section: str, field: str, value: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg[section][field] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --- wrong types ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "field", "value", "expected"),
    [
        (BartConfig, "d_model", "64", "an integer"),
        (BartConfig, "decoder_layers", 2.5, "an integer"),
        (BartConfig, "encoder_layers", True, "an integer"),
        (BartConfig, "force_ln_scale", "yes", "true or false"),
        (BartConfig, "layer_norm_eps", "1e-5", "a number"),
        (VQGANConfig, "ch", "128", "an integer"),
        (VQGANConfig, "ch_mult", ("1", "2"), "a list of integers"),
        (VQGANConfig, "attn_resolutions", 16, "a list of integers"),
        (VQGANConfig, "pixel_range", 1, "a string"),
        (VQGANConfig, "mid_attn", 1, "true or false"),
        (ClipConfig, "text_width", [256], "an integer"),
        (ClipConfig, "mlp_ratio", None, "a number"),
        (TextConfig, "max_length", "64", "an integer"),
        (TextConfig, "normalize", "false", "true or false"),
        (SamplingConfig, "top_k", "50", "an integer"),
        (SamplingConfig, "temperature", "hot", "a number"),
    ],
)
def test_wrong_types_name_the_field_the_value_and_the_type(
    cls: type, field: str, value: Any, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**{field: value})
    msg = str(info.value)
    assert field in msg and repr(value) in msg and expected in msg, msg


def test_wrong_type_in_config_json_is_a_config_error() -> None:
    data = preset("tiny").to_dict()
    data["bart"]["d_model"] = "64"
    with pytest.raises(ConfigError, match=r"bart\.d_model must be an integer, got '64' \(str\)"):
        PipelineConfig.from_dict(data)


def test_integer_like_values_are_kept_as_ints() -> None:
    import numpy as np

    cfg = BartConfig(d_model=np.int64(64), attention_heads=4)
    assert type(cfg.d_model) is int and cfg.d_model == 64
    assert VQGANConfig(dropout=0).dropout == 0  # an int is a fine float


# --- bounds -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (BartConfig, "decoder_layers", 10**6),
        (BartConfig, "encoder_layers", 10**6),
        (BartConfig, "d_model", 65536),
        (BartConfig, "ffn_dim", 10**9),
        (BartConfig, "encoder_vocab_size", 10**12),
        (BartConfig, "max_text_length", 10**9),
        (BartConfig, "image_length", 10**9),
        (BartConfig, "d_model", 0),
        (VQGANConfig, "ch", 10**9),
        (VQGANConfig, "ch_mult", (1, 10**6)),
        (VQGANConfig, "num_res_blocks", 10**6),
        (VQGANConfig, "n_embed", 10**12),
        (VQGANConfig, "resolution", 2**40),
        (VQGANConfig, "num_groups", 0),
        (ClipConfig, "vision_layers", 10**6),
        (ClipConfig, "text_width", 2**20),
        (ClipConfig, "mlp_ratio", 1e9),
        (TextConfig, "max_length", 10**9),
        (TextConfig, "max_length", 1),
    ],
)
def test_absurd_sizes_are_refused_by_name(cls: type, field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"\.{field} must be between"):
        cls(**{field: value})


def test_too_many_levels_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"vqgan\.ch_mult must have"):
        VQGANConfig(ch_mult=(1,) * 1000, resolution=4096)


def test_bounds_admit_the_published_models_and_the_defaults() -> None:
    mega = BART_PRESETS["mega"]
    assert (mega.encoder_layers, mega.d_model, mega.ffn_dim, mega.attention_heads) == (
        24,
        2048,
        4096,
        32,
    )
    assert (mega.encoder_vocab_size, mega.image_vocab_size) == (50272, 16415)
    vq = VQGAN_PRESETS["f16_16384"]
    assert (vq.ch, vq.ch_mult, vq.n_embed, vq.embed_dim) == (128, (1, 1, 2, 2, 4), 16384, 256)
    for name in ("mini", "mega", "tiny"):
        PipelineConfig.from_dict(preset(name).to_dict())
    PipelineConfig.from_dict(json.loads((DEFAULT_MODEL / "config.json").read_text()))


def test_every_size_field_has_bounds() -> None:
    """Each integer field (and each float that scales a size) is in its class's LIMITS table."""
    for cls in (BartConfig, VQGANConfig, ClipConfig, TextConfig):
        ints = {
            f.name
            for f in dataclasses.fields(cls)
            if f.type in ("int", "tuple[int, ...]", int, tuple[int, ...])
        }
        assert ints <= set(cls.LIMITS), (cls.__name__, ints - set(cls.LIMITS))
    assert "mlp_ratio" in ClipConfig.LIMITS


def test_text_length_is_checked_against_bart() -> None:
    tiny = BART_PRESETS["tiny"]
    with pytest.raises(ConfigError, match=r"text\.max_length \(64\).*bart\.max_text_length \(32\)"):
        PipelineConfig(bart=tiny, text=TextConfig(max_length=64))
    data = preset("tiny").to_dict()
    data["text"]["max_length"] = 10**6
    with pytest.raises(ConfigError, match=r"text\.max_length"):
        PipelineConfig.from_dict(data)
    PipelineConfig(bart=tiny, text=TextConfig(max_length=16))  # shorter is fine


# --- the memory estimate ----------------------------------------------------------------------
def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


@pytest.mark.parametrize(
    "make",
    [
        lambda: (BART_PRESETS["tiny"], DalleBart),
        lambda: (BART_PRESETS["mini"], DalleBart),
        lambda: (BART_PRESETS["mega"], DalleBart),
        lambda: (dataclasses.replace(BART_PRESETS["tiny"], force_ln_scale=True), DalleBart),
        lambda: (VQGAN_PRESETS["tiny"], VQGAN),
        lambda: (VQGAN_PRESETS["f16_16384"], VQGAN),
        lambda: (dataclasses.replace(VQGAN_PRESETS["f16_16384"], decoder_only=True), VQGAN),
        lambda: (ClipConfig(), SmallClip),
    ],
)
def test_param_count_matches_the_built_model(make: Any) -> None:
    cfg, cls = make()
    with torch.device("meta"):
        actual = _numel(cls(cfg))
    assert abs(cfg.param_count() - actual) <= 0.01 * actual, (cfg.param_count(), actual)


def test_default_model_estimate_matches_its_weights() -> None:
    cfg = PipelineConfig.from_dict(json.loads((DEFAULT_MODEL / "config.json").read_text()))
    with torch.device("meta"):
        actual = (
            _numel(DalleBart(cfg.bart)) + _numel(VQGAN(cfg.vqgan)) + _numel(SmallClip(cfg.clip))
        )
    assert abs(cfg.estimate_bytes() - 4 * actual) <= 0.01 * 4 * actual
    assert cfg.estimate_bytes(training=True) == 4 * cfg.estimate_bytes()


def test_memory_check_refuses_what_the_machine_cannot_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    huge = BartConfig(
        d_model=16384,
        attention_heads=128,
        encoder_layers=256,
        decoder_layers=256,
        ffn_dim=65536,
    )
    with pytest.raises(ConfigError, match=r"GiB.*more than this machine's .* GiB of memory"):
        check_memory(huge)  # ~2 * 10^12 parameters: more than any machine has
    mega = preset("mega")
    monkeypatch.setattr(config_module, "physical_memory_bytes", lambda: 2 * 2**30)
    with pytest.raises(ConfigError, match="memory"):
        mega.check_memory()
    with pytest.raises(ConfigError, match="training"):
        check_memory(mega.bart, training=True)
    preset("tiny").check_memory()
    monkeypatch.setattr(config_module, "physical_memory_bytes", lambda: None)
    mega.check_memory()  # unknown memory: no refusal


# --- through the CLI: model directories -------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "field", "value", "needle"),
    [
        ("bart", "decoder_layers", 10**6, "bart.decoder_layers"),
        ("vqgan", "ch", 10**9, "vqgan.ch"),
        ("bart", "d_model", "64", "bart.d_model must be an integer, got '64' (str)"),
        ("text", "max_length", 10**9, "text.max_length"),
    ],
)
def test_model_dir_with_a_bad_config_exits_2(
    tiny: Path, tmp_path: Path, section: str, field: str, value: Any, needle: str
) -> None:
    bad = _edited_copy(tiny, tmp_path / "bad", section, field, value)
    r = run("generate", "--model", bad, "--out", tmp_path / "out", "a cat")
    assert_one_line_error(r.returncode, r.stderr, needle)
    r = run("convert", bad, tmp_path / "converted")
    assert_one_line_error(r.returncode, r.stderr, needle)
    assert not (tmp_path / "converted").exists()


def test_create_and_generate_refuse_a_model_larger_than_memory(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "physical_memory_bytes", lambda: 64 * 2**10)
    code, err = run_here(capsys, "create", tmp_path / "mega", "--preset", "mega")
    assert_one_line_error(code, err, "memory")
    assert not (tmp_path / "mega").exists()
    code, err = run_here(capsys, "generate", "--model", tiny, "--out", tmp_path / "o", "a cat")
    assert_one_line_error(code, err, "memory")


# --- through the CLI: training ----------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("faults") / "data")


def _train(shards: Path, out: Path, *sets: str) -> list[str]:
    args = ["train", "--data", str(shards), "--out", str(out), "--steps", "1"]
    base = {f"bart.{k}": v for k, v in tiny_bart_overrides().items()}
    for s in sets:
        key, _, value = s.partition("=")
        base[key] = value
    for key, value in base.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_train_refuses_an_absurd_d_model(shards: Path, tmp_path: Path) -> None:
    r = run(*_train(shards, tmp_path / "run", "bart.d_model=65536"))
    assert_one_line_error(r.returncode, r.stderr, "bart.d_model must be between")


def test_train_refuses_a_model_larger_than_memory(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [
        "bart.d_model=16384",
        "bart.attention_heads=128",
        "bart.encoder_layers=256",
        "bart.decoder_layers=256",
        "bart.ffn_dim=65536",
    ]
    code, err = run_here(capsys, *_train(shards, tmp_path / "run", *sets))
    assert_one_line_error(code, err, "memory", "training")


def test_train_refuses_a_mistyped_size(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_here(capsys, *_train(shards, tmp_path / "run", "bart.ffn_dim=[1, 2]"))
    assert_one_line_error(code, err, "bart.ffn_dim must be an integer")
    for key in ("image_vocab_size", "encoder_vocab_size", "max_text_length"):
        code, err = run_here(capsys, *_train(shards, tmp_path / "run", f"bart.{key}=many"))
        assert_one_line_error(code, err, f"bart.{key} must be an integer")


def test_train_vqgan_and_train_clip_refuse_models_larger_than_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.training.test_vqgan import write_images

    data = write_images(tmp_path / "imgs", n=4, size=32)
    vq_sets = ["vqgan.ch=1024", "vqgan.ch_mult=64,64", "vqgan.attn_resolutions=[]"]
    args = ["train-vqgan", "--data", data, "--out", tmp_path / "vq", "--model-preset", "tiny"]
    code, err = run_here(capsys, *args, *(x for s in vq_sets for x in ("--set", s)))
    assert_one_line_error(code, err, "memory", "training")
    clip_sets = [f"clip.{k}={v}" for k, v in (("text_width", 8192), ("text_layers", 256))]
    clip_sets += [f"clip.{k}={v}" for k, v in (("vision_width", 8192), ("vision_layers", 256))]
    args = ["train-clip", "--data", data, "--out", tmp_path / "clip", "--batch-size", "4"]
    code, err = run_here(capsys, *args, *(x for s in clip_sets for x in ("--set", s)))
    assert_one_line_error(code, err, "memory", "training")


# --- pickled stand-ins in checkpoints ---------------------------------------------------------
class Gadget:
    """A class the safe loader does not know: it becomes an inert ForeignObject."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _min_dalle_root(tmp_path: Path, enc_changes: dict[str, Any] | None = None) -> Path:
    torch.manual_seed(0)
    model = DalleBart(BART_PRESETS["tiny"])
    root = tmp_path / "md" / "dalle_bart_mini"
    root.mkdir(parents=True)
    enc = dict(model.encoder.state_dict())
    enc.update(enc_changes or {})
    torch.save(enc, root / "encoder.pt")
    torch.save(model.decoder.state_dict(), root / "decoder.pt")
    return root.parent


def test_require_tensors() -> None:
    stub = type("ForeignObject[x.Y]", (ForeignObject,), {"foreign_name": "x.Y"})()
    require_tensors({"a": torch.zeros(1)}, "f.pt")
    with pytest.raises(CheckpointError, match=r"f\.pt: 'b' holds a stand-in for x\.Y"):
        require_tensors({"a": torch.zeros(1), "b": stub}, "f.pt")
    with pytest.raises(CheckpointError, match=r"'epoch' holds a value of type int"):
        require_tensors({"epoch": 3}, "f.pt")
    require_tensors({"epoch": 3, "w": torch.zeros(1)}, "f.pt", metadata={"epoch": int})
    with pytest.raises(CheckpointError, match=r"'epoch' holds a value of type str"):
        require_tensors({"epoch": "3"}, "f.pt", metadata={"epoch": int})
    with pytest.raises(CheckpointError, match=r"key 7"):
        require_tensors({7: torch.zeros(1)}, "f.pt")


@pytest.mark.parametrize("value", [Gadget(), 3, "text", {"nested": torch.zeros(1)}])
def test_min_dalle_with_a_non_tensor_is_refused(tmp_path: Path, value: Any) -> None:
    key = "layers.0.glu.fc0.weight"
    root = _min_dalle_root(tmp_path, {key: value})
    with pytest.raises(CheckpointError, match=rf"encoder\.pt: '{key}' holds"):
        load_min_dalle(root)


def test_min_dalle_stand_in_through_convert(tmp_path: Path) -> None:
    root = _min_dalle_root(tmp_path, {"embed_tokens.weight": Gadget()})
    r = run("convert", root, tmp_path / "out")
    assert_one_line_error(r.returncode, r.stderr, "'embed_tokens.weight'", "Gadget")
    assert not (tmp_path / "out").exists()
    fine = _min_dalle_root(tmp_path / "ok")
    assert load_min_dalle(fine, attention_heads=4)[0] == BART_PRESETS["tiny"]  # no stand-in: loads


TAMING_VQ = VQGANConfig(
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    z_channels=16,
    embed_dim=8,
    n_embed=64,
    resolution=32,
    num_groups=32,
    pixel_range="-1,1",
)


def _taming_ckpt(path: Path, sd_changes: dict[str, Any] | None = None) -> Path:
    torch.manual_seed(0)
    sd: dict[str, Any] = dict(VQGAN(TAMING_VQ).state_dict())
    sd["loss.logvar"] = torch.zeros(())
    sd.update(sd_changes or {})
    ckpt = {
        "epoch": 4,
        "global_step": 1000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "callbacks": {"last": Gadget()},  # Lightning's own objects outside the weights are fine
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def test_taming_with_a_stand_in_is_refused(tmp_path: Path) -> None:
    good = _taming_ckpt(tmp_path / "good" / "last.ckpt")
    cfg, state = load_taming(good)
    VQGAN(cfg).load_state_dict(state, strict=True)
    assert isinstance(load_torch_file(good)["callbacks"]["last"], ForeignObject)
    bad = _taming_ckpt(tmp_path / "bad" / "last.ckpt", {"loss.discriminator.gadget": Gadget()})
    with pytest.raises(CheckpointError, match=r"'loss\.discriminator\.gadget' holds a stand-in"):
        load_taming(bad)
    r = run("convert", bad, tmp_path / "out")
    assert_one_line_error(r.returncode, r.stderr, "'loss.discriminator.gadget'", "Gadget")
    assert not (tmp_path / "out").exists()


def test_bare_taming_state_dict_may_carry_its_step_counters(tmp_path: Path) -> None:
    sd: dict[str, Any] = dict(VQGAN(TAMING_VQ).state_dict())
    path = tmp_path / "bare.ckpt"
    torch.save({**sd, "epoch": 2, "global_step": 7}, path)
    cfg, _ = load_taming(path)
    assert cfg.n_embed == 64
    torch.save({**sd, "epoch": Gadget()}, path)
    with pytest.raises(CheckpointError, match=r"'epoch' holds a stand-in"):
        load_taming(path)


# --- convert checks what it copies, as loading would --------------------------------------------
def test_convert_refuses_a_broken_native_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    src = create_random_model(tmp_path / "src", preset="tiny")
    state = load_file(src / "bart.safetensors")
    state["decoder.lm_head.weight"] = state["decoder.lm_head.weight"][:-1].clone()
    save_file(state, src / "bart.safetensors")
    code, err = run_here(capsys, "convert", src, tmp_path / "out")
    assert_one_line_error(code, err, "decoder.lm_head.weight", "shape")
    assert not (tmp_path / "out").exists()

    data = (src / "vqgan.safetensors").read_bytes()
    (src / "vqgan.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    code, err = run_here(capsys, "convert", src, tmp_path / "out")
    assert_one_line_error(code, err, "vqgan.safetensors")
    assert not (tmp_path / "out").exists()
