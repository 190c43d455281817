"""taming-transformers VQGAN checkpoints (PyTorch Lightning .ckpt + YAML config) -> (VQGANConfig, state dict).

The weights sit under the checkpoint's `state_dict` with exactly our names (`encoder.*`,
`quant_conv.*`, `quantize.embedding.weight`, `post_quant_conv.*`, `decoder.*`); the `loss.*`
discriminator/LPIPS weights are dropped. The architecture comes from the YAML's
`model.params.{ddconfig, n_embed, embed_dim}`, or, when no YAML is found, from the tensor shapes.
Taming models see pixels in [-1, 1], so the config says pixel_range "-1,1".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..config import VQGANConfig
from ..errors import CheckpointError, ConfigError
from ..models.vqgan import VQGAN
from .safe_load import LIGHTNING_METADATA, load_torch_file, require_tensors

log = logging.getLogger(__name__)

# The ddconfig keys a VQGANConfig needs, then those it accepts at their only supported value.
_DDCONFIG_REQUIRED = frozenset(
    [
        "z_channels",
        "resolution",
        "in_channels",
        "out_ch",
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
    ]
)
_DDCONFIG_KEYS = _DDCONFIG_REQUIRED | {"double_z", "dropout", "resamp_with_conv", "give_pre_end"}
_SUPPORTED_TARGETS = {"taming.models.vqgan.VQModel"}
# The first-stage model of a taming cond-transformer checkpoint lives under this prefix.
_FIRST_STAGE_PREFIX = "first_stage_model."
_PARTS = {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
# Resolution assumed when the config is inferred from tensor shapes (it only sets grid_size).
_DEFAULT_RESOLUTION = 256


def find_taming_yaml(ckpt_path: str | Path) -> Path | None:
    """The YAML config belonging to a .ckpt: next to it, or in ../configs/ as taming's release folders have it."""
    ckpt = Path(ckpt_path)
    here, up = ckpt.parent, ckpt.parent.parent
    for cand in (
        ckpt.with_suffix(".yaml"),
        here / "model.yaml",
        here / "config.yaml",
        up / "configs" / "model.yaml",
        here / "configs" / "model.yaml",
    ):
        if cand.is_file():
            return cand
    for folder in (up / "configs", here / "configs"):
        # taming's training logs: configs/<timestamp>-project.yaml; the newest sorts last.
        projects = sorted(folder.glob("*-project.yaml")) if folder.is_dir() else []
        if projects:
            return projects[-1]
    for folder in (here, up / "configs", here / "configs"):
        if not folder.is_dir():
            continue
        yamls = [p for p in sorted(folder.glob("*.yaml")) if not p.name.endswith("-lightning.yaml")]
        if len(yamls) == 1:
            return yamls[0]
        if len(yamls) > 1:
            raise CheckpointError(
                f"{ckpt}: several YAML files in {folder} ({', '.join(p.name for p in yamls)}); "
                "say which one is the model config (--taming-config)"
            )
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} is not a readable YAML file: {e}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} does not hold a YAML mapping")
    return doc


def config_from_yaml(yaml_path: str | Path) -> tuple[VQGANConfig, str]:
    """(VQGANConfig, state-dict prefix) from a taming YAML; refuses what our VQGAN cannot represent."""
    path = Path(yaml_path)
    doc = _read_yaml(path)
    model = doc.get("model", doc)
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise CheckpointError(
            f"{path}: no model.params section; not a taming-transformers model config"
        )
    target, params, prefix = model.get("target"), model["params"], ""
    if "first_stage_config" in params:  # a cond-transformer config: its VQGAN is the first stage
        stage = params["first_stage_config"]
        if not isinstance(stage, dict) or not isinstance(stage.get("params"), dict):
            raise CheckpointError(f"{path}: model.params.first_stage_config has no params")
        target, params, prefix = stage.get("target"), stage["params"], _FIRST_STAGE_PREFIX
    if target is not None and target not in _SUPPORTED_TARGETS:
        raise CheckpointError(
            f"{path}: model target {target!r} is not supported (only {sorted(_SUPPORTED_TARGETS)}; "
            "Gumbel and EMA quantizers are not implemented)"
        )
    if params.get("remap") is not None:
        raise CheckpointError(f"{path}: codebook index remapping (params.remap) is not supported")
    dd = params.get("ddconfig")
    if not isinstance(dd, dict):
        raise CheckpointError(f"{path}: model.params.ddconfig is missing")
    unknown = sorted(set(dd) - _DDCONFIG_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path}: unknown ddconfig key(s) {unknown}; this VQGAN cannot represent them"
        )
    if dd.get("double_z", True):  # taming's Encoder defaults to double_z=True
        raise CheckpointError(
            f"{path}: ddconfig.double_z is {dd.get('double_z', 'missing (taming default: true)')}; a "
            "double_z encoder is a KL/diagonal-Gaussian one, a VQGAN needs double_z: false"
        )
    if not dd.get("resamp_with_conv", True):
        raise CheckpointError(
            f"{path}: ddconfig.resamp_with_conv=false (pooling resamplers) is not supported"
        )
    if dd.get("give_pre_end", False):
        raise CheckpointError(f"{path}: ddconfig.give_pre_end=true is not supported")
    for key in ("n_embed", "embed_dim"):
        if key not in params:
            raise CheckpointError(f"{path}: model.params.{key} is missing")
    missing = sorted(_DDCONFIG_REQUIRED - set(dd))
    if missing:
        raise CheckpointError(f"{path}: ddconfig lacks {missing}")
    try:
        cfg = VQGANConfig(
            ch=int(dd["ch"]),
            ch_mult=tuple(int(m) for m in dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
            z_channels=int(dd["z_channels"]),
            embed_dim=int(params["embed_dim"]),
            n_embed=int(params["n_embed"]),
            resolution=int(dd["resolution"]),
            in_channels=int(dd["in_channels"]),
            out_ch=int(dd["out_ch"]),
            dropout=float(dd.get("dropout", 0.0)),
            num_groups=32,
            pixel_range="-1,1",
        )
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: invalid VQGAN config: {e}") from e
    return cfg, prefix


_LEVEL = re.compile(r"^encoder\.down\.(\d+)\.")
_BLOCK0 = re.compile(r"^encoder\.down\.0\.block\.(\d+)\.")


def config_from_state(state: Mapping[str, Tensor], where: str = "taming checkpoint") -> VQGANConfig:
    """Infer the architecture from tensor shapes (resolution assumed 256) when no YAML is at hand."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(
                f"{where}: tensor {key!r} is missing; not a taming VQGAN state dict"
            )
        return tuple(state[key].shape)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in state if (m := _LEVEL.match(k))})
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK0.match(k))}
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise CheckpointError(
            f"{where}: encoder.down.N.block.M tensors are missing or not contiguous"
        )
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    attn_res = tuple(
        _DEFAULT_RESOLUTION // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state
    )
    embed_dim, z_channels = shape("quant_conv.weight")[:2]
    if shape("encoder.conv_out.weight")[0] != z_channels:
        raise CheckpointError(
            f"{where}: encoder.conv_out has {shape('encoder.conv_out.weight')[0]} channels but quant_conv "
            f"takes {z_channels} (a double_z encoder?); not a VQGAN"
        )
    n_embed, e_dim = shape("quantize.embedding.weight")
    if e_dim != embed_dim:
        raise CheckpointError(
            f"{where}: codebook width {e_dim} differs from quant_conv output {embed_dim}"
        )
    try:
        return VQGANConfig(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=max(blocks) + 1,
            attn_resolutions=attn_res,
            z_channels=z_channels,
            embed_dim=embed_dim,
            n_embed=n_embed,
            resolution=_DEFAULT_RESOLUTION,
            in_channels=in_channels,
            out_ch=shape("decoder.conv_out.weight")[0],
            num_groups=32,
            pixel_range="-1,1",
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: inferred an invalid VQGAN config: {e}") from e


def expected_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of our VQGAN's state dict for config, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VQGAN(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(state: Mapping[str, Tensor], config: VQGANConfig, where: str) -> None:
    """Raise a CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    want = expected_shapes(config)
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing for this VQGAN config, first {missing[:3]}"
        )
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} unexpected tensor(s), first {extra[:3]}")
    for k, s in want.items():
        v = state[k]
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{where}: {k} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != s:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)}, the config expects {s}"
            )


def extract_state(raw: Mapping[str, Any], prefix: str | None, where: str) -> dict[str, Tensor]:
    """The VQGAN tensors of a loaded checkpoint (under `state_dict` or top level), prefix stripped, no loss.*.

    prefix None: "first_stage_model." when the checkpoint is a cond transformer's, else "".
    """
    sd = raw.get("state_dict", raw)
    if not isinstance(sd, Mapping):
        raise CheckpointError(
            f"{where}: 'state_dict' is a {type(sd).__name__}, not a mapping of tensors"
        )
    if prefix is None:
        has_stage = any(isinstance(k, str) and k.startswith(_FIRST_STAGE_PREFIX) for k in sd)
        prefix = _FIRST_STAGE_PREFIX if has_stage else ""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not k.startswith(prefix):
            continue
        name = k[len(prefix) :]
        # Skips loss.* (discriminator, LPIPS) and other Lightning-module members (a transformer, ...).
        if name.split(".", 1)[0] in _PARTS:
            out[name] = v
    if not out:
        raise CheckpointError(
            f"{where}: no VQGAN tensors found (expected keys like {prefix}encoder.conv_in.weight"
            f"{' under state_dict' if 'state_dict' in raw else ''})"
        )
    require_tensors(sd, where, LIGHTNING_METADATA)
    return out


def load_taming(
    ckpt_path: str | Path, yaml_path: str | Path | None = None
) -> tuple[VQGANConfig, dict[str, Tensor]]:
    """Read a taming .ckpt (+ its YAML, found next to it when not given) into (VQGANConfig, our state dict)."""
    ckpt = Path(ckpt_path)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt} does not exist or is not a file")
    yml = Path(yaml_path) if yaml_path is not None else find_taming_yaml(ckpt)
    if yml is not None and not yml.is_file():
        raise CheckpointError(f"taming config {yml} does not exist")
    cfg, prefix = config_from_yaml(yml) if yml is not None else (None, None)
    state = extract_state(load_torch_file(ckpt), prefix, str(ckpt))
    if cfg is None:
        cfg = config_from_state(state, str(ckpt))
        log.warning(
            "%s: no YAML config found; architecture inferred from tensor shapes (resolution assumed %d)",
            ckpt,
            _DEFAULT_RESOLUTION,
        )
    check_state(state, cfg, f"{ckpt} (config {yml})" if yml is not None else str(ckpt))
    return cfg, state
