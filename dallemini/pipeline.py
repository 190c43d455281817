"""TextToImage: prompts -> CLIP-ranked PIL images, from any supported model directory, on any device and dtype."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import Tensor

from . import threads
from .checkpoints import load_parts
from .checkpoints.native import (
    ModelExamples,
    build_from_state,
    caption_words,
    is_model_dir,
    known_words_only,
    load_into,
    read_examples,
    read_vocabulary,
)
from .checkpoints.quantized import build_bart
from .config import PipelineConfig, SamplingConfig
from .continuous import RowRequest, RunningBatch
from .devices import activation_dtype, resolve_device, resolve_dtype
from .errors import CheckpointError, ConfigError, InputError
from .generate import TokenBatch, iter_image_tokens
from .images import make_grid as make_grid  # re-exported
from .images import resize_center_crop, to_pil
from .memory import release_freed_memory
from .models import kernels
from .models.bart import DalleBart
from .models.clip import BuiltinClipScorer, ImageTextScorer, SmallClip
from .models.loading import load_scorer
from .models.loading import load_vqgan as load_vqgan  # re-exported
from .models.vqgan import VQGAN
from .synonyms import Synonyms, read_synonyms
from .text import TextEncoder, TextNormalizer

# The built-in model (emoji scenes, made by `dallemini recipe emoji`; see its MODEL_CARD.md): what
# generate / serve / load_pipeline use when no model is given.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

# Words `unknown_words` never reports: they name nothing to draw, so a model that never saw "of" or
# "the" still draws "a cat on the left" as well as it can.
_FUNCTION_WORDS = "a an the this that it its is are and or of to with in on at for by"
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())


def default_model_path() -> Path:
    """The built-in model directory shipped inside the package."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ConfigError(
            f"this installation has no built-in model ({DEFAULT_MODEL_DIR} holds no config.json): "
            "give a model directory (--model DIR), e.g. OUT/model made by `dallemini recipe emoji OUT`"
        )
    return DEFAULT_MODEL_DIR


ImageSource = Image.Image | str | os.PathLike


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a PIL image or an image file; an unreadable file raises InputError."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"an image must be a PIL image or a file path, got {type(source).__name__}"
        )
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {source}: {e}") from e


@dataclass
class GeneratedImage:
    """One generated image with what made it: prompt, seed, CLIP score (None without a reranker), tokens."""

    image: Image.Image
    prompt: str
    seed: int
    score: float | None
    tokens: list[int]


@dataclass
class StreamFrame:
    """Partial images while tokens arrive: rows not sampled yet are grey; `tokens` [B, done] sampled so far."""

    images: list[Image.Image]
    done: int
    total: int
    tokens: Tensor | None = None


@dataclass
class _Request:
    """One call's prompts encoded, with a prompt index, a seed and (for completion) forced tokens per image row."""

    prompts: list[str]
    ids: Tensor
    mask: Tensor
    index: Tensor
    seeds: list[int]
    prefix: Tensor | None


class TextToImage:
    """The DALL·E Mini pipeline: normalize + tokenize -> DalleBart sampling -> VQGAN decoding -> CLIP reranking."""

    def __init__(
        self,
        bart: DalleBart,
        vqgan: VQGAN,
        text,  # dallemini.text.TextEncoder
        config: PipelineConfig,
        device: torch.device,
        dtype: torch.dtype,
        scorer: ImageTextScorer | None = None,
        model_dir: str | os.PathLike | None = None,
    ) -> None:
        if config.bart is None or config.vqgan is None:
            raise ConfigError("a pipeline needs both a DalleBart and a VQGAN")
        if config.vqgan.grid_size**2 != config.bart.image_length:
            raise ConfigError(
                f"VQGAN grid {config.vqgan.grid_size}x{config.vqgan.grid_size} does not match DalleBart "
                f"image_length {config.bart.image_length}"
            )
        if config.vqgan.n_embed > config.bart.image_vocab_size:
            raise ConfigError(
                f"VQGAN codebook ({config.vqgan.n_embed}) is larger than the DalleBart image vocabulary "
                f"({config.bart.image_vocab_size})"
            )
        # The speed paths (packed weights, native CPU kernels) bound in place: same weights, same results.
        self.bart = kernels.accelerate(bart.eval())
        self.vqgan = vqgan.eval()
        self.text = text
        self.config = config
        self.device = device
        self.dtype = dtype
        # Reranks the images of each prompt by CLIP score; None: images come back in seed order.
        self.scorer = scorer
        # VQGAN decoding runs this many images at a time, in groups that do not depend on max_batch,
        # so chunked requests give the very same pixels (conv results change with the batch size).
        # On CPU, 256 px images decode fastest one at a time (~8% over 8 at once, and little
        # activation memory), but small ones in groups: 64 px, 16 at a time, 2.6x faster per image.
        side = config.vqgan.resolution
        self.decode_batch = max(1, 16 * 64 * 64 // side**2) if device.type == "cpu" else 8
        # The native model directory it came from (None: another format or built in memory), and
        # what that directory says the model knows: the words of its training captions and what it
        # draws (None when the directory has no vocabulary.txt / examples.json).
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.vocabulary: frozenset[str] | None = None
        self.examples: ModelExamples | None = None
        # Everyday words read as the words the model knows (synonyms.json; see `read_prompt`).
        self.synonyms: Synonyms | None = None
        if model_dir is not None:
            self.vocabulary = read_vocabulary(model_dir)
            self.examples = read_examples(model_dir)
            self.synonyms = read_synonyms(model_dir)

    @property
    def is_builtin(self) -> bool:
        """Whether this is the package's built-in emoji-scenes model."""
        return self.model_dir is not None and self.model_dir.resolve() == DEFAULT_MODEL_DIR

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` that the model's training captions never used, each once, in order.

        The prompt is normalized as the model's text encoder does and split into words
        (`checkpoints.native.caption_words`); small function words (`FUNCTION_WORDS`: a, the, of,
        ...) are never reported, nor are words its synonym list reads as known ones (`read_prompt`).
        A model without a vocabulary (vocabulary.txt) reports none.
        """
        if self.vocabulary is None:
            return []
        text = self.text.normalize(prompt)
        words = caption_words(text if self.synonyms is None else self.synonyms.read(text)[0])
        unknown = (w for w in words if w not in self.vocabulary and w not in FUNCTION_WORDS)
        return list(dict.fromkeys(unknown))

    def read_prompt(self, prompt: str) -> tuple[str, list[tuple[str, str]]]:
        """The prompt as the model reads it, and the (phrase, read as) pairs of its synonym list
        (synonyms.json) that it used: "a kitty on navy" -> "a cat on blue". A model with a
        vocabulary (vocabulary.txt) leaves out the words it never saw: a word no training caption
        used means nothing to it, and would only disturb how it reads the words around it.
        Without either, as given."""
        if self.synonyms is None and self.vocabulary is None:
            return prompt, []
        text = self.text.normalize(prompt)
        read: list[tuple[str, str]] = []
        if self.synonyms is not None:
            text, read = self.synonyms.read(text)
        if self.vocabulary is not None:
            text = known_words_only(text, self.vocabulary)
        return text, read

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vqgan: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        clip: str | os.PathLike | None = None,
        vqgan_dtype: str | torch.dtype | None = None,
    ) -> TextToImage:
        """Load a model directory (or any foreign format `dallemini convert` accepts) onto a device.

        `path=None` loads the built-in emoji-scenes model (`DEFAULT_MODEL_DIR`). `dtype="int8"` keeps the
        DalleBart's dense layers in 8 bits (models/quant.py) computing in float32; VQGAN and CLIP stay float.

        `clip` is a Hugging Face CLIP folder or a dallemini model directory with a built-in CLIP; without
        it the model directory's own built-in CLIP (clip.safetensors) is the reranker when it has one.
        `vqgan_dtype` (default float32) runs the VQGAN decoder in another dtype: bfloat16 halves its time
        on CPUs with avx512_bf16, at the price of pixel values a few levels off float32's.
        A model directory's vocabulary.txt and examples.json, when it has them, become `vocabulary`
        (see `unknown_words`) and `examples`.
        """
        dev, dt = resolve_device(device), resolve_dtype(dtype, weights=True)
        act, vq_dt = activation_dtype(dt), resolve_dtype(vqgan_dtype)  # int8: float32 activations
        path = default_model_path() if path is None else path
        parts = load_parts(path, vqgan=vqgan, tokenizer=tokenizer, lazy=True, dtype=act)
        cfg = parts.config
        if cfg.bart is None:
            raise CheckpointError(f"{path} holds no DalleBart model; give a full model directory")
        if cfg.vqgan is None:
            raise CheckpointError(f"{path} holds no VQGAN; pass one with vqgan=PATH (--vqgan)")
        if parts.tokenizer_json is None:
            raise CheckpointError(
                f"{path} has no tokenizer (tokenizer.json or vocab.json + merges.txt)"
            )
        cfg.check_memory(bytes_per_param=dt.itemsize)
        # One copy of the weights in memory: each tensor is read, converted to its dtype and moved to
        # the device on its own, and the modules adopt them (see build_from_state).
        # int8: quantized layer by layer (or read as stored); see checkpoints/quantized.py
        bart = build_bart(cfg.bart, parts.states.pop("bart"), f"{parts.source} (bart)", dt, dev)
        vq = build_from_state(
            lambda: VQGAN(cfg.vqgan),
            parts.states.pop("vqgan"),
            f"{parts.source} (vqgan)",
            vq_dt,
            dev,
        )
        words = parts.word_list if cfg.text.normalize else None
        normalizer = TextNormalizer(word_list=words) if words is not None else None
        text = TextEncoder(Tokenizer.from_str(parts.tokenizer_json), cfg.text, normalizer)
        if text.vocab_size > cfg.bart.encoder_vocab_size:
            raise CheckpointError(
                f"tokenizer has {text.vocab_size} tokens but the model's text vocabulary is "
                f"{cfg.bart.encoder_vocab_size}; they do not belong together"
            )
        scorer: ImageTextScorer | None = None
        if clip is not None:
            scorer = load_scorer(clip, device=dev, dtype=act)
        elif cfg.clip is not None:
            small = load_into(SmallClip(cfg.clip), parts.states["clip"], f"{parts.source} (clip)")
            scorer = BuiltinClipScorer(small, text).to(dev, act)
        # The VQGAN decoder runs in float32 unless asked otherwise: it is cheap and colours stay exact.
        # Channels-last convolutions are ~15% faster with oneDNN on CPU (measured on the f16 decoder).
        fmt = torch.channels_last if dev.type == "cpu" else torch.preserve_format
        vq = vq.to(dev, vq_dt, memory_format=fmt)
        local = Path(path) if isinstance(path, (str, os.PathLike)) else None
        model_dir = local if local is not None and is_model_dir(local) else None
        pipe = cls(bart.to(dev, act), vq, text, cfg, dev, dt, scorer=scorer, model_dir=model_dir)
        release_freed_memory()  # the read buffers of tensors converted while loading
        return pipe

    def sampling(
        self, base: SamplingConfig | None = None, /, **overrides: float | int | None
    ) -> SamplingConfig:
        """The settings a call runs with: `base` (default: the model's own) with the non-None overrides.

        The overrides (temperature, top_k, top_p, condition_scale) are checked once, when the new
        SamplingConfig is built (InputError); with none given `base` itself comes back.
        """
        if base is None:
            base = self.config.sampling
        elif not isinstance(base, SamplingConfig):
            raise InputError(f"sampling must be a SamplingConfig, got {type(base).__name__}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **given) if given else base

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageSource]) -> Tensor:
        """Images (PIL or files) -> VQGAN codes [N, image_length], after resizing and centre-cropping to its resolution."""
        size = self.config.vqgan.resolution
        arr = np.stack(
            [np.asarray(resize_center_crop(load_image(im), size), dtype=np.uint8) for im in images]
        )
        pixels = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return self.vqgan.encode(pixels).flatten(1)

    def _init_codes(
        self, init_image: ImageSource | Sequence[ImageSource] | None, keep_rows: int, prompts: int
    ) -> Tensor | None:
        """The first keep_rows token rows of the init image(s), one row of codes per prompt; None when nothing is kept."""
        g = self.config.vqgan.grid_size
        if isinstance(keep_rows, bool) or not isinstance(keep_rows, int) or not 0 <= keep_rows <= g:
            raise InputError(
                f"keep_rows must be an integer from 0 to {g} (the token grid is {g}x{g}), got {keep_rows!r}"
            )
        if init_image is None:
            if keep_rows:
                raise InputError(f"keep_rows={keep_rows} needs an init_image to take the rows from")
            return None
        images = list(init_image) if isinstance(init_image, (list, tuple)) else [init_image]
        if len(images) not in (1, prompts):
            raise InputError(
                f"{len(images)} init images given for {prompts} prompts; give one, or one per prompt"
            )
        # keep_rows=0 keeps nothing of the image: that is plain generation, so the image is not even read.
        if keep_rows == 0:
            return None
        codes = self.encode_images(images)[:, : keep_rows * g]
        return codes.expand(prompts, -1)  # one image serves every prompt

    def _request(
        self,
        prompt: str | Sequence[str],
        num_images: int | Sequence[int],
        seed: int | Sequence[int | None] | None,
        init_image: ImageSource | Sequence[ImageSource] | None = None,
        keep_rows: int = 0,
    ) -> _Request:
        """Check and encode one call's inputs: prompts, one seed per image row, forced tokens if any."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt given")
        counts = [num_images] * len(prompts) if isinstance(num_images, int) else list(num_images)
        if len(counts) != len(prompts):
            raise InputError(f"{len(counts)} image counts given for {len(prompts)} prompts")
        for n in counts:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
                raise InputError(f"num_images must be between 1 and 1024, got {n}")
        ids, mask = self.text([self.read_prompt(p)[0] for p in prompts])
        if seed is None or isinstance(seed, int):
            # One seed for the call: its images are numbered on across all prompts.
            start = secrets.randbelow(2**31) if seed is None else seed
            firsts = list(itertools.accumulate(counts[:-1], initial=start))
        else:
            # One seed per prompt (None: a random one): each prompt's images count on from its own.
            firsts = list(seed)
            if len(firsts) != len(prompts):
                raise InputError(f"{len(firsts)} seeds given for {len(prompts)} prompts")
            firsts = [secrets.randbelow(2**31) if s is None else s for s in firsts]
        for s in firsts:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 - 2**20:
                raise InputError(f"seed must be a non-negative 63-bit integer, got {s}")
        seeds = [first + k for first, n in zip(firsts, counts, strict=True) for k in range(n)]
        index = torch.arange(len(prompts), device=self.device).repeat_interleave(
            torch.tensor(counts, device=self.device)
        )
        codes = self._init_codes(init_image, keep_rows, len(prompts))
        prefix = None if codes is None else codes[index]
        return _Request(prompts, ids.to(self.device), mask.to(self.device), index, seeds, prefix)

    def _token_stream(
        self, req: _Request, rows: slice, settings: SamplingConfig, stream_every: int
    ) -> Iterator[TokenBatch]:
        """Sample the image rows `rows` of a request; only the prompts those rows use are encoded."""
        used, local = torch.unique(req.index[rows], return_inverse=True)
        u_ids, u_mask = self.text.unconditional(1)
        return iter_image_tokens(
            self.bart,
            req.ids[used],
            req.mask[used],
            u_ids.to(self.device),
            u_mask.to(self.device),
            req.seeds[rows],
            settings,
            num_codes=self.config.vqgan.n_embed,
            prompt_index=local,
            prefix=None if req.prefix is None else req.prefix[rows],
            stream_every=stream_every,
        )

    def row_requests(
        self,
        prompt: str,
        num_images: int,
        seed: int,
        settings: SamplingConfig,
        init_image: ImageSource | None = None,
        keep_rows: int = 0,
    ) -> list[RowRequest]:
        """One prompt's image rows (image k with seed + k) for a `running_batch`."""
        req = self._request(prompt, num_images, seed, init_image, keep_rows)
        forced = [None] * len(req.seeds) if req.prefix is None else list(req.prefix)
        return [
            RowRequest(req.ids[0], req.mask[0], s, settings, p)
            for s, p in zip(req.seeds, forced, strict=True)
        ]

    def running_batch(self, capacity: int) -> RunningBatch:
        """A continuous decoder batch of at most `capacity` images over this pipeline's DalleBart."""
        u_ids, u_mask = self.text.unconditional(1)
        return RunningBatch(self.bart, u_ids, u_mask, self.config.vqgan.n_embed, capacity)

    @torch.inference_mode()
    @threads.tuned("vqgan")
    def partial_images(self, tokens: Tensor) -> list[Image.Image]:
        """Images of tokens [B, done] sampled so far: the rows not begun are grey."""
        g, total = self.config.vqgan.grid_size, self.config.bart.image_length
        done = tokens.shape[1]
        full = torch.zeros((tokens.shape[0], total), dtype=torch.long, device=self.device)
        full[:, :done] = tokens
        images = torch.cat(list(self._decode_groups(full)))
        if done < total:
            cut = -(-done // g) * self.config.vqgan.downsample_factor  # token rows begun
            images[:, :, cut:] = 0.5
        return to_pil(images)

    def _decode_groups(self, tokens: Tensor) -> Iterator[Tensor]:
        """Image tokens [B, image_length] -> pixels [b, 3, H, W] in [0, 1], `decode_batch` images at a time."""
        g = self.config.vqgan.grid_size
        # on a busy CPU one thread may be faster (pixels then may differ by a level, as between
        # batch sizes)
        tuner = threads.tuner("vqgan") if self.device.type == "cpu" else threads.FIXED
        for codes in tokens.to(self.device).view(-1, g, g).split(self.decode_batch):
            with tuner.step():
                pixels = self.vqgan.decode(codes)
            yield pixels

    @torch.inference_mode()
    @threads.tuned("vqgan")
    def decode(self, tokens: Tensor) -> list[Image.Image]:
        """Image tokens [B, image_length] -> PIL images through the VQGAN decoder."""
        return [im for pixels in self._decode_groups(tokens) for im in to_pil(pixels)]

    def rerank(self, groups: list[list[GeneratedImage]]) -> list[list[GeneratedImage]]:
        """Score every group's images against its prompt with `scorer` (one call) and sort each group best first."""
        if self.scorer is None:
            raise ConfigError(
                "no CLIP reranker loaded: pass clip=PATH (--clip) or use a model with a built-in CLIP"
            )
        if not groups or any(not g for g in groups):
            raise InputError("rerank needs a non-empty list of images for every prompt")
        images = [r.image for g in groups for r in g]
        texts = [self.read_prompt(g[0].prompt)[0] for g in groups]
        scores = self.scorer.score(images, texts)  # [prompts, images]
        ranked, start = [], 0
        for p, group in enumerate(groups):
            mine = scores[p, start : start + len(group)]
            start += len(group)
            order = torch.argsort(mine, descending=True, stable=True).tolist()
            ranked.append([replace(group[j], score=float(mine[j])) for j in order])
        return ranked

    @torch.inference_mode()
    @threads.tuned("decode")  # the tuned thread count of its loops does not outlive the call
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images: int | Sequence[int] = 1,
        seed: int | Sequence[int | None] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        condition_scale: float | None = None,
        rerank: bool = True,
        init_image: ImageSource | Sequence[ImageSource] | None = None,
        keep_rows: int = 0,
        max_batch: int | None = None,
        progress: Callable[[int, int], object] | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[GeneratedImage] | list[list[GeneratedImage]]:
        """Generate num_images per prompt; one prompt gives a list, several give a list per prompt.

        With a scorer and rerank=True each prompt's images come best first with `score` set; otherwise
        in seed order (image k of the call has seed + k) with score None. `num_images` and `seed` may
        also be lists with one entry per prompt (image k of prompt p then has seed[p] + k): an image
        depends only on its prompt, seed and settings, so unrelated requests can share one call. `init_image` (one, or one per
        prompt) with keep_rows=K keeps the image's top K token rows and samples the rest; keep_rows=0
        keeps nothing and is plain generation. All images are sampled as one batch, or in chunks of at
        most `max_batch` image rows, which gives the same images. `progress(done, total)` is called after
        every decoding step. `sampling` is a SamplingConfig to run with (default: the model's own,
        `self.config.sampling`); temperature, top_k, top_p and condition_scale, when given, override
        its fields: `pipe(p, top_k=5)` is `pipe(p, sampling=pipe.sampling(top_k=5))`.
        """
        settings = self.sampling(
            sampling,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            condition_scale=condition_scale,
        )
        if max_batch is not None and (
            isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
        ):
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        req = self._request(prompt, num_images, seed, init_image, keep_rows)
        b = len(req.seeds)
        chunk = max_batch or b
        kept = 0 if req.prefix is None else req.prefix.shape[1]
        steps = self.config.bart.image_length - kept
        total = -(-b // chunk) * steps
        chunks = []
        for n, start in enumerate(range(0, b, chunk)):
            rows = slice(start, start + chunk)
            for batch in self._token_stream(req, rows, settings, 1 if progress else 0):
                if progress is not None:
                    progress(n * steps + batch.done - kept, total)
            chunks.append(batch.tokens)
        tokens = torch.cat(chunks)
        out: list[list[GeneratedImage]] = [[] for _ in req.prompts]
        made = zip(self.decode(tokens), tokens.tolist(), req.index.tolist(), req.seeds, strict=True)
        for im, row, p, s in made:
            out[p].append(GeneratedImage(im, req.prompts[p], s, None, row))
        if rerank and self.scorer is not None:
            out = self.rerank(out)
        return out[0] if isinstance(prompt, str) else out

    @torch.inference_mode()
    def stream(
        self,
        prompt: str | Sequence[str],
        num_images: int | Sequence[int] = 1,
        seed: int | Sequence[int | None] | None = None,
        every: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        condition_scale: float | None = None,
        init_image: ImageSource | None = None,
        keep_rows: int = 0,
        sampling: SamplingConfig | None = None,
    ) -> Iterator[StreamFrame]:
        """Yield partial images every `every` tokens (default: one token row), the last frame complete.

        Images come in seed order, not reranked; several prompts give their images one after another in
        one list; num_images, seed, init_image, keep_rows, sampling and its overrides work as in
        __call__.
        """
        g = self.config.vqgan.grid_size
        every = every or g
        if every < 1:
            raise InputError(f"every must be >= 1, got {every}")
        settings = self.sampling(
            sampling,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            condition_scale=condition_scale,
        )
        req = self._request(prompt, num_images, seed, init_image, keep_rows)
        with threads.tuned("decode"):
            for batch in self._token_stream(req, slice(None), settings, every):
                images = self.partial_images(batch.tokens)
                yield StreamFrame(images, batch.done, batch.total, batch.tokens)


def load_pipeline(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs,
) -> TextToImage:
    """Shorthand for TextToImage.from_pretrained; no path: the built-in emoji-scenes model."""
    return TextToImage.from_pretrained(path, device=device, dtype=dtype, **kwargs)
