"""The VQGAN trainer: L1/L2 + perceptual + codebook + patch-GAN losses on raw images (taming's recipe).

Two modules train side by side, each with its own optimizer and schedule: "model" (the VQGAN) and
"discriminator" (taming's PatchGAN). Every micro-batch does the generator pass (reconstruction losses,
plus the adaptively weighted GAN term once `disc_start` updates are done) and, once the GAN is on, the
discriminator pass on the same, detached reconstructions. Both schedules count global updates, so the
discriminator's learning rate at a step does not depend on when it started.

Taming trains the f16 VQGAN with Adam, lr 4.5e-6 × global batch, betas (0.5, 0.9) and a constant
rate; those are the defaults here (with AdamW and no weight decay, which is the same optimizer).
Images come from any source `open_source` reads (captions are not needed) through `PairDataset`
(`require_captions=False`), the exactly resumable, rank-split reader the CLIP trainer uses too; its
position is saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import typing
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..checkpoints.native import save_model_dir
from ..config import VQGAN_PRESETS, PipelineConfig, VQGANConfig, check_memory
from ..data.pairs import PairDataset
from ..data.sources import Source, open_source
from ..errors import ConfigError, InputError
from ..images import make_grid
from ..models.loading import load_vqgan
from ..models.vqgan import VQGAN
from . import distributed as D
from .loop import TrainConfig, Trainer, option
from .losses import D_LOSSES, LPIPS, ActNorm, VQGANLoss, load_taming_discriminator
from .settings import coerce

log = logging.getLogger("dallemini.train")

SOURCE_KINDS = ("auto", "folder", "tar", "parquet")


def spread_pick(z: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of n rows of z spread over its distribution (k-means++ seeding, in doubling rounds).

    Each round draws as many new rows as are chosen so far, with probability proportional to the
    squared distance to the nearest chosen row, so a mass of identical latents (a flat background)
    gets one entry rather than most of them.
    """
    chosen = torch.randint(len(z), (1,), generator=generator)
    dist = (z - z[chosen]).square().sum(1)
    while len(chosen) < n:
        k = min(len(chosen), n - len(chosen))
        new = torch.multinomial(dist + 1e-12, k, replacement=k > len(z), generator=generator)
        chosen = torch.cat([chosen, new])
        for start in range(0, len(z), 8192):
            part = slice(start, start + 8192)
            near = torch.cdist(z[part], z[new]).square().amin(1)
            dist[part] = torch.minimum(dist[part], near)
    return chosen


@dataclass
class ExtraRows:
    """Rows a trainer extension adds to one micro-batch (see `VQGANTrainer.extra_rows`)."""

    images: Tensor  # [k, 3, H, W]: encoded and decoded with the batch, against themselves
    # Maps the quantized latents of the whole batch [B, C, h, w] to what the decoder decodes: the
    # same rows, then extra ones; those are reconstructed against `targets`, weighted `weight`.
    decode: Callable[[Tensor], Tensor] | None = None
    targets: Tensor | None = None  # [j, 3, H, W], one per row `decode` appends
    weight: float = 1.0

    def targets_for(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(reconstruction targets, per-row loss weights or None) for the batch `images` (extra rows in)."""
        if self.decode is None or self.targets is None:
            return images, None
        targets = torch.cat([images, self.targets])
        if self.weight == 1.0:
            return targets, None
        weights = torch.ones(targets.shape[0], device=targets.device)
        weights[-self.targets.shape[0] :] = self.weight
        return targets, weights


# --- configuration -------------------------------------------------------------------------------
@dataclass
class VQGANTrainConfig(TrainConfig):
    """`dallemini train-vqgan` settings: images, the VQGAN to train, loss weights, discriminator, LPIPS."""

    # images only are used
    data: str = option("", "image folder, webdataset .tar(s) or parquet file(s)")
    kind: str = option("auto", "auto, folder, tar or parquet")  # as `dallemini encode`
    image_column: str | None = option(None, "parquet column with image bytes")
    caption_column: str | None = None  # parquet files need one to be readable; it is not used
    eval_data: str | None = option(None, "held-out images for L1/PSNR")  # eval/l1, eval/psnr
    eval_holdout: int = 0  # without eval_data: the first N records of data, kept out of training
    model: str | None = option(None, "model dir or VQGAN checkpoint to fine-tune")  # else preset
    preset: str = option(  # a VQGAN_PRESETS name
        "f16_16384", "VQGAN preset when training from scratch", flag="--model-preset"
    )
    vqgan: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    resolution: int | None = option(None, "training image side (default: the VQGAN's)")
    # None: each epoch is a shuffle of the whole index (parquet/.tar.gz sources keep every encoded
    # image in memory); N: stream the source each epoch through a shuffle buffer of N images (bounded
    # memory, a local shuffle; 0 keeps the source order)
    shuffle_buffer: int | None = None
    workers: int = 0  # image-decoding threads (0: decode in the training thread)
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # needs lpips_vgg + lpips_lin, or lpips_taming
    codebook_weight: float = 1.0
    disc_weight: float = 0.8  # scales the adaptive GAN weight (taming's custom_vqgan: 0.8)
    disc_factor: float = 1.0
    disc_start: int = option(10_000, "updates before the GAN starts")
    disc_loss: str = "hinge"
    disc_lr: float | None = option(None, "discriminator learning rate (default: --lr)")
    disc_ch: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"  # batch or actnorm
    discriminator: str | None = option(None, "taming .ckpt to start the discriminator from")
    # torchvision's vgg16-397923af.pth
    lpips_vgg: str | None = option(None, "torchvision VGG16 weights for LPIPS")
    # the lpips package's weights/v0.1/vgg.pth
    lpips_lin: str | None = option(None, "lpips' vgg.pth linear heads")
    # one carrying loss.perceptual_loss.*, instead of lpips_vgg + lpips_lin
    lpips_taming: str | None = option(None, "taming .ckpt to take LPIPS from")
    sample_images: int = 8  # originals over reconstructions in out/samples/step-NNNNNN.png
    # Dead-code restarts: every N updates (0: never), codebook entries that no latent of a fixed
    # probe of training images picks are moved onto probe latents (chosen by quantization error),
    # so a codebook trained from scratch does not collapse onto a few entries.
    codebook_restart_every: int = 0
    codebook_restart_until: int = 0  # last update that may restart codes (0: no limit)
    codebook_restart_probe: int = 256  # training images in the probe (a seeded random sample)
    # Updates during which the decoder sees the encoder's continuous latents (an autoencoder
    # warm-up); at this update every codebook entry is drawn from the probe's latents (weighted by
    # distance), a data-dependent start that a codebook trained from scratch otherwise lacks.
    quantize_start: int = 0
    # False: fine-tune the decoder (and post_quant_conv) of `model` only; the encoder and the
    # codebook stay as they are, so every image keeps its codes and a seq2seq model trained on
    # them stays valid (e.g. teach the decoder to draw the token rows a DalleBart emits).
    train_encoder: bool = True
    # Taming's optimizer: Adam, 4.5e-6 × global batch (8 here), betas (0.5, 0.9), constant rate, no clipping.
    optimizer: str = "adamw"
    lr: float = 3.6e-5
    beta1: float = 0.5
    beta2: float = 0.9
    decay: str = "constant"
    clip_grad: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("data must name an image folder, webdataset .tar(s) or parquet files")
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.preset not in VQGAN_PRESETS:
            raise ConfigError(
                f"unknown VQGAN preset {self.preset!r}; choose one of {sorted(VQGAN_PRESETS)}"
            )
        if self.model and self.vqgan:
            raise ConfigError("vqgan.* overrides shape a new VQGAN; they cannot apply to --model")
        weights = "l1_weight l2_weight perceptual_weight codebook_weight disc_weight disc_factor"
        counts = "disc_start eval_holdout sample_images workers quantize_start"
        restarts = "codebook_restart_every codebook_restart_until"
        for name in f"{weights} {counts} {restarts}".split():
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.codebook_restart_probe < 1:
            raise ConfigError(
                f"codebook_restart_probe must be >= 1, got {self.codebook_restart_probe}"
            )
        if not self.train_encoder:
            if not self.model:
                raise ConfigError(
                    "train_encoder=false fine-tunes a decoder: give the VQGAN as model"
                )
            for name in ("quantize_start", "codebook_restart_every"):
                if getattr(self, name):
                    raise ConfigError(
                        f"{name} must be 0 with train_encoder=false (the encoder and codebook stay "
                        "fixed)"
                    )
        if self.shuffle_buffer is not None and self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0 (or none), got {self.shuffle_buffer}")
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"resolution must be >= 1, got {self.resolution}")
        if self.disc_loss not in D_LOSSES:
            raise ConfigError(
                f"disc_loss must be one of {sorted(D_LOSSES)}, got {self.disc_loss!r}"
            )
        if self.disc_lr is not None and not self.disc_lr > 0:
            raise ConfigError(f"disc_lr must be > 0, got {self.disc_lr}")
        if bool(self.lpips_vgg) != bool(self.lpips_lin):
            raise ConfigError("LPIPS needs both lpips_vgg (VGG16 weights) and lpips_lin (vgg.pth)")
        if self.lpips_taming and self.lpips_vgg:
            raise ConfigError("give either lpips_vgg + lpips_lin or lpips_taming, not both")
        if self.distributed == "fsdp":
            raise ConfigError(
                "the VQGAN trainer runs with distributed=ddp (the adaptive GAN weight needs the "
                "decoder's whole last layer); a VQGAN fits on every device"
            )


def _vqgan_config(preset: str, overrides: dict[str, Any]) -> VQGANConfig:
    """A preset's VQGANConfig with field overrides (values from YAML or --set, coerced to the field types)."""
    base = VQGAN_PRESETS[preset].to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(f"vqgan: unknown field(s) {unknown}; known: {sorted(base)}")
    hints = typing.get_type_hints(VQGANConfig)
    for name, value in overrides.items():
        if typing.get_origin(hints[name]) is tuple and not isinstance(value, (str, list, tuple)):
            value = [value]
        base[name] = coerce(value, hints[name], f"vqgan.{name}")
    return VQGANConfig.from_dict(base)


# --- the trainer ---------------------------------------------------------------------------------
class VQGANTrainer(Trainer):
    """Trains (or fine-tunes) a VQGAN with its discriminator; exports `out/model` holding only the VQGAN."""

    config_class = VQGANTrainConfig
    cfg: VQGANTrainConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.source = self._open(cfg.data)
        self.eval_source = self._open(cfg.eval_data) if cfg.eval_data else None
        self.vqgan = self._build_vqgan()
        vc = self.vqgan.config
        if vc.decoder_only:
            raise ConfigError(
                f"{cfg.model} holds only a VQGAN decoder; training needs the encoder too"
            )
        self.resolution = cfg.resolution or vc.resolution
        if self.resolution % vc.downsample_factor:
            raise ConfigError(
                f"resolution {self.resolution} is not a multiple of the VQGAN's downsampling factor "
                f"{vc.downsample_factor}"
            )
        lpips = self._lpips()
        if cfg.disc_start >= cfg.steps and self.env.is_main:
            log.info(
                "disc_start=%d >= steps=%d: the discriminator does not train in this run",
                cfg.disc_start,
                cfg.steps,
            )
        if lpips is None and cfg.perceptual_weight > 0 and self.env.is_main:
            log.warning(
                "no LPIPS weights given (lpips_vgg + lpips_lin, or lpips_taming): training without "
                "the perceptual term"
            )
        self.loss = VQGANLoss(
            lpips=lpips,
            disc_start=cfg.disc_start,
            disc_loss=cfg.disc_loss,
            l1_weight=cfg.l1_weight,
            l2_weight=cfg.l2_weight,
            perceptual_weight=cfg.perceptual_weight if lpips is not None else 0.0,
            codebook_weight=cfg.codebook_weight,
            disc_weight=cfg.disc_weight,
            disc_factor=cfg.disc_factor,
            disc_in_channels=vc.out_ch,
            disc_ch=cfg.disc_ch,
            disc_layers=cfg.disc_layers,
            disc_norm=cfg.disc_norm,
        )
        if cfg.discriminator:  # its shape comes from the checkpoint; disc_ch/layers/norm are unused
            self.loss.discriminator = load_taming_discriminator(cfg.discriminator)
        uses_actnorm = any(isinstance(m, ActNorm) for m in self.loss.discriminator.modules())
        if uses_actnorm and self.env.distributed and not cfg.discriminator:
            raise ConfigError(
                "disc_norm=actnorm initialises from each rank's first batch, so ranks would disagree; "
                "use disc_norm=batch, one process, or a trained discriminator"
            )
        self.loss.to(self.device)
        if not cfg.train_encoder:  # the optimizer only gets what still requires a gradient
            for frozen in (self.vqgan.encoder, self.vqgan.quant_conv, self.vqgan.quantize):
                frozen.requires_grad_(False)
        self.add_module("model", self.vqgan)
        self.add_module("discriminator", self.loss.discriminator, lr=cfg.disc_lr)

        count = self.source.count_hint()
        holdout = 0 if cfg.eval_data else cfg.eval_holdout
        if count is not None and count <= holdout:
            raise ConfigError(
                f"{cfg.data} holds {count} images; eval_holdout={holdout} would leave none to train on"
            )
        self.data = self._images(
            self.source,
            cfg.batch_size,
            seed=cfg.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            shuffle_buffer=cfg.shuffle_buffer,
            start=holdout,
        )
        self.eval_data = self._eval_images(self.env.rank, self.env.world_size, cfg.batch_size)
        self._samples: Tensor | None = None
        self._probe: Tensor | None = None

    # --- building -------------------------------------------------------------------------------
    def _build_vqgan(self) -> VQGAN:
        """The VQGAN to fine-tune (model dir or foreign checkpoint), else a fresh one from preset + overrides."""
        cfg = self.cfg
        if cfg.model:
            return load_vqgan(cfg.model, device="cpu", dtype="float32")
        check_memory(_vqgan_config(cfg.preset, cfg.vqgan), training=True)
        return VQGAN(_vqgan_config(cfg.preset, cfg.vqgan))

    def _lpips(self) -> LPIPS | None:
        cfg = self.cfg
        if cfg.perceptual_weight <= 0:
            return None
        if cfg.lpips_taming:
            return LPIPS.from_taming(cfg.lpips_taming)
        if cfg.lpips_vgg and cfg.lpips_lin:
            return LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_lin)
        return None

    def _open(self, path: str) -> Source:
        return open_source(
            path,
            self.cfg.kind,  # type: ignore[arg-type]
            image_column=self.cfg.image_column,
            caption_column=self.cfg.caption_column,
            normalizer=None,
        )

    def _images(self, source: Source, batch_size: int, **kw: Any) -> PairDataset:
        """Batches of this source's images (captions or not) at the training resolution."""
        return PairDataset(
            source,
            batch_size,
            self.resolution,
            captions="first",
            require_captions=False,
            workers=self.cfg.workers,
            **kw,
        )

    def _eval_images(
        self, rank: int, world_size: int, batch_size: int, limit: int | None = None
    ) -> PairDataset | None:
        """One ordered pass over the evaluation images (eval_data, or the held-out head of data).

        `limit`: only the first that many records of them.
        """
        cfg = self.cfg
        if self.eval_source is not None:
            source, stop = self.eval_source, limit
        elif cfg.eval_holdout:
            source, stop = self.source, min(cfg.eval_holdout, limit or cfg.eval_holdout)
        else:
            return None
        return self._images(
            source,
            batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=False,
            stop=stop,
            epochs=1,
            drop_last=False,
        )

    # --- the extension point ------------------------------------------------------------------
    def extra_rows(self, micro: int) -> ExtraRows | None:
        """Rows that micro-batch `micro` of this update trains on beside its images; none here.

        Subclasses fill it; drawing from (seed, step, rank, micro) alone keeps resumes exact.
        """
        return None

    @contextlib.contextmanager
    def _decoding(self, decode: Callable[[Tensor], Tensor] | None) -> Iterator[None]:
        """While active, the decoder gets `decode(quantized latents)` instead of the latents."""
        if decode is None:
            yield
            return
        handle = self.vqgan.post_quant_conv.register_forward_pre_hook(
            lambda _module, args: (decode(args[0]),)
        )
        try:
            yield
        finally:
            handle.remove()

    # --- a step ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _wrapped_discriminator(self) -> Iterator[None]:
        """The loss's discriminator calls go through the DDP wrapper (gradient all-reduce) for the duration."""
        inner, wrapped = self.loss.discriminator, self.wrapped["discriminator"]
        if wrapped is inner:
            yield
            return
        self.loss.discriminator = wrapped
        try:
            yield
        finally:
            self.loss.discriminator = inner

    def train_step(self) -> dict[str, float]:
        """Generator update (and, once the GAN is on, discriminator update) over `grad_accum` micro-batches."""
        accum = self.cfg.grad_accum
        model, disc = self.wrapped["model"], self.wrapped["discriminator"]
        # The adaptive weight differentiates w.r.t. the real parameter, not a DDP wrapper's view of it.
        last_layer = self.vqgan.decoder.conv_out.weight
        gan = self.loss.gan_active(self.step)
        logs: dict[str, float] = defaultdict(float)
        quantize = self.step >= self.cfg.quantize_start
        if self.step > 0 and self.step == self.cfg.quantize_start:
            logs.update(self.restart_dead_codes(every_code=True))
        elif self._restart_due():
            logs.update(self.restart_dead_codes())
        for i in range(accum):
            images = self.next_batch().pixels.to(self.device, non_blocking=True)
            extra = self.extra_rows(i)
            targets, weights = images, None
            if extra is not None:
                images = torch.cat([images, extra.images])
            sync = i == accum - 1
            with (
                D.gradient_sync(model, sync),
                self.autocast(),
                self._decoding(extra.decode if extra is not None else None),
            ):
                recon, codebook_loss, _ = model(images, quantize=quantize)
                if extra is not None:
                    targets, weights = extra.targets_for(images)
                loss, g_logs = self.loss.generator_loss(
                    targets, recon, codebook_loss, self.step, last_layer, weights
                )
            self.backward(loss / accum)
            if not gan:  # the GAN terms appear in the logs once they count
                for k in ("g_loss", "d_weight", "disc_factor"):
                    g_logs.pop(k)
            else:
                with D.gradient_sync(disc, sync), self.autocast(), self._wrapped_discriminator():
                    d_loss, d_logs = self.loss.discriminator_loss(targets, recon, self.step)
                self.backward(d_loss / accum)
                g_logs.update(d_logs)
            for k, v in g_logs.items():
                logs[k] += v / accum
            logs["n_images"] += float(images.shape[0])
        logs["grad_norm"] = self.optimizer_step("model")
        if gan:
            logs["d_grad_norm"] = self.optimizer_step("discriminator")
        else:  # the discriminator's schedule counts global updates, trained or not
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=r"Detected call of `lr_scheduler.step\(\)`"
                )
                self.optims["discriminator"].scheduler.step()
        return logs

    # --- codebook restarts ----------------------------------------------------------------------
    def _restart_due(self) -> bool:
        every, until = self.cfg.codebook_restart_every, self.cfg.codebook_restart_until
        return (
            bool(every)
            and self.step > self.cfg.quantize_start  # before it the codebook is not in use
            and self.step % every == 0
            and (not until or self.step <= until)
        )

    def _probe_images(self) -> Tensor:
        """The restart probe: a fixed seeded sample of training images (the same on every rank)."""
        if self._probe is None:
            k = self.cfg.codebook_restart_probe
            probe = self._images(self.source, k, seed=self.cfg.seed + 1, epochs=1, drop_last=False)
            self._probe = next(iter(probe)).pixels
        return self._probe

    @torch.no_grad()
    def restart_dead_codes(self, every_code: bool = False) -> dict[str, float]:
        """Move the entries no probe latent picks onto probe latents, drawn by quantization error;
        with `every_code`, move every entry, spread over the probe's latents by `spread_pick`.

        Deterministic in (seed, step) and identical on every rank (same probe, same weights, same
        draw), so it needs no communication and resumes exactly; the moved rows' optimizer moments
        are zeroed.
        """
        quant = self.vqgan.quantize
        latents = []
        for chunk in self._probe_images().split(64):
            with self.autocast():
                z = self.vqgan.encode_latents(chunk.to(self.device))
            latents.append(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        z = quant.matched(torch.cat(latents))
        codes = quant.nearest(z[:, :, None, None]).flatten()
        weight = quant.embedding.weight
        used = torch.bincount(codes, minlength=quant.n_embed) > 0
        g = self.step_generator("codebook-restart", shared=True)
        dead = (
            torch.arange(quant.n_embed, device=z.device)
            if every_code
            else (~used).nonzero().flatten()
        )
        if len(dead):
            if every_code:
                pick = spread_pick(z.cpu(), quant.n_embed, g)
            else:
                err = (z - quant.codebook().detach().float()[codes]).square().sum(1) + 1e-12
                pick = torch.multinomial(err.cpu(), len(dead), len(dead) > len(err), generator=g)
            weight.data[dead] = z[pick.to(z.device)].to(weight.dtype)
            state = self.optims["model"].optimizer.state.get(weight, {})
            for v in state.values():
                if isinstance(v, Tensor) and v.shape == weight.shape:
                    v[dead] = 0
        return {"codes_restarted": float(len(dead)), "codes_used": float(used.sum())}

    # --- evaluation, samples, export -----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reconstruction L1 and PSNR (clamped, [0, 1] pixels) and codebook usage on the evaluation images."""
        env = self.env
        if self.eval_data is None:
            return {}
        self.eval_data.set_epoch(0)
        n_embed = self.vqgan.config.n_embed
        sums = torch.zeros(3, dtype=torch.float64)
        used = torch.zeros(n_embed, dtype=torch.float64)
        try:
            for batch in self.eval_data:
                images = batch.pixels.to(self.device)
                with self.autocast():
                    recon, _, codes = self.vqgan(images)
                err = recon.float().clamp(0.0, 1.0) - images
                l1 = err.abs().mean(dim=(1, 2, 3))
                mse = err.square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
                psnr = -10.0 * torch.log10(mse)
                sums += torch.tensor([float(l1.sum()), float(psnr.sum()), float(images.shape[0])])
                used += torch.bincount(codes.flatten().cpu(), minlength=n_embed).double()
        except InputError as e:  # a rank with no evaluation images still joins the all-reduce
            log.warning("evaluation: %s", e)
        totals = D.all_reduce_sum(torch.cat([sums, used]), env)
        n = float(totals[2])
        if n == 0:
            return {}
        return {
            "l1": float(totals[0]) / n,
            "psnr": float(totals[1]) / n,
            "codebook_usage": float((totals[3:] > 0).sum()) / n_embed,
        }

    def _sample_images(self) -> Tensor | None:
        """The readable ones of the first `sample_images` evaluation (else training) images, in source order."""
        k = self.cfg.sample_images
        if self._samples is None and k > 0:
            with contextlib.suppress(InputError):
                images = self._eval_images(0, 1, k, limit=k) or self._images(
                    self.source, k, shuffle=False, stop=k, epochs=1, drop_last=False
                )
                batch = next(iter(images), None)
                self._samples = batch.pixels if batch is not None else None
        return self._samples

    @torch.no_grad()
    def sample(self, step: int) -> Path | None:
        """Rank 0 writes out/samples/step-NNNNNN.png: originals (top row) above their reconstructions."""
        if not self.env.is_main:
            return None
        images = self._sample_images()
        if images is None:
            return None
        model = self.vqgan
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                recon, _, _ = model(images.to(self.device))
        finally:
            model.train(was_training)
        recon = recon.float().clamp(0.0, 1.0).cpu()
        tiles = [
            Image.fromarray((t.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))
            for t in torch.cat([images, recon])
        ]
        dst = self.out / "samples" / f"step-{step:06d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        make_grid(tiles, cols=images.shape[0]).save(dst)
        return dst

    def export(self, state: dict[str, Tensor]) -> Path:
        """out/model: a model directory with only the VQGAN (config.json + vqgan.safetensors)."""
        return save_model_dir(
            self.out / "model",
            PipelineConfig(vqgan=self.vqgan.config),
            {"vqgan": state},
            overwrite=True,
        )
