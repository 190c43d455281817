"""The taming-transformers VQGAN (Esser et al.): image <-> grid of codebook indices.

Module and parameter names are exactly taming's (`encoder.down.0.block.1.norm1.weight`,
`quantize.embedding.weight`, `decoder.up.4.attn.0.q.weight`, ...), so taming checkpoints,
dalle-mini's Flax VQGAN (after renaming) and min-dalle's detokenizer load as they are.
`encode`/`decode` always speak images in [0, 1]; `config.pixel_range` says what the network
itself sees ("0,1" for dalle-mini, "-1,1" for taming checkpoints).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VQGANConfig
from ..errors import ConfigError, InputError

# Rows of the [rows, n_embed] distance matrix computed at once when searching the codebook.
_DISTANCE_BUDGET = 1 << 24


class PixelNorm(nn.Module):
    """Layer norm over the channels of each pixel on its own (affine), a norm with no spatial reach."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, 1e-6)
        return y.permute(0, 3, 1, 2)


def _norm(channels: int, groups: int) -> nn.Module:
    """Taming's Normalize: GroupNorm with eps 1e-6 and an affine scale/shift (groups 0: PixelNorm)."""
    if groups == 0:
        return PixelNorm(channels)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a (1x1 when the width changes) shortcut; no timestep embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.conv2(self.dropout(F.silu(self.norm2(h))))
            if self.in_channels != self.out_channels:
                x = self.nin_shortcut(x)
            return x + h
        # Inference: the same arithmetic on fewer fresh buffers (activations and the residual in place).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj_out are 1x1 convs, scaled by C^-1/2."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        # [B, HW, C] tokens; 1x1 convs become linear maps on the channel axis.
        h = self.norm(x).flatten(2).transpose(1, 2)
        q = F.linear(h, self.q.weight.view(c, c), self.q.bias)
        k = F.linear(h, self.k.weight.view(c, c), self.k.bias)
        v = F.linear(h, self.v.weight.view(c, c), self.v.bias)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(
            1
        )
        out = F.linear(a, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, hh, ww)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 convolution (taming's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# For output row 2i + a of (nearest x2, then a 3x3 conv), the kernel's three rows land on input rows
# (i-1, i, i) when a = 0 and (i, i, i+1) when a = 1: two taps each, the rows that share an input summed.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution.

    Without autograd it runs as four 2x2 convolutions at the input resolution, one per output phase
    (sub-pixel form): the same sums with 16 instead of 36 multiply-adds per output pixel and channel,
    and no upsampled copy of the input.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._phase_cache: tuple[tuple, Tensor, Tensor | None] | None = None

    def phase_weights(self) -> tuple[Tensor, Tensor | None]:
        """The conv as 2x2 kernels, [4 * C, C, 2, 2] in _PHASES order, and its bias repeated 4 times (cached)."""
        w, b = self.conv.weight, self.conv.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device, None if b is None else b._version)
        if self._phase_cache is None or self._phase_cache[0] != key:
            taps = _PHASE_TAPS.to(w.device, torch.float32)
            kernels = [
                torch.einsum("pk,ql,oikl->oipq", taps[a], taps[c], w.float()) for a, c in _PHASES
            ]
            w4 = torch.cat(kernels).to(w.dtype)
            if w.is_contiguous(memory_format=torch.channels_last):
                w4 = w4.contiguous(memory_format=torch.channels_last)
            b4 = None if b is None else b.repeat(4)
            self._phase_cache = (key, w4, b4)
        return self._phase_cache[1], self._phase_cache[2]

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        w4, b4 = self.phase_weights()
        n, c, h, w = x.shape
        # Output phase (a, b) at (i, j) reads padded-input rows i+a, i+a+1 and columns j+b, j+b+1.
        out = F.conv2d(F.pad(x, (1, 1, 1, 1)), w4, b4)  # [n, 4c, h+1, w+1]
        fmt = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        y = torch.empty((n, c, 2 * h, 2 * w), dtype=out.dtype, device=x.device, memory_format=fmt)
        for k, (a, b) in enumerate(_PHASES):
            y[:, :, a::2, b::2] = out[:, k * c : (k + 1) * c, a : a + h, b : b + w]
        return y


class Encoder(nn.Module):
    """conv_in -> down levels (res blocks, attention at attn_resolutions, downsample) -> mid -> conv_out.

    With `local_encoder` every f x f cell is encoded on its own, as its own batch row, with
    per-pixel channel norms and no attention: GroupNorm's per-image statistics would make every code
    depend on the whole scene, and per-cell ones would erase the cell's own colour and contrast.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        cfg = config
        self.local = cfg.local_encoder
        self.cell = cfg.downsample_factor
        g = 0 if self.local else cfg.num_groups
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i in range(self.num_resolutions):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions and not self.local:
                    level.attn.append(AttnBlock(block_in, g))
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.mid.attn_1 = (
            AttnBlock(block_in, g) if cfg.mid_attn and not self.local else nn.Identity()
        )
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.local:
            return self._forward(x)
        b, c, hh, ww = x.shape
        f = self.cell
        gh, gw = hh // f, ww // f
        # [B, C, gh, f, gw, f] -> [B * gh * gw, C, f, f]: one batch row per cell.
        cells = x.reshape(b, c, gh, f, gw, f).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, f, f)
        z = self._forward(cells.contiguous())  # [B * gh * gw, z, 1, 1]
        return z.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()

    def _forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> up levels from the coarsest (res blocks, attention, upsample) -> conv_out."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        cfg, g = config, config.num_groups
        self.num_resolutions = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g) if cfg.mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        levels: list[nn.Module] = []
        for i in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # taming indexes up.N by resolution level, finest first
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Codebook of n_embed vectors: nearest-entry lookup by squared L2, straight-through gradients.

    The loss is codebook + beta * commitment (VQ-VAE). Taming's original VectorQuantizer puts beta
    on the codebook term instead; set `legacy_loss=True` to reproduce that exactly. With `l2_norm`
    latents and entries are compared as unit vectors (nearest = highest cosine; Yu et al. 2021's
    improved VQGAN), which keeps far more of a large codebook in use.
    """

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        legacy_loss: bool = False,
        l2_norm: bool = False,
    ) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.beta, self.legacy_loss, self.l2_norm = beta, legacy_loss, l2_norm
        # Taming's init; passing the storage skips nn.Embedding's own normal_ init (slow, and on the
        # meta device it imports torch._dynamo).
        self.embedding = nn.Embedding(n_embed, embed_dim, _weight=torch.empty(n_embed, embed_dim))
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Codes [B, h, w] of the entries nearest to latents [B, embed_dim, h, w] (float32, row-chunked)."""
        b, c, hh, ww = z.shape
        flat = self.matched(z.permute(0, 2, 3, 1).reshape(-1, c).float())
        weight = self.codebook().float()
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e; |z|^2 is the same for every entry, so it is left out.
        e2 = weight.square().sum(1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
        step = max(1, _DISTANCE_BUDGET // self.n_embed)
        for start in range(0, flat.shape[0], step):
            d = torch.addmm(e2, flat[start : start + step], weight.t(), alpha=-2.0)
            out[start : start + step] = d.argmin(1)
        return out.view(b, hh, ww)

    def matched(self, z: Tensor) -> Tensor:
        """Latents (channels on dim 1) as they are compared with the entries: unit vectors with `l2_norm`."""
        return F.normalize(z, dim=1) if self.l2_norm else z

    def codebook(self) -> Tensor:
        """The entries as used: the embedding rows, as unit vectors with `l2_norm`."""
        return self.matched(self.embedding.weight)

    def lookup(self, codes: Tensor) -> Tensor:
        """Latents [B, embed_dim, h, w] of codes [B, h, w] (a channels-last view, no copy)."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize for training: (z_q with straight-through gradient, codebook+commitment loss, codes)."""
        z = self.matched(z)
        codes = self.nearest(z)
        z_q = self.lookup(codes).to(z.dtype)
        codebook = F.mse_loss(z_q, z.detach())
        commitment = F.mse_loss(z, z_q.detach())
        if self.legacy_loss:
            loss = commitment + self.beta * codebook
        else:
            loss = codebook + self.beta * commitment
        z_q = z + (z_q - z).detach()
        return z_q, loss, codes


class VQGAN(nn.Module):
    """Encoder + quant_conv + VectorQuantizer + post_quant_conv + Decoder, taming's names and layout."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        if not config.decoder_only:
            self.encoder = Encoder(config)
            self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, l2_norm=config.l2_codes)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    # --- pixel range ---------------------------------------------------------------------------
    def _to_network(self, images: Tensor) -> Tensor:
        return images * 2.0 - 1.0 if self.config.pixel_range == "-1,1" else images

    def _from_network(self, out: Tensor) -> Tensor:
        return (out + 1.0) * 0.5 if self.config.pixel_range == "-1,1" else out

    # --- checks --------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        cfg = self.config
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"images must be a [B, {cfg.in_channels}, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise InputError(
                f"images must be floats in [0, 1], got dtype {images.dtype} (divide uint8 by 255)"
            )
        if images.shape[1] != cfg.in_channels:
            raise InputError(
                f"images must have {cfg.in_channels} channels (NCHW layout), got shape {tuple(images.shape)}"
            )
        f = cfg.downsample_factor
        h, w = images.shape[-2:]
        if h == 0 or w == 0 or h % f or w % f:
            raise InputError(
                f"image size {h}x{w} is not a positive multiple of the VQGAN downsampling factor {f}; "
                f"resize or crop to e.g. {cfg.resolution}x{cfg.resolution}"
            )

    def _check_codes(self, codes: Tensor) -> Tensor:
        """Codes as [B, h, w]; [B, h*w] is accepted when h*w is a perfect square."""
        if not isinstance(codes, Tensor) or codes.dim() not in (2, 3):
            shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise InputError(f"codes must be a [B, h, w] or [B, h*w] tensor, got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise InputError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.dim() == 2:
            n = codes.shape[1]
            side = math.isqrt(n)
            if side * side != n or n == 0:
                raise InputError(
                    f"{n} codes per image is not a square grid; pass codes as [B, h, w]"
                )
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.numel():
            lo, hi = torch.aminmax(codes)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.config.n_embed:
                raise InputError(
                    f"codes must be in [0, {self.config.n_embed}) for this codebook, got values in [{lo}, {hi}]"
                )
        return codes.long()

    def _require_encoder(self) -> None:
        if self.config.decoder_only:
            raise ConfigError(
                "this VQGAN was built decoder-only (config.decoder_only=True, e.g. from min-dalle's "
                "detoker.pt) and cannot encode images; load a full VQGAN checkpoint to encode"
            )

    # --- encoding ------------------------------------------------------------------------------
    def _prepare(self, x: Tensor, weight: Tensor) -> Tensor:
        """x on weight's device and dtype, in the memory format the (3x3) weight uses."""
        x = x.to(device=weight.device, dtype=weight.dtype)
        if weight.is_contiguous(memory_format=torch.channels_last):
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def encode_latents(self, images: Tensor) -> Tensor:
        """Continuous latents [B, embed_dim, h, w] (before quantization) of images [B, 3, H, W] in [0, 1]."""
        self._require_encoder()
        self._check_images(images)
        x = self._prepare(images, self.encoder.conv_in.weight)
        return self.quant_conv(self.encoder(self._to_network(x)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Codes [B, h, w] (int64) of images [B, 3, H, W] in [0, 1]: the nearest codebook entries."""
        self._require_encoder()
        self._check_images(images)
        f = self.config.downsample_factor
        if images.shape[0] == 0:
            return torch.empty(
                0,
                images.shape[2] // f,
                images.shape[3] // f,
                dtype=torch.long,
                device=images.device,
            )
        return self.quantize.nearest(self.encode_latents(images))

    def quantize_latents(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(quantized latents, codes) for continuous latents [B, embed_dim, h, w]; no gradient."""
        codes = self.quantize.nearest(latents)
        return self.quantize.lookup(codes).to(latents.dtype), codes

    # --- decoding ------------------------------------------------------------------------------
    def _decode_network(self, z_q: Tensor) -> Tensor:
        """Decoder output in the network's own pixel range (unclamped)."""
        return self.decoder(self.post_quant_conv(self._prepare(z_q, self.decoder.conv_in.weight)))

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32, clamped) from quantized latents [B, embed_dim, h, w]."""
        out = self._from_network(self._decode_network(z_q))
        return (
            out.clamp_(0.0, 1.0).float() if not out.requires_grad else out.clamp(0.0, 1.0).float()
        )

    def decode(self, codes: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] (float32, clamped) from codes [B, h, w] or [B, h*w]."""
        codes = self._check_codes(codes)
        if codes.shape[0] == 0:
            f, (h, w) = self.config.downsample_factor, codes.shape[1:]
            return torch.empty(0, self.config.out_ch, h * f, w * f, device=codes.device)
        return self.decode_latents(
            self.quantize.lookup(codes.to(self.quantize.embedding.weight.device))
        )

    # --- training ------------------------------------------------------------------------------
    def forward(self, images: Tensor, quantize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction in [0, 1] space, unclamped; codebook+commitment loss; codes).

        quantize=False decodes the continuous latents (an autoencoder warm-up: zero codebook loss;
        the codes are still reported).
        """
        z = self.encode_latents(images)
        if quantize:
            z_q, loss, codes = self.quantize(z)
        else:
            z_q = self.quantize.matched(z)
            loss, codes = z.new_zeros(()), self.quantize.nearest(z.detach())
        recon = self._from_network(self._decode_network(z_q))
        return recon, loss, codes
