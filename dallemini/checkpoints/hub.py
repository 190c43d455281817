"""Hugging Face Hub names -> local folders: download only the files a model needs, convert once.

A name is `owner/repo`, `owner/repo@revision`, or a short name (SHORT_NAMES). A path that exists
always wins. Downloads go through `huggingface_hub` (its cache, HF_HOME / HF_HUB_CACHE, HF_TOKEN,
HF_HUB_OFFLINE, progress bars). A downloaded checkpoint is converted once into a dallemini model
directory under `cache_root()/models`, keyed by repositories, resolved commits and storage dtype,
and remembered under `cache_root()/refs`, so later runs load it without touching the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
)
from tqdm import tqdm

from .. import __version__
from ..errors import CheckpointError
from . import native
from .safetensors_io import file_sha256

log = logging.getLogger(__name__)

ORIGINAL_VQGAN = "dalle-mini/vqgan_imagenet_f16_16384"
CLIP_REPO = "openai/clip-vit-base-patch32"
SOURCE_FILE = "source.json"
CARD_FILE = "MODEL_CARD.md"

_DALLE_FILES = [
    "config.json",
    "flax_model.msgpack",
    "flax_model*.msgpack",
    "flax_model.msgpack.index.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    native.WORD_LIST_FILE,
    "README.md",
]
_VQGAN_FILES = ["config.json", "flax_model.msgpack", "README.md"]
_MIN_DALLE_FILES = {
    "mini": [
        "encoder_mini.pt",
        "decoder_mini.pt",
        "detoker.pt",
        "vocab_mini.json",
        "merges_mini.txt",
    ],
    "mega": ["encoder.pt", "decoder.pt", "detoker.pt", "vocab.json", "merges.txt"],
}
_CLIP_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "README.md",
]
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class Source:
    """What a name points at: a DalleBart repo (+ the VQGAN it pairs with), a VQGAN, min-dalle, or CLIP."""

    kind: str  # "flax-dalle", "flax-vqgan", "min-dalle", "native", "clip"
    repo: str
    revision: str | None = None
    vqgan: str | None = None  # the VQGAN repo converted with a DalleBart
    variant: str = ""  # min-dalle: "mini" or "mega"


SHORT_NAMES: dict[str, Source] = {
    "mini": Source("flax-dalle", "dalle-mini/dalle-mini", vqgan=ORIGINAL_VQGAN),
    "mega": Source("flax-dalle", "dalle-mini/dalle-mega", vqgan=ORIGINAL_VQGAN),
    "min-dalle-mini": Source("min-dalle", "kuprel/min-dalle", variant="mini"),
    "min-dalle-mega": Source("min-dalle", "kuprel/min-dalle", variant="mega"),
    "clip": Source("clip", CLIP_REPO),
}


def cache_root() -> Path:
    """$DALLEMINI_CACHE, else $XDG_CACHE_HOME/dallemini, else ~/.cache/dallemini."""
    root = os.environ.get("DALLEMINI_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dallemini"


def is_hub_name(name: str | os.PathLike) -> bool:
    """True for a short name or `owner/repo[@revision]` that is not an existing path."""
    text = str(name)
    if Path(text).exists():
        return False
    base = text.split("@", 1)[0]
    return base in SHORT_NAMES or bool(_NAME.match(text))


def local_path(
    name: str | os.PathLike, dtype: torch.dtype | None = None, refresh: bool = False
) -> Path:
    """The local folder for a path or Hub name: the path itself, or the converted model directory
    (converting it on first use), or for CLIP the downloaded Hugging Face folder."""
    if not is_hub_name(name):
        return Path(name)
    source = parse(str(name))
    if source.kind == "clip":
        return _download(source, _CLIP_FILES + _clip_weights(source))[0]
    ref = _ref_file(str(name))
    if not refresh:
        cached = _cached(ref, dtype)
        if cached is not None:
            return cached
    return _convert(str(name), source, dtype, ref)


def cached_folder(name: str) -> Path:
    """The local folder of a path or of a Hub name already downloaded (and converted), without any
    request; a CheckpointError saying how to get it otherwise."""
    if not is_hub_name(name):
        return Path(name)
    cached = _cached(_ref_file(name), None)
    if cached is None:
        base = name.split("@", 1)[0]
        source = SHORT_NAMES.get(base)
        if source is not None and source.kind == "clip":
            with _hub_errors(name, _CLIP_FILES):
                return Path(
                    huggingface_hub.snapshot_download(
                        source.repo, revision=source.revision, local_files_only=True
                    )
                )
        raise CheckpointError(
            f"{name} has not been downloaded yet: `dallemini download {name}` fetches and converts it"
        )
    return cached


def parse(name: str) -> Source:
    """A name -> Source; owner/repo names are classified by the files the repo holds."""
    base, _, revision = name.partition("@")
    if base in SHORT_NAMES:
        return _with_revision(SHORT_NAMES[base], revision or None)
    known = {s.repo: s for s in SHORT_NAMES.values() if s.kind != "min-dalle"}
    known[ORIGINAL_VQGAN] = Source("flax-vqgan", ORIGINAL_VQGAN)
    if base in known:
        return _with_revision(known[base], revision or None)
    files = _repo_files(base, revision or None)
    return _classify(base, revision or None, files)


def _with_revision(source: Source, revision: str | None) -> Source:
    return Source(source.kind, source.repo, revision, source.vqgan, source.variant)


def _classify(repo: str, revision: str | None, files: set[str]) -> Source:
    if "config.json" in files and {"bart.safetensors", "vqgan.safetensors"} & files:
        return Source("native", repo, revision)
    if "flax_model.msgpack" in files or "flax_model.msgpack.index.json" in files:
        if {"vocab.json", "tokenizer.json"} & files:
            return Source("flax-dalle", repo, revision, vqgan=ORIGINAL_VQGAN)
        return Source("flax-vqgan", repo, revision)
    for variant, needed in _MIN_DALLE_FILES.items():
        if set(needed[:2]) <= files:
            return Source("min-dalle", repo, revision, variant=variant)
    if "config.json" in files and {"model.safetensors", "pytorch_model.bin"} & files:
        return Source("clip", repo, revision)
    raise CheckpointError(
        f"{repo} on the Hub holds no checkpoint dallemini knows (looked for flax_model.msgpack, "
        "min-dalle encoder.pt/decoder.pt, a dallemini model directory or a CLIP model)"
    )


# ---------------------------------------------------------------------------------------------
# The convert-once cache


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "--", text).strip("-")


def _ref_file(name: str) -> Path:
    """Where the last resolution of `name` (commits and converted folders per dtype) is kept."""
    return cache_root() / "refs" / f"{_slug(name)}.json"


def _read_ref(ref: Path) -> dict:
    try:
        data = json.loads(ref.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("dirs"), dict) else {}
    except (OSError, ValueError):
        return {}


def _cached(ref: Path, dtype: torch.dtype | None) -> Path | None:
    """A verified converted folder for the name that can serve `dtype`: one stored in it, else one
    in float32 (cast while loading); any for None. A narrower dtype never serves a wider one."""
    dirs = _read_ref(ref).get("dirs", {})
    want = _dtype_name(dtype) if dtype is not None else None
    if want is None:
        order = sorted(dirs, key=lambda d: d != "float32")
    else:
        order = [d for d in (want, "float32", "native") if d in dirs]
    for key in dict.fromkeys(order):
        path = Path(str(dirs[key]))
        if key == "native" and native.is_model_dir(path):  # a Hub snapshot, used as it is
            return path
        if path.is_dir() and verify(path):
            return path
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def verify(path: Path) -> bool:
    """True when every file a converted folder lists in source.json has its recorded sha256; a
    corrupt folder is removed (so that it is converted again), with a warning.

    Files whose size, mtime and inode match the stamp of their last check are trusted without
    hashing them again (a Mega start would otherwise hash 5-10 GB); any write to them is re-hashed.
    """
    stamps_file = path / ".verified.json"
    try:
        files = json.loads((path / SOURCE_FILE).read_text())["sha256"]
        try:
            stamps = json.loads(stamps_file.read_text())
        except (OSError, ValueError):
            stamps = {}
        fresh = {name: _stamp(path / name) for name in files}
        ok = all(
            stamps.get(name) == fresh[name] or file_sha256(path / name) == digest
            for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning(
            "%s is corrupt (a file differs from its recorded sha256): converting again", path
        )
        shutil.rmtree(path, ignore_errors=True)
    elif stamps != fresh:
        tmp = stamps_file.with_name(f"{stamps_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, stamps_file)
    return ok


def _stamp(file: Path) -> list[int]:
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _convert(name: str, source: Source, dtype: torch.dtype | None, ref: Path) -> Path:
    """Download what `source` needs, convert it once into the cache, remember it under `ref`."""
    if source.kind == "native":
        folder, commit = _download(source, ["*.json", "*.safetensors", "*.txt", "*.md"])
        _record(ref, "native", folder, {source.repo: commit})
        return folder
    origins: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dallemini-stage-") as stage:
        src, vqgan = _fetch_sources(source, Path(stage), origins)
        storage = dtype if dtype is not None else _source_dtype(source)
        commits = "-".join(o["commit"][:10] for o in origins)
        key = f"{_slug(name.split('@')[0])}-{commits}-{_dtype_name(storage)}"
        dst = cache_root() / "models" / key
        if not (dst.is_dir() and verify(dst)):
            print(f"converting {name} once, into {dst}", file=sys.stderr, flush=True)

            def write_extra(tmp: Path, hashes: dict[str, str]) -> None:
                _write_card(tmp, name, origins, storage)
                record = {
                    "name": name,
                    "origins": origins,
                    "dtype": _dtype_name(storage),
                    "converted_by": f"dallemini {__version__}",
                    "sha256": {**hashes, CARD_FILE: file_sha256(tmp / CARD_FILE)},
                }
                (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")

            # Imported here: the package's load_parts resolves names through this module.
            from . import convert

            bar = tqdm(desc="converting", unit="tensor", disable=not sys.stderr.isatty())

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            try:
                convert(
                    src, dst, vqgan=vqgan, dtype=dtype, write_extra=write_extra, progress=progress
                )
            except CheckpointError:
                if not dst.is_dir():  # another process may have finished the same conversion first
                    raise
            finally:
                bar.close()
            if not verify(dst):  # hashes what was written once and stamps it for later starts
                raise CheckpointError(f"{dst}: the converted files differ from what was written")
    _record(ref, _dtype_name(storage), dst, {o["repo"]: o["commit"] for o in origins})
    return dst


def _record(ref: Path, dtype: str, folder: Path, commits: dict[str, str]) -> None:
    data = _read_ref(ref)
    if data.get("commits") not in (None, commits):
        data["dirs"] = {}  # a newer revision: older conversions no longer answer this name
    data.setdefault("dirs", {})[dtype] = str(folder.resolve())
    data["commits"] = commits
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, ref)


def _source_dtype(source: Source) -> torch.dtype:
    return torch.float16 if source.kind == "min-dalle" else torch.float32


def _fetch_sources(source: Source, stage: Path, origins: list[dict]) -> tuple[Path, Path | None]:
    """Download the files of `source` (and its VQGAN); (checkpoint folder, VQGAN folder or None)."""
    if source.kind == "min-dalle":
        patterns = [*_MIN_DALLE_FILES[source.variant], "README.md"]
        folder, commit = _download(source, patterns)
        origins.append(_origin(source.repo, source.revision, commit, folder, patterns))
        # A folder holding only this variant's files (the snapshot may hold the other one too).
        sub = stage / f"dalle_bart_{source.variant}"
        sub.mkdir()
        suffix = "_mini" if source.variant == "mini" else ""
        for f in _MIN_DALLE_FILES[source.variant]:
            canonical = f.replace(suffix, "") if suffix else f
            target = stage / "vqgan" / canonical if f == "detoker.pt" else sub / canonical
            target.parent.mkdir(exist_ok=True)
            target.symlink_to((folder / f).resolve())
        return stage, None
    patterns = _DALLE_FILES if source.kind == "flax-dalle" else _VQGAN_FILES
    folder, commit = _download(source, patterns)
    origins.append(_origin(source.repo, source.revision, commit, folder, patterns))
    vqgan = None
    if source.vqgan is not None:
        vq_source = Source("flax-vqgan", source.vqgan)
        vqgan, vq_commit = _download(vq_source, _VQGAN_FILES)
        origins.append(_origin(source.vqgan, None, vq_commit, vqgan, _VQGAN_FILES))
    return folder, vqgan


def _origin(
    repo: str, revision: str | None, commit: str, folder: Path, patterns: list[str]
) -> dict:
    """Where one part came from: the repo, revision, commit and the files used (and their size)."""
    files = sorted(p.name for p in folder.iterdir() if any(fnmatch(p.name, x) for x in patterns))
    size = sum((folder / f).stat().st_size for f in files)
    return {
        "repo": repo,
        "revision": revision or "main",
        "commit": commit,
        "files": files,
        "bytes": size,
        "license": _license(folder / "README.md"),
    }


def _license(readme: Path) -> str:
    """The `license:` of a model card's YAML front matter, as the source states it."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return "not stated (no model card downloaded)"
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*(.+)$", m.group(1), re.M) if m else None
    return found.group(1).strip().strip("'\"") if found else "not stated in the model card"


def _write_card(folder: Path, name: str, origins: list[dict], dtype: torch.dtype) -> None:
    """A short model card: where the weights came from, their licence, sizes."""
    cfg = native.read_config(folder)
    lines = [
        f"# {name}",
        "",
        f"Converted by dallemini {__version__}; weights stored as {_dtype_name(dtype)}.",
        "",
    ]
    lines += ["| source | revision | commit | licence (as the source states it) | downloaded |"]
    lines += ["|---|---|---|---|---:|"]
    for o in origins:
        lines.append(
            f"| {o['repo']} | {o['revision']} | {o['commit'][:12]} | {o['license']} | "
            f"{o['bytes'] / 1e9:.2f} GB |"
        )
    lines.append("")
    for part, file in native.WEIGHT_FILES.items():
        if (folder / file).is_file():
            section = getattr(cfg, part)
            lines.append(f"- {part}: `{file}`, {(folder / file).stat().st_size / 1e9:.2f} GB")
            if part == "bart":
                lines.append(
                    f"  ({section.encoder_layers}+{section.decoder_layers} layers, d_model "
                    f"{section.d_model}, {section.attention_heads} heads, GLU {section.ffn_dim})"
                )
    (folder / CARD_FILE).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Downloads


def _download(source: Source, patterns: list[str]) -> tuple[Path, str]:
    """snapshot_download of the matching files -> (snapshot folder, commit), every file verified."""
    revision = source.revision or "main"
    where = f"{source.repo}@{revision}"
    with _hub_errors(where, patterns), _progress():
        folder = Path(
            huggingface_hub.snapshot_download(
                source.repo, revision=revision, allow_patterns=patterns
            )
        )
        commit = folder.name
        bad = [p for p in folder.iterdir() if not _blob_ok(p)]
        for p in bad:  # a corrupted cached blob: fetch it again, never load it
            log.warning(
                "%s/%s does not match its hash in the cache: downloading it again", where, p.name
            )
            blob = p.resolve()
            p.unlink()
            blob.unlink(missing_ok=True)
            huggingface_hub.hf_hub_download(source.repo, p.name, revision=commit)
            if not _blob_ok(p):
                raise CheckpointError(
                    f"{where}: {p.name} does not match its hash after downloading it again"
                )
    if not any(folder.iterdir()):
        raise CheckpointError(f"{where} has none of the files needed ({', '.join(patterns)})")
    return folder, commit


def _blob_ok(path: Path) -> bool:
    """Whether a cached file matches its blob name (sha256 for large files, git's sha1 for others)."""
    etag = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return file_sha256(path) == etag
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(16 * 2**20):
                digest.update(block)
        return digest.hexdigest() == etag
    return True  # a blob name we do not know how to check


def _repo_files(repo: str, revision: str | None) -> set[str]:
    """The file names of a repo (one metadata request; the cached snapshot's files when offline)."""
    with _hub_errors(f"{repo}@{revision or 'main'}", []):
        try:
            return set(huggingface_hub.list_repo_files(repo, revision=revision))
        except hf_errors.OfflineModeIsEnabled:
            folder = huggingface_hub.snapshot_download(
                repo, revision=revision, local_files_only=True
            )
            return {p.name for p in Path(folder).iterdir()}


def _clip_weights(source: Source) -> list[str]:
    """model.safetensors when the CLIP repo (or its cached snapshot) has it, else pytorch_model.bin."""
    try:
        folder = huggingface_hub.snapshot_download(
            source.repo, revision=source.revision, allow_patterns=_CLIP_FILES, local_files_only=True
        )
        names = {p.name for p in Path(folder).iterdir()}
        if names & {"model.safetensors", "pytorch_model.bin"}:
            return sorted(names & {"model.safetensors", "pytorch_model.bin"})
    except hf_errors.LocalEntryNotFoundError:
        pass
    files = _repo_files(source.repo, source.revision)
    return ["model.safetensors"] if "model.safetensors" in files else ["pytorch_model.bin"]


@contextmanager
def _progress() -> Iterator[None]:
    """huggingface_hub's progress bars on a terminal only."""
    hide = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


@contextmanager
def _hub_errors(where: str, patterns: list[str]) -> Iterator[None]:
    """huggingface_hub's exceptions -> one-line CheckpointErrors saying what to do."""
    try:
        yield
    except CheckpointError:
        raise
    except hf_errors.RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{where.split('@')[0]} is neither a local path nor a repository on the Hugging Face "
            "Hub (a typo, or a private repository: set HF_TOKEN); Hub names are "
            f"owner/repo[@revision] or one of {', '.join(SHORT_NAMES)}"
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{where}: no such revision on the Hugging Face Hub") from e
    except hf_errors.GatedRepoError as e:
        raise CheckpointError(f"{where} needs an account token: set HF_TOKEN") from e
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        files = f" (files: {', '.join(p for p in patterns if '*' not in p)})" if patterns else ""
        raise CheckpointError(
            f"{where} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
            f"and cannot be downloaded now{files}: "
            + (
                "unset HF_HUB_OFFLINE, or run `dallemini download NAME` where the Hub is reachable"
                if huggingface_hub.constants.HF_HUB_OFFLINE
                else "check the network and run the command again"
            )
        ) from e
    except hf_errors.HfHubHTTPError as e:
        raise CheckpointError(f"{where}: the Hugging Face Hub answered {_first_line(e)}") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: download failed ({_first_line(e)})") from e
    except Exception as e:  # the HTTP client's own errors (dropped connections, timeouts)
        raise CheckpointError(
            f"{where}: download failed ({type(e).__name__}: {_first_line(e)}); run the command "
            "again to continue it"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe(path: Path) -> dict | None:
    """Where a converted model directory came from (its source.json), or None for other folders."""
    try:
        data = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if k != "sha256"} if isinstance(data, dict) else None
