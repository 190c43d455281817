"""dalle-mini's Flax VQGAN (patil-suraj/vqgan-jax, e.g. `vqgan_imagenet_f16_16384`) -> (VQGANConfig, state dict).

The folder holds vqgan-jax's `config.json` (ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
embed_dim, n_embed, resolution, in_channels, out_ch, double_z, dropout, resamp_with_conv,
give_pre_end) and `flax_model.msgpack`. The Flax names are taming's with `.N` list indices
written `_N` (`encoder/down_0/block_1/norm1/scale` <-> `encoder.down.0.block.1.norm1.weight`;
`mid/block_1` is the same in both); conv `kernel` is (H, W, in, out) and becomes torch's
(out, in, H, W); GroupNorm `scale` is `weight`; the codebook is `quantize/embedding/embedding`.
GroupNorm has 32 groups and eps 1e-6, as in taming. The Flax model is fed pixels in [0, 1].

Note on the original's forward (not on the weights): vqgan-jax's up/down levels apply every
attention block of a level after each residual block, where taming applies attn[i] after block[i];
the 16x16 levels of f16_16384 (2 encoder / 3 decoder blocks) are therefore computed differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import VQGANConfig
from ..errors import CheckpointError, ConfigError
from .flax_msgpack import flatten_tree, read_msgpack
from .safe_load import read_json_object
from .taming import check_state, expected_shapes

WEIGHTS_NAME = "flax_model.msgpack"

# vqgan-jax VQGANConfig defaults, used for fields config.json leaves out.
_DEFAULTS: dict[str, Any] = {
    "ch": 128,
    "out_ch": 3,
    "in_channels": 3,
    "num_res_blocks": 2,
    "resolution": 256,
    "z_channels": 256,
    "ch_mult": [1, 1, 2, 2, 4],
    "attn_resolutions": [16],
    "n_embed": 1024,
    "embed_dim": 256,
    "dropout": 0.0,
    "double_z": False,
    "resamp_with_conv": True,
    "give_pre_end": False,
}
_FLAGS: dict[str, tuple[bool, str]] = {
    "double_z": (False, "a double_z encoder is a KL (Gaussian) one, not a VQGAN"),
    "resamp_with_conv": (True, "only convolutional up/downsampling is implemented"),
    "give_pre_end": (False, "the decoder always ends with norm_out/conv_out"),
}
_INDEX = re.compile(r"(\w+)\.(\d+)")


def vqgan_config_from_flax(cfg: dict[str, Any], where: Path | str = "config.json") -> VQGANConfig:
    """Map a vqgan-jax config dict to our VQGANConfig (pixel_range "0,1"); refuse unsupported flags by name."""
    where = Path(where)
    for flag, (want, why) in _FLAGS.items():
        value = cfg.get(flag, _DEFAULTS[flag])
        if value is not want:
            raise ConfigError(
                f"{where}: {flag}={json.dumps(value)} is not supported ({why}; expected {json.dumps(want)})"
            )
    get = {k: cfg.get(k, v) for k, v in _DEFAULTS.items()}
    try:
        return VQGANConfig(
            ch=int(get["ch"]),
            ch_mult=tuple(int(m) for m in get["ch_mult"]),
            num_res_blocks=int(get["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in get["attn_resolutions"]),
            z_channels=int(get["z_channels"]),
            embed_dim=int(get["embed_dim"]),
            n_embed=int(get["n_embed"]),
            resolution=int(get["resolution"]),
            in_channels=int(get["in_channels"]),
            out_ch=int(get["out_ch"]),
            dropout=float(get["dropout"]),
            num_groups=32,
            pixel_range="0,1",
        )
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid VQGAN config: {e}") from e


def flax_name(torch_key: str) -> str:
    """Our (taming) state-dict key -> the Flax parameter path, e.g. encoder/down_0/block_1/conv1/kernel."""
    if torch_key == "quantize.embedding.weight":
        return "quantize/embedding/embedding"
    return _INDEX.sub(r"\1_\2", torch_key).replace(".", "/")


def convert_flax_vqgan(
    flat: dict[str, Any], cfg: VQGANConfig, where: str = WEIGHTS_NAME
) -> dict[str, Tensor]:
    """Flat Flax tree ({"encoder/conv_in/kernel": tensor}; consumed) -> our VQGAN state dict."""
    state: dict[str, Tensor] = {}
    for key, shape in expected_shapes(cfg).items():
        path = flax_name(key)
        conv = len(shape) == 4
        norm = len(shape) == 1 and key.endswith(".weight")
        if conv or norm:
            path = path.rsplit("/", 1)[0] + ("/kernel" if conv else "/scale")
        if path not in flat:
            raise CheckpointError(f"{where}: parameter {path!r} is missing (for {key})")
        t = flat.pop(path)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise CheckpointError(f"{where}: {path!r} is not a floating-point array")
        got = tuple(t.shape)
        if conv:
            want = (shape[2], shape[3], shape[1], shape[0])
            ok = got == want
        elif len(shape) == 1:  # norms and biases; old flax GroupNorm params were (1, 1, 1, C)
            want = shape
            ok = got[-1:] == shape and all(s == 1 for s in got[:-1])
        else:
            want = shape
            ok = got == want
        if not ok:
            raise CheckpointError(
                f"{where}: {path!r} has shape {got}, config.json implies {want} (for {key})"
            )
        if conv:
            state[key] = t.permute(3, 2, 0, 1).contiguous()
        elif len(shape) == 1:
            state[key] = t.reshape(shape)
        else:
            state[key] = t
    if flat:
        extra = sorted(flat)
        raise CheckpointError(
            f"{where}: {len(extra)} parameter(s) that config.json does not describe, first {extra[:4]}"
        )
    check_state(state, cfg, where)
    return state


def load_flax_vqgan(path: str | Path) -> tuple[VQGANConfig, dict[str, Tensor]]:
    """Read a Flax VQGAN folder (config.json + flax_model.msgpack) into (VQGANConfig, taming-named state dict)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not folder.is_dir():
        raise CheckpointError(f"{p} does not exist")
    cfg_path = folder / "config.json"
    raw = read_json_object(cfg_path, "a Flax VQGAN needs config.json")
    cfg = vqgan_config_from_flax(raw, cfg_path)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} found")
    flat = flatten_tree(read_msgpack(weights))
    return cfg, convert_flax_vqgan(flat, cfg, str(weights))
