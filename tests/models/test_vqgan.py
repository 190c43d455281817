"""VQGAN: parity with taming-transformers' and min-dalle's own modules, codebook round trips, checkpoint safety."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import dallemini.models.vqgan as vqgan_module
from dallemini.checkpoints.min_dalle_vqgan import load_min_dalle_vqgan
from dallemini.checkpoints.safe_load import ForeignObject, load_torch_file
from dallemini.checkpoints.taming import load_taming
from dallemini.config import VQGAN_PRESETS
from dallemini.errors import CheckpointError, ConfigError, InputError
from dallemini.models.vqgan import VQGAN

TINY = VQGAN_PRESETS["tiny"]
# A small taming model: 32x32 images -> 8x8 codes, attention at 8x8 (taming hard-codes 32 norm groups).
DDCONFIG = {
    "double_z": False,
    "z_channels": 16,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}
N_EMBED, EMBED_DIM = 64, 8


# --- stand-ins for what real Lightning checkpoints carry ---------------------------------------
class LightningCallback:
    """Mimics pytorch_lightning's ModelCheckpoint, which Lightning pickles into `callbacks`."""

    def __init__(self) -> None:
        self.monitor = "val/rec_loss"
        self.best_model_score = 0.5


def _touch(path: str) -> int:
    """Side effect that must never happen while loading a checkpoint."""
    Path(path).write_text("foreign code ran")
    return 0


class ReducesToCode:
    """Unpickling this with plain pickle calls _touch(path)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (_touch, (self.path,))


class SetsStateWithCode:
    """Unpickling this with plain pickle runs __setstate__, which writes a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __setstate__(self, state: dict) -> None:
        _touch(state["path"])


# --- helpers -----------------------------------------------------------------------------------
def _perturb(module: torch.nn.Module, seed: int, conv_std: float | None = None) -> None:
    """Move GroupNorm affines away from 1/0 (and optionally redraw conv weights) so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Conv2d) and conv_std is not None:
                bound = conv_std * 3**0.5  # uniform with this std: much faster to draw than normal
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)


def _taming_parts() -> dict[str, torch.nn.Module]:
    """Taming's own Encoder/Decoder/VectorQuantizer + quant convs at the small config, random weights."""
    tm = pytest.importorskip("taming.modules.diffusionmodules.model")
    tq = pytest.importorskip("taming.modules.vqvae.quantize")
    torch.manual_seed(0)
    parts = {
        "encoder": tm.Encoder(**DDCONFIG),
        "decoder": tm.Decoder(**DDCONFIG),
        "quantize": tq.VectorQuantizer(N_EMBED, EMBED_DIM, beta=0.25),
        "quant_conv": torch.nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1),
        "post_quant_conv": torch.nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1),
    }
    for i, m in enumerate(parts.values()):
        _perturb(m, seed=10 + i)
        m.eval()
    with (
        torch.no_grad()
    ):  # a codebook on the latents' scale, so the nearest entry is well separated
        parts["quantize"].embedding.weight.copy_(0.3 * torch.randn(N_EMBED, EMBED_DIM))
    return parts


def _lightning_ckpt(parts: dict[str, torch.nn.Module], extra: dict | None = None) -> dict:
    sd = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    sd["loss.logvar"] = torch.zeros(())
    ckpt = {
        "epoch": 1,
        "global_step": 3,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "callbacks": {
            LightningCallback: {"best_model_score": torch.tensor(0.5)},
            "last": LightningCallback(),
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}],
    }
    ckpt.update(extra or {})
    return ckpt


def _yaml(ddconfig: dict | None = None, n_embed: int = N_EMBED) -> dict:
    return {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": EMBED_DIM,
                "n_embed": n_embed,
                "ddconfig": ddconfig or DDCONFIG,
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0},
                },
            },
        }
    }


def _release_folder(root: Path, ckpt: dict, config: dict | None) -> Path:
    """Taming's release layout: <name>/checkpoints/last.ckpt + <name>/configs/model.yaml."""
    (root / "checkpoints").mkdir(parents=True)
    path = root / "checkpoints" / "last.ckpt"
    torch.save(ckpt, path)
    if config is not None:
        (root / "configs").mkdir()
        (root / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def taming_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    parts = _taming_parts()
    path = _release_folder(
        tmp_path_factory.mktemp("taming") / "vqgan_small", _lightning_ckpt(parts), _yaml()
    )
    return parts, path


def _tiny(seed: int = 0, **changes: object) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN(dataclasses.replace(TINY, **changes)).eval()
    _perturb(model, seed)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


# --- parity with taming-transformers -----------------------------------------------------------
def test_taming_parity_encode_decode(taming_setup: tuple[dict, Path]) -> None:
    parts, path = taming_setup
    cfg, state = load_taming(path)  # finds ../configs/model.yaml
    assert cfg.pixel_range == "-1,1" and cfg.n_embed == N_EMBED and cfg.grid_size == 8
    model = VQGAN(cfg).eval()
    model.load_state_dict(state, strict=True)
    assert set(state) == set(model.state_dict())

    torch.manual_seed(1)
    for size in ((32, 32), (32, 48)):
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            h = parts["quant_conv"](parts["encoder"](x * 2 - 1))
            _, _, (_, _, idx) = parts["quantize"](h)
            ref_codes = idx.view(2, size[0] // 4, size[1] // 4)
            codes = model.encode(x)
            assert codes.dtype == torch.long
            assert torch.equal(codes, ref_codes)

            z_q = parts["quantize"].get_codebook_entry(
                ref_codes.flatten(), (2, *ref_codes.shape[1:], EMBED_DIM)
            )
            ref = ((parts["decoder"](parts["post_quant_conv"](z_q)) + 1) / 2).clamp(0, 1)
            out = model.decode(ref_codes)
        assert out.shape == ref.shape == (2, 3, *size)
        inside = ((ref > 0) & (ref < 1)).float().mean()
        assert inside > 0.5, "test weights saturate the output; parity would be vacuous"
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_taming_parity_training_forward(taming_setup: tuple[dict, Path]) -> None:
    parts, path = taming_setup
    cfg, state = load_taming(path)
    model = VQGAN(cfg).eval()
    model.load_state_dict(state)
    model.quantize.legacy_loss = True  # taming's VectorQuantizer puts beta on the codebook term
    x = torch.rand(2, 3, 32, 32)
    h = parts["quant_conv"](parts["encoder"](x * 2 - 1))
    z_q, ref_loss, (_, _, idx) = parts["quantize"](h)
    ref_rec = (parts["decoder"](parts["post_quant_conv"](z_q)) + 1) / 2
    with torch.enable_grad():
        rec, loss, codes = model(x)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(rec, ref_rec, atol=2e-5, rtol=1e-4)
    assert torch.equal(codes.flatten(), idx.flatten())


def test_taming_without_yaml_infers_config(taming_setup: tuple[dict, Path], tmp_path: Path) -> None:
    parts, _ = taming_setup
    path = tmp_path / "model.ckpt"
    torch.save(_lightning_ckpt(parts), path)
    cfg, state = load_taming(path)
    yaml_cfg, _ = load_taming(path, yaml_path=_write_yaml(tmp_path / "c" / "m.yaml", _yaml()))
    # Same architecture; only the assumed resolution (and attention resolutions relative to it) differ.
    assert cfg.resolution == 256 and cfg.attn_resolutions == (64,)
    same = dataclasses.replace(
        cfg, resolution=yaml_cfg.resolution, attn_resolutions=yaml_cfg.attn_resolutions
    )
    assert same == yaml_cfg
    VQGAN(cfg).load_state_dict(state, strict=True)


def test_taming_cond_transformer_first_stage(
    taming_setup: tuple[dict, Path], tmp_path: Path
) -> None:
    parts, _ = taming_setup
    sd = {f"first_stage_model.{k}": v for k, v in _lightning_ckpt(parts)["state_dict"].items()}
    sd["transformer.tok_emb.weight"] = torch.zeros(4, 4)
    path = tmp_path / "cin.ckpt"
    torch.save({"state_dict": sd}, path)
    cfg, state = load_taming(path)  # no YAML: prefix and architecture from the tensors
    VQGAN(cfg).load_state_dict(state, strict=True)
    stage = _yaml()["model"]
    config = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer"}}
    config["model"]["params"] = {"first_stage_config": stage, "transformer_config": {}}
    cfg2, state2 = load_taming(path, _write_yaml(tmp_path / "cin.yaml", config))
    assert cfg2.resolution == 32 and set(state2) == set(state)


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_taming_refuses_unsupported_configs(
    taming_setup: tuple[dict, Path], tmp_path: Path
) -> None:
    _, path = taming_setup
    bad = {
        "double_z": {**DDCONFIG, "double_z": True},
        "fancy_option": {**DDCONFIG, "fancy_option": 3},
    }
    for word, dd in bad.items():
        with pytest.raises(CheckpointError, match=word):
            load_taming(path, _write_yaml(tmp_path / f"{word}.yaml", _yaml(dd)))
    gumbel = _yaml()
    gumbel["model"]["target"] = "taming.models.vqgan.GumbelVQ"
    with pytest.raises(CheckpointError, match="GumbelVQ"):
        load_taming(path, _write_yaml(tmp_path / "gumbel.yaml", gumbel))
    with pytest.raises(CheckpointError, match=r"quantize\.embedding\.weight"):
        load_taming(path, _write_yaml(tmp_path / "n128.yaml", _yaml(n_embed=128)))


def test_truncated_and_foreign_files_raise_checkpoint_error(
    taming_setup: tuple[dict, Path], tmp_path: Path
) -> None:
    _, path = taming_setup
    data = path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated"):
        load_taming(cut, path.parent.parent / "configs" / "model.yaml")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.ckpt"):
        load_torch_file(junk)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_taming(tmp_path / "missing.ckpt")
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_torch_file(lst)


def test_foreign_globals_load_as_inert_stubs(
    taming_setup: tuple[dict, Path], tmp_path: Path
) -> None:
    parts, _ = taming_setup
    marks = [tmp_path / "reduce-ran", tmp_path / "setstate-ran"]
    extra = {
        "hyper_parameters": {
            "a": ReducesToCode(str(marks[0])),
            "b": SetsStateWithCode(str(marks[1])),
        }
    }
    path = _release_folder(tmp_path / "evil", _lightning_ckpt(parts, extra), _yaml())
    cfg, state = load_taming(path)
    VQGAN(cfg).load_state_dict(state, strict=True)
    assert not any(m.exists() for m in marks), "loading ran code named by the checkpoint"

    raw = load_torch_file(path)
    assert not any(m.exists() for m in marks)
    hp, callbacks = raw["hyper_parameters"], raw["callbacks"]
    assert isinstance(hp["a"], ForeignObject) and hp["a"].foreign_name.endswith("._touch")
    assert isinstance(hp["b"], ForeignObject) and hp["b"].state == {"path": str(marks[1])}
    assert isinstance(callbacks["last"], ForeignObject)
    assert callbacks["last"].foreign_name.endswith(".LightningCallback")
    assert any(isinstance(k, type) and issubclass(k, ForeignObject) for k in callbacks)
    # The same file under unrestricted pickle would have run it: the check above is not vacuous.
    torch.load(path, weights_only=False)
    assert all(m.exists() for m in marks)


# --- parity with min-dalle's detokenizer -------------------------------------------------------
@pytest.mark.slow
def test_min_dalle_detokenizer_parity(tmp_path: Path) -> None:
    # Importing min_dalle switches autograd off and sets the thread count process-wide: undo both.
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    md = pytest.importorskip("min_dalle.models.vqgan_detokenizer")
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    det = md.VQGanDetokenizer().eval()
    _perturb(det, seed=3, conv_std=0.02)
    torch.save(det.state_dict(), tmp_path / "detoker.pt")
    cfg, state = load_min_dalle_vqgan(tmp_path / "detoker.pt")
    assert (
        cfg.decoder_only
        and cfg.pixel_range == "0,1"
        and (cfg.n_embed, cfg.embed_dim) == (16384, 256)
    )
    with torch.device("meta"):  # no random init of 40M parameters only to overwrite them
        model = VQGAN(cfg).eval()
    model.load_state_dict(state, strict=True, assign=True)
    codes = torch.randint(0, 16384, (1, 256), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = det.forward(False, codes)  # [256, 256, 3] in 0..255
        out = model.decode(codes)  # flat [1, 256] codes are accepted
    inside = ((ref > 0) & (ref < 255)).float().mean()
    assert inside > 0.3, "test weights saturate the output; parity would be vacuous"
    # min-dalle's own float32 error against a float64 run is ~0.03 (of 255) at these weights; ours ~0.004.
    torch.testing.assert_close(out[0].permute(1, 2, 0) * 255, ref, atol=0.1, rtol=1e-4)


# --- behaviour on a tiny model -----------------------------------------------------------------
def test_state_dict_keys_follow_taming_names() -> None:
    with torch.device("meta"):
        full = VQGAN(VQGAN_PRESETS["f16_16384"])
    keys = set(full.state_dict())
    for k in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.4.attn.1.q.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "quantize.embedding.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid.block_2.norm2.bias",
        "decoder.up.4.attn.2.k.weight",
        "decoder.up.4.block.2.conv2.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.norm_out.weight",
        "decoder.conv_out.bias",
    ):
        assert k in keys, k
    assert (
        "encoder.down.4.downsample.conv.weight" not in keys
        and "decoder.up.0.upsample.conv.weight" not in keys
    )
    n = sum(p.numel() for p in full.parameters())
    assert 70e6 < n < 80e6  # ≈76M, as the published Flax checkpoint


@torch.no_grad()
def test_vqgan_without_mid_attention(tmp_path: Path) -> None:
    from dallemini.checkpoints.native import save_model_dir
    from dallemini.config import PipelineConfig
    from dallemini.pipeline import load_vqgan

    cfg = dataclasses.replace(TINY, mid_attn=False)
    assert TINY.fingerprint() == dataclasses.replace(TINY, mid_attn=True).fingerprint()
    assert cfg.fingerprint() != TINY.fingerprint()
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    assert not any(".mid.attn_1." in k for k in model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    save_model_dir(tmp_path / "m", PipelineConfig(vqgan=cfg), {"vqgan": model.state_dict()})
    loaded = load_vqgan(tmp_path / "m", device="cpu")
    assert loaded.config.mid_attn is False
    assert torch.equal(loaded.encode(x), model.encode(x))


@torch.no_grad()
def test_local_encoder_codes_depend_on_their_own_cell_only() -> None:
    cfg = dataclasses.replace(TINY, mid_attn=False, local_encoder=True)
    assert TINY.fingerprint() == dataclasses.replace(TINY, local_encoder=False).fingerprint()
    assert cfg.fingerprint() != dataclasses.replace(TINY, mid_attn=False).fingerprint()
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    assert not any("attn" in k for k in model.encoder.state_dict())
    f = cfg.downsample_factor
    x = torch.rand(2, 3, 64, 128)
    z = model.encode_latents(x)
    assert z.shape == (2, cfg.embed_dim, 64 // f, 128 // f)
    # One cell changed: only its own latent moves.
    y = x.clone()
    y[0, :, f : 2 * f, 2 * f : 3 * f] = torch.rand(3, f, f)
    moved = (model.encode_latents(y) - z).abs().amax(1) > 0
    expected = torch.zeros_like(moved)
    expected[0, 1, 2] = True
    assert torch.equal(moved, expected)
    # The same cell content gets the same latent wherever it stands.
    cell = torch.rand(3, f, f)
    a, b = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    a[0, :, :f, :f] = cell
    b[0, :, 3 * f : 4 * f, 2 * f : 3 * f] = cell
    torch.testing.assert_close(
        model.encode_latents(a)[0, :, 0, 0], model.encode_latents(b)[0, :, 3, 2]
    )


def test_l2_codes_match_by_cosine() -> None:
    cfg = dataclasses.replace(TINY, l2_codes=True)
    assert TINY.fingerprint() == dataclasses.replace(TINY, l2_codes=False).fingerprint()
    assert cfg.fingerprint() != TINY.fingerprint()
    torch.manual_seed(0)
    model = VQGAN(cfg)
    quant = model.quantize
    quant.embedding.weight.data.normal_()
    z = torch.randn(2, cfg.embed_dim, 3, 3, requires_grad=True)
    cos = torch.einsum(
        "bchw,nc->bhwn", F.normalize(z, dim=1), F.normalize(quant.embedding.weight, dim=1)
    )
    codes = quant.nearest(5.0 * z.detach())  # the scale of a latent does not matter
    assert torch.equal(codes, cos.argmax(-1))
    # what the decoder gets are unit vectors, and the gradient reaches the encoder's latents
    z_q, loss, codes2 = quant(z)
    assert torch.equal(codes2, codes)
    torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 3, 3))
    torch.testing.assert_close(quant.lookup(codes).norm(dim=1), torch.ones(2, 3, 3))
    (z_q.sum() + loss).backward()
    assert z.grad is not None and quant.embedding.weight.grad is not None


@torch.no_grad()
def test_encode_decode_shapes_and_ranges() -> None:
    model = _tiny()
    x = torch.rand(2, 3, 64, 64)
    codes = model.encode(x)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.n_embed
    images = model.decode(codes)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    torch.testing.assert_close(model.decode(codes.view(2, 16)), images)
    assert model.encode(torch.rand(1, 3, 64, 128)).shape == (1, 4, 8)
    assert model.encode(torch.rand(0, 3, 64, 64)).shape == (0, 4, 4)
    assert model.decode(torch.zeros(0, 4, 4, dtype=torch.long)).shape == (0, 3, 64, 64)


def test_codebook_round_trip() -> None:
    model = _tiny()
    codes = torch.randint(0, TINY.n_embed, (3, 4, 4))
    z_q = model.quantize.lookup(codes)
    assert z_q.shape == (3, TINY.embed_dim, 4, 4)
    assert torch.equal(model.quantize.nearest(z_q), codes)
    requant, again = model.quantize_latents(z_q + 1e-4 * torch.randn_like(z_q))
    assert torch.equal(again, codes) and torch.equal(requant, z_q)
    # decode(encode(x)) runs; encoding is a fixed point on the codebook vectors it picked.
    x = torch.rand(2, 3, 64, 64)
    c = model.encode(x)
    assert model.decode(c).shape == x.shape
    zq, c2 = model.quantize_latents(model.encode_latents(x))
    assert torch.equal(c, c2) and torch.equal(model.quantize.nearest(zq), c)


def test_nearest_is_exact_when_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny()
    z = torch.randn(2, TINY.embed_dim, 5, 7)
    brute = torch.cdist(
        z.permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim), model.quantize.embedding.weight
    )
    ref = brute.argmin(1).view(2, 5, 7)
    assert torch.equal(model.quantize.nearest(z), ref)
    monkeypatch.setattr(vqgan_module, "_DISTANCE_BUDGET", 3 * TINY.n_embed)  # 3 rows per chunk
    assert torch.equal(model.quantize.nearest(z), ref)


def test_training_forward_gradients() -> None:
    model = _tiny().train()
    x = torch.rand(2, 3, 64, 64)
    with (
        torch.enable_grad()
    ):  # in case another test module imported min_dalle, which disables it globally
        rec, loss, codes = model(x)
        assert rec.shape == x.shape and loss.dim() == 0 and codes.shape == (2, 4, 4)
        ((rec - x).abs().mean() + loss).backward()
    assert model.encoder.conv_in.weight.grad is not None  # straight-through estimator
    assert model.quantize.embedding.weight.grad is not None  # codebook term
    assert model.decoder.conv_out.weight.grad is not None


def test_channels_last_decode_matches() -> None:
    model = _tiny()
    codes = torch.randint(0, TINY.n_embed, (2, 4, 4))
    ref = model.decode(codes)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model.decode(codes), ref, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_input_error() -> None:
    model = _tiny()
    for bad in (
        torch.rand(3, 64, 64),
        torch.rand(1, 4, 64, 64),
        torch.rand(1, 3, 60, 64),
        torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8),
    ):
        with pytest.raises(InputError):
            model.encode(bad)
    for bad in (
        torch.full((1, 4, 4), TINY.n_embed),
        torch.full((1, 4, 4), -1),
        torch.zeros(1, 4, 4),
        torch.zeros(1, 15, dtype=torch.long),
        torch.zeros(4, dtype=torch.long),
    ):
        with pytest.raises(InputError):
            model.decode(bad)


def test_decoder_only_cannot_encode() -> None:
    model = VQGAN(dataclasses.replace(TINY, decoder_only=True))
    keys = set(model.state_dict())
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in keys)
    assert "quantize.embedding.weight" in keys and "post_quant_conv.weight" in keys
    with pytest.raises(ConfigError, match="decoder-only"):
        model.encode(torch.rand(1, 3, 64, 64))
    assert model.decode(torch.zeros(1, 4, 4, dtype=torch.long)).shape == (1, 3, 64, 64)


def test_pixel_range_conversion() -> None:
    a = _tiny(seed=4)
    b = VQGAN(dataclasses.replace(TINY, pixel_range="-1,1")).eval()
    b.load_state_dict(a.state_dict())
    codes = torch.randint(0, TINY.n_embed, (1, 4, 4))
    raw = a._decode_network(a.quantize.lookup(codes))
    torch.testing.assert_close(b.decode(codes), ((raw + 1) / 2).clamp(0, 1))
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(b.encode_latents(x), a.encode_latents(x * 2 - 1))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inference_decoder_matches_the_autograd_path(fmt: torch.memory_format) -> None:
    """Without autograd, upsampling runs as 2x2 sub-pixel convolutions and activations in place: same pixels."""
    model = _tiny().to(memory_format=fmt).requires_grad_(False)
    codes = torch.randint(0, TINY.n_embed, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    with torch.enable_grad():  # the plain path: nearest x2 + 3x3 conv, out-of-place activations
        ref = model.decode(codes)
    with torch.inference_mode():
        out = model.decode(codes)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    up = model.decoder.up[1].upsample
    x = torch.randn(2, up.conv.in_channels, 5, 3).contiguous(memory_format=fmt)
    with torch.enable_grad():
        ref = up(x)
    with torch.no_grad():
        got = up(x)
        assert got.is_contiguous(memory_format=fmt)
        up.conv.weight.mul_(2)  # the cached 2x2 kernels follow the weight
        torch.testing.assert_close(
            up(x), 2 * got - up.conv.bias[:, None, None], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
