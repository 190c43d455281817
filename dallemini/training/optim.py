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
        return Adafactor(chosen, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(chosen, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


class Adafactor(torch.optim.Adafactor):
    """`torch.optim.Adafactor` (same settings, state and checkpoints) with a faster per-tensor update.

    Written here because torch's column statistic, `norm(grad, dim=-2)`, runs ~35x slower on CPU than
    a row reduction; with fewer passes over each tensor, a mini model's step takes 1.0 s, not 2.3 s.
    """

    # One buffer for every tensor's update, kept across steps: a fresh large tensor each time would
    # page-fault its memory in again, which cost as much as the arithmetic.
    _scratch: Tensor | None = None

    def _scratch_like(self, grad: Tensor, largest: int) -> Tensor:
        """Memory of grad's shape, dtype and device for its update (not part of the state)."""
        buf = self._scratch
        fits = buf is not None and buf.numel() >= grad.numel()
        if not fits or (buf.dtype, buf.device) != (grad.dtype, grad.device):
            buf = self._scratch = grad.new_empty(largest)
        return buf[: grad.numel()].view(grad.shape)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            rows: list[Tensor | None] = []
            cols: list[Tensor | None] = []
            variances: list[Tensor | None] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, rows, cols, variances, steps)
            eps1, eps2 = group["eps"]
            lr = float(group["lr"])
            largest = max((g.numel() for g in grads), default=0)
            for param, grad, row_var, col_var, variance, step_t in zip(
                params, grads, rows, cols, variances, steps, strict=True
            ):
                _adafactor_update(
                    param,
                    -grad if group["maximize"] else grad,
                    row_var,
                    col_var,
                    variance,
                    step_t,
                    self._scratch_like(grad, largest),
                    lr=lr,
                    d=group["d"],
                    beta2_decay=group["beta2_decay"],
                    weight_decay=group["weight_decay"],
                    eps1=torch.finfo(param.dtype).eps if eps1 is None else eps1,
                    eps2=eps2,
                )
        return loss


def _adafactor_update(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    step_t: Tensor,
    update: Tensor,
    *,
    lr: float,
    d: float,
    beta2_decay: float,
    weight_decay: float,
    eps1: float,
    eps2: float,
) -> None:
    """One tensor's Adafactor step, as torch's single-tensor update computes it; `update` is scratch
    memory of grad's shape."""
    step_t += 1
    step = float(step_t)
    one_minus_beta2 = step**beta2_decay
    rho = min(lr, step**-0.5)
    # relative step size, from the weights before decay; 0-dim tensors keep a GPU free of syncs
    alpha = (torch.linalg.vector_norm(param) / param.numel() ** 0.5).clamp_(min=eps2) * rho
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    squared = torch.mul(grad, grad, out=update)
    if row_var is not None and col_var is not None:
        row_var.lerp_(squared.mean(dim=-1, keepdim=True), one_minus_beta2)
        col_var.lerp_(squared.mean(dim=-2, keepdim=True), one_minus_beta2)
        scaled_rows = row_var / row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1)
        torch.mul(scaled_rows, col_var, out=update)  # the factored second-moment estimate
    elif variance is not None:
        variance.lerp_(squared, one_minus_beta2)
        update.copy_(variance)
    else:
        raise AssertionError("Adafactor state has neither factored nor full second moments")
    update.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
    rms = torch.linalg.vector_norm(update) / (update.numel() ** 0.5 * d)
    param.addcmul_(update, alpha / rms.clamp_(min=1.0), value=-1.0)


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
