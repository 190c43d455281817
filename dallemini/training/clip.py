"""The small-CLIP trainer (`dallemini train-clip`): contrastive learning on (caption, image) pairs of any source.

Data comes straight from an image folder, webdataset tars or Parquet (`open_source`) through
`PairDataset` (decoded, centre-cropped to the CLIP's `image_size`, exactly resumable, rank-split).
The loss is CLIP's symmetric InfoNCE over each rank's micro-batch (not gathered across ranks), with
one change: captions repeat in real data (and in emoji scenes when several images get the same
caption), and with `captions="all"` an image can meet itself twice in a batch. Plain InfoNCE
would push such identical pairs apart, so every (text, image) pair whose normalized captions are
equal, or whose image is the same record, counts as a positive, and each row's target is spread
evenly over its positives (`contrastive_loss(logits, positives)`).

The tokenizer is `tokenizer` (files), else the one of `model`, else the run's own `out/tokenizer.json`
(on resume), else a byte-level BPE trained on the data's captions and saved there. The export
`out/model` is `model` plus the trained `clip` section and `clip.safetensors` when `model` is given,
else a model directory holding only the CLIP, its text config and tokenizer; either loads with
`models.loading.load_scorer` / `load_small_clip`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..checkpoints import load_parts, native
from ..config import ClipConfig, PipelineConfig, TextConfig, check_memory
from ..data.pairs import CAPTION_MODES, PairBatch, PairDataset
from ..data.sources import Source, open_source
from ..errors import CheckpointError, ConfigError
from ..models.clip import SmallClip, contrastive_loss
from ..text import TextEncoder, TextNormalizer, load_tokenizer, save_tokenizer, train_tokenizer
from . import distributed as D
from .loop import TrainConfig, Trainer, option

log = logging.getLogger("dallemini.train")

SOURCE_KINDS = ("auto", "folder", "tar", "parquet")


@dataclass
class ClipTrainConfig(TrainConfig):
    """`dallemini train-clip` settings: data, CLIP shape (or a model whose CLIP to fine-tune), tokenizer, eval."""

    out: str = "runs/clip"
    data: str = option(  # or a glob
        "", "caption–image source: image folder (+ .txt), webdataset .tar(s), parquet"
    )
    eval_data: str | None = option(None, "held-out source for loss and retrieval accuracy")
    kind: str = option("auto", "auto, folder, tar or parquet")  # as `dallemini encode`
    image_column: str | None = option(None, "parquet column with image bytes")
    caption_column: str | None = option(None, "parquet column with captions")
    model: str | None = option(
        None, "model directory whose CLIP to fine-tune and/or whose tokenizer to use"
    )
    clip: dict[str, Any] = field(default_factory=dict)  # overrides of ClipConfig fields
    tokenizer: str | None = option(
        None, "tokenizer files (default: the model's, else trained on data)"
    )
    tokenizer_vocab: int = 4096  # vocabulary of a tokenizer trained on the data's captions
    captions: str = "random"  # per image: random (one per epoch), first, or all (one item each)
    workers: int = 0  # image-decoding threads (0: decode in the training thread)
    eval_chunk: int = 1024  # retrieval accuracy is top-1 among this many eval pairs at a time
    # CLIP-style optimisation: AdamW (no decay on gains, biases, logit scale), warm-up, cosine decay.
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta2: float = 0.98
    warmup_steps: int = 200
    decay: str = "cosine"

    def validate(self) -> None:
        """Reject settings that cannot work, naming the field."""
        super().validate()
        if not self.data:
            raise ConfigError(
                "data must name a caption–image source (image folder with .txt captions, "
                "webdataset .tar files or parquet)"
            )
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.captions not in CAPTION_MODES:
            raise ConfigError(f"captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if self.batch_size < 2:
            raise ConfigError(
                f"batch_size must be >= 2 for a contrastive loss (per rank), got {self.batch_size}"
            )
        if self.eval_chunk < 2:
            raise ConfigError(f"eval_chunk must be >= 2, got {self.eval_chunk}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.distributed != "ddp":
            raise ConfigError(
                "train-clip supports distributed=ddp only: the small CLIP fits on one device"
            )
        if not isinstance(self.clip, dict):
            raise ConfigError(f"clip must be a mapping of ClipConfig fields, got {self.clip!r}")


def batch_positives(captions: list[str], record: Tensor) -> Tensor:
    """[N, N] bool: pair (i, j) matches when captions i and j are equal or both items show the same image."""
    codes = {c: k for k, c in enumerate(dict.fromkeys(c.strip() for c in captions))}
    cap = torch.tensor([codes[c.strip()] for c in captions])
    rec = record.cpu()
    return (cap[:, None] == cap[None, :]) | (rec[:, None] == rec[None, :])


def _top1(logits: Tensor, positives: Tensor) -> tuple[float, float]:
    """Correct top-1 picks text->image (rows) and image->text (columns), counted against the positives."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    t2i = positives[rows, logits.argmax(dim=1)].sum()
    i2t = positives[logits.argmax(dim=0), rows].sum()
    return float(t2i), float(i2t)


@dataclass
class _Base:
    """What a `model` contributes: its config, its CLIP weights (if any) and its tokenizer (if any)."""

    config: PipelineConfig
    clip_state: dict[str, Tensor] | None
    tokenizer_json: str | None


def _read_base(path: str) -> _Base:
    """Config, CLIP weights and tokenizer of a model dir (or any convertible checkpoint), without the rest."""
    p = Path(path)
    if native.is_model_dir(p):
        cfg = native.read_config(p)
        state = native.read_weights(p, "clip") if cfg.clip is not None else None
        tok = p / native.TOKENIZER_FILE
        return _Base(cfg, state, tok.read_text(encoding="utf-8") if tok.is_file() else None)
    parts = load_parts(p)
    return _Base(parts.config, parts.states.get("clip"), parts.tokenizer_json)


def _bpe_model(tok: Tokenizer) -> Any:
    """The vocabulary + merges of a tokenizer (what decides its ids), for comparing two tokenizers."""
    return json.loads(tok.to_str()).get("model")


class ClipTrainer(Trainer):
    """Trains the built-in `SmallClip`; exports a model directory `out/model` usable by `load_scorer`."""

    config_class = ClipTrainConfig
    cfg: ClipTrainConfig

    def setup(self) -> None:
        """Read the base model, open the data, settle the tokenizer and CLIP shape, build the model."""
        cfg = self.cfg
        self.base = _read_base(cfg.model) if cfg.model else None
        base_text = self.base.config.text if self.base is not None else TextConfig()
        normalizer = TextNormalizer() if base_text.normalize else None
        shape = self._clip_shape()
        self.data = PairDataset(
            self._source(cfg.data, normalizer),
            cfg.batch_size,
            shape.image_size,
            captions=cfg.captions,
            shuffle=True,
            seed=cfg.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            workers=cfg.workers,
        )
        self.tokenizer = self._tokenizer()
        if self.base is not None:  # exported into that model dir: scored with its text config
            length = min(base_text.max_length, shape.max_text_length)
            text_cfg = dataclasses.replace(base_text, max_length=length)
        else:
            text_cfg = TextConfig(max_length=shape.max_text_length)
        self.text = TextEncoder(self.tokenizer, text_cfg)  # what the export stores
        # The source already normalized the captions (with the same normalizer): tokenize them as they are.
        self._tokenize = TextEncoder(self.tokenizer, dataclasses.replace(text_cfg, normalize=False))
        self.clip_config = self._final_clip_config(shape)
        check_memory(self.clip_config, training=True)
        model = SmallClip(self.clip_config)
        if self.base is not None and self.base.clip_state is not None:
            native.load_into(model, self.base.clip_state, f"{cfg.model} (clip)")
            self.base.clip_state = None  # loaded; no need to keep a second copy
        self.add_module("model", model, no_decay=lambda _name, p: p.ndim < 2)
        self.eval_data: PairDataset | None = None
        if cfg.eval_data:
            self.eval_data = PairDataset(
                self._source(cfg.eval_data, normalizer),
                cfg.batch_size,
                shape.image_size,
                captions="first",
                shuffle=True,  # one fixed order (epoch 0): chunks and batches mix the whole set
                seed=cfg.seed,
                rank=self.env.rank,
                world_size=self.env.world_size,
                epochs=1,
                drop_last=False,
                workers=cfg.workers,
            )
        if self.env.is_main:
            log.info(
                "clip: %d images, %d pairs per epoch from %s; %d parameters",
                len(self.data.records),
                self.data.num_items,
                cfg.data,
                sum(p.numel() for p in model.parameters()),
            )

    # --- building -------------------------------------------------------------------------------
    def _source(self, path: str, normalizer: TextNormalizer | None) -> Source:
        cfg = self.cfg
        return open_source(
            path,
            cfg.kind,  # type: ignore[arg-type]
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
            normalizer=normalizer,
        )

    def _clip_shape(self) -> ClipConfig:
        """The CLIP architecture before the tokenizer is known: the base model's, or defaults + `clip` overrides."""
        cfg = self.cfg
        known = {f.name for f in dataclasses.fields(ClipConfig)}
        unknown = sorted(set(cfg.clip) - known)
        if unknown:
            raise ConfigError(f"clip: unknown field(s) {unknown}; known: {sorted(known)}")
        if self.base is not None and self.base.config.clip is not None:
            have = self.base.config.clip
            for name, value in cfg.clip.items():
                if value != getattr(have, name):
                    raise ConfigError(
                        f"clip.{name}={value!r} differs from the CLIP of {cfg.model} "
                        f"({name}={getattr(have, name)!r}); a fine-tuned CLIP keeps its shape"
                    )
            return have
        try:
            return ClipConfig(**{**dataclasses.asdict(ClipConfig()), **cfg.clip})
        except (TypeError, ValueError) as e:  # e.g. clip.image_size=big
            raise ConfigError(f"clip: {e}; check the types of the clip settings") from e

    def _final_clip_config(self, shape: ClipConfig) -> ClipConfig:
        """The shape with the tokenizer's vocabulary and padding id (a fine-tuned CLIP must already fit them)."""
        vocab, pad = self.text.vocab_size, self.text.config.pad_token_id
        if self.base is not None and self.base.config.clip is not None:
            if vocab > shape.vocab_size:
                raise ConfigError(
                    f"the tokenizer has {vocab} tokens, the CLIP of {self.cfg.model} knows "
                    f"{shape.vocab_size}; use the tokenizer it was trained with"
                )
            return shape
        size = int(self.cfg.clip.get("vocab_size", vocab))
        if vocab > size:
            raise ConfigError(
                f"clip.vocab_size {size} is smaller than the tokenizer's vocabulary ({vocab})"
            )
        return dataclasses.replace(shape, vocab_size=size, pad_token_id=pad)

    def _tokenizer(self) -> Tokenizer:
        """Given files, the model's, the run's own (on resume), or trained on the data's captions."""
        cfg = self.cfg
        own = Path(cfg.out) / native.TOKENIZER_FILE
        base_json = self.base.tokenizer_json if self.base is not None else None
        if self.base is not None and base_json is None and self.base.config.bart is not None:
            raise ConfigError(
                f"{cfg.model} has a DalleBart but no tokenizer.json: adding a CLIP tokenizer would "
                f"become the DalleBart's too; give the model its tokenizer first "
                f"(dallemini convert --tokenizer) or train the CLIP without model"
            )
        if cfg.tokenizer:
            tok = load_tokenizer(cfg.tokenizer)
            if base_json is not None and _bpe_model(tok) != _bpe_model(
                Tokenizer.from_str(base_json)
            ):
                raise ConfigError(
                    f"tokenizer {cfg.tokenizer} differs from the one in {cfg.model}; the exported model "
                    f"directory holds one tokenizer, so leave out tokenizer to use the model's"
                )
        elif base_json is not None:
            tok = Tokenizer.from_str(base_json)
        elif self.base is not None and self.base.config.clip is not None:
            raise ConfigError(
                f"{cfg.model} has a CLIP but no tokenizer.json; pass tokenizer=FILES with the one "
                f"it was trained with"
            )
        elif own.is_file():
            tok = load_tokenizer(own)
        else:
            tok = self._train_tokenizer(own)
        return tok

    def _train_tokenizer(self, dst: Path) -> Tokenizer:
        """Rank 0 fits a BPE on the training captions and saves it in out/; the other ranks read it."""
        if self.env.is_main:
            tok = train_tokenizer(self.data.all_captions(), self.cfg.tokenizer_vocab)
            save_tokenizer(tok, dst)
        D.barrier(self.env)
        return load_tokenizer(dst)

    # --- a step ---------------------------------------------------------------------------------
    def _encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids and mask on the device, cut after the longest caption (exact: the text tower is causal)."""
        ids, mask = self._tokenize(captions)
        length = int(mask.sum(dim=1).max())
        return ids[:, :length].to(self.device), mask[:, :length].to(self.device)

    def compute_loss(self, batch: PairBatch) -> tuple[Tensor, dict[str, float]]:
        """Symmetric InfoNCE over the micro-batch with duplicate captions/images as extra positives."""
        captions, pixels, record = batch
        ids, mask = self._encode_text(captions)
        pixels = pixels.to(self.device, non_blocking=True)
        logits = self.wrapped["model"](ids, mask, pixels)
        positives = batch_positives(captions, record).to(self.device)
        loss = contrastive_loss(logits, positives)
        t2i, i2t = _top1(logits.detach(), positives)
        n = len(captions)
        model = D.unwrap(self.wrapped["model"])
        return loss, {
            "loss": float(loss.detach()),
            "accuracy": (t2i + i2t) / (2 * n),
            "logit_scale": float(model.logit_scale.detach().exp()),
            "n_images": float(n),
        }

    # --- evaluation and export ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (per batch_size batch) and top-1 retrieval text->image / image->text within eval_chunk pairs."""
        if self.eval_data is None:
            return {}
        model = D.unwrap(self.wrapped["model"])  # no DDP forward: ranks may hold different counts
        self.eval_data.set_epoch(0)
        texts, images, captions, records = [], [], [], []
        loss_sum = loss_n = 0.0
        for batch in self.eval_data:
            ids, mask = self._encode_text(batch.captions)
            with self.autocast():
                t = model.encode_text(ids, mask)
                i = model.encode_image(batch.pixels.to(self.device))
            if len(batch.captions) > 1:
                pos = batch_positives(batch.captions, batch.record).to(self.device)
                n = len(batch.captions)
                loss_sum += float(contrastive_loss(model.logits(t, i), pos)) * n
                loss_n += n
            texts.append(torch.nn.functional.normalize(t.float(), dim=-1))
            images.append(torch.nn.functional.normalize(i.float(), dim=-1))
            captions += batch.captions
            records.append(batch.record)
        sums = torch.zeros(5, dtype=torch.float64)
        sums[0], sums[1] = loss_sum, loss_n
        if captions:
            t_all, i_all, r_all = torch.cat(texts), torch.cat(images), torch.cat(records)
            chunk = self.cfg.eval_chunk
            for lo in range(0, len(captions), chunk):
                hi = min(lo + chunk, len(captions))
                sim = t_all[lo:hi] @ i_all[lo:hi].t()
                pos = batch_positives(captions[lo:hi], r_all[lo:hi]).to(sim.device)
                t2i, i2t = _top1(sim, pos)
                sums[2] += t2i
                sums[3] += i2t
                sums[4] += hi - lo
        sums = D.all_reduce_sum(sums, self.env)
        n = max(float(sums[4]), 1.0)
        out = {"text_to_image_top1": float(sums[2]) / n, "image_to_text_top1": float(sums[3]) / n}
        if sums[1] > 0:
            out["loss"] = float(sums[0] / sums[1])
        return out

    def export(self, state: dict[str, Tensor]) -> Path:
        """out/model: `model` plus the trained CLIP, or a model dir with only the CLIP + text config + tokenizer."""
        states: dict[str, dict[str, Tensor]]
        if self.cfg.model:
            parts = load_parts(Path(self.cfg.model))
            config = dataclasses.replace(parts.config, clip=self.clip_config)
            states = {**parts.states, "clip": state}
            tok_json = parts.tokenizer_json
            if tok_json is None:
                tok_json = self.tokenizer.to_str()
            elif _bpe_model(Tokenizer.from_str(tok_json)) != _bpe_model(self.tokenizer):
                raise CheckpointError(f"the tokenizer of {self.cfg.model} changed during training")
        else:
            config = PipelineConfig(clip=self.clip_config, text=self.text.config)
            states = {"clip": state}
            tok_json = self.tokenizer.to_str()
        clean = Tokenizer.from_str(tok_json)
        clean.no_padding()
        clean.no_truncation()
        return native.save_model_dir(
            self.out / "model", config, states, clean.to_str(), overwrite=True
        )
