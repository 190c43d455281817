"""Devices and dtypes from user words ("auto", "cuda:1", "bfloat16"): one resolver for every entry point."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8 = "int8"  # the DalleBart's weights in 8 bits (models/quant.py), activations in float32


def resolve_device(
    device: str | torch.device | None = None, local_rank: int | None = None
) -> torch.device:
    """'auto'/None picks cuda > mps > cpu; anything else must name an available device. With a
    `local_rank` (torchrun), a CUDA device without an index is that rank's GPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(device)!r} requested but no CUDA GPU is available; use --device cpu"
            )
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, weights: bool = False) -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' or a torch dtype; default float32. `weights=True` (the
    DalleBart's dtype) also takes 'int8' / torch.int8: 8-bit weights, float32 activations."""
    if dtype is None:
        return torch.float32
    if weights and dtype in (INT8, torch.int8):
        return torch.int8
    if dtype in (INT8, torch.int8):
        raise ConfigError(
            f"int8 applies to the DalleBart's weights only (--dtype int8); the VQGAN and CLIP run in "
            f"one of {sorted(DTYPES)}"
        )
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} not supported; use one of {_names(weights)}")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} not supported; use one of {_names(weights)}")
    return DTYPES[dtype]


def _names(weights: bool) -> list[str]:
    return sorted(DTYPES) + ([INT8] if weights else [])


def activation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model of `dtype` computes in: float32 for int8 weights, else the dtype itself."""
    return torch.float32 if dtype == torch.int8 else dtype
