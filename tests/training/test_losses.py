"""VQGAN losses: taming-compatible discriminator, GAN losses, adaptive weight, LPIPS loading, VQGANLoss."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch

from dallemini.config import VQGAN_PRESETS
from dallemini.errors import CheckpointError, ConfigError
from dallemini.models.vqgan import VQGAN
from dallemini.training.losses import (
    LPIPS,
    PatchDiscriminator,
    VQGANLoss,
    adaptive_weight,
    adopt_weight,
    discriminator_state_from_taming,
    generator_gan_loss,
    hinge_d_loss,
    load_taming_discriminator,
    vanilla_d_loss,
)


def _taming_discriminator(ch: int, n_layers: int, actnorm: bool) -> torch.nn.Module:
    mod = pytest.importorskip("taming.modules.discriminator.model")
    torch.manual_seed(0)
    return mod.NLayerDiscriminator(
        input_nc=3, ndf=ch, n_layers=n_layers, use_actnorm=actnorm
    ).apply(mod.weights_init)


# --- discriminator -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["batch", "actnorm"])
def test_discriminator_matches_taming(norm: str) -> None:
    theirs = _taming_discriminator(8, 3, norm == "actnorm")
    ours = PatchDiscriminator(3, 8, 3, norm=norm)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):  # train: batch statistics / ActNorm's data-dependent init
        theirs.train(train)
        ours.train(train)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


def test_discriminator_init_and_config() -> None:
    torch.manual_seed(0)
    d = PatchDiscriminator(ch=64, n_layers=3)
    w = d.main[2].weight  # 64 -> 128, 4x4: 131k samples
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = d.main[3]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert d(torch.rand(1, 3, 32, 32)).shape == (1, 1, 2, 2)
    with pytest.raises(ConfigError, match="norm"):
        PatchDiscriminator(norm="group")


def test_load_taming_discriminator(tmp_path: Path) -> None:
    theirs = _taming_discriminator(8, 2, actnorm=True)
    theirs(torch.randn(2, 3, 32, 32))  # ActNorm initialises itself on the first training batch
    state = {f"loss.discriminator.{k}": v for k, v in theirs.state_dict().items()}
    state["encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)

    ours = load_taming_discriminator(path)
    assert ours.config == {"in_channels": 3, "ch": 8, "n_layers": 2, "norm": "actnorm"}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    assert set(discriminator_state_from_taming(state)) == set(theirs.state_dict())

    del state["loss.discriminator.main.6.scale"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"main\.6\.scale"):
        load_taming_discriminator(path)
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"loss\.discriminator"):
        load_taming_discriminator(path)


# --- GAN losses ----------------------------------------------------------------------------------
def test_gan_losses_by_hand() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want = 0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(0.5)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want)
    assert generator_gan_loss(fake).item() == pytest.approx(0.5)
    assert adopt_weight(2.0, 4, 5) == 0.0
    assert adopt_weight(2.0, 5, 5) == 2.0


def test_adaptive_weight_by_hand() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (w**2).sum()  # gradient 2w = [2, 4]
    g = 3.0 * w.sum()  # gradient [3, 3]
    got = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert not got.requires_grad
    assert got.item() == pytest.approx(math.sqrt(20) / (math.sqrt(18) + 1e-4) * 0.5)
    nll.backward()  # the graph was retained
    # A GAN loss with no gradient: the ratio is clamped at 1e4.
    assert adaptive_weight((w**2).sum(), 0.0 * w.sum(), w).item() == pytest.approx(1e4)


# --- LPIPS ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random torchvision-format VGG16 file (with a stand-in classifier) and an lpips-format vgg.pth."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lpips")
    state = LPIPS().state_dict()
    vgg = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.randn(4, 4)  # the real one is 4096 x 25088; ignored anyway
    lin = {k: v.abs() for k, v in state.items() if k.startswith("lin")}
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


def test_lpips_layout_and_values(lpips_files: tuple[Path, Path]) -> None:
    model = LPIPS.from_files(*lpips_files)
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's vgg16().features
    assert set(model.state_dict()) == {
        *(f"features.{i}.{p}" for i in convs for p in ("weight", "bias")),
        *(f"lin{i}.model.1.weight" for i in range(5)),
    }
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.train().training
    torch.testing.assert_close(
        model.lin0.model[1].weight, torch.load(lpips_files[1])["lin0.model.1.weight"]
    )

    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    assert torch.equal(model(x, x), torch.zeros(2))
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_lpips_bad_files(lpips_files: tuple[Path, Path], tmp_path: Path) -> None:
    vgg_path, lin_path = lpips_files
    vgg = torch.load(vgg_path)
    vgg["features.28.w"] = vgg.pop("features.28.weight")
    torch.save(vgg, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"features\.28\.weight.*missing"):
        LPIPS.from_files(tmp_path / "renamed.pth", lin_path)

    lin = torch.load(lin_path)
    lin["lin3.model.1.weight"] = torch.zeros(1, 256, 1, 1)
    torch.save(lin, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"lin3\.model\.1\.weight.*shape"):
        LPIPS.from_files(vgg_path, tmp_path / "shape.pth")

    data = lin_path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        LPIPS.from_files(vgg_path, tmp_path / "cut.pth")


def test_lpips_from_taming_checkpoint(lpips_files: tuple[Path, Path], tmp_path: Path) -> None:
    ref = LPIPS.from_files(*lpips_files)
    slices = {range(0, 4): 1, range(4, 9): 2, range(9, 16): 3, range(16, 23): 4, range(23, 30): 5}
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("features."):  # taming's vgg16 wrapper: net.sliceK.<torchvision index>
            idx = int(k.split(".")[1])
            k = next(f"net.slice{s}.{k[len('features.') :]}" for r, s in slices.items() if idx in r)
        state[f"loss.perceptual_loss.{k}"] = v
    state["loss.perceptual_loss.scaling_layer.shift"] = ref.shift
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    got = LPIPS.from_taming(tmp_path / "last.ckpt")
    torch.testing.assert_close(got.state_dict(), ref.state_dict())


# --- VQGANLoss -----------------------------------------------------------------------------------
def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth random-ish images in [0, 1]: gradients plus a coloured square."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, size)
    base = torch.rand(n, 3, 1, 1, generator=g) * ramp.view(1, 1, 1, -1)
    base = base + torch.rand(n, 3, 1, 1, generator=g) * ramp.view(1, 1, -1, 1)
    for i in range(n):
        r, c = (torch.randint(0, size // 2, (2,), generator=g)).tolist()
        base[i, :, r : r + size // 3, c : c + size // 3] = torch.rand(3, 1, 1, generator=g)
    return base.clamp(0, 1)


def test_vqgan_loss_terms(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dallemini.training.losses"):
        loss_fn = VQGANLoss(disc_start=5, disc_ch=8, disc_layers=2, l2_weight=0.5)
    assert sum("without the perceptual term" in r.message for r in caplog.records) == 1

    torch.manual_seed(0)
    last = torch.randn(3, 3, requires_grad=True)
    images = _images(2, 16)
    recon = torch.einsum("oc,bchw->bohw", last, images)  # recon depends on `last`
    codebook = torch.tensor(0.3)
    diff = (images * 2 - 1) - (recon * 2 - 1)

    loss, logs = loss_fn.generator_loss(images, recon, codebook, step=4, last_layer=last)
    assert logs["l1"] == pytest.approx(diff.abs().mean().item())
    assert logs["l2"] == pytest.approx(diff.square().mean().item())
    assert logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0 and logs["disc_factor"] == 0.0
    assert loss.item() == pytest.approx(logs["l1"] + 0.5 * logs["l2"] + 0.3)
    assert all(isinstance(v, float) for v in logs.values())
    # per-image weights: equal ones change nothing, a zero drops that image
    _, same = loss_fn.generator_loss(images, recon, codebook, 4, last, torch.tensor([2.0, 2.0]))
    assert same["l1"] == pytest.approx(logs["l1"]) and same["l2"] == pytest.approx(logs["l2"])
    _, first = loss_fn.generator_loss(images, recon, codebook, 4, last, torch.tensor([1.0, 0.0]))
    assert first["l1"] == pytest.approx(diff[0].abs().mean().item())
    assert first["l2"] == pytest.approx(diff[0].square().mean().item())

    loss, logs = loss_fn.generator_loss(images, recon, codebook, step=5, last_layer=last)
    assert logs["d_weight"] > 0 and logs["disc_factor"] == 1.0
    assert loss.item() == pytest.approx(logs["nll"] + logs["d_weight"] * logs["g_loss"] + 0.3)
    loss.backward()
    assert last.grad is not None
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # generator pass only
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())

    d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step=4)
    assert d_loss.item() == 0.0
    loss_fn.eval()  # fixed batch-norm statistics: the same logits twice
    d_loss, d_logs = loss_fn.discriminator_loss(images, recon, step=5)
    real = loss_fn.discriminator(images * 2 - 1)
    fake = loss_fn.discriminator(recon.detach() * 2 - 1)
    assert d_loss.item() == pytest.approx(hinge_d_loss(real, fake).item())
    assert d_logs["logits_real"] == pytest.approx(real.mean().item())
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_vqgan_training_steps_lower_reconstruction_loss(lpips_files: tuple[Path, Path]) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        VQGAN_PRESETS["tiny"], ch=16, ch_mult=(1, 2), attn_resolutions=(), resolution=16
    )
    vqgan = VQGAN(cfg)
    loss_fn = VQGANLoss(
        lpips=LPIPS.from_files(*lpips_files), disc_start=0, disc_ch=8, disc_layers=2
    )
    g_opt = torch.optim.Adam(vqgan.parameters(), lr=2e-3)
    d_opt = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-4)
    images = _images(4, 16)

    def l1() -> float:
        with torch.no_grad():
            return (vqgan(images)[0] - images).abs().mean().item()

    before = l1()
    for step in range(6):
        recon, codebook, _ = vqgan(images)
        loss, logs = loss_fn.generator_loss(
            images, recon, codebook, step, last_layer=vqgan.decoder.conv_out.weight
        )
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        d_loss, _ = loss_fn.discriminator_loss(images, recon, step)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        assert math.isfinite(logs["loss"]) and logs["perceptual"] > 0 and logs["d_weight"] > 0
    assert l1() < 0.7 * before
