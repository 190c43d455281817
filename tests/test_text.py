"""Tests for dallemini.text: the dalle-mini caption normalizer and the BART byte-level BPE helpers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from dallemini.config import TextConfig
from dallemini.errors import CheckpointError, ConfigError, InputError
from dallemini.text import (
    MASK_TOKEN,
    SPECIAL_TOKENS,
    HashtagSplitter,
    TextEncoder,
    TextNormalizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

COLOURS = ["red", "blue", "green", "yellow", "white"]
SUBJECTS = ["apple", "dog", "cat", "pizza", "car"]
PLACES = ["top left", "center", "bottom right", "top right"]
# 100 captions in the style of the built-in emoji dataset, plus some punctuation and numbers.
CAPTIONS = [
    f"A {s} on a {c} background, {p}!" if i % 3 else f"{s.title()} #{c}{s} at 12/{i % 9 + 1} (x{i})"
    for i, (s, c, p) in enumerate((s, c, p) for s in SUBJECTS for c in COLOURS for p in PLACES)
]


@pytest.fixture(scope="module")
def normalizer() -> TextNormalizer:
    return TextNormalizer(split_hashtags=False)


@pytest.fixture(scope="module")
def trained(normalizer: TextNormalizer) -> Tokenizer:
    return train_tokenizer(CAPTIONS, 400, normalizer)


@pytest.fixture()
def vocab_merges_dir(trained: Tokenizer, tmp_path: Path) -> Path:
    """vocab.json + merges.txt as BART ships them (merges.txt starts with a #version line)."""
    d = tmp_path / "bpe"
    d.mkdir()
    trained.model.save(str(d))
    assert (d / "merges.txt").read_text().startswith("#version")
    return d


# --------------------------------------------------------------------------------------------
# Normalizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello World", " hello world"),
        ("1,000,000 people", " 1000000 people"),  # commas inside numbers go
        ("costs 3,50 euro", " costs 3, 50 euro"),  # ...only before 3 digits
        ("<b>bold</b> text", " bold text"),  # html tags
        ("&amp;amp; fish", " & fish"),  # html entities, unescaped twice
        ("see http://x.com/a?b=1 now", " see now"),  # urls
        ('He said "hi" and `bye`', ' he said " hi " and " bye "'),  # quotes
        ("what?! really... yes;no", " what, really, yes, no"),  # punctuation -> commas
        ("a (big) {cat} [dog] | x = y + z ~ w", " a, big, cat, dog, x, y, z, w"),
        ("sooooo cool!!!!", " so cool"),  # 4+ repeats squeezed
        ("chapter VIII", " chapter viii"),  # 3 repeats kept
        ("year 2000000", " year 2000000"),  # digits never squeezed
        ("it's a dog's life, they'll", " it's a dog's life, they'll"),  # contractions kept
        ("rock 'n' roll", ' rock " n " roll'),  # other apostrophes are quotes
        ("version 1.5 of e.g. x", " version 1.5 of e.g, x"),  # inner dots kept
        ("born 12/25/1990", " born 12/25/1990"),  # dates kept
        ("red/blue", " red, blue"),  # other slashes are commas
        ("i love 🥑", " i love, avocado"),  # emoji -> :name: -> words
        ("❤️ heart", " red heart, heart"),
        ("[12] wiki text [3]", " wiki text"),  # WIT references
        ("well-known a-b-c", " well known a b, c"),
        ("50% & $5 * 3", " 50 % & $ 5 * 3"),  # spaced special characters
        ("snake_case back\\slash", " snake case back slash"),  # ignored characters
        ("Ｆｕｌｌ width café", " full width cafe"),  # unidecode
        ("cafÃ©", " cafe"),  # ftfy fixes mojibake
        ("   ,hello,  ", " hello"),  # leading/trailing commas
        ("tab\tand\nnewline", " tab and newline"),
        ("#sunset photo", " sunset photo"),  # hashtag without splitting
        ("", " "),
        ("???", " "),
    ],
)
def test_normalizer_rules(normalizer: TextNormalizer, raw: str, expected: str) -> None:
    assert normalizer(raw) == expected


def test_normalizer_always_starts_with_one_space(normalizer: TextNormalizer) -> None:
    for caption in CAPTIONS[:20]:
        out = normalizer(caption)
        assert out.startswith(" ") and not out.startswith("  ")
        assert normalizer(out) == out  # normalizing twice changes nothing on these


def test_normalizer_rejects_non_str(normalizer: TextNormalizer) -> None:
    with pytest.raises(InputError):
        normalizer(None)  # type: ignore[arg-type]


def test_person_runs_become_people(normalizer: TextNormalizer) -> None:
    assert normalizer("<PERSON> and <PERSON> walking") == " people walking"
    assert normalizer("<person>, <person> and <person> on a beach") == " people on a beach"


def test_person_replacement_is_deterministic_and_weighted() -> None:
    choices = {" a person", " someone", " somebody"}
    first = [TextNormalizer(split_hashtags=False)(f"<person> holds item {i}") for i in range(300)]
    again = [TextNormalizer(split_hashtags=False)(f"<person> holds item {i}") for i in range(300)]
    assert first == again
    picked = [next(c for c in choices if s.startswith(c + " holds")) for s in first]
    counts = {c: picked.count(c) for c in choices}
    # weights 282265 : 121194 : 12219 -> about 68% / 29% / 3%
    assert counts[" a person"] > counts[" someone"] > counts[" somebody"]
    assert 150 < counts[" a person"] < 250
    # another seed makes other (still deterministic) choices
    other = [
        TextNormalizer(split_hashtags=False, seed=1)(f"<person> holds item {i}") for i in range(300)
    ]
    assert other != first
    assert other == [
        TextNormalizer(split_hashtags=False, seed=1)(f"<person> holds item {i}") for i in range(300)
    ]


WORDS = ["the", "a", "hot", "dog", "stand", "cats", "cat", "sun", "set", "sunset", "s", "'s"]


def test_hashtag_splitting_with_word_list(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("".join(f"{w} {1000 - i}\n" for i, w in enumerate(WORDS)))  # `word count` lines
    norm = TextNormalizer(path)
    assert norm("#HotDogStand") == " hot dog stand"
    assert norm("#2022cats") == " 2022 cats"  # digit runs stay together
    assert norm("#sunset") == " sunset"  # the more frequent split wins
    assert norm("a #hot_dog's stand") == " a hot dog's stand"  # shielded apostrophe survives
    assert norm("#v1.5") == " v 1.5"  # shielded dot survives
    assert norm("#xyzzy") == " x y z z y"  # unknown letters: one a word, as wordninja does
    gz = tmp_path / "words.txt.gz"
    gz.write_bytes(gzip.compress("\n".join(WORDS).encode()))
    assert TextNormalizer(gz)("#hotdogstand") == " hot dog stand"
    assert TextNormalizer(WORDS)("#hotdogstand") == " hot dog stand"


def test_hashtag_splitter_reattaches_possessive_and_digits() -> None:
    splitter = HashtagSplitter(WORDS)
    assert splitter.split("dog's") == ["dog's"]
    assert splitter.split("12cats34") == ["12", "cats", "34"]
    assert splitter("hot-dog stand") == "hot dog stand"
    assert splitter.split("") == []


def test_hashtags_kept_whole_without_splitting(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS))
    assert TextNormalizer(path, split_hashtags=False)("#hotdogstand") == " hotdogstand"


def test_hashtag_word_list_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        TextNormalizer(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    norm = TextNormalizer(
        empty
    )  # a word list is read on the first hashtag (the original's is 34 MB)
    with pytest.raises(ConfigError, match="empty"):
        norm("#hotdog")


def test_hashtags_kept_whole_without_wordninja(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HashtagSplitter, "default_word_list", staticmethod(lambda: None))
    norm = TextNormalizer()
    assert norm("#HotDogStand #dog's") == " hotdogstand dog's"
    assert norm.hashtag_splitter is None


@pytest.mark.skipif(HashtagSplitter.default_word_list() is None, reason="wordninja not installed")
def test_default_word_list_splits_hashtags() -> None:
    norm = TextNormalizer()
    assert norm("#sunsetoverthebeach") == " sunset over the beach"
    assert norm.hashtag_splitter is HashtagSplitter.default()  # loaded once per process


# --------------------------------------------------------------------------------------------
# Tokenizer: training, files, round trips
# --------------------------------------------------------------------------------------------


def test_trained_tokenizer_layout(trained: Tokenizer, normalizer: TextNormalizer) -> None:
    assert [trained.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    size = trained.get_vocab_size(with_added_tokens=True)
    assert 261 < size <= 400
    assert trained.token_to_id(MASK_TOKEN) == size - 1  # <mask> last, as in BART
    for caption in CAPTIONS[:10]:
        text = normalizer(caption)
        enc = trained.encode(text)
        assert enc.ids[0] == 0 and enc.ids[-1] == 2
        assert 3 not in enc.ids
        assert trained.decode(enc.ids) == text  # byte-level BPE is lossless
    assert trained.encode(" a red apple").tokens[1].startswith("Ġ")  # the normalizer's space


def test_train_tokenizer_errors() -> None:
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(CAPTIONS, 100)
    with pytest.raises(InputError, match="no non-empty captions"):
        train_tokenizer(["", "  "], 300)


def test_vocab_merges_round_trip(
    trained: Tokenizer, vocab_merges_dir: Path, normalizer: TextNormalizer
) -> None:
    d = vocab_merges_dir
    loaded = [
        load_tokenizer(d),
        load_tokenizer(d / "vocab.json"),
        load_tokenizer(d / "merges.txt"),
        load_tokenizer(str(d / "vocab.json"), d / "merges.txt"),
    ]
    for caption in CAPTIONS[::7]:
        text = normalizer(caption)
        want = trained.encode(text).ids
        for tok in loaded:
            assert tok.encode(text).ids == want
    for tok in loaded:
        assert tok.token_to_id(MASK_TOKEN) == trained.token_to_id(MASK_TOKEN)


def test_merges_without_version_line(vocab_merges_dir: Path, trained: Tokenizer) -> None:
    merges = vocab_merges_dir / "merges.txt"
    merges.write_text("\n".join(merges.read_text().splitlines()[1:]) + "\n")
    assert (
        load_tokenizer(vocab_merges_dir).encode(" a red apple").ids
        == trained.encode(" a red apple").ids
    )


def test_tokenizer_json_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    written = save_tokenizer(trained, tmp_path / "model")
    assert written == tmp_path / "model" / "tokenizer.json"
    for tok in (load_tokenizer(tmp_path / "model"), load_tokenizer(written)):
        assert tok.encode(" a green cat, center").ids == trained.encode(" a green cat, center").ids
        assert tok.get_vocab_size(with_added_tokens=True) == trained.get_vocab_size(
            with_added_tokens=True
        )
    # the file carries no padding/truncation, even when saved from an encoder's padded copy
    save_tokenizer(TextEncoder(trained).tokenizer, tmp_path / "padded.json")
    data = json.loads((tmp_path / "padded.json").read_text())
    assert data["padding"] is None and data["truncation"] is None
    assert not list(tmp_path.glob("**/*.tmp*"))


def test_hand_written_bart_vocab(tmp_path: Path) -> None:
    """Ids from a vocab written by hand: an expectation that does not come from our own trainer."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for tok in ("Ġc", "at", "Ġcat", "Ġo", "Ġon"):
        vocab[tok] = len(vocab)
    vocab[MASK_TOKEN] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ c\na t\nĠc at\nĠ o\nĠo n\n")
    tok = load_tokenizer(tmp_path)
    assert tok.encode(" cat on cats").ids == [
        0,
        vocab["Ġcat"],
        vocab["Ġon"],
        vocab["Ġcat"],
        vocab["s"],
        2,
    ]
    assert tok.encode("cat").ids == [0, vocab["c"], vocab["at"], 2]  # no prefix space added
    assert tok.encode(" é").ids == [0, vocab["Ġ"], vocab["Ã"], vocab["©"], 2]  # bytes of é
    assert tok.token_to_id(MASK_TOKEN) == len(vocab) - 1


def test_matches_transformers_bart_tokenizer(
    vocab_merges_dir: Path, normalizer: TextNormalizer
) -> None:
    transformers = pytest.importorskip("transformers")
    bart = transformers.BartTokenizerFast.from_pretrained(
        str(vocab_merges_dir), local_files_only=True
    )
    ours = load_tokenizer(vocab_merges_dir)
    texts = [normalizer(c) for c in CAPTIONS[::9]]
    texts += [" xyz qq 123 ünï", " hello   world", ' a, b " c " d', ""]
    for text in texts:
        assert ours.encode(text).ids == bart(text)["input_ids"], text


def test_matches_min_dalle_tokenizer(vocab_merges_dir: Path) -> None:
    text_tokenizer = pytest.importorskip("min_dalle.text_tokenizer")
    vocab = json.loads((vocab_merges_dir / "vocab.json").read_text())
    merges = (vocab_merges_dir / "merges.txt").read_text().splitlines()[1:]
    theirs = text_tokenizer.TextTokenizer(vocab, merges)
    ours = load_tokenizer(vocab_merges_dir)
    for text in [" a red apple on a blue background", " pizza at the center", " yellow dog"]:
        assert ours.encode(text).ids == theirs.tokenize(text)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_tokenizer_errors(tmp_path: Path, vocab_merges_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path / "emptydir")
    (vocab_merges_dir / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"merges\.txt"):
        load_tokenizer(vocab_merges_dir)
    with pytest.raises(CheckpointError, match=r"merges\.txt"):
        load_tokenizer(vocab_merges_dir / "vocab.json")

    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / "tokenizer.json", '{"model": {"type": "BPE"')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(bad)
    _write(bad / "tokenizer.json", "{}")
    with pytest.raises(CheckpointError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(bad / "tokenizer.json")
    _write(bad / "tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_tokenizer(bad / "tokenizer.json")

    vm = tmp_path / "vm"
    vm.mkdir()
    _write(vm / "merges.txt", "#version: 0.2\na b\n")
    _write(vm / "vocab.json", "not json")
    with pytest.raises(CheckpointError, match=r"vocab\.json"):
        load_tokenizer(vm)
    _write(vm / "vocab.json", json.dumps(["a", "b"]))
    with pytest.raises(CheckpointError, match=r"vocab\.json"):
        load_tokenizer(vm)
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    _write(vm / "vocab.json", json.dumps({**specials, "a": 4, "b": 5, "ab": 6}))
    _write(vm / "merges.txt", "#version: 0.2\na b c\n")
    with pytest.raises(CheckpointError, match=r"merges\.txt line 2"):
        load_tokenizer(vm)
    _write(vm / "merges.txt", "#version: 0.2\na q\n")
    with pytest.raises(CheckpointError, match=r"merges\.txt"):
        load_tokenizer(vm)
    _write(vm / "merges.txt", "a b\n")
    _write(vm / "vocab.json", json.dumps({"<s>": 0, "</s>": 2, "a": 4, "b": 5, "ab": 6}))
    with pytest.raises(CheckpointError, match="<pad>"):
        load_tokenizer(vm)


# --------------------------------------------------------------------------------------------
# TextEncoder
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(trained: Tokenizer, normalizer: TextNormalizer) -> TextEncoder:
    return TextEncoder(trained, TextConfig(), normalizer)


def test_encoder_pads_to_max_length(encoder: TextEncoder, trained: Tokenizer) -> None:
    ids, mask = encoder(["A red apple on a white background!", "Blue dog, top left"])
    assert ids.shape == mask.shape == (2, 64)
    assert ids.dtype == mask.dtype == torch.long
    want = trained.encode(" a red apple on a white background").ids
    assert ids[0, : len(want)].tolist() == want
    assert ids[0, len(want) :].eq(1).all()
    assert mask[0].tolist() == [1] * len(want) + [0] * (64 - len(want))
    assert encoder.decode(ids[0]) == " a red apple on a white background"


def test_encoder_truncates_keeping_specials(encoder: TextEncoder) -> None:
    ids, mask = encoder("a red apple " * 50)
    assert ids.shape == (1, 64)
    assert ids[0, 0] == 0 and ids[0, 63] == 2
    assert mask.eq(1).all()
    assert 1 not in ids[0].tolist()


def test_encoder_short_max_length(trained: Tokenizer, normalizer: TextNormalizer) -> None:
    enc = TextEncoder(trained, TextConfig(max_length=8), normalizer)
    ids, mask = enc(["a", "a red apple on a white background " * 3])
    assert ids.shape == (2, 8)
    assert ids[1, -1] == 2 and mask[1].eq(1).all()
    assert enc.max_length == 8
    with pytest.raises(ConfigError):
        TextEncoder(trained, TextConfig(max_length=1))


def test_unconditional_pattern(encoder: TextEncoder) -> None:
    ids, mask = encoder.unconditional(3)
    assert ids.shape == mask.shape == (3, 64)
    assert ids.tolist() == [[0, 2] + [1] * 62] * 3
    assert mask.tolist() == [[1, 1] + [0] * 62] * 3
    ids[0, 0] = 5  # rows are independent tensors, not views of one
    assert ids[1, 0] == 0
    with pytest.raises(InputError):
        encoder.unconditional(0)


def test_empty_prompts_are_errors(encoder: TextEncoder) -> None:
    for bad in ("", "   \n", "???"):
        with pytest.raises(InputError, match="prompt 1"):
            encoder(["a cat", bad])
    with pytest.raises(InputError, match="no prompts"):
        encoder([])
    with pytest.raises(InputError, match="must be a str"):
        encoder([3])  # type: ignore[list-item]
    ids, mask = encoder(["a cat", ""], allow_empty=True)
    uncond_ids, uncond_mask = encoder.unconditional(1)
    assert torch.equal(ids[1], uncond_ids[0]) and torch.equal(mask[1], uncond_mask[0])


def test_encoder_vocab_size_and_config_checks(trained: Tokenizer) -> None:
    enc = TextEncoder(trained, TextConfig(), TextNormalizer(split_hashtags=False))
    assert enc.vocab_size == trained.get_vocab_size(with_added_tokens=True)
    ids, _ = enc(CAPTIONS)
    assert int(ids.max()) < enc.vocab_size
    with pytest.raises(CheckpointError, match="<pad>"):
        TextEncoder(trained, TextConfig(pad_token_id=5))


def test_encoder_without_normalization(trained: Tokenizer) -> None:
    enc = TextEncoder(trained, TextConfig(normalize=False))
    assert enc.normalizer is None
    ids, _ = enc(" a cat")
    assert ids[0, :4].tolist() == trained.encode(" a cat").ids
    assert enc.normalize("A Cat!") == "A Cat!"


def test_encoder_adds_missing_post_processor(trained: Tokenizer, tmp_path: Path) -> None:
    data = json.loads(trained.to_str())
    data["post_processor"] = None
    bare = Tokenizer.from_str(json.dumps(data))
    assert bare.encode(" a cat").ids[0] != 0
    enc = TextEncoder(bare, TextConfig(), TextNormalizer(split_hashtags=False))
    ids, _ = enc("a cat")
    assert ids[0, :4].tolist() == trained.encode(" a cat").ids


def test_encoder_from_path(trained: Tokenizer, tmp_path: Path) -> None:
    enc = TextEncoder(trained, TextConfig(), TextNormalizer(split_hashtags=False))
    enc.save(tmp_path)
    again = TextEncoder.from_path(tmp_path, normalizer=TextNormalizer(split_hashtags=False))
    assert torch.equal(enc(CAPTIONS[:5])[0], again(CAPTIONS[:5])[0])
