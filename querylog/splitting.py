"""Seeded, partition-independent draws for splitting by near-duplicate cluster: the same value
for the same cluster on any partitioning and in any rerun (split's home split, select's random
strategy and tie-breaks)."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

from core.config import Config

_HASH_RESOLUTION = 1_000_000


def hash_uniform(*cols: Column) -> Column:
    """A number in [0, 1) from a hash of ``cols``: the same draw for the same values, on any
    partitioning and in any rerun."""
    return F.pmod(F.xxhash64(*cols), F.lit(_HASH_RESOLUTION)) / _HASH_RESOLUTION


def home_split(validation: float, test: float, seed: int) -> Column:
    """The split a labeled row of ``cluster_id`` belongs to, by a seeded hash of the cluster:
    the same for every member of a cluster, and for a pool query once it gets a label."""
    u = hash_uniform(F.col("cluster_id"), F.lit(seed))
    return F.when(u < test, "test").when(u < test + validation, "validation").otherwise("train")


def home_split_of(cfg: Config) -> Column:
    """:func:`home_split` under ``cfg`` (no hashed test split when ``data.test_path`` is set)."""
    s = cfg.split
    return home_split(s.validation_fraction, 0.0 if cfg.data.test_path else s.test_fraction, s.seed)
