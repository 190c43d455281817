"""Text pipeline: dalle-mini's caption normalizer and the BART byte-level BPE tokenizer (HF `tokenizers`).

Captions go through `TextNormalizer` (the rules the released models were trained with), then a
byte-level BPE with BART's special tokens, padded/truncated to `TextConfig.max_length` tokens
including `<s>` and `</s>`. `TextEncoder` bundles both and returns the tensors the model takes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import emoji
import ftfy
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from unidecode import unidecode

from .config import TextConfig
from .errors import CheckpointError, ConfigError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "MASK_TOKEN",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "HashtagSplitter",
    "TextEncoder",
    "TextNormalizer",
    "load_tokenizer",
    "save_tokenizer",
    "train_tokenizer",
]

# BART's special tokens in id order (0..3); `<mask>` is always the last id of the vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
TOKENIZER_FILE = "tokenizer.json"

# --------------------------------------------------------------------------------------------
# Normalizer rules. Each pattern is one step of dalle-mini's TextNormalizer, in the same order.
# --------------------------------------------------------------------------------------------

# CC12M replaces names with <person>; the weights are word counts from Wikipedia.
_PERSON_RUN = re.compile(r"<person>([,\s]*(and)*[,\s]*<person>)+")
_PERSON_WORDS = ("a person", "someone", "somebody")
_PERSON_WEIGHTS = (282265, 121194, 12219)

_WIKI_REF_HEAD = re.compile(r"\A\s*\[\d+\]")
_WIKI_REF_TAIL = re.compile(r"\[\d+\]\s*\Z")
_HTML_TAG = re.compile(r"<[^<]+?>")
_URL = re.compile(r"http\S+")
_NUMBER_COMMA = re.compile(r"(\d),(\d{3})")

# Placeholders that shield a character from the punctuation rules; made of letters so that they
# stay inside one \w run (and so that no character in them repeats 4 times).
_TMP = "xtokx"
_DOT = f"{_TMP}dot{_TMP}"
_APOSTROPHE = f"{_TMP}quote{_TMP}"
_SLASH = f"{_TMP}slash{_TMP}"
_PLACEHOLDER = re.compile(f"({_DOT}|{_APOSTROPHE}|{_SLASH})")
_INNER_DOT = re.compile(r"(\w)\.(\w)")
_CONTRACTION = re.compile(r"'(?=(?:[stdm]|ll|re|ve)\b)")
_DATE_SLASH = re.compile(r"(\d)/(\d)")

_INNER_HYPHEN = re.compile(r"(\w)-(\w)")
_SPACED_CHARS = re.compile(r"([%&/$*])")
_HASHTAG = re.compile(r"#(\w+)")
_IGNORED_CHARS = re.compile(r"[_#\\]")
_QUOTE_CHARS = re.compile(r"['\"`]")
_PUNCTUATION = re.compile(r"[()\[\].,|:;?!=+~\-/{}]")
_REPEATED_CHAR = re.compile(r"(\D)\1{3,}")
_QUOTE_RUN = re.compile(r'(\s*"+\s*)+')
_COMMA_RUN = re.compile(r"(\s*,+\s*)+")
_WHITESPACE = re.compile(r"\s+")

# Hashtag splitter: pieces are runs of these characters; anything else separates words.
_HASHTAG_PIECE_SEP = re.compile(r"[^a-zA-Z0-9']+")
# A character missing from the word list costs this much (finite, so a path always exists).
_UNKNOWN_CHAR_COST = 1e6


class HashtagSplitter:
    """Splits run-together words ("#hotdogstand" -> "hot dog stand") by dynamic programming over word ranks.

    The cost of a word is log(rank + 1) in a frequency-ordered word list (Zipf's law); the split of
    least total cost wins, ties going to shorter words. As in dalle-mini (adapted from wordninja),
    runs of digits and a trailing "'s" are glued back onto the word before them.
    """

    def __init__(self, words: Iterable[str]) -> None:
        costs: dict[str, float] = {}
        for word in words:
            word = word.strip().lower()
            if word and word not in costs:
                costs[word] = math.log(len(costs) + 1)
        if not costs:
            raise ConfigError("hashtag word list is empty; give a frequency-ordered list of words")
        self._costs = costs
        self._max_len = max(len(w) for w in costs)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HashtagSplitter:
        """Read a frequency-ordered word list (one `word` or `word count` a line, optionally .gz)."""
        p = Path(path)
        try:
            raw = p.read_bytes()
            if p.suffix == ".gz":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"cannot read hashtag word list {p}: {e}; give a UTF-8 text file with one word a line"
            ) from e
        return cls(line.split()[0] for line in text.splitlines() if line.strip())

    @staticmethod
    def default_word_list() -> Path | None:
        """The word list shipped by the `wordninja` package (English Wikipedia ranks), if it is installed."""
        spec = importlib.util.find_spec("wordninja")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "wordninja" / "wordninja_words.txt.gz"
        return path if path.is_file() else None

    @classmethod
    def default(cls) -> HashtagSplitter | None:
        """A splitter over `default_word_list()`, loaded once per process; None without wordninja."""
        path = cls.default_word_list()
        return _cached_splitter(str(path)) if path is not None else None

    def __call__(self, text: str) -> str:
        """Split `text` into words and join them with single spaces."""
        return " ".join(self.split(text))

    def split(self, text: str) -> list[str]:
        """The words of `text`; non-alphanumeric characters (except ') separate pieces split on their own."""
        words: list[str] = []
        for piece in _HASHTAG_PIECE_SEP.split(text):
            words.extend(self._split_piece(piece))
        return words

    def _cost(self, word: str) -> float:
        cost = self._costs.get(word.lower())
        if cost is not None:
            return cost
        return _UNKNOWN_CHAR_COST if len(word) == 1 else math.inf

    def _split_piece(self, s: str) -> list[str]:
        n = len(s)
        best = [0.0] + [math.inf] * n  # best[i]: least cost of splitting s[:i]
        last = [0] * (n + 1)  # last[i]: length of the last word in that split
        for end in range(1, n + 1):
            for length in range(1, min(self._max_len, end) + 1):
                cost = best[end - length] + self._cost(s[end - length : end])
                if cost < best[end]:
                    best[end], last[end] = cost, length
        reversed_words: list[str] = []
        end = n
        while end > 0:
            word = s[end - last[end] : end]
            prev = reversed_words[-1] if reversed_words else None
            glue = prev is not None and word != "'"
            if glue and (prev == "'s" or (word[-1].isdigit() and prev[0].isdigit())):
                reversed_words[-1] = word + prev
            else:
                reversed_words.append(word)
            end -= last[end]
        return reversed_words[::-1]


@functools.lru_cache(maxsize=4)
def _cached_splitter(path: str) -> HashtagSplitter:
    return HashtagSplitter.from_file(path)


_DEFAULT = object()


class TextNormalizer:
    """dalle-mini's caption normalizer: the text the released models were trained on, always led by a space.

    Steps, in order: ftfy; HTML unescape (twice); emoji -> ":name:"; unidecode; lower case;
    CC12M `<person>` tokens; WIT `[n]` references; HTML tags; URLs; thousands commas; shield
    inner dots, contractions and dates; split `a-b`, space out `% & / $ *`; split hashtags; drop
    `_ # \\`; quotes -> `"`; other punctuation -> `,`; unshield; squeeze 4+ repeated characters;
    merge quotes and commas; collapse spaces; trim commas.

    Unlike the original, the `<person>` choice ("a person" / "someone" / "somebody", weighted as
    in the original) is deterministic: drawn from a `random.Random` seeded by `seed` and a SHA-256
    of the input text, so the same caption always normalizes the same way.

    `word_list` drives hashtag splitting: a path to a frequency-ordered word list (one `word` or
    `word count` a line, `.gz` allowed), an iterable of words in frequency order, or None for the
    list shipped by the `wordninja` package when it is installed (loaded on first use). Without
    any list, or with `split_hashtags=False`, a hashtag keeps its text minus the `#`.
    """

    def __init__(
        self,
        word_list: str | os.PathLike[str] | Iterable[str] | None = None,
        *,
        split_hashtags: bool = True,
        seed: int = 0,
    ) -> None:
        self.seed = int(seed)
        self._splitter: HashtagSplitter | object | None
        if not split_hashtags:
            self._splitter = None
        elif word_list is None:
            self._splitter = _DEFAULT  # resolved on the first hashtag
        elif isinstance(word_list, (str, os.PathLike)):
            if not Path(word_list).is_file():
                raise ConfigError(f"hashtag word list {word_list} does not exist")
            self._splitter = Path(word_list)  # read on the first hashtag (a large list takes ~1 s)
        else:
            self._splitter = HashtagSplitter(word_list)

    @property
    def hashtag_splitter(self) -> HashtagSplitter | None:
        """The splitter used for hashtags, or None when hashtags are kept whole."""
        if self._splitter is _DEFAULT:
            self._splitter = HashtagSplitter.default()
        elif isinstance(self._splitter, Path):
            self._splitter = _cached_splitter(str(self._splitter))
        return self._splitter  # type: ignore[return-value]

    def __call__(self, text: str) -> str:
        """Normalize one caption; the result starts with a space (" " for a caption with no words)."""
        if not isinstance(text, str):
            raise InputError(f"text to normalize must be a str, got {type(text).__name__}")
        original = text
        t = ftfy.fix_text(text)
        t = html.unescape(html.unescape(t))
        t = emoji.demojize(t)  # before unidecode, which would drop the emoji
        t = unidecode(t)
        t = t.lower()
        t = self._replace_person(t, original)
        t = _WIKI_REF_TAIL.sub("", _WIKI_REF_HEAD.sub("", t))
        t = _HTML_TAG.sub(" ", t)
        t = _URL.sub("", t)
        t = _NUMBER_COMMA.sub(r"\1\2", _NUMBER_COMMA.sub(r"\1\2", t))
        t = _INNER_DOT.sub(rf"\1{_DOT}\2", t)
        t = _CONTRACTION.sub(_APOSTROPHE, t)
        t = _DATE_SLASH.sub(rf"\1{_SLASH}\2", t)
        t = _INNER_HYPHEN.sub(r"\1 \2", t)
        t = _SPACED_CHARS.sub(r" \1 ", t)
        t = _HASHTAG.sub(self._expand_hashtag, t)
        t = _IGNORED_CHARS.sub(" ", t)
        t = _QUOTE_CHARS.sub(' " ', t)
        t = _PUNCTUATION.sub(",", t)
        t = t.replace(_DOT, ".").replace(_APOSTROPHE, "'").replace(_SLASH, "/")
        t = _REPEATED_CHAR.sub(r"\1", t)
        t = _QUOTE_RUN.sub(' " ', t)
        t = _COMMA_RUN.sub(", ", t)
        t = _WHITESPACE.sub(" ", t)
        t = t.strip()
        t = t.removesuffix(",")
        t = t.removeprefix(",")
        return " " + t.strip()

    def _replace_person(self, t: str, original: str) -> str:
        """CC12M: a run of `<person>` tokens becomes "people", each lone one a weighted (seeded) choice."""
        if "<person>" not in t:
            return t
        t = _PERSON_RUN.sub(" people ", t)
        digest = hashlib.sha256(f"{self.seed}\0{original}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        while "<person>" in t:
            word = rng.choices(_PERSON_WORDS, weights=_PERSON_WEIGHTS)[0]
            t = t.replace("<person>", f" {word} ", 1)
        return t

    def _expand_hashtag(self, match: re.Match[str]) -> str:
        """Drop the `#` and split the run-together words, leaving shielded characters intact."""
        body = match.group(1)
        splitter = self.hashtag_splitter
        if splitter is None:
            return body
        parts = _PLACEHOLDER.split(body)  # odd indices are the placeholders themselves
        return "".join(part if i % 2 else splitter(part) for i, part in enumerate(parts))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _configure_bart(tok: Tokenizer, names: Sequence[str] | None = None) -> Tokenizer:
    """Give a BPE model BART's byte-level pre-tokenizer, decoder, `<s> … </s>` post-processor and specials."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    where = f"{names[0]}: " if names else ""
    for token, token_id in (("<s>", bos), ("</s>", eos), ("<pad>", tok.token_to_id("<pad>"))):
        if token_id is None:
            raise CheckpointError(
                f"{where}the vocabulary has no {token!r} token; dallemini needs a BART-style "
                f"vocabulary with <s>, <pad> and </s>"
            )
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", eos), ("<s>", bos), trim_offsets=True, add_prefix_space=False
    )
    specials = [
        AddedToken(t, special=True) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None
    ]
    if tok.token_to_id(MASK_TOKEN) is not None:
        specials.append(AddedToken(MASK_TOKEN, lstrip=True, special=True))
    tok.add_special_tokens(specials)
    return tok


def _read_vocab_merges(vocab_path: Path, merges_path: Path) -> Tokenizer:
    """Build a BART tokenizer from `vocab.json` + `merges.txt`, naming the file at fault on errors."""
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise CheckpointError(f"tokenizer file {p} is missing")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{vocab_path} is not a valid vocab.json: {e}") from e
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(
            f"{vocab_path} is not a vocab.json: expected a non-empty token -> id object"
        )
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or v < 0), None)
    if bad is not None:
        raise CheckpointError(
            f"{vocab_path}: token {bad!r} has id {vocab[bad]!r}; ids must be integers >= 0"
        )
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {merges_path}: {e}") from e
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise CheckpointError(
                f"{merges_path} line {number} is not a merge (two tokens separated by one space): {line!r}"
            )
        merges.append((pair[0], pair[1]))
    try:
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    except Exception as e:  # tokenizers raises plain Exception for merges that name unknown tokens
        raise CheckpointError(f"{merges_path} does not match {vocab_path}: {e}") from e
    tok = Tokenizer(model)
    # As transformers does, special tokens missing from the vocabulary are appended (<mask> last).
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>",) if t not in vocab])
    if MASK_TOKEN not in vocab:
        tok.add_special_tokens([AddedToken(MASK_TOKEN, lstrip=True, special=True)])
    return _configure_bart(tok, [str(vocab_path)])


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except Exception as e:  # tokenizers raises plain Exception on malformed JSON
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from e


def load_tokenizer(
    path: str | os.PathLike[str], merges: str | os.PathLike[str] | None = None
) -> Tokenizer:
    """Load a BART byte-level BPE from a folder, a `tokenizer.json`, or `vocab.json` (+ `merges.txt` beside it or given).

    A folder is searched for `tokenizer.json`, then for `vocab.json` + `merges.txt` (the layout of
    BART, dalle-mini and min-dalle). Missing or corrupt files raise `CheckpointError` naming the file.
    """
    p = Path(path)
    if merges is not None:
        return _read_vocab_merges(p, Path(merges))
    if p.is_dir():
        if (p / TOKENIZER_FILE).is_file():
            return _read_tokenizer_json(p / TOKENIZER_FILE)
        if (p / "vocab.json").is_file() or (p / "merges.txt").is_file():
            return _read_vocab_merges(p / "vocab.json", p / "merges.txt")
        raise CheckpointError(
            f"no tokenizer in {p}: expected {TOKENIZER_FILE}, or vocab.json and merges.txt"
        )
    if not p.is_file():
        raise CheckpointError(f"tokenizer file {p} does not exist")
    if p.suffix == ".txt":  # a merges file: its vocabulary sits beside it
        return _read_vocab_merges(p.parent / "vocab.json", p)
    if p.name == TOKENIZER_FILE:
        return _read_tokenizer_json(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return _read_tokenizer_json(p)
    return _read_vocab_merges(p, p.parent / "merges.txt")


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> Path:
    """Write `tokenizer.json` (into `path` if it is a folder) atomically, without padding/truncation settings."""
    p = Path(path)
    if p.is_dir() or not p.suffix:
        p = p / TOKENIZER_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    clean = Tokenizer.from_str(tokenizer.to_str())
    clean.no_padding()
    clean.no_truncation()
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    clean.save(str(tmp))
    os.replace(tmp, p)
    return p


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int,
    normalizer: TextNormalizer | None = None,
    *,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a BART-style byte-level BPE on (normalized) captions: `<s>`,`<pad>`,`</s>`,`<unk>` = 0..3, `<mask>` last.

    `vocab_size` counts every token including `<mask>`; training may stop short of it when the
    captions run out of pairs seen `min_frequency` times.
    """
    smallest = len(SPECIAL_TOKENS) + 256 + 1
    if vocab_size < smallest:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {smallest} "
            f"(4 special tokens, 256 bytes, <mask>)"
        )
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for caption in captions:
            if not isinstance(caption, str):
                raise InputError(f"captions must be str, got {type(caption).__name__}")
            text = normalizer(caption) if normalizer is not None else caption
            if text.strip():
                count += 1
                yield text

    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <mask> is added after training so it gets the last id
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if count == 0:
        raise InputError("no non-empty captions to train the tokenizer on")
    tok.add_special_tokens([AddedToken(MASK_TOKEN, lstrip=True, special=True)])
    return _configure_bart(tok)


class TextEncoder:
    """Captions -> (input_ids, attention_mask) LongTensors [B, max_length]: normalizer + BPE + `<s>…</s>` + padding.

    Token ids are not checked against a model's embedding table: compare `vocab_size` with it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: TextConfig | None = None,
        normalizer: TextNormalizer | None = None,
    ) -> None:
        config = config if config is not None else TextConfig()
        if config.max_length < 2:
            raise ConfigError(
                f"text.max_length must be at least 2 (<s> and </s>), got {config.max_length}"
            )
        self.config = config
        self.normalizer = (
            normalizer if normalizer is not None or not config.normalize else TextNormalizer()
        )
        tok = Tokenizer.from_str(
            tokenizer.to_str()
        )  # our own copy: padding settings are per object
        for token, expected in (
            ("<s>", config.bos_token_id),
            ("<pad>", config.pad_token_id),
            ("</s>", config.eos_token_id),
        ):
            got = tok.token_to_id(token)
            if got != expected:
                raise CheckpointError(
                    f"the tokenizer maps {token!r} to {got}, but the text config expects id {expected}; "
                    f"use the tokenizer the model was trained with"
                )
        if tok.post_processor is None:
            tok.post_processor = processors.RobertaProcessing(
                ("</s>", config.eos_token_id), ("<s>", config.bos_token_id), add_prefix_space=False
            )
        tok.enable_truncation(max_length=config.max_length)
        tok.enable_padding(length=config.max_length, pad_id=config.pad_token_id, pad_token="<pad>")
        empty = tok.encode("").ids
        if empty[:2] != [config.bos_token_id, config.eos_token_id]:
            raise CheckpointError(
                f"the tokenizer encodes an empty caption as {empty[:4]}…, not <s> </s>: its post-processor "
                f"does not add BART's <s> … </s>"
            )
        self.tokenizer = tok

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        config: TextConfig | None = None,
        normalizer: TextNormalizer | None = None,
    ) -> TextEncoder:
        """Build an encoder from tokenizer files (see `load_tokenizer`)."""
        return cls(load_tokenizer(path), config, normalizer)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can emit (special tokens included): the model's encoder vocab must be at least this."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_length(self) -> int:
        """Length of every encoded row, `<s>` and `</s>` included."""
        return self.config.max_length

    def normalize(self, text: str) -> str:
        """The text the tokenizer sees: normalized when the config says so."""
        return self.normalizer(text) if self.normalizer is not None else text

    def __call__(
        self, texts: str | Sequence[str], *, allow_empty: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts; an empty prompt raises `InputError` unless `allow_empty` (then it is the unconditional row)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise InputError("no prompts given; pass at least one caption")
        prepared: list[str] = []
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise InputError(f"prompt {i} must be a str, got {type(text).__name__}")
            if not text.strip():
                if allow_empty:
                    prepared.append("")
                    continue
                raise InputError(
                    f"prompt {i} is empty; describe the image you want (e.g. 'a red apple on a table')"
                )
            normalized = self.normalize(text)
            if not normalized.strip() and not allow_empty:
                raise InputError(
                    f"prompt {i} ({text!r}) has no words left after text normalization; use letters or digits"
                )
            prepared.append(normalized)
        return self._encode(prepared)

    def unconditional(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption, not normalized, as in the original: ids [<s>, </s>, <pad>…], mask [1, 1, 0…]."""
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        ids, mask = self._encode([""])
        return ids.expand(batch, -1).clone(), mask.expand(batch, -1).clone()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Token ids back to text, special tokens dropped (for logs and debugging)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer as `tokenizer.json` (see `save_tokenizer`)."""
        return save_tokenizer(self.tokenizer, path)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(texts)
        for text, e in zip(texts, encodings, strict=True):
            if e.overflowing:  # cut to max_length: say so rather than drop words silently
                log.warning(
                    "prompt %r is longer than the model's %d text tokens; it reads only the first %d",
                    text.strip() if len(text) <= 80 else text.strip()[:77] + "...",
                    self.max_length,
                    self.max_length,
                )
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask
