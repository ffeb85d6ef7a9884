"""The one featurizer: query normalization and hashed n-gram ids.

The same object normalizes raw text at ingest, turns queries into ids when shards are written,
and serves the logged model, so training and serving see identical features
(docs/architecture.md, "MLflow record").
Hashing uses CRC-32, which is stable across processes, machines and Python versions (Python's
own ``hash`` is salted per process).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

NORMALIZATION = "nfkc-casefold-v1"
FEATURIZER_VERSION = 1

# C0/C1 controls, zero-width and bidi marks, line/paragraph separators, BOM.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2028\u2029\u2060\ufeff]")
_SPACE = re.compile(r"\s+")


def normalize_query(text: str | None) -> str | None:
    """NFKC, control characters to spaces, case folding, whitespace collapsed and trimmed."""
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text)
    text = _CONTROL.sub(" ", text)
    text = text.casefold()
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class Featurizer:
    """Hashed word n-grams (1..``word_ngrams``) and optional fastText-style character n-grams."""

    num_buckets: int = 1 << 20
    word_ngrams: int = 2
    char_ngram_min: int = 0
    char_ngram_max: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> Featurizer:
        """From ``featurizer`` config (any object with the four fields)."""
        return cls(cfg.num_buckets, cfg.word_ngrams, cfg.char_ngram_min, cfg.char_ngram_max)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Featurizer:
        """Rebuild from :meth:`settings` (a manifest or a logged model)."""
        if (
            settings.get("version") != FEATURIZER_VERSION
            or settings.get("normalization") != NORMALIZATION
        ):
            raise ValueError(
                f"featurizer settings {settings} were written by another featurizer version "
                f"(this one is version {FEATURIZER_VERSION}, {NORMALIZATION})"
            )
        return cls(
            num_buckets=int(settings["num_buckets"]),
            word_ngrams=int(settings["word_ngrams"]),
            char_ngram_min=int(settings["char_ngram_min"]),
            char_ngram_max=int(settings["char_ngram_max"]),
        )

    def settings(self) -> dict[str, Any]:
        """Everything that decides the ids; a shard and a model must agree on it exactly."""
        return {"version": FEATURIZER_VERSION, "normalization": NORMALIZATION, **asdict(self)}

    def tokens(self, query: str) -> list[str]:
        """The n-gram strings of an already normalized query (each prefixed by its kind)."""
        words = query.split(" ") if query else []
        grams = [
            f"w{n}:" + " ".join(words[i : i + n])
            for n in range(1, self.word_ngrams + 1)
            for i in range(len(words) - n + 1)
        ]
        if self.char_ngram_min:
            for word in words:
                padded = f"<{word}>"
                for n in range(self.char_ngram_min, self.char_ngram_max + 1):
                    grams.extend(f"c:{padded[i : i + n]}" for i in range(len(padded) - n + 1))
        return grams

    def ids(self, query: str) -> np.ndarray:
        """int32 bucket ids of a normalized query, in n-gram order."""
        buckets = self.num_buckets
        return np.fromiter(
            (zlib.crc32(g.encode("utf-8")) % buckets for g in self.tokens(query)), dtype=np.int32
        )

    def ids_raw(self, text: str | None) -> np.ndarray:
        """Ids of raw text: normalized first, exactly as ingest does."""
        return self.ids(normalize_query(text) or "")

    def bags(self, id_lists: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids and offsets for ``EmbeddingBag`` from a batch of id arrays."""
        arrays = list(id_lists)
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        flat = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
        return flat, offsets
