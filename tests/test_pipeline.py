"""TextToImage: CLIP reranking, chunked batches, image completion (init_image + keep_rows), streaming."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dallemini.checkpoints import load_parts
from dallemini.checkpoints.native import save_model_dir, write_examples, write_vocabulary
from dallemini.config import SamplingConfig
from dallemini.errors import CheckpointError, InputError
from dallemini.models.clip import BuiltinClipScorer, HFClipScorer, SmallClip
from dallemini.pipeline import TextToImage, load_pipeline
from dallemini.random_model import create_random_model
from tests.models.test_clip import save_tiny_hf_clip, tiny_config

PROMPTS = ["a red cat", "blue"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models run fastest on one thread (conftest restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random_model(tmp_path_factory.mktemp("pipe") / "tiny", preset="tiny")


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> TextToImage:
    return TextToImage.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return save_tiny_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-clip")


@pytest.fixture(scope="module")
def with_builtin_clip(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model directory plus a random built-in CLIP (clip section + clip.safetensors)."""
    parts = load_parts(tiny_dir)
    clip = tiny_config(vocab_size=parts.config.bart.encoder_vocab_size, max_text_length=32)
    torch.manual_seed(1)
    states = dict(parts.states, clip=SmallClip(clip).state_dict())
    dst = tmp_path_factory.mktemp("builtin") / "tiny-clip"
    return save_model_dir(dst, replace(parts.config, clip=clip), states, parts.tokenizer_json)


def blocks_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A non-square picture of coloured blocks (so encoding it gives varied codes)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.NEAREST
    )


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Reranking
# --------------------------------------------------------------------------------------------


def test_rerank_follows_a_direct_scorer_call(tiny_dir: Path, hf_clip: Path) -> None:
    pipe = TextToImage.from_pretrained(tiny_dir, device="cpu", clip=hf_clip)
    assert isinstance(pipe.scorer, HFClipScorer)
    plain = pipe(PROMPTS, num_images=5, seed=3, rerank=False)
    assert [[r.seed for r in g] for g in plain] == [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert all(r.score is None for g in plain for r in g)
    ranked = pipe(PROMPTS, num_images=5, seed=3)
    for text, before, after in zip(PROMPTS, plain, ranked, strict=True):
        direct = pipe.scorer.score([r.image for r in before], [text])[0]
        order = torch.argsort(direct, descending=True, stable=True).tolist()
        assert order != list(range(5))  # reranking really moved images here
        assert [r.seed for r in after] == [before[j].seed for j in order]
        scores = [r.score for r in after]
        assert scores == sorted(scores, reverse=True)
        torch.testing.assert_close(torch.tensor(scores), direct[order])
        for k, j in enumerate(order):
            assert after[k].prompt == text
            assert after[k].image.tobytes() == before[j].image.tobytes()
            assert after[k].tokens == before[j].tokens
    one = pipe(PROMPTS[0], num_images=5, seed=3)  # one prompt: a flat list, ranked the same way
    assert [r.seed for r in one] == [r.seed for r in ranked[0]]


def test_builtin_clip_and_clip_choice(
    tiny_dir: Path, with_builtin_clip: Path, hf_clip: Path, tmp_path: Path
) -> None:
    own = TextToImage.from_pretrained(with_builtin_clip, device="cpu")
    assert isinstance(own.scorer, BuiltinClipScorer)  # the model directory's own CLIP by default
    res = own("a red cat", num_images=4, seed=0)
    scores = [r.score for r in res]
    assert None not in scores and scores == sorted(scores, reverse=True)
    direct = own.scorer.score([r.image for r in res], ["a red cat"])[0]
    torch.testing.assert_close(torch.tensor(scores), direct)
    # clip= overrides the built-in one; a model directory with a CLIP also serves as clip=
    assert isinstance(
        TextToImage.from_pretrained(with_builtin_clip, device="cpu", clip=hf_clip).scorer,
        HFClipScorer,
    )
    other = TextToImage.from_pretrained(tiny_dir, device="cpu", clip=with_builtin_clip)
    assert isinstance(other.scorer, BuiltinClipScorer)
    assert [r.score for r in other("a red cat", num_images=4, seed=0)] == scores
    # no CLIP anywhere: no reranker, images in seed order without scores
    bare = TextToImage.from_pretrained(tiny_dir, device="cpu")
    assert bare.scorer is None
    assert [(r.seed, r.score) for r in bare("a red cat", num_images=3, seed=0)] == [
        (0, None),
        (1, None),
        (2, None),
    ]
    with pytest.raises(CheckpointError, match="does not exist"):
        TextToImage.from_pretrained(tiny_dir, device="cpu", clip=tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no CLIP"):
        TextToImage.from_pretrained(tiny_dir, device="cpu", clip=tmp_path)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_chunks_give_the_same_images(pipe: TextToImage) -> None:
    prompts = ["a cat", "a dog", "pizza on a red background, top"]
    together = pipe(prompts, num_images=3, seed=11)
    calls: list[tuple[int, int]] = []
    one_by_one = pipe(prompts, num_images=3, seed=11, max_batch=1)
    fours = pipe(prompts, num_images=3, seed=11, max_batch=4, progress=lambda *a: calls.append(a))
    for got in (one_by_one, fours):
        for a, b in zip(together, got, strict=True):
            assert [(r.prompt, r.seed, r.tokens) for r in a] == [
                (r.prompt, r.seed, r.tokens) for r in b
            ]
            assert [r.image.tobytes() for r in a] == [r.image.tobytes() for r in b]
    # 9 images in chunks of 4, 4, 1: three runs of 16 decoding steps, reported one step at a time
    assert calls == [(i, 48) for i in range(1, 49)]
    for bad in (0, -1, 1.5):
        with pytest.raises(InputError, match="max_batch"):
            pipe("a cat", max_batch=bad)  # type: ignore[arg-type]


def test_a_sampling_config_gives_the_keywords_images(pipe: TextToImage) -> None:
    given = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "condition_scale": 3.0}
    settings = SamplingConfig(**given)
    assert pipe.sampling(**given) == settings  # the sugar builds the same object
    by_keywords = pipe(PROMPTS, num_images=2, seed=3, **given)
    by_object = pipe(PROMPTS, num_images=2, seed=3, sampling=settings)
    default = pipe(PROMPTS, num_images=2, seed=3)
    tokens = [[r.tokens for r in g] for g in by_keywords]
    assert tokens == [[r.tokens for r in g] for g in by_object]
    assert tokens != [[r.tokens for r in g] for g in default]  # the settings did change something
    for a, b in zip(by_keywords, by_object, strict=True):
        assert [r.image.tobytes() for r in a] == [r.image.tobytes() for r in b]
    # keywords override the object's fields: sampling=S, top_k=1 is S with top_k 1
    greedy = pipe(PROMPTS, num_images=2, seed=3, sampling=settings, top_k=1)
    same = pipe(PROMPTS, num_images=2, seed=3, sampling=replace(settings, top_k=1))
    assert [[r.tokens for r in g] for g in greedy] == [[r.tokens for r in g] for g in same]
    # streaming takes the object too; its last frame is the call's images
    frames = list(pipe.stream("a red cat", num_images=2, seed=3, sampling=settings))
    assert frames[-1].tokens.tolist() == tokens[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [("temperature", 0.0), ("top_k", -1), ("top_p", 1.5), ("condition_scale", float("nan"))],
)
def test_bad_sampling_keywords_raise_the_configs_error(
    pipe: TextToImage, name: str, value: float
) -> None:
    with pytest.raises(InputError) as from_config:
        SamplingConfig(**{name: value})
    message = str(from_config.value)
    assert message.startswith(f"{name} must be a number")
    for call in (
        lambda: pipe("a cat", **{name: value}),
        lambda: list(pipe.stream("a cat", **{name: value})),
        lambda: pipe("a cat", sampling=SamplingConfig(), **{name: value}),
    ):
        with pytest.raises(InputError) as from_call:
            call()
        assert str(from_call.value) == message
    with pytest.raises(InputError, match="sampling must be a SamplingConfig, got dict"):
        pipe("a cat", sampling={name: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Image completion
# --------------------------------------------------------------------------------------------


def test_completion_keeps_the_init_images_rows(pipe: TextToImage, tmp_path: Path) -> None:
    g = pipe.config.vqgan.grid_size
    f = pipe.config.vqgan.downsample_factor
    img = blocks_image(0)
    codes = pipe.encode_images([img])[0]
    assert codes.shape == (g * g,)
    recon = pipe.decode(codes[None])[0]
    keep = 2
    done = pipe("a cat", num_images=4, seed=0, init_image=img, keep_rows=keep)
    for r in done:
        assert r.tokens[: keep * g] == codes[: keep * g].tolist()  # kept rows: exactly the codes
    assert len({tuple(r.tokens[keep * g :]) for r in done}) == 4  # the rest is sampled per seed
    # Pixels: the tiny random VQGAN's decoder mixes the whole 4x4 latent (mid attention, GroupNorm,
    # a receptive field wider than the grid), so kept codes give close, not equal, pixels. Compare the
    # first token row (a full row away from the boundary) with the reconstruction, and with the same
    # seeds generated without the init image as the yardstick of "unrelated".
    top = slice(0, (keep - 1) * f)
    err = np.abs(pixels([r.image for r in done]) - pixels([recon]))[:, top].mean()
    control = pipe("a cat", num_images=4, seed=0)
    err_control = np.abs(pixels([r.image for r in control]) - pixels([recon]))[:, top].mean()
    assert err < 4.0 and err < 0.85 * err_control, (err, err_control)
    # keeping every row gives back the plain VQGAN reconstruction, pixel for pixel (decoded as a
    # batch of two, like the reconstruction here: conv results may round differently per batch size)
    full = pipe("a cat", num_images=2, seed=5, init_image=img, keep_rows=g)
    assert [r.tokens for r in full] == [codes.tolist()] * 2
    twice = pipe.decode(codes.expand(2, -1))
    assert [r.image.tobytes() for r in full] == [im.tobytes() for im in twice]
    assert np.abs(pixels([full[0].image]) - pixels([recon])).max() <= 1
    # a file path works like the image; keep_rows=0 keeps nothing: plain generation
    path = tmp_path / "init.png"
    img.save(path)
    assert pipe("a cat", num_images=4, seed=0, init_image=path, keep_rows=keep) == done
    plain = pipe("a cat", num_images=2, seed=0, init_image=img, keep_rows=0)
    assert [r.tokens for r in plain] == [r.tokens for r in control[:2]]


def test_one_init_image_per_prompt(pipe: TextToImage) -> None:
    g = pipe.config.vqgan.grid_size
    images = [blocks_image(1), blocks_image(2, (64, 64))]
    codes = pipe.encode_images(images)
    assert not torch.equal(codes[0], codes[1])
    out = pipe(["a cat", "a dog"], num_images=2, seed=0, init_image=images, keep_rows=1)
    for p, group in enumerate(out):
        assert all(r.tokens[:g] == codes[p, :g].tolist() for r in group)
    chunked = pipe(
        ["a cat", "a dog"], num_images=2, seed=0, init_image=images, keep_rows=1, max_batch=3
    )
    assert [[r.tokens for r in x] for x in chunked] == [[r.tokens for r in x] for x in out]


def test_stream_with_an_init_image(pipe: TextToImage) -> None:
    img = blocks_image(3)
    frames = list(pipe.stream("a cat", num_images=2, seed=4, every=4, init_image=img, keep_rows=2))
    assert [f.done for f in frames] == [12, 16]
    final = pipe("a cat", num_images=2, seed=4, init_image=img, keep_rows=2)
    assert [im.tobytes() for im in frames[-1].images] == [r.image.tobytes() for r in final]
    # the first frame has three token rows: below them it is grey
    assert frames[0].images[0].crop((0, 48, 64, 64)).getextrema() == ((128, 128),) * 3


def test_completion_errors(pipe: TextToImage, tmp_path: Path) -> None:
    img = blocks_image(0)
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(InputError, match=r"keep_rows must be an integer from 0 to 4"):
            pipe("a cat", init_image=img, keep_rows=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="needs an init_image"):
        pipe("a cat", keep_rows=2)
    with pytest.raises(InputError, match="2 init images given for 1 prompts"):
        pipe("a cat", init_image=[img, img], keep_rows=2)
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    with pytest.raises(InputError, match="cannot read image"):
        pipe("a cat", init_image=text, keep_rows=1)
    with pytest.raises(InputError, match="cannot read image"):
        pipe("a cat", init_image=tmp_path / "missing.png", keep_rows=1)
    with pytest.raises(InputError, match="PIL image or a file path"):
        pipe("a cat", init_image=np.zeros((64, 64, 3)), keep_rows=1)  # type: ignore[arg-type]


def test_unknown_words_come_from_the_model_vocabulary(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_dir, d)
    write_vocabulary(d, [" avocado on a red background, top left", " a blue cat"])
    write_examples(d, ["a blue cat"], "cats and avocados")
    pipe = TextToImage.from_pretrained(d, device="cpu")
    assert not pipe.is_builtin and pipe.examples is not None
    assert pipe.examples.prompts == ("a blue cat",)
    # normalized as the model's text is (case, punctuation, hyphens); each word once, in order;
    # function words ("the", "of", "an") that the captions never used are not reported
    prompt = "An ARMCHAIR in the shape of an Avocado, armchair-shaped!"
    assert pipe.unknown_words(prompt) == ["armchair", "shape", "shaped"]
    assert pipe.unknown_words("Avocado on a RED background, top-left") == []
    # and the model reads the prompt without them
    assert pipe.read_prompt(prompt) == (" avocado", [])  # "an", "in", "the": not in it either
    assert (
        pipe.read_prompt("there is a cat: on a blue background")[0]
        == " a cat, on a blue background"
    )
    assert pipe.read_prompt("armchair")[0] == " armchair"  # nothing known: as written
    ids, _ = pipe.text([pipe.read_prompt(prompt)[0]])
    assert torch.equal(ids, pipe.text(["avocado"])[0])


def test_a_model_without_a_vocabulary_reports_no_unknown_words(pipe: TextToImage) -> None:
    assert pipe.model_dir is not None and pipe.vocabulary is None and pipe.examples is None
    assert pipe.unknown_words("an armchair in the shape of an avocado") == []


def test_the_builtin_model_names_the_words_it_does_not_know() -> None:
    pipe = load_pipeline(device="cpu")
    assert pipe.is_builtin and pipe.examples is not None and len(pipe.examples.prompts) >= 4
    assert pipe.unknown_words("an armchair in the shape of an avocado") == ["armchair", "shape"]
    assert pipe.unknown_words("a photo of a kitty in the upper left corner") == []  # read as cat
    assert pipe.read_prompt("a kitty on a navy background")[1] == [
        ("kitty", "cat"),
        ("navy", "blue"),
    ]
    assert pipe.unknown_words("a photo of a sedan in the upper left corner") == ["sedan"]
    assert pipe.unknown_words("strawberry on a blue background, top left") == []
    assert all(pipe.unknown_words(p) == [] for p in pipe.examples.prompts)
