"""The DalleBart trainer: cross-entropy on (caption tokens -> VQGAN image tokens) from encoded shards.

The original's recipe is `preset: mini, optimizer: adafactor, lr: 0.005, warmup_steps: 2000, decay: linear,
precision: bfloat16` with a global batch of 3,584 (batch_size × grad_accum × ranks). Captions are blanked
with probability `blank_caption_prob` (the empty caption, as at sampling time) so the model learns the
unconditional distribution that super-conditioning needs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import Tensor

from ..checkpoints import load_parts
from ..checkpoints.native import load_into, save_model_dir, write_examples, write_vocabulary
from ..config import (
    BART_PRESETS,
    BartConfig,
    PipelineConfig,
    SamplingConfig,
    TextConfig,
    check_memory,
)
from ..data.shards import ShardDataset, read_shard
from ..errors import ConfigError
from ..generate import iter_image_tokens
from ..images import make_grid, to_pil
from ..models import kernels
from ..models.bart import DalleBart
from ..models.loading import load_vqgan
from ..models.vqgan import VQGAN
from ..text import TextEncoder, TextNormalizer, load_tokenizer, train_tokenizer
from . import distributed as D
from .loop import TrainConfig, Trainer, option

log = logging.getLogger("dallemini.train")


@dataclass
class Seq2SeqConfig(TrainConfig):
    """`dallemini train` settings: data, model shape (or a model to fine-tune), text and sampling."""

    # two shared settings that are options of `dallemini train` alone
    optimizer: str = option("adafactor", "adafactor or adamw")
    distributed: str = option("ddp", "ddp or fsdp (under torchrun)")  # fsdp: fully_shard
    data: str = option(  # parquet shards
        "", "encoded token shards (dallemini encode): a folder, or an s3:// or https:// URL"
    )
    eval_data: str | None = option(None, "held-out encoded shards")  # for the evaluation loss
    model: str | None = option(None, "model directory to fine-tune")  # else `preset`
    # the DalleBart shape when training from scratch
    preset: str = option("tiny", "tiny, mini or mega (from scratch)", flag="--model-preset")
    bart: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    # for sample grids and the exported model
    vqgan: str | None = option(None, "VQGAN (model dir/checkpoint) for samples and export")
    tokenizer: str | None = (
        None  # tokenizer files; default: the model's, else one trained on the data
    )
    tokenizer_vocab: int = 4096  # vocabulary of a tokenizer trained on the data's captions
    text_length: int | None = (
        None  # caption tokens incl. <s></s>; default: the model's max_text_length
    )
    blank_caption_prob: float = 0.1
    shuffle_buffer: int = 10_000
    sample_prompts: list[str] = field(default_factory=list)  # default: 4 captions of the eval data
    sample_images: int = 4  # images per prompt in a sample grid
    sample_condition_scale: float = 10.0
    sample_top_k: int = 50

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("data must name a folder of encoded shards (dallemini encode)")
        if not 0.0 <= self.blank_caption_prob < 1.0:
            raise ConfigError(
                f"blank_caption_prob must be in [0, 1), got {self.blank_caption_prob}"
            )
        if self.preset not in BART_PRESETS:
            raise ConfigError(
                f"unknown preset {self.preset!r}; choose one of {sorted(BART_PRESETS)}"
            )
        if self.sample_images < 1:
            raise ConfigError(f"sample_images must be >= 1, got {self.sample_images}")


class Seq2SeqTrainer(Trainer):
    """Trains DalleBart on encoded shards; exports a model directory `out/model` usable by `generate`."""

    config_class = Seq2SeqConfig
    cfg: Seq2SeqConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.init_parts = None
        if cfg.model:
            self.init_parts = load_parts(Path(cfg.model))
        probe = ShardDataset(cfg.data, lambda c: (c, c), 1, shuffle=False)
        info = probe.info
        self.text = self._text_encoder(cfg)
        self.bart_config = self._bart_config(cfg, info)
        check_memory(self.bart_config, training=True)
        model = DalleBart(self.bart_config)
        if self.init_parts is not None:
            load_into(model, self.init_parts.states["bart"], f"{cfg.model} (bart)")
        self.vqgan_model = self._vqgan(cfg, info)
        self.add_module("model", model)
        self.data = ShardDataset(
            cfg.data,
            self.text,
            cfg.batch_size,
            shuffle=True,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        self._warn_partial_epoch(cfg)
        self.uncond = self.text.unconditional(1)
        self._micro = 0  # micro-batch index within a step: one blanking draw per micro-batch

    def _warn_partial_epoch(self, cfg: Seq2SeqConfig) -> None:
        """Warn when the run ends before its stream has read every shard: shards are read whole, in
        a shuffled order, so rows stored by subject or source would be learnt from some of them only."""
        coverage = self.data.epoch_coverage(cfg.steps * cfg.batch_size * cfg.grad_accum)
        if coverage < 1:
            rows = self.data.total_rows // self.env.world_size
            log.warning(
                "%d steps read about %.0f%% of the %d rows of %s (shuffle_buffer %s): unless its "
                "shards are in random order, set shuffle_buffer >= %d (the rows of an epoch) to "
                "draw every update from the whole dataset",
                cfg.steps,
                100 * coverage,
                rows,
                cfg.data,
                cfg.shuffle_buffer,
                rows,
            )

    # --- building -------------------------------------------------------------------------------
    def _text_encoder(self, cfg: Seq2SeqConfig) -> TextEncoder:
        """The tokenizer: given, the model's, the run's own (on resume), or trained on the data's captions."""
        own = Path(cfg.out) / "tokenizer.json"
        length = cfg.text_length
        if length is None:
            if self.init_parts is not None and self.init_parts.config.bart is not None:
                length = self.init_parts.config.bart.max_text_length
            else:
                base = BART_PRESETS[cfg.preset]
                length = _int_setting(cfg.bart, "max_text_length", base.max_text_length)
        text_cfg = TextConfig(max_length=length)
        if cfg.tokenizer:
            tok = load_tokenizer(cfg.tokenizer)
        elif self.init_parts is not None and self.init_parts.tokenizer_json is not None:
            tok = Tokenizer.from_str(self.init_parts.tokenizer_json)
        elif own.is_file():
            tok = load_tokenizer(own)
        else:
            tok = self._train_tokenizer(cfg, own)
        return TextEncoder(tok, text_cfg)

    def _train_tokenizer(self, cfg: Seq2SeqConfig, dst: Path) -> Tokenizer:
        """Rank 0 fits a BPE on every caption of the training shards; the others read its file."""
        if self.env.is_main:
            ds = ShardDataset(cfg.data, lambda c: (c, c), 1, shuffle=False)

            def captions() -> Iterator[str]:
                for s in ds.shards:
                    yield from read_shard(s.path, ds.code_length)[0]

            tok = train_tokenizer(captions(), cfg.tokenizer_vocab, normalizer=TextNormalizer())
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_text(tok.to_str())
            tmp.replace(dst)
        D.barrier(self.env)
        return load_tokenizer(dst)

    def _bart_config(self, cfg: Seq2SeqConfig, info: dict[str, Any]) -> BartConfig:
        """The model shape: the fine-tuned model's, or the preset with the data's grid/codebook and the tokenizer's vocab."""
        grid, n_embed = info.get("grid_size"), info.get("n_embed")
        if self.init_parts is not None and self.init_parts.config.bart is not None:
            bc = self.init_parts.config.bart
        else:
            base = dataclasses.asdict(BART_PRESETS[cfg.preset])
            unknown = sorted(set(cfg.bart) - set(base))
            if unknown:
                raise ConfigError(f"bart: unknown field(s) {unknown}; known: {sorted(base)}")
            base.update(cfg.bart)
            if n_embed:
                base.setdefault("image_vocab_size", n_embed)
                base["image_vocab_size"] = _int_setting(cfg.bart, "image_vocab_size", n_embed)
                base["decoder_start_token_id"] = base["image_vocab_size"]
            if grid:
                base["image_length"] = int(grid) ** 2
            base["encoder_vocab_size"] = _int_setting(
                cfg.bart, "encoder_vocab_size", self.text.vocab_size
            )
            base["max_text_length"] = self.text.max_length
            bc = BartConfig(**base)
        if grid and bc.image_length != int(grid) ** 2:
            raise ConfigError(
                f"{cfg.data} holds {int(grid) ** 2} codes per image, the model generates {bc.image_length}"
            )
        if n_embed and n_embed > bc.image_vocab_size:
            raise ConfigError(
                f"{cfg.data} uses a {n_embed}-entry codebook, the model knows {bc.image_vocab_size} codes"
            )
        if self.text.vocab_size > bc.encoder_vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.text.vocab_size} tokens, the model's text vocabulary {bc.encoder_vocab_size}"
            )
        if self.text.max_length > bc.max_text_length:
            raise ConfigError(
                f"text_length {self.text.max_length} exceeds the model's max_text_length {bc.max_text_length}"
            )
        return bc

    def _vqgan(self, cfg: Seq2SeqConfig, info: dict[str, Any]) -> VQGAN | None:
        """The VQGAN that made the data (for samples and export), checked against dataset.json's fingerprint."""
        path = cfg.vqgan
        if (
            path is None
            and self.init_parts is not None
            and self.init_parts.config.vqgan is not None
        ):
            path = cfg.model
        if path is None:
            return None
        vq = load_vqgan(path, device=self.device)
        fp = info.get("vqgan_fingerprint")
        if fp and fp != vq.config.fingerprint():
            raise ConfigError(
                f"{path} is not the VQGAN that encoded {cfg.data} (fingerprint {vq.config.fingerprint()} "
                f"vs {fp} in dataset.json)"
            )
        return vq

    # --- a step ---------------------------------------------------------------------------------
    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        ids, mask, codes = (t.to(self.device, non_blocking=True) for t in batch)
        p = self.cfg.blank_caption_prob
        if p > 0:
            g = self.step_generator(f"blank{self._micro}")
            blank = (torch.rand(ids.shape[0], generator=g) < p).to(self.device)
            u_ids, u_mask = (t.to(self.device) for t in self.uncond)
            ids = torch.where(blank[:, None], u_ids, ids)
            mask = torch.where(blank[:, None], u_mask, mask)
        self._micro += 1
        out = self.wrapped["model"](ids, mask, labels=codes)
        return out.loss, {
            "loss": float(out.loss.detach()),
            "n_samples": float(codes.shape[0]),
            "n_tokens": float(codes.numel()),
        }

    def train_step(self) -> dict[str, float]:
        self._micro = 0
        return super().train_step()

    # --- evaluation, samples, export -----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean cross-entropy and top-1 token accuracy on `eval_data`, over all ranks' parts."""
        cfg = self.cfg
        if not cfg.eval_data:
            return {}
        ds = ShardDataset(
            cfg.eval_data,
            self.text,
            cfg.batch_size,
            shuffle=False,
            rank=self.env.rank,
            world_size=self.env.world_size,
            epochs=1,
            drop_last=False,
        )
        model = self.wrapped["model"]
        sums = torch.zeros(3, dtype=torch.float64)
        for ids, mask, codes in ds:
            ids, mask, codes = ids.to(self.device), mask.to(self.device), codes.to(self.device)
            with self.autocast():
                out = model(ids, mask, labels=codes)
            n = codes.numel()
            correct = (out.logits.argmax(-1) == codes).sum()
            sums += torch.tensor(
                [float(out.loss) * n, float(correct), float(n)], dtype=torch.float64
            )
        sums = D.all_reduce_sum(sums, self.env)
        return {"loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}

    def _prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.sample_prompts:
            return list(cfg.sample_prompts)
        folder = cfg.eval_data or cfg.data
        ds = ShardDataset(folder, lambda c: (c, c), 1, shuffle=False)
        captions = read_shard(ds.shards[0].path, ds.code_length)[0]
        return list(dict.fromkeys(captions))[:4]

    def pipeline_config(self) -> PipelineConfig:
        vq = self.vqgan_model.config if self.vqgan_model is not None else None
        return PipelineConfig(
            bart=self.bart_config,
            vqgan=vq,
            text=self.text.config,
            sampling=SamplingConfig(
                condition_scale=self.cfg.sample_condition_scale, top_k=self.cfg.sample_top_k
            ),
        )

    @contextmanager
    def _full_weights(self) -> Iterator[DalleBart]:
        """The main model with all its weights present (unsharded for the duration under FSDP)."""
        model = D.unwrap(self.wrapped["model"])
        sharded = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
        for m in sharded:
            m.unshard()
        try:
            yield model  # type: ignore[misc]
        finally:
            for m in sharded:
                m.reshard()

    def _sample_images(self, model: DalleBart, vq: VQGAN, prompts: list[str]) -> list[Image.Image]:
        """`sample_images` images per prompt, in order, the k-th image of the run drawn with seed + k
        (what TextToImage gives for these prompts, settings and seed)."""
        n = self.cfg.sample_images
        ids, mask = self.text(prompts)
        u_ids, u_mask = self.text.unconditional(1)
        seeds = [self.cfg.seed + k for k in range(n * len(prompts))]
        index = torch.arange(len(prompts)).repeat_interleave(n)
        *_, batch = iter_image_tokens(
            kernels.accelerate(model),  # the CPU inference paths, as generation binds them
            ids.to(self.device),
            mask.to(self.device),
            u_ids.to(self.device),
            u_mask.to(self.device),
            seeds,
            self.pipeline_config().sampling,
            num_codes=vq.config.n_embed,
            prompt_index=index,
        )
        # Decoded one image at a time on CPU and eight on GPU, as TextToImage does (same pixels).
        g = vq.config.grid_size
        codes = batch.tokens.view(-1, g, g).split(1 if self.device.type == "cpu" else 8)
        return [im for c in codes for im in to_pil(vq.decode(c))]

    def sample(self, step: int) -> Path | None:
        """A grid per run: every sample prompt × sample_images, written to out/samples/step-NNNNNN.png."""
        if self.vqgan_model is None:
            return None
        prompts = self._prompts()
        with self._full_weights() as model, torch.inference_mode():
            was_training = model.training
            model.eval()
            try:
                images = self._sample_images(model, self.vqgan_model, prompts)
            finally:
                model.train(was_training)
        if not self.env.is_main:
            return None
        dst = self.out / "samples" / f"step-{step:06d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, cols=self.cfg.sample_images).save(dst)
        (dst.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
        return dst

    def _write_vocabulary(self, dst: Path) -> None:
        """vocabulary.txt (every word of the training captions) and examples.json (the first four
        distinct ones) in the exported model dir; the shards hold the captions, read once here."""
        seen: dict[str, None] = {}

        def captions() -> Iterator[str]:
            normalized = self.data.info.get("captions_normalized") is True
            for shard in self.data.shards:
                for caption in read_shard(shard.path, self.data.code_length)[0]:
                    text = caption if normalized else self.text.normalize(caption)
                    if len(seen) < 4 and text.strip():
                        seen.setdefault(text.strip())
                    yield text

        write_vocabulary(dst, captions())
        write_examples(dst, list(seen))

    def export(self, state: dict[str, Tensor]) -> Path:
        """out/model: config.json + bart.safetensors (+ vqgan.safetensors) + tokenizer.json, with
        the training captions' vocabulary.txt and examples.json."""
        states: dict[str, dict[str, Tensor]] = {"bart": state}
        if self.vqgan_model is not None:
            states["vqgan"] = self.vqgan_model.state_dict()
        return save_model_dir(
            self.out / "model",
            self.pipeline_config(),
            states,
            tokenizer_json=self.text.tokenizer.to_str(),
            overwrite=True,
            write_extra=lambda tmp, _hashes: self._write_vocabulary(tmp),
        )


def _int_setting(section: dict[str, Any], key: str, default: int) -> int:
    """An integer from the `bart` settings (--set bart.KEY=...), or a ConfigError naming it."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"bart.{key} must be an integer, got {value!r}")
    return value
