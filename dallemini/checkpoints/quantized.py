"""DalleBart state dicts with 8-bit weights (models/quant.py), and building the model from them.

An int8 model directory stores each quantized dense layer as `NAME.weight` (int8 [out, in]) and
`NAME.weight_scale` (float32 [out]); its config's bart section says `"quantization": "int8"`. Float
states are quantized lazily (each weight when it is read, then freed), stored int8 ones are
dequantized lazily where a float model is asked for.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import BartConfig
from ..errors import CheckpointError
from ..models.bart import DalleBart
from ..models.quant import dequantize_weight, is_quantizable, quantize_, quantize_weight
from .lazy import LazyTensor, TensorLike, load
from .native import build_from_state

INT8 = "int8"  # BartConfig.quantization of a model directory with int8 DalleBart weights
SCALE = "_scale"  # NAME.weight's scale is NAME.weight_scale


def stored_int8_layers(state: dict[str, TensorLike]) -> list[str]:
    """Names of the layers a state stores in int8 (those with a NAME.weight_scale)."""
    tail = ".weight" + SCALE
    return [k[: -len(tail)] for k in state if k.endswith(tail)]


def float_layers_to_quantize(state: dict[str, TensorLike]) -> list[str]:
    """Names of a float DalleBart state's dense layers that quantization converts (models.quant)."""
    return [
        k.removesuffix(".weight")
        for k, t in state.items()
        if k.endswith(".weight") and len(t.shape) == 2 and is_quantizable(k.removesuffix(".weight"))
    ]


def _lazy_quantized(t: TensorLike) -> tuple[LazyTensor, LazyTensor]:
    """A float weight's int8 values and scales, computed when the values are read (the scales kept
    for their own read), so the float weight is read and freed once."""
    done: dict[str, torch.Tensor] = {}

    def values() -> torch.Tensor:
        q, done["scale"] = quantize_weight(load(t))
        return q

    def scales() -> torch.Tensor:
        if "scale" not in done:  # read before the values: quantize again
            values()
        return done.pop("scale")

    out, inp = tuple(t.shape)
    return LazyTensor((out, inp), torch.int8, values), LazyTensor((out,), torch.float32, scales)


def quantize_state(state: dict[str, TensorLike], layers: list[str]) -> dict[str, TensorLike]:
    """The state with each named layer's float weight replaced by lazy int8 values and scales
    (consumes `state`); each pair sits together, values first."""
    wanted = {f"{name}.weight" for name in layers}
    out: dict[str, TensorLike] = {}
    for k in list(state):
        t = state.pop(k)
        if k in wanted:
            out[k], out[k + SCALE] = _lazy_quantized(t)
        else:
            out[k] = t
    return out


def dequantize_state(state: dict[str, TensorLike]) -> dict[str, TensorLike]:
    """The state with every stored int8 weight as a lazy float32 one (q * scale); consumes `state`."""
    out: dict[str, TensorLike] = {}
    for k in list(state):
        if k.endswith(".weight" + SCALE):
            continue
        t = state.pop(k)
        scale = state.get(k + SCALE)
        if scale is not None:
            t = LazyTensor(
                tuple(t.shape),
                torch.float32,
                lambda q=t, s=scale: dequantize_weight(load(q), load(s)),
            )
        out[k] = t
    state.clear()
    return out


def _check_config(
    cfg: BartConfig, state: dict[str, TensorLike], stored: list[str], where: str
) -> None:
    """Each scale must go with int8 values, and a state with them with a config that says so (and
    the other way round)."""
    for name in stored:
        got = state.get(f"{name}.weight")
        if got is None or got.dtype != torch.int8:
            what = "missing" if got is None else str(got.dtype)
            raise CheckpointError(f"{where}: {name}.weight has a scale but is {what}, not int8")
    says = cfg.quantization == INT8
    if says != bool(stored):
        has = "has int8 weights" if stored else "has no int8 scales (NAME.weight_scale)"
        raise CheckpointError(
            f"{where}: the config's bart.quantization is {cfg.quantization!r} but the state {has}; "
            "re-convert the model (dallemini convert SRC DST --dtype int8)"
        )


def build_bart(
    cfg: BartConfig,
    state: dict[str, TensorLike],
    where: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> DalleBart:
    """DalleBart from a float or int8 state (consumed), one tensor at a time (build_from_state).

    dtype torch.int8: int8 dense layers (quantized here, each float weight freed once its int8 copy
    exists, or as stored) with float32 activations; a float dtype: a float model (stored int8
    weights dequantized).
    """
    stored = stored_int8_layers(state)
    _check_config(cfg, state, stored, where)
    if dtype != torch.int8:
        state = dequantize_state(state) if stored else state
        return build_from_state(lambda: DalleBart(cfg), state, where, dtype, device)
    layers = stored or float_layers_to_quantize(state)
    state = state if stored else quantize_state(state, layers)
    model = build_from_state(
        lambda: quantize_(DalleBart(cfg), layers), state, where, torch.float32, device
    )
    return model  # type: ignore[return-value]


def for_storage(
    cfg: BartConfig, state: dict[str, TensorLike], dtype: torch.dtype | None
) -> tuple[BartConfig, dict[str, TensorLike]]:
    """The config and (lazy) state to write for a DalleBart stored in `dtype`: torch.int8 quantizes a
    float state, a float dtype dequantizes an int8 one, None keeps what there is."""
    stored = stored_int8_layers(state)
    if dtype == torch.int8 and not stored:
        return replace(cfg, quantization=INT8), quantize_state(
            state, float_layers_to_quantize(state)
        )
    if dtype is not None and dtype != torch.int8 and stored:
        return replace(cfg, quantization=None), dequantize_state(state)
    return cfg, state
