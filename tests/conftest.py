"""Shared fixtures: one local Spark session for the whole run, configs in temp folders, an empty
MLflow store to start from, and one small generated pipeline run that tests copy.

The shared run (:func:`shared_run`) is the generated flow of ``SHARED_SETTINGS`` (augment on),
run once per session by the real command line into a session folder; a test that needs a
finished run takes its own copy (:func:`finished_run`): the data root, the MLflow store and its
artifacts, with the folder's path rewritten in the store so that the copy is self-contained (a
stage of the copy reruns or is reused by its fingerprint, which does not include where the
data root lies).

MLflow keeps one store per tracking URI *string* for the life of the process, so a relative
``sqlite:///mlflow.db`` in one test reaches the file of the first test that used that string.
The fixtures here hand out absolute URIs only.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from core.config import Config, TrackingConfig, load_config

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # An xdist worker's __main__ has neither a spec nor a file, which PySpark's Connect module
    # (imported by Great Expectations) takes for a doctest run, and exits the process. Import
    # Great Expectations once as an interactive session would; it keeps what it found.
    sys.ps1 = ""
    import great_expectations  # noqa: F401

    del sys.ps1
WORDNET = Path(__file__).resolve().parent / "fixtures" / "wordnet"
"""A few real WordNet synsets, so tests need no system WordNet."""

SHARED_DATE = "2026-11-01"
SHARED_SMALL = (
    "generate.num_events=6000", "generate.num_queries=800", "generate.num_labels=6",
    "generate.dirty_fraction=0.01", "featurizer.num_buckets=65536", "model.dim=32",
    "train.time_budget_s=40", "train.epochs=8", "train.batch_size=64",
    "spark.master=local[2]", "spark.shuffle_partitions=4",
)  # fmt: skip
SHARED_SETTINGS = (*SHARED_SMALL, "augment.enabled=true", f"augment.wordnet_dir={WORDNET}")
"""The shared run: a small generated log through every stage, augment and the decomposition on."""


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


def sets(*items: str) -> list[str]:
    """``--set KEY=VALUE`` arguments of the command line."""
    return [arg for item in items for arg in ("--set", item)]


SMALL_DATA_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
SMALL_DATA_SPARK_CONF = {
    "spark.driver.extraJavaOptions": SMALL_DATA_JVM,
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
}
"""Spark tuned for test-sized data: the JVM compiles with its quick compiler only, and query
plans run interpreted instead of compiling Java for each one. The plans and results are the same;
on this suite's few-thousand-row frames compiling costs more than it saves (about a fifth of a
Spark-bound test's time on two cores). ``make demo`` runs with Spark's defaults."""


def small_data_spark_conf() -> str:
    """:data:`SMALL_DATA_SPARK_CONF` as the value of ``--set spark.conf=…``."""
    return "spark.conf=" + json.dumps(SMALL_DATA_SPARK_CONF)


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """One real local Spark session (bound to 127.0.0.1) shared by every Spark test."""
    from core.config import SparkConfig
    from core.spark import get_spark

    session = get_spark(
        SparkConfig(
            master="local[2]", shuffle_partitions=4, driver_memory="2g",
            app_name="zipfline-tests", conf=SMALL_DATA_SPARK_CONF,
        )
    )  # fmt: skip
    yield session
    session.stop()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside its temp folder (relative paths, mlflow.db) and return it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- MLflow stores --------------------------------------------------------------------------


def rewrite_store(db: Path, old: Path, new: Path) -> None:
    """Replace the folder ``old`` by ``new`` in every text value of the sqlite store ``db``:
    MLflow records absolute locations (experiment and run artifact URIs, logged models, model
    version sources, dataset sources, stage folders in tags)."""
    before, after = f"{old}/", f"{new}/"
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(t in (kind or "").upper() for t in ("CHAR", "TEXT", "CLOB")):
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE instr("{column}", ?) > 0',
                        (before, after, before),
                    )
        con.commit()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store with its tables made, once: creating them (some fifty
    schema migrations) takes seconds per new store, a copy of the file a millisecond."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    store = SqlAlchemyStore(f"sqlite:///{db}", str(folder / "mlartifacts"))
    store.engine.dispose()
    return db


def fresh_store(template: Path, db: Path) -> str:
    """An empty MLflow store at ``db`` (a copy of the template) unless one is there; its URI."""
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
        rewrite_store(db, template.parent, db.parent)
    return f"sqlite:///{db}"


@pytest.fixture
def empty_store(mlflow_template: Path, tmp_path: Path) -> str:
    """An empty MLflow store at ``tmp_path/mlflow.db`` (where :func:`config_for` points); its URI."""
    return fresh_store(mlflow_template, tmp_path / "mlflow.db")


# --- the shared run -------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    """A finished pipeline run in ``folder``: ``data/`` (``data.root``), ``mlflow.db`` and
    ``mlartifacts/`` (its MLflow store), the settings it ran with and what it printed."""

    folder: Path
    run_date: str
    settings: tuple[str, ...]
    out: str = ""
    err: str = ""

    @property
    def root(self) -> Path:
        return self.folder / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / self.run_date

    @property
    def db(self) -> Path:
        return self.folder / "mlflow.db"

    @property
    def tracking(self) -> TrackingConfig:
        return TrackingConfig(uri=f"sqlite:///{self.db}")

    def sets(self, *extra: str) -> list[str]:
        """``--set`` arguments: this run's settings and folders (absolute), then ``extra``."""
        return sets(*self.settings, f"data.root={self.root}", f"tracking.uri={self.tracking.uri}",
                    *extra)  # fmt: skip

    def argv(self, *extra: str) -> list[str]:
        """``zipfline run`` of this run's date and settings, then ``extra`` settings."""
        return ["run", "--run-date", self.run_date, *self.sets(*extra)]

    def copy_to(self, dest: Path, *, store: bool = True) -> FinishedRun:
        """A copy in ``dest``: the data root, and (``store``) the MLflow store and artifacts with
        their recorded locations moved to ``dest``; JSON files and stage markers of the data
        root that name the folder (a training spec's shard folder) name the copy."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.root, dest / "data", symlinks=True)
        before, after = f"{self.folder}/", f"{dest}/"
        for path in (dest / "data").rglob("*"):
            if (
                path.is_file()
                and (path.suffix == ".json" or path.name == "_SUCCESS")
                and "labels" not in path.relative_to(dest / "data").parts  # fingerprinted
            ):
                text = path.read_text()
                if before in text:
                    path.write_text(text.replace(before, after))
        if store:
            shutil.copyfile(self.db, dest / "mlflow.db")
            if (self.folder / "mlartifacts").is_dir():
                shutil.copytree(self.folder / "mlartifacts", dest / "mlartifacts", symlinks=True)
            rewrite_store(dest / "mlflow.db", self.folder, dest)
        return replace(self, folder=dest)


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``zipfline ARGV`` in this process from ``cwd``: exit code, stdout, stderr."""
    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def shared_run(spark: object, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The shared run, once per session: ``zipfline run`` of ``SHARED_SETTINGS`` on the
    generated log, every stage, into a session folder. Read it, never change it: a test that
    reruns stages, registers models or writes files takes :func:`finished_run`.

    Under pytest-xdist the workers share one run: the first to ask makes it under a file lock,
    the others wait for it and read what it printed."""
    base, tag = tmp_path_factory.getbasetemp(), "shared-run"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder all workers' temp folders are in
        tag += "-" + os.environ.get("PYTEST_XDIST_TESTRUNUID", "")  # this session's, not older
    run = FinishedRun(base / tag, SHARED_DATE, SHARED_SETTINGS)
    record = base / f"{tag}.json"
    with open(base / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            shutil.rmtree(run.folder, ignore_errors=True)  # a worker that died while making it
            run.folder.mkdir()
            code, out, err = run_cli(run.argv(), run.folder)
            partial = record.with_suffix(".partial")
            partial.write_text(json.dumps({"code": code, "out": out, "err": err}))
            partial.replace(record)
    done = json.loads(record.read_text())
    assert done["code"] == 0, (
        f"the shared run failed:\n{done['err'][-6000:]}\n{done['out'][-3000:]}"
    )
    return replace(run, out=done["out"], err=done["err"])


FIRST = ("tests/integration/test_retrain.py", "tests/integration/test_training.py")
"""The modules with the longest tests, collected first and each kept together: under work
stealing the first worker starts on them while the other takes the rest of the list (a stolen
share of ``test_training`` builds that module's shards once more)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::")[0]
        return FIRST.index(module) if module in FIRST else len(FIRST)

    items.sort(key=rank)


@pytest.fixture
def finished_run(shared_run: FinishedRun, tmp_path: Path) -> FinishedRun:
    """This test's own copy of the shared run (data, MLflow store, registry) in ``tmp_path``."""
    return shared_run.copy_to(tmp_path)
