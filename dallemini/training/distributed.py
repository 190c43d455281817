"""torchrun-aware process setup: rank/world from the environment, gloo on CPU and NCCL on GPU, DDP or FSDP
wrapping, and full (unsharded) state dicts for rank-0 checkpoint writing that are correct under both.

A plain `python -m dallemini.cli train ...` is a world of one and never touches torch.distributed; the same
command under `torchrun --nproc-per-node N` (or on many nodes) becomes data-parallel unchanged.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..devices import resolve_device
from ..errors import ConfigError

log = logging.getLogger(__name__)


# torch.distributed.fsdp and torch.distributed.checkpoint are imported where used: each takes about
# a second to import (sympy), which every `dallemini` command, training or not, would pay.
def _fsdp() -> Any:
    return importlib.import_module("torch.distributed.fsdp")


def _dcp() -> Any:
    return importlib.import_module("torch.distributed.checkpoint.state_dict")


STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the world size, its local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device and start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    """Tear the process group down (a no-op in a world of one)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op in a world of one)."""
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: Tensor, env: DistEnv) -> Tensor:
    """Sum a tensor over ranks (returns it unchanged in a world of one)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's Python object on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Sub-modules that FSDP shards on their own: transformer layers, and the blocks of conv nets."""
    units = []
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            units.extend(layers)
    return units


def wrap_model(model: nn.Module, env: DistEnv, strategy: str = "ddp") -> nn.Module:
    """DDP (default) or FSDP2 `fully_shard` per layer + root; the model itself in a world of one."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown distributed strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "fsdp":
        if not env.distributed:
            return model
        for unit in _shard_units(model):
            _fsdp().fully_shard(unit)
        _fsdp().fully_shard(model)
        return model
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own module)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    )


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (DDP no_sync / FSDP2 set_requires_gradient_sync)."""
    if hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def _options(**kw: Any) -> Any:
    return _dcp().StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on CPU (gathered from shards under FSDP); every rank must call it."""
    state = _dcp().get_model_state_dict(
        unwrap(model), options=_options(full_state_dict=True, cpu_offload=True)
    )
    # A copy even on CPU: callers keep it while the live weights change (e.g. EMA swapped back out).
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load full weights into a plain, DDP or FSDP model (each rank keeps its shard)."""
    _dcp().set_model_state_dict(unwrap(model), state, options=_options(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter names, unsharded, on CPU; every rank must call it."""
    return _dcp().get_optimizer_state_dict(
        unwrap(model), optimizer, options=_options(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what `full_optimizer_state` returned (parameters matched by name)."""
    _dcp().set_optimizer_state_dict(
        unwrap(model), optimizer, state, options=_options(full_state_dict=True)
    )
