"""WordNet 3 as data: its synsets' lemmas (the augment stage's synonyms) and glosses with their
lexicographer files (the real-text case the generator builds, ``generate.source=wordnet``).

A ``data.<pos>`` line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id …] p_cnt
[pointers …] [frames …] | gloss``, with ``w_cnt`` in hex; the licence header lines start with
spaces. The lexicographer file number indexes :data:`LEXNAMES` (``noun.animal``,
``verb.motion``, …), which is the gloss's label.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import EnvironmentProblem

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip
"""WordNet 3.0's lexicographer files, in the order of their numbers (its ``lexnames``)."""


@dataclass(frozen=True)
class Synset:
    """One synset: its lemmas (lower case, ``_`` as spaces), lexicographer file and definition
    (the gloss without its quoted examples)."""

    lemmas: tuple[str, ...]
    lexname: str
    definition: str


def parse_line(line: str) -> Synset | None:
    """The synset of one ``data.<pos>`` line; ``None`` for a licence header line."""
    if not line or line[0] == " ":
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split(" ", 4 + 2 * 255)
    lexnum = int(fields[1])
    count = int(fields[3], 16)
    lemmas: list[str] = []
    for j in range(count):
        lemma = fields[4 + 2 * j].split("(", 1)[0].replace("_", " ").lower()
        if lemma and lemma not in lemmas:
            lemmas.append(lemma)
    lexname = LEXNAMES[lexnum] if lexnum < len(LEXNAMES) else f"lex.{lexnum:02d}"
    return Synset(tuple(lemmas), lexname, definition_of(gloss))


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: its ``;``-separated parts up to the first quoted example."""
    parts = []
    for part in gloss.strip().split(";"):
        part = part.strip()
        if not part or part.startswith('"'):
            break
        parts.append(part)
    return "; ".join(parts)


def parse_wordnet_data(lines: Iterable[str]) -> list[list[str]]:
    """The synonym groups (a synset's lemmas, when it has more than one) of one data file."""
    return [list(s.lemmas) for s in map(parse_line, lines) if s is not None and len(s.lemmas) > 1]


def _files(wordnet_dir: str, setting: str, otherwise: str) -> list[Path]:
    root = Path(wordnet_dir)
    missing = [name for name in WORDNET_FILES if not (root / name).is_file()]
    if missing:
        raise EnvironmentProblem(
            f"{setting.split('.')[0]}: WordNet not found in {root} (missing {', '.join(missing)}): "
            "install Debian's wordnet-base package (apt-get install wordnet-base, or `make "
            f"wordnet`), point {setting} at a WordNet 3 dict folder{otherwise}"
        )
    return [root / name for name in WORDNET_FILES]


def read_synsets(
    wordnet_dir: str, setting: str = "generate.wordnet_dir", otherwise: str = ""
) -> Iterator[Synset]:
    """Every synset of the four data files of ``wordnet_dir``, file by file, in file order; a
    missing file is an :class:`EnvironmentProblem` naming ``setting`` (and ``otherwise``)."""
    for path in _files(wordnet_dir, setting, otherwise):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                synset = parse_line(line.rstrip("\n"))
                if synset is not None:
                    yield synset


@functools.lru_cache(maxsize=2)
def load_synonyms(wordnet_dir: str) -> dict[str, tuple[str, ...]]:
    """Single-word lemma → its WordNet synonyms (other lemmas of its synsets), sorted."""
    table: dict[str, set[str]] = {}
    synsets = read_synsets(wordnet_dir, "augment.wordnet_dir", ", or set augment.enabled=false")
    for synset in synsets:
        if len(synset.lemmas) < 2:
            continue
        for w in synset.lemmas:
            if " " not in w:
                table.setdefault(w, set()).update(x for x in synset.lemmas if x != w)
    return {w: tuple(sorted(s)) for w, s in table.items() if s}
