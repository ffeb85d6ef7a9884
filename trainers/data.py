"""The shard reader: manifest-checked Parquet shards straight into ``EmbeddingBag`` tensors.

Each rank takes its share of the manifest's files, refuses any whose sha256 or featurizer
settings differ from the manifest, and reads the ``ids`` list column with pyarrow into one flat
id array plus row offsets. Batches are gathered with vectorized numpy; no per-example Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.errors import DataError
from core.hashing import sha256_of


def load_manifest(shard_dir: Path) -> dict[str, Any]:
    path = shard_dir / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the shard manifest ({exc})") from exc


def check_featurizer(manifest: dict[str, Any], settings: dict[str, Any], where: str) -> None:
    """Refuse shards written with other featurizer settings than the model's."""
    if manifest["featurizer"] != settings:
        raise DataError(
            f"{where}: shards were featurized with {manifest['featurizer']}, the model expects "
            f"{settings}; rerun the shard stage (--from shard --force)"
        )


@dataclass
class ShardData:
    """A rank's rows: flat ids, row offsets (len rows + 1), labels and weights."""

    ids: np.ndarray
    row_offsets: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls) -> ShardData:
        """No rows (async mode's server trains on none)."""
        return cls(
            ids=np.zeros(0, dtype=np.int32), row_offsets=np.zeros(1, dtype=np.int64),
            labels=np.zeros(0, dtype=np.int64), weights=np.zeros(0, dtype=np.float32),
        )  # fmt: skip

    def sample(self, fraction: float, seed: int) -> ShardData:
        """A seeded random ``fraction`` of the rows (at least one), for learning curves."""
        if fraction >= 1.0 or self.num_rows == 0:
            return self
        k = max(1, int(round(fraction * self.num_rows)))
        rows = np.sort(np.random.default_rng(seed).choice(self.num_rows, size=k, replace=False))
        ids, offsets, labels, weights = self.batch(rows)
        return ShardData(
            ids=ids.numpy().astype(np.int32),
            row_offsets=np.append(offsets.numpy(), len(ids)).astype(np.int64),
            labels=labels.numpy(),
            weights=weights.numpy(),
        )

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(ids, offsets, labels, weights)`` tensors for the given row indices."""
        starts = self.row_offsets[rows]
        lengths = self.row_offsets[rows + 1] - starts
        offsets = np.zeros(len(rows), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        total = int(lengths.sum())
        # Position j of the batch's flat ids reads ids[starts[r] + (j - offsets[r])].
        gather = np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)
        return (
            torch.from_numpy(self.ids[gather].astype(np.int64, copy=False)),
            torch.from_numpy(offsets),
            torch.from_numpy(self.labels[rows].astype(np.int64, copy=False)),
            torch.from_numpy(self.weights[rows].astype(np.float32, copy=False)),
        )


def check_shard(shard_dir: Path, entry: dict[str, Any]) -> Path:
    """The shard file of a manifest entry, refused when its sha256 is not the manifest's."""
    path = shard_dir / entry["path"]
    if sha256_of(path) != entry["sha256"]:
        raise DataError(
            f"{path}: sha256 does not match the manifest (the shard changed after it was "
            "written); rerun the shard stage (--from shard --force)"
        )
    return path


def check_shards(shard_dir: Path, manifest: dict[str, Any]) -> None:
    """Every shard of every split against the manifest: on the driver, before any training
    process starts, so that a changed shard fails the stage in one line naming the file."""
    for split in manifest["splits"].values():
        for entry in split["files"]:
            check_shard(shard_dir, entry)


def read_split(
    shard_dir: Path, split: str, rank: int, world_size: int, *, verify: bool = True
) -> ShardData:
    """This rank's share of ``split``: whole files when they divide evenly among the ranks,
    else every ``world_size``-th row of all files (tiny data)."""
    manifest = load_manifest(shard_dir)
    entries = manifest["splits"][split]["files"]
    by_file = len(entries) >= world_size and len(entries) % world_size == 0
    mine = entries[rank::world_size] if by_file else entries
    tables = []
    for entry in mine:
        path = check_shard(shard_dir, entry) if verify else shard_dir / entry["path"]
        tables.append(pq.read_table(path, columns=["ids", "label", "weight"]))
    table = pa.concat_tables(tables) if tables else pa.table(
        {"ids": pa.array([], pa.list_(pa.int32())), "label": pa.array([], pa.int32()),
         "weight": pa.array([], pa.float32())}
    )  # fmt: skip
    if not by_file:
        table = table.take(pa.array(np.arange(rank, table.num_rows, world_size)))
    ids_col = table.column("ids").combine_chunks()
    if ids_col.null_count:
        raise DataError(f"{shard_dir}: {split} shards hold rows without ids")
    # Offsets of a sliced ListArray need not start at 0: rebase them onto the flat values.
    offsets = ids_col.offsets.to_numpy().astype(np.int64)
    values = ids_col.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0] : offsets[-1]]
    return ShardData(
        ids=values.astype(np.int32, copy=False),
        row_offsets=offsets - offsets[0],
        labels=table.column("label").to_numpy().astype(np.int64),
        weights=table.column("weight").to_numpy().astype(np.float32),
    )
