"""Training: DalleBart, VQGAN and small-CLIP trainers, schedules, resumable state, distributed setup."""

from __future__ import annotations

import importlib

from ..errors import ConfigError

# kind -> (module, class): imported lazily so that `dallemini train` does not load the GAN losses etc.
TRAINERS = {
    "clip": ("clip", "ClipTrainer"),
    "seq2seq": ("seq2seq", "Seq2SeqTrainer"),
    "vqgan": ("vqgan", "VQGANTrainer"),
}


def trainer_class(kind: str) -> type:
    """The Trainer subclass for a kind of model (seq2seq, vqgan, clip)."""
    if kind not in TRAINERS:
        raise ConfigError(f"unknown trainer {kind!r}; choose one of {sorted(TRAINERS)}")
    module, name = TRAINERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
