"""VQGAN training losses: patch-GAN discriminator, GAN losses, adaptive weight, LPIPS, VQGANLoss.

The layout follows taming-transformers' `VQLPIPSWithDiscriminator`, so its checkpoints load:
the discriminator's names are taming's `NLayerDiscriminator` ones (`main.0.weight`, ...), and the
perceptual loss reads torchvision's VGG16 file (`vgg16-397923af.pth`) and the `lpips` package's
`vgg.pth` heads. Images come in and go out in [0, 1]; every loss term is computed in [-1, 1]
(taming's pixel space), so taming's loss weights mean the same here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.safe_load import load_torch_file
from ..errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_TAMING_DISC_PREFIX = "loss.discriminator."
_TAMING_LPIPS_PREFIX = "loss.perceptual_loss."


def _signed(images: Tensor) -> Tensor:
    """[0, 1] images -> [-1, 1], the space taming's losses (and their weights) work in."""
    return images * 2.0 - 1.0


def _check_state(
    want: Mapping[str, Tensor], got: Mapping[str, Any], where: str, prefixes: tuple[str, ...]
) -> None:
    """Raise a CheckpointError naming the first missing, mis-shaped or unexpected (under prefixes) tensor."""
    for key, ref in want.items():
        if key not in got:
            raise CheckpointError(f"{where}: tensor {key!r} is missing ({len(want)} expected)")
        value = got[key]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != ref.shape:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
            )
    extra = [k for k in got if isinstance(k, str) and k.startswith(prefixes) and k not in want]
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all); not the expected layout"
        )


# --- discriminator -------------------------------------------------------------------------------
class ActNorm(nn.Module):
    """Per-channel scale * (x + loc), set from the first training batch's mean/std (taming's ActNorm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.transpose(0, 1).flatten(1)
        self.loc.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        return self.scale * (x + self.loc)


def _init_weights(m: nn.Module) -> None:
    """taming's weights_init: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) discriminator with taming's NLayerDiscriminator layout: one logit per patch.

    4x4 convs: stride 2 for the first n_layers, then two stride-1 ones; widths ch * min(2**n, 8).
    Convs followed by BatchNorm carry no bias, those followed by ActNorm do (as in taming).
    """

    def __init__(
        self, in_channels: int = 3, ch: int = 64, n_layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if norm not in ("batch", "actnorm"):
            raise ConfigError(f"discriminator norm must be 'batch' or 'actnorm', got {norm!r}")
        if n_layers < 1 or ch < 1 or in_channels < 1:
            raise ConfigError(
                f"discriminator needs n_layers, ch, in_channels >= 1, got {n_layers}, {ch}, {in_channels}"
            )
        self.config = {"in_channels": in_channels, "ch": ch, "n_layers": n_layers, "norm": norm}
        norm_layer = nn.BatchNorm2d if norm == "batch" else ActNorm
        bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ch, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ch * prev, ch * mult, 4, stride=stride, padding=1, bias=bias),
                norm_layer(ch * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits [B, 1, h, w] of images in the discriminator's pixel space ([-1, 1] in VQGANLoss)."""
        return self.main(images)


def _taming_tensors(state_dict: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """A taming checkpoint's tensors: its "state_dict" entry, or the mapping itself if it has none."""
    sd = state_dict.get("state_dict", state_dict)
    if not isinstance(sd, Mapping):
        raise CheckpointError(
            f"{where}: 'state_dict' is a {type(sd).__name__}, not a mapping of tensors"
        )
    return sd


def discriminator_state_from_taming(
    state_dict: Mapping[str, Any], where: str = "checkpoint"
) -> dict[str, Tensor]:
    """The `loss.discriminator.*` tensors of a taming checkpoint (whole or its state_dict), prefix stripped."""
    sd = _taming_tensors(state_dict, where)
    n = len(_TAMING_DISC_PREFIX)
    out = {
        k[n:]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(_TAMING_DISC_PREFIX)
    }
    if not out:
        raise CheckpointError(
            f"{where}: no {_TAMING_DISC_PREFIX}* tensors found; the checkpoint was saved without its "
            "training loss (or is not a taming VQGAN checkpoint)"
        )
    return out


def discriminator_config_from_state(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """PatchDiscriminator keyword arguments (in_channels, ch, n_layers, norm) read off tensor shapes."""
    convs = sorted(
        int(m.group(1))
        for k, v in state.items()
        if (m := re.fullmatch(r"main\.(\d+)\.weight", k)) and isinstance(v, Tensor) and v.dim() == 4
    )
    if len(convs) < 3 or convs[0] != 0:
        raise CheckpointError(
            "discriminator state has no main.0.weight or fewer than 3 convolutions; "
            "not a taming NLayerDiscriminator"
        )
    ch, in_channels = state["main.0.weight"].shape[:2]
    norm = "actnorm" if any(k.endswith(".loc") for k in state) else "batch"
    return {"in_channels": in_channels, "ch": ch, "n_layers": len(convs) - 2, "norm": norm}


def load_discriminator_state(
    model: PatchDiscriminator, state: Mapping[str, Any], where: str
) -> None:
    """Check every key and shape of state against model (CheckpointError naming the first bad one), then load."""
    _check_state(model.state_dict(), state, where, prefixes=("",))
    model.load_state_dict(state)


def load_taming_discriminator(ckpt_path: str | Path) -> PatchDiscriminator:
    """A PatchDiscriminator with the trained discriminator of a taming VQGAN .ckpt (read weights_only)."""
    state = discriminator_state_from_taming(load_torch_file(ckpt_path), str(ckpt_path))
    model = PatchDiscriminator(**discriminator_config_from_state(state))
    load_discriminator_state(model, state, f"{ckpt_path} ({_TAMING_DISC_PREFIX}*)")
    return model


# --- GAN losses ----------------------------------------------------------------------------------
def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss: (mean relu(1 - real) + mean relu(1 + fake)) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating (softplus) discriminator loss: (mean softplus(-real) + mean softplus(fake)) / 2."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """The generator's adversarial loss: minus the mean logit of its reconstructions."""
    return -logits_fake.mean()


def adopt_weight(weight: float, step: int, start: int) -> float:
    """weight from step `start` on, 0 before it (taming's delayed discriminator start)."""
    return 0.0 if step < start else weight


def adaptive_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0
) -> Tensor:
    """taming's GAN weight: |d nll/d last| / (|d g_loss/d last| + 1e-4), clamped to [0, 1e4], detached, x disc_weight."""
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * disc_weight


# --- LPIPS ---------------------------------------------------------------------------------------
# torchvision's vgg16().features: 3x3 conv + ReLU per number, 2x2 max-pool per "M".
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices in that Sequential of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part with torchvision's indices, so its state dict reads `0.weight`, `2.weight`, ..."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


class _LinearHead(nn.Module):
    """lpips' NetLinLayer: dropout then a bias-free 1x1 conv to one channel (`model.1.weight`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) on VGG16 features; frozen and always in eval mode.

    Build with `LPIPS.from_files` (torchvision VGG16 + lpips' vgg.pth) or `LPIPS.from_taming`;
    `LPIPS()` alone has random weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()[: _TAPS[-1] + 1]  # nothing after relu5_3 is used
        for i, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(c))
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode (no dropout in the heads) whatever the parent module is set to."""
        return super().train(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-image distances [B] between images a and b [B, 3, H, W] in [0, 1] (H, W >= 16)."""
        x = torch.cat([a, b]).to(self.shift.dtype)
        x = (_signed(x) - self.shift) / self.scale
        heads = [getattr(self, f"lin{i}") for i in range(len(_TAPS))]
        total = x.new_zeros(a.shape[0])
        tap = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == _TAPS[tap]:
                f = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10)
                fa, fb = f.chunk(2)
                total = total + heads[tap].model((fa - fb).square()).mean(dim=(1, 2, 3))
                tap += 1
        return total

    def _load_checked(self, state: Mapping[str, Any], where: str, part: str) -> None:
        """Load the "features" or "lin" tensors of state after checking every key and shape."""
        prefix = "features." if part == "features" else "lin"
        want = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        _check_state(want, state, where, prefixes=(prefix,))
        self.load_state_dict({k: state[k] for k in want}, strict=False)

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """LPIPS from torchvision's VGG16 state dict (classifier ignored) and lpips' vgg.pth; never downloads."""
        model = cls()
        model._load_checked(load_torch_file(vgg_path), str(vgg_path), "features")
        model._load_checked(load_torch_file(lin_path), str(lin_path), "lin")
        return model

    @classmethod
    def from_taming(cls, ckpt_path: str | Path) -> LPIPS:
        """LPIPS from the `loss.perceptual_loss.*` tensors a taming VQGAN .ckpt carries."""
        state = lpips_state_from_taming(load_torch_file(ckpt_path), str(ckpt_path))
        model = cls()
        where = f"{ckpt_path} ({_TAMING_LPIPS_PREFIX}*)"
        model._load_checked(state, where, "features")
        model._load_checked(state, where, "lin")
        return model


def lpips_state_from_taming(
    state_dict: Mapping[str, Any], where: str = "checkpoint"
) -> dict[str, Tensor]:
    """taming's `loss.perceptual_loss.{net.sliceK.N, linK}.*` tensors renamed to LPIPS's `features.N.*`, `linK.*`."""
    sd = _taming_tensors(state_dict, where)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not k.startswith(_TAMING_LPIPS_PREFIX):
            continue
        name = k[len(_TAMING_LPIPS_PREFIX) :]
        if m := re.fullmatch(r"net\.slice\d\.(\d+\..+)", name):
            out[f"features.{m.group(1)}"] = v
        elif name.startswith("lin"):
            out[name] = v
    if not out:
        raise CheckpointError(f"{where}: no {_TAMING_LPIPS_PREFIX}* tensors found")
    return out


# --- the VQGAN objective -------------------------------------------------------------------------
@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop module's parameters from requiring (and so accumulating) gradients."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class VQGANLoss(nn.Module):
    """L1 + L2 + perceptual + codebook + adaptively weighted patch-GAN loss (taming's VQLPIPSWithDiscriminator).

    Two passes per step: `generator_loss` for the VQGAN's optimizer (its pass leaves no gradient in
    the discriminator) and `discriminator_loss` for the discriminator's. The GAN terms start at
    step `disc_start`. Pixel and GAN terms are computed on images mapped to [-1, 1].
    """

    def __init__(
        self,
        *,
        lpips: LPIPS | None = None,
        disc_start: int = 0,
        disc_loss: str = "hinge",
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        disc_weight: float = 1.0,
        disc_factor: float = 1.0,
        disc_in_channels: int = 3,
        disc_ch: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "batch",
    ) -> None:
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ConfigError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.discriminator = PatchDiscriminator(disc_in_channels, disc_ch, disc_layers, disc_norm)
        self.lpips = lpips
        self.d_loss_fn = D_LOSSES[disc_loss]
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor
        self.l1_weight, self.l2_weight = l1_weight, l2_weight
        self.perceptual_weight, self.codebook_weight = perceptual_weight, codebook_weight
        if lpips is None and perceptual_weight > 0:
            log.warning(
                "VQGANLoss: no LPIPS weights given; training without the perceptual term "
                "(pass lpips=LPIPS.from_files(vgg16.pth, vgg.pth) to use it)"
            )

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at this step (a trainer may skip the discriminator pass before)."""
        return adopt_weight(self.disc_factor, step, self.disc_start) > 0

    def generator_loss(
        self,
        images: Tensor,
        recon: Tensor,
        codebook_loss: Tensor,
        step: int,
        last_layer: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """(loss for the VQGAN, float logs) from images and reconstructions in [0, 1] space.

        last_layer: the decoder's last weight (`vqgan.decoder.conv_out.weight`) for the adaptive GAN
        weight; None uses `disc_weight` as a fixed weight. Without autograd the GAN weight is 0.
        weights: per-image weights [B] of the reconstruction terms (None: all equal).
        """
        x, y = _signed(images), _signed(recon)
        diff = x - y

        def mean(per_pixel: Tensor) -> Tensor:
            if weights is None:
                return per_pixel.mean()
            w = weights.to(per_pixel.device, per_pixel.dtype)
            return (per_pixel.flatten(1).mean(1) * w).sum() / w.sum()

        l1, l2 = mean(diff.abs()), mean(diff.square())
        nll = self.l1_weight * l1 + self.l2_weight * l2
        perceptual = torch.zeros_like(l1)
        if self.lpips is not None and self.perceptual_weight > 0:
            perceptual = mean(self.lpips(images, recon)[:, None])
            nll = nll + self.perceptual_weight * perceptual
        codebook = codebook_loss.mean()
        loss = nll + self.codebook_weight * codebook

        factor = adopt_weight(self.disc_factor, step, self.disc_start)
        g_loss = d_weight = torch.zeros_like(l1)
        if factor > 0:
            with _frozen(self.discriminator):
                g_loss = generator_gan_loss(self.discriminator(y))
            if last_layer is None:
                d_weight = torch.full_like(l1, self.disc_weight)
            elif torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            loss = loss + d_weight * factor * g_loss

        values = torch.stack([loss, nll, l1, l2, perceptual, codebook, g_loss, d_weight]).detach()
        names = ("loss", "nll", "l1", "l2", "perceptual", "codebook", "g_loss", "d_weight")
        logs = dict(zip(names, values.float().tolist(), strict=True))
        logs["disc_factor"] = factor
        return loss, logs

    def discriminator_loss(
        self, images: Tensor, recon: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """(loss for the discriminator, float logs); real and reconstructed images are detached."""
        logits_real = self.discriminator(_signed(images.detach()))
        logits_fake = self.discriminator(_signed(recon.detach()))
        factor = adopt_weight(self.disc_factor, step, self.disc_start)
        loss = factor * self.d_loss_fn(logits_real, logits_fake)
        values = torch.stack([loss, logits_real.mean(), logits_fake.mean()]).detach()
        logs = dict(
            zip(("d_loss", "logits_real", "logits_fake"), values.float().tolist(), strict=True)
        )
        return loss, logs
