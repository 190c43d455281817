"""Learning-rate schedules: linear warm-up, then linear, cosine or constant decay (the original: 2,000 + linear)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError

DECAYS = ("linear", "cosine", "constant")


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, decay: str = "linear", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): ramps from 1/warmup to 1, then decays to min_ratio."""
    if decay not in DECAYS:
        raise ConfigError(f"unknown decay {decay!r}; choose one of {DECAYS}")
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(
            f"bad schedule: warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def make_scheduler(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    decay: str = "linear",
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR over lr_factor; its state_dict holds only the step count, so it resumes exactly."""
    lr_factor(0, warmup_steps, total_steps, decay, min_ratio)  # validate now, not at the first step
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, decay, min_ratio))
