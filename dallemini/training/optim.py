"""Optimizers (Adafactor as the original, AdamW) and an exponential moving average of the weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

OPTIMIZERS = ("adafactor", "adamw")


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """`torch.optim.Adafactor` (factored second moments, no first moment: the original's memory-light choice) or AdamW."""
    items: list[Any] = list(params)
    if items and isinstance(items[0], dict):  # parameter groups with their own settings
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        chosen: list[Any] = [g for g in groups if g["params"]]
    else:
        chosen = [p for p in items if p.requires_grad]
    if not chosen:
        raise ConfigError("nothing to optimize: the model has no trainable parameters")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if name == "adafactor":
        return torch.optim.Adafactor(chosen, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(chosen, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


class EMA:
    """Shadow copy of a model's floating-point weights, updated as ema = decay·ema + (1 − decay)·w after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow weights toward the current ones."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, list[Tensor]]:
        return {"shadow": [s.detach().cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, list[Tensor]]) -> None:
        saved = state["shadow"]
        if len(saved) != len(self.shadow) or any(
            a.shape != b.shape for a, b in zip(saved, self.shadow, strict=True)
        ):
            raise ConfigError("the saved EMA weights do not match this model")
        for s, v in zip(self.shadow, saved, strict=True):
            s.copy_(v)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (for evaluation, samples and export)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)
