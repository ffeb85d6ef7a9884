"""Shared fixtures: one local Spark session for the whole run, configs in temp folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Config, load_config

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
WORDNET = Path(__file__).resolve().parent / "fixtures" / "wordnet"
"""A few real WordNet synsets, so tests need no system WordNet."""


def config_for(tmp_path: Path, *overrides: str) -> Config:
    """The base config with data and tracking inside ``tmp_path`` and small defaults for tests."""
    return load_config(
        "local",
        [
            f"data.root={tmp_path / 'data'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "spark.master=local[2]",
            "spark.shuffle_partitions=4",
            "spark.driver_memory=2g",
            "featurizer.num_buckets=65536",
            f"augment.wordnet_dir={WORDNET}",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """One real local Spark session (bound to 127.0.0.1) shared by every Spark test."""
    from core.config import SparkConfig
    from core.spark import get_spark

    session = get_spark(
        SparkConfig(
            master="local[2]", shuffle_partitions=4, driver_memory="2g", app_name="zipfline-tests"
        )
    )
    yield session
    session.stop()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside its temp folder (relative paths, mlflow.db) and return it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
