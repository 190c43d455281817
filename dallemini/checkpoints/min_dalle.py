"""min-dalle checkpoints (encoder.pt / decoder.pt / detoker.pt + vocab.json / merges.txt) -> our state dicts.

min-dalle's module names are ours, so the work is: find the files in either of its two layouts, infer
the config from tensor shapes, and reconcile the layer norms that min-dalle stores with a scale
(nn.LayerNorm) where the original has bias only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import BartConfig, VQGANConfig
from ..errors import CheckpointError
from .min_dalle_vqgan import convert_min_dalle_vqgan
from .safe_load import load_torch_file, require_tensors

# Norms that have no scale in the original unless force_ln_scale is set (their min-dalle weight is all ones).
_BIAS_ONLY_LN = re.compile(
    r"(layers\.\d+\.(pre_self_attn_layer_norm|pre_encoder_attn_layer_norm|glu\.ln0|glu\.ln1)|final_ln)\.weight$"
)
_LAYER = re.compile(r"^layers\.(\d+)\.")


@dataclass
class MinDalleFiles:
    """Where the files of one min-dalle model are."""

    encoder: Path
    decoder: Path
    detoker: Path | None
    vocab: Path | None
    merges: Path | None


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def find_files(path: str | Path) -> MinDalleFiles | None:
    """Locate min-dalle files: a models_root (dalle_bart_mini|mega/ + vqgan/), a dalle_bart_* folder, or the flat hub layout."""
    root = Path(path)
    if not root.is_dir():
        return None
    for sub in ("dalle_bart_mega", "dalle_bart_mini"):
        if (root / sub / "encoder.pt").is_file():
            found = find_files(root / sub)
            if found and found.detoker is None:
                found.detoker = _first(root / "vqgan" / "detoker.pt", root / "detoker.pt")
            return found
    for suffix in ("", "_mini"):
        enc, dec = root / f"encoder{suffix}.pt", root / f"decoder{suffix}.pt"
        if enc.is_file() and dec.is_file():
            return MinDalleFiles(
                encoder=enc,
                decoder=dec,
                detoker=_first(root / "detoker.pt", root.parent / "vqgan" / "detoker.pt"),
                vocab=_first(root / f"vocab{suffix}.json", root / "vocab.json"),
                merges=_first(root / f"merges{suffix}.txt", root / "merges.txt"),
            )
    return None


def _num_layers(state: dict[str, Tensor], where: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if not idx:
        raise CheckpointError(
            f"{where}: no layers.N.* tensors; not a min-dalle encoder/decoder file"
        )
    if idx != set(range(max(idx) + 1)):
        raise CheckpointError(f"{where}: layer indices are not contiguous: {sorted(idx)}")
    return max(idx) + 1


def _shape(state: dict[str, Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"{where}: tensor {key!r} is missing; not a min-dalle file of the expected layout"
        )
    return tuple(state[key].shape)


def convert_bart(
    encoder_state: dict[str, Tensor],
    decoder_state: dict[str, Tensor],
    attention_heads: int | None = None,
    where: str = "min-dalle",
) -> tuple[BartConfig, dict[str, Tensor]]:
    """Build a BartConfig from the tensors' shapes (heads: d_model/64 unless given) and our state dict."""
    v_text, d = _shape(encoder_state, "embed_tokens.weight", f"{where} encoder")
    t_text, _ = _shape(encoder_state, "embed_positions.weight", f"{where} encoder")
    ffn, _ = _shape(encoder_state, "layers.0.glu.fc0.weight", f"{where} encoder")
    v_img, d_dec = _shape(decoder_state, "embed_tokens.weight", f"{where} decoder")
    img_len, _ = _shape(decoder_state, "embed_positions.weight", f"{where} decoder")
    if d_dec != d:
        raise CheckpointError(f"{where}: encoder width {d} and decoder width {d_dec} differ")
    heads = attention_heads or max(1, d // 64)
    image_vocab_size = v_img - 1
    state: dict[str, Tensor] = {}
    for prefix, part in (("encoder.", encoder_state), ("decoder.", decoder_state)):
        for k, v in part.items():
            if k in ("pose_tokens", "token_indices") or k.endswith(".token_indices"):
                continue  # min-dalle buffers, not weights
            state[prefix + k] = v
    # Bias-only norms: keep their scales only if some differ from 1 (then the model needs force_ln_scale).
    scale_keys = [k for k in state if _BIAS_ONLY_LN.search(k)]
    force_scale = any(not torch.all(state[k] == 1) for k in scale_keys)
    if force_scale:  # fill the scales min-dalle left out (it loads with strict=False) with ones
        for k in list(state):
            w = k[: -len("bias")] + "weight"
            if k.endswith(".bias") and _BIAS_ONLY_LN.search(w):
                state.setdefault(w, torch.ones_like(state[k]))
    else:
        for k in scale_keys:
            del state[k]
    cfg = BartConfig(
        encoder_vocab_size=v_text,
        image_vocab_size=image_vocab_size,
        max_text_length=t_text,
        image_length=img_len,
        d_model=d,
        encoder_layers=_num_layers(encoder_state, f"{where} encoder"),
        decoder_layers=_num_layers(decoder_state, f"{where} decoder"),
        attention_heads=heads,
        ffn_dim=ffn,
        decoder_start_token_id=min(16384, image_vocab_size),
        force_ln_scale=force_scale,
    )
    return cfg, state


def load_min_dalle(
    path: str | Path, attention_heads: int | None = None
) -> tuple[
    BartConfig, dict[str, Tensor], VQGANConfig | None, dict[str, Tensor] | None, MinDalleFiles
]:
    """Read a min-dalle model folder into (bart config, bart state, vqgan config, vqgan state, files)."""
    files = find_files(path)
    if files is None:
        raise CheckpointError(
            f"{path}: no min-dalle files found (expected encoder.pt + decoder.pt, e.g. in dalle_bart_mini/)"
        )
    enc = load_torch_file(files.encoder)
    dec = load_torch_file(files.decoder)
    require_tensors(enc, str(files.encoder))
    require_tensors(dec, str(files.decoder))
    bart_cfg, bart_state = convert_bart(enc, dec, attention_heads, where=str(files.encoder.parent))
    vq_cfg = vq_state = None
    if files.detoker is not None:
        vq_cfg, vq_state = convert_min_dalle_vqgan(
            load_torch_file(files.detoker), where=str(files.detoker)
        )
    return bart_cfg, bart_state, vq_cfg, vq_state, files
