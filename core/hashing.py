"""Fingerprints: short, stable digests of settings and of the files a stage reads.

A stage's fingerprint (``pipelines.stages``) is built from these; a file's fingerprint is its
path, size and modification time, which changes whenever the file is rewritten, without
reading its bytes (checksums are for the shard manifest, where they are verified on read).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from core.layout import LABELS_DIR, data_files


def digest(value: Any) -> str:
    """A 16-hex-digit SHA-256 of ``value`` as key-sorted JSON."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (shard checksums, dataset digests)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_listing(path: Path) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of every data file at ``path`` (see ``data_files``)."""
    out = []
    for p in data_files(path):
        st = p.stat()
        name = str(p) if p == path else str(p.relative_to(path))
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def source_fingerprint(location: str | None) -> str:
    """The fingerprint of an input location: a local file or folder by its listing (its
    absolute path included, so another folder with the same files is another input); a remote
    URI (``s3a://``…) by its text only, since listing it is the reader's business; nothing
    configured, ``"none"``."""
    if not location:
        return "none"
    if "://" in location and not location.startswith("file://"):
        return digest(["uri", location])
    path = Path(location.removeprefix("file://")).expanduser().resolve()
    return digest([str(path), tree_listing(path)])


def labels_fingerprint(root: Path) -> str:
    """The fingerprint of the label store ``<root>/labels/`` (its imports; ``_quarantine`` and
    the import log are left out like every ``_`` path)."""
    return digest(tree_listing(root / LABELS_DIR))
