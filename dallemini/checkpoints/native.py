"""The native model directory: config.json + bart/vqgan/clip .safetensors + tokenizer.json (DESIGN.md §3).

Two optional files say what a model knows: vocabulary.txt (every word of its training captions) and
examples.json (a line on what it draws and a few prompts it draws well).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import PipelineConfig
from ..errors import CheckpointError, ConfigError
from ..memory import release_freed_memory
from .lazy import TensorLike, load, materialize
from .safetensors_io import lazy_safetensors, write_safetensors

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = {
    "bart": "bart.safetensors",
    "vqgan": "vqgan.safetensors",
    "clip": "clip.safetensors",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WORD_LIST_FILE = (
    "enwiki-words-frequency.txt"  # the original's hashtag word list, when a model ships it
)
VOCABULARY_FILE = "vocabulary.txt"  # the words of the training captions, sorted, one a line
EXAMPLES_FILE = "examples.json"  # {"description": "...", "prompts": ["...", ...]}
# A word: letters and digits, with apostrophes inside ("man's"); anything else separates words.
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


@dataclass(frozen=True)
class ModelExamples:
    """What a model draws: a line saying so (or None) and a few prompts it draws well."""

    description: str | None
    prompts: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """The examples.json form."""
        return {"description": self.description, "prompts": list(self.prompts)}


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when path holds a dallemini config.json."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == PipelineConfig.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str | os.PathLike) -> PipelineConfig:
    """Parse a model directory's config.json with errors that name the file."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} not found: {path} is not a dallemini model directory")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    try:
        return PipelineConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from e


def save_model_dir(
    path: str | os.PathLike,
    config: PipelineConfig,
    states: Mapping[str, Mapping[str, TensorLike]],
    tokenizer_json: str | None = None,
    overwrite: bool = False,
    dtypes: Mapping[str, torch.dtype] | None = None,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    write_extra: Callable[[Path, dict[str, str]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a model directory atomically (temp folder + rename), so a crash never leaves half a model.

    Tensors are written one at a time (lazy ones read just then); `dtypes` casts a part's float
    tensors (e.g. {"bart": torch.bfloat16}); `extra_files` copies files in by name; `write_extra`
    gets the temp folder and each weight file's sha256 to write more files before the rename;
    `progress` gets the bytes of each tensor written.
    """
    dst = Path(path)
    for part in states:
        if part not in WEIGHT_FILES:
            raise ConfigError(
                f"unknown model part {part!r}; expected one of {sorted(WEIGHT_FILES)}"
            )
        if getattr(config, part) is None:
            raise ConfigError(f"weights given for {part!r} but the config has no {part} section")
    if dst.exists() and not overwrite:
        raise CheckpointError(
            f"{dst} already exists; remove it or pass overwrite=True (--overwrite)"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        hashes: dict[str, str] = {}
        for part, state in states.items():
            to = (dtypes or {}).get(part)
            hashes[WEIGHT_FILES[part]] = write_safetensors(
                tmp / WEIGHT_FILES[part],
                state,
                metadata={"format": "pt", "part": part},
                cast=None if to is None else (lambda d, to=to: to if d.is_floating_point else d),
                progress=progress,
            )
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        if write_extra is not None:
            write_extra(tmp, hashes)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def caption_words(text: str) -> list[str]:
    """The words of a (normalized) caption in order, lower-cased: runs of letters and digits, with
    apostrophes inside them; vocabulary.txt and `TextToImage.unknown_words` split text this way."""
    return _WORD.findall(text.lower())


def known_words_only(text: str, vocabulary: Iterable[str]) -> str:
    """`text` without the words (as `caption_words` splits it) that are not in `vocabulary`, or
    `text` itself where no word of it is."""
    known = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
    words = caption_words(text)
    if all(w in known for w in words) or not any(w in known for w in words):
        return text
    kept = _WORD.sub(lambda m: m.group(0) if m.group(0).lower() in known else "", text)
    kept = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", kept))
    kept = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", kept)  # "a, , b" -> "a, b"
    lead = text[: len(text) - len(text.lstrip())]  # the normalizer's leading space, kept
    return lead + kept.strip(" ,;:")


def write_vocabulary(path: str | os.PathLike, captions: Iterable[str]) -> Path:
    """Write vocabulary.txt into a model directory: every word of the (normalized) captions, sorted."""
    words: set[str] = set()
    for caption in captions:
        words.update(caption_words(caption))
    f = Path(path) / VOCABULARY_FILE
    f.write_text("".join(f"{w}\n" for w in sorted(words)), encoding="utf-8")
    return f


def read_vocabulary(path: str | os.PathLike) -> frozenset[str] | None:
    """A model directory's vocabulary.txt as a set of words; None when it has none."""
    f = Path(path) / VOCABULARY_FILE
    if not f.is_file():
        return None
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {f}: {e}; it should hold one word a line") from e
    return frozenset(w for line in text.splitlines() for w in caption_words(line))


def write_examples(
    path: str | os.PathLike, prompts: Sequence[str], description: str | None = None
) -> Path:
    """Write examples.json into a model directory: a line on what the model draws and example prompts."""
    f = Path(path) / EXAMPLES_FILE
    data = ModelExamples(description, tuple(prompts)).to_dict()
    f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return f


def read_optional_json(f: Path) -> object | None:
    """An optional JSON file of a model directory: None when it is missing, CheckpointError when
    it cannot be read or parsed."""
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {f}: {e}") from e


def read_examples(path: str | os.PathLike) -> ModelExamples | None:
    """A model directory's examples.json; None when it has none, CheckpointError when it is malformed."""
    f = Path(path) / EXAMPLES_FILE
    data = read_optional_json(f)
    if data is None:
        return None
    prompts = data.get("prompts", []) if isinstance(data, dict) else None
    description = data.get("description") if isinstance(data, dict) else None
    if (
        not isinstance(prompts, list)
        or not all(isinstance(p, str) for p in prompts)
        or not isinstance(description, (str, type(None)))
    ):
        raise CheckpointError(
            f'{f} must be {{"description": "...", "prompts": ["...", ...]}} (strings only)'
        )
    return ModelExamples(description, tuple(prompts))


def read_weights(path: str | os.PathLike, part: str, lazy: bool = False) -> dict[str, TensorLike]:
    """One part's safetensors tensors (lazy: nothing read yet); a truncated or foreign file becomes a
    CheckpointError naming it."""
    f = Path(path) / WEIGHT_FILES[part]
    if not f.is_file():
        raise CheckpointError(f"{f} not found; the model directory's config lists a {part} model")
    state = lazy_safetensors(f)
    return state if lazy else materialize(state)


def check_state_dict(module: nn.Module, state: Mapping[str, TensorLike], where: str) -> None:
    """Compare a state dict with a module's parameters and name the first missing, extra or misshapen tensor."""
    expected = module.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(
                f"{where}: tensor {name!r} is missing (expected shape {tuple(ref.shape)})"
            )
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(got.shape)} but the config implies {tuple(ref.shape)}"
            )
        if ref.is_floating_point() and got.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {got.dtype}; expected a float dtype"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)"
        )


def load_into(module: nn.Module, state: Mapping[str, TensorLike], where: str) -> nn.Module:
    """Check, then copy a state dict into a module (dtype converted to the module's)."""
    check_state_dict(module, state, where)
    module.load_state_dict(materialize(state), strict=True)
    return module


_INITS = (
    "normal_",
    "uniform_",
    "zeros_",
    "ones_",
    "constant_",
    "trunc_normal_",
    "kaiming_uniform_",
)


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """nn.init's fills as no-ops while a module is built on the meta device, where they mean nothing
    and each costs milliseconds (torch decomposes them in Python there: 2.5 s for DalleBart mini)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_from_state(
    factory: Callable[[], nn.Module],
    state: dict[str, TensorLike],
    where: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Like load_into(factory(), ...) without a second copy of the weights: the module is built on the
    meta device (no allocation, no random init) and adopts the state's tensors, each read (if lazy),
    converted to `dtype` (floats; default: the module's) and moved to `device` one at a time.

    `state` is consumed (emptied) so that each original tensor can be freed once converted: peak
    memory is the finished module plus one tensor.
    """
    with torch.device("meta"), _skip_init():
        module = factory()
    check_state_dict(module, state, where)
    expected = module.state_dict()
    adopted: dict[str, Tensor] = {}
    since_trim = 0
    for k in list(state):
        ref = expected[k]
        to = dtype if (dtype is not None and ref.is_floating_point()) else ref.dtype
        adopted[k] = load(state.pop(k)).to(device=device, dtype=to).contiguous()
        since_trim += adopted[k].numel() * adopted[k].element_size()
        if since_trim > 2**28:  # read buffers freed so far: back to the system, not kept in RSS
            release_freed_memory()
            since_trim = 0
    module.load_state_dict(adopted, strict=True, assign=True)
    on_meta = device is not None and torch.device(device).type == "meta"
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover and not on_meta:
        raise CheckpointError(f"{where}: {leftover[0]!r} was not in the state dict")
    return module
