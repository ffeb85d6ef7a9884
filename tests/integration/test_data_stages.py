"""Ingest, dedupe and split on tiny, messy inputs against a real local Spark session."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError, DataError
from core.layout import RunContext
from jobs import augment, ingest, split
from pipelines.stages import run_stage
from querylog import readers
from querylog.clean import NORM, normalize_queries
from querylog.readers import CORRUPT, read_raw
from tests.conftest import config_for
from trainers.featurizer import normalize_query

pytestmark = pytest.mark.integration


def _messy_raw(root):
    raw = root / "raw"
    (raw / "nested").mkdir(parents=True)
    (raw / "_ignored").mkdir()
    (raw / "_ignored" / "x.csv").write_text("nothing,here\n1,2\n")
    (raw / "a.csv").write_text(
        "Query,Label,source\n"
        '"Cheap Flights",travel,web\n'
        '"cheap   flights",travel,app\n'
        '"multi\nline, query",books,web\n'
        '"say ""hi""",music,web\n'
        ",books,web\n"
        '"   ",music,web\n'
        f'"{"x" * 40}",music,web\n'
        "too,many,fields,here\n"
    )
    with (raw / "nested" / "b.jsonl").open("w") as fh:
        fh.write(
            json.dumps({"query": "CHEAP flights", "label": "travel", "ts": "2026-11-01T10:00:00Z"})
            + "\n"
        )
        fh.write('{"query": "broken\n')
        fh.write(json.dumps({"query": "bad time", "label": "books", "ts": "yesterday"}) + "\n")
        fh.write(json.dumps({"query": "no label yet", "label": ""}) + "\n")
        fh.write(json.dumps({"query": "odd label", "label": "cooking"}) + "\n")
    (raw / "c.csv").write_bytes(b"query,label\ncaf\xe9 latte,music\n")
    pd.DataFrame(
        {"query": ["ＦＵＬＬ width", "guitar album"], "label": ["books", "music"]}
    ).to_parquet(raw / "d.parquet")
    return raw


def test_ingest_quarantines_each_reason_and_reconciles(spark, tmp_path):
    raw = _messy_raw(tmp_path)
    cfg = config_for(tmp_path, f"data.raw_path={raw}", "ingest.max_query_chars=30",
                     "data.labels=[travel, books, music]",
                     "dq.policies.ingest.quarantined_share=warn")  # half of it is mess  # fmt: skip
    ctx = RunContext(cfg, "2026-11-01", spark=spark)
    result = run_stage(ctx, "ingest")
    assert result.tags["dq.warn.ingest.quarantined_share"] == "1"
    assert result.quarantined_by_reason == {
        "bad_encoding": 1, "bad_timestamp": 1, "empty_query": 2, "malformed_row": 2,
        "too_long": 1, "unknown_label": 1,
    }  # fmt: skip
    assert result.rows_in == 16
    assert result.rows_out == 8
    result.check_reconciles("ingest")
    out = ctx.stage_dir("ingest")
    rows = pd.read_parquet(out / "rows")
    assert set(rows["query"]) >= {"cheap flights", "multi line, query", 'say "hi"', "full width"}
    assert rows.loc[rows["query"] == "no label yet", "label"].isna().all()
    assert "source" in rows.columns and rows["source_file"].notna().all()  # extras kept
    bad = pd.read_parquet(out / "quarantine")
    assert len(bad) == 8 and set(bad["stage"]) == {"ingest"}
    assert bad.loc[bad["reason"] == "malformed_row", "_corrupt_record"].notna().all()
    marker = json.loads((out / "_SUCCESS").read_text())
    assert marker["result"]["rows_out"] == 8

    deduped = run_stage(ctx, "dedupe")
    rows = pd.read_parquet(ctx.stage_dir("dedupe") / "rows").set_index("query")
    flights = rows.loc["cheap flights"]
    assert flights["count"] == 3 and flights["num_labeled"] == 3
    assert dict(flights["label_counts"]) == {"travel": 3}
    assert flights["majority_label"] == "travel"
    assert deduped.rows_merged == 2 and deduped.metrics["clusters"] == deduped.rows_out
    deduped.check_reconciles("dedupe")


def test_a_large_csv_without_quoted_line_breaks_is_read_by_several_tasks(
    spark, tmp_path, monkeypatch
):
    """One file, no record over two lines: Spark splits it at line breaks (many tasks) and
    reads the same rows, malformed ones included, as a whole-file read; a quoted line break
    makes it one task again."""
    raw = tmp_path / "raw"
    raw.mkdir()
    frame = pd.DataFrame({"query": [f'query "{i}", quoted' for i in range(3000)],
                          "label": ["a", "b", "c"] * 1000})  # fmt: skip
    frame.to_csv(raw / "one.csv", index=False)  # quotes and commas, but no quoted line break
    with (raw / "one.csv").open("a") as fh:
        fh.write("too,many,fields\n,empty query\n")

    def read(whole: bool) -> tuple[int, list]:
        with monkeypatch.context() as patch:
            if whole:
                patch.setattr(readers, "spans_lines", lambda f: True)
            df = read_raw(spark, str(raw), "auto", "data.raw_path")
            rows = df.select("query", "label", CORRUPT).toPandas().fillna("")
            return df.rdd.getNumPartitions(), sorted(map(tuple, rows.to_numpy().tolist()))

    spark.conf.set("spark.sql.files.maxPartitionBytes", "16384")  # ~90 KB: several splits
    try:
        tasks, lines = read(whole=False)
        assert tasks > 1
        assert read(whole=True) == (1, lines)
        assert sum(1 for row in lines if row[2]) == 1  # the malformed row, in both reads
        assert {(q, lab) for q, lab, _ in lines} >= set(zip(frame["query"], frame["label"],
                                                            strict=True))  # fmt: skip
        with (raw / "one.csv").open("a") as fh:
            fh.write('"a query\nover two lines",a\n')
        tasks, lines = read(whole=False)
        assert tasks == 1 and ("a query\nover two lines", "a", "") in lines
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")


def test_missing_query_column_names_the_file(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ok.csv").write_text("query,label\nhello,x\n")
    (raw / "bad.csv").write_text("text,label\nhello,x\n")
    ctx = RunContext(config_for(tmp_path, f"data.raw_path={raw}"), "2026-11-01", spark=spark)
    with pytest.raises(DataError, match=r"bad\.csv: missing the required column 'query'"):
        run_stage(ctx, "ingest")
    assert not ctx.done("ingest")


def test_a_raw_file_gone_between_listing_and_reading_stops_ingest_naming_it(
    spark, tmp_path, monkeypatch
):
    """The file is moved away after the listing (the fault bench's hook, as log rotation would):
    one line naming it, nothing written or marked done; put back, the same run reads it all."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.csv").write_text("query,label\nhello,x\nworld,y\n")
    (raw / "b.jsonl").write_text('{"query": "third", "label": "x"}\n')
    aside = tmp_path / "aside"
    aside.mkdir()
    ctx = RunContext(config_for(tmp_path, f"data.raw_path={raw}"), "2026-11-01", spark=spark)
    monkeypatch.setenv(ingest.FAULT_MOVE_RAW_ENV, str(aside))
    with pytest.raises(DataError) as gone:
        run_stage(ctx, "ingest")
    assert str(gone.value).startswith(f"data.raw_path: file://{raw / 'a.csv'} went away between "
                                      "listing and reading")  # fmt: skip
    assert (aside / "a.csv").exists() and not ctx.done("ingest")
    assert not ctx.stage_dir("ingest").exists()
    monkeypatch.delenv(ingest.FAULT_MOVE_RAW_ENV)
    (aside / "a.csv").rename(raw / "a.csv")
    result = run_stage(ctx, "ingest")
    assert (result.rows_in, result.rows_out) == (3, 3)


def test_missing_path_and_empty_folder(spark, tmp_path):
    ctx = RunContext(
        config_for(tmp_path, f"data.raw_path={tmp_path / 'nope'}"), "2026-11-01", spark=spark
    )
    with pytest.raises(ConfigError, match="no such file or folder"):
        run_stage(ctx, "ingest")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "header_only.csv").write_text("query,label\n")
    ctx = RunContext(
        config_for(tmp_path, f"data.raw_path={tmp_path / 'empty'}"), "2026-11-01", spark=spark
    )
    with pytest.raises(DataError, match="no rows"):
        run_stage(ctx, "ingest")


def test_split_keeps_clusters_apart_and_honours_an_external_test_set(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    queries = [f"query number {i}" for i in range(400)]
    frame = pd.DataFrame(
        {"query": queries * 2 + ["unlabeled thing"], "label": ["a", "b"] * 400 + [""]}
    )
    frame.to_csv(raw / "log.csv", index=False)
    no_gates = "dq.enabled=false"  # the gates are test_gates' business
    ctx = RunContext(config_for(tmp_path, f"data.raw_path={raw}", "split.test_fraction=0.2",
                                no_gates), "2026-11-01", spark=spark)  # fmt: skip
    for stage in ("ingest", "dedupe", "split"):
        run_stage(ctx, stage)
    parts = {n: pd.read_parquet(ctx.stage_dir("split") / n) for n in split.SPLITS}
    assert set(parts["train"]["cluster_id"]).isdisjoint(parts["test"]["cluster_id"])
    assert set(parts["validation"]["cluster_id"]).isdisjoint(parts["test"]["cluster_id"])
    assert list(parts["pool"]["query"]) == ["unlabeled thing"]
    assert 0.1 < len(parts["test"]) / 400 < 0.3
    assert (parts["test"]["weight"] == 2).all()

    external = tmp_path / "external"
    external.mkdir()
    pd.DataFrame({"query": ["Query Number 1", "query number 1", "brand new", "", "w",
                            "query numbr 2"],
                  "label": ["a", "a", "b", "a", "a", "b"], "weight": ["3", "", "1", "1", "-2", ""]}
                 ).to_csv(external / "test.csv", index=False)  # fmt: skip
    # the same log split again, now against the external test set: ingest and dedupe read
    # neither the test set nor the split settings, so their output above is the input
    ctx = RunContext(config_for(tmp_path, f"data.raw_path={raw}", f"data.test_path={external}",
                                no_gates), "2026-11-01", spark=spark)  # fmt: skip
    result = run_stage(ctx, "split")
    result.check_reconciles("split")
    assert result.quarantined_by_reason == {
        "bad_weight": 1, "empty_query": 1, "in_test_set": 1, "near_test_set": 1
    }  # fmt: skip
    test = pd.read_parquet(ctx.stage_dir("split") / "test").set_index("query")
    assert test.loc["query number 1", "weight"] == 4.0  # 3 + a blank weight counting 1
    assert test.loc["brand new", "bucket"] == "tail"  # never seen in the log
    train_queries = set(pd.read_parquet(ctx.stage_dir("split") / "train")["query"])
    assert "query number 1" not in train_queries
    kept = train_queries | set(pd.read_parquet(ctx.stage_dir("split") / "validation")["query"])
    assert "query number 2" not in kept  # a typo of it is a test query
    near = pd.read_parquet(ctx.stage_dir("split") / "quarantine" / "near_test_set")
    assert list(near["query"]) == ["query number 2"]
    assert "query number 3" in kept


def test_augment_adds_variants_of_tail_training_queries_only(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    head = ["cheap car rental"] * 30
    tail = [f"car number {i} {w}" for i, w in enumerate(["red", "blue", "green"] * 60)]
    pd.DataFrame({"query": head + tail, "label": ["a"] * 30 + ["b"] * 180}).to_csv(
        raw / "log.csv", index=False
    )
    ctx = RunContext(config_for(tmp_path, f"data.raw_path={raw}", "augment.enabled=true", "augment.variants=3",
                                "split.test_fraction=0.2", "split.validation_fraction=0.2",
                                "dq.enabled=false"),  # the gates are the other tests' business
                     "2026-11-01", spark=spark)  # fmt: skip
    for stage in ("ingest", "dedupe", "split"):
        run_stage(ctx, stage)
    result = run_stage(ctx, "augment")
    result.check_reconciles("augment")
    parts = {n: pd.read_parquet(ctx.stage_dir("split") / n) for n in split.SPLITS}
    out = pd.read_parquet(ctx.stage_dir("augment") / augment.TRAIN_DIR)
    originals, variants = out[out["aug_of"].isna()], out[out["aug_of"].notna()]
    assert sorted(originals["query"]) == sorted(parts["train"]["query"])
    assert len(variants) == result.metrics["rows_augmented"] > 0
    train = parts["train"]
    tail_train = set(train.loc[train["count"] <= 2, "query"])
    assert set(variants["aug_of"]) <= tail_train  # the head query is never augmented
    held_out = set(parts["validation"]["query"]) | set(parts["test"]["query"])
    assert held_out.isdisjoint(variants["query"]) and variants["query"].is_unique
    assert not set(variants["query"]) & set(originals["query"])
    by_origin = originals.set_index("query")
    for row in variants.itertuples():  # lineage: the variant carries its origin's label and cluster
        assert row.majority_label == by_origin.loc[row.aug_of, "majority_label"]
        assert row.cluster_id == by_origin.loc[row.aug_of, "cluster_id"]
    assert set(variants["aug_op"]) <= {"synonym", "insert", "swap", "delete", "typo"}
    assert {"synonym", "insert"} & set(variants["aug_op"])  # "car" has WordNet synonyms
    again = RunContext(ctx.cfg, "2026-11-01", force=True, spark=spark)
    run_stage(again, "augment")
    rerun = pd.read_parquet(again.stage_dir("augment") / augment.TRAIN_DIR)
    assert sorted(rerun["query"]) == sorted(out["query"])  # deterministic per seed


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ingest_counts_reconcile_on_random_mess(spark, tmp_path, seed):
    """Property: whatever mix of good and bad records, every record is out or quarantined."""
    rng = np.random.default_rng(seed)
    kinds = ["ok", "empty", "blank", "long", "bad_ts", "unknown", "control", "unicode"]
    records = []
    for i in range(int(rng.integers(50, 150))):
        kind = kinds[int(rng.integers(len(kinds)))]
        query = {"ok": f"query {i}", "empty": "", "blank": " \t ", "long": "x" * 80,
                 "control": f"q\x07 {i}", "unicode": f"Ｃａｆé {i}"}.get(kind, f"query {i}")  # fmt: skip
        ts = "not a time" if kind == "bad_ts" else "2026-11-01T00:00:00Z"
        label = "zzz" if kind == "unknown" else ["a", "b", ""][i % 3]
        records.append({"query": query, "label": label, "ts": ts})
    raw = tmp_path / "raw"
    raw.mkdir()
    half = len(records) // 2
    pd.DataFrame(records[:half]).to_csv(raw / "part.csv", index=False)
    with (raw / "part.jsonl").open("w") as fh:
        for r in records[half:]:
            fh.write(json.dumps(r) + "\n")
    cfg = config_for(tmp_path, f"data.raw_path={raw}", "ingest.max_query_chars=50",
                     "data.labels=[a, b]", "dq.policies.ingest.quarantined_share=warn")  # fmt: skip
    ctx = RunContext(cfg, "2026-11-01", spark=spark)
    result = run_stage(ctx, "ingest")
    result.check_reconciles("ingest")
    assert result.rows_in == len(records)
    out = pd.read_parquet(ctx.stage_dir("ingest") / "rows")
    bad = pd.read_parquet(ctx.stage_dir("ingest") / "quarantine")
    assert len(out) == result.rows_out and len(bad) == result.rows_quarantined
    assert bad["reason"].value_counts().to_dict() == result.quarantined_by_reason
    expected_bad = sum(r["query"].strip() == "" or len(r["query"]) > 50 or r["ts"] == "not a time"
                       or r["label"] == "zzz" for r in records)  # fmt: skip
    assert result.rows_quarantined == expected_bad


def test_ingest_normalizes_every_query_as_the_featurizer_does(spark):
    """ASCII queries are normalized by Spark's functions, the others in Python: both give what
    the featurizer's ``normalize_query`` gives (the model sees the text ingest kept)."""
    rng = np.random.default_rng(3)
    ascii_chars = [chr(c) for c in range(128)]
    texts = [None, "", " ", "\x00", "\x7f", "Cheap\tFLIGHTS \r\n", "\x1fa\x1cb\x0bc\x0cd"]
    texts += [f"x{c}Y{c}{c}z" for c in ascii_chars]
    texts += ["".join(rng.choice(ascii_chars, size=int(rng.integers(0, 12)))) for _ in range(300)]
    texts += ["Ｃａｆé", "ǅungla", "Straße", "İstanbul", "\u00a0a\u2003b\u3000", "zero\u200bwidth",
              "ﬁne", "e\u0301", "ÀB\x85c", "x\u2028y", "\ufeffbom", "ΣΊΣΥΦΟΣ"]  # fmt: skip
    frame = spark.createDataFrame(pd.DataFrame({"query": texts}), "query string")
    got = [row[NORM] for row in normalize_queries(frame).select(NORM).collect()]
    assert got == [normalize_query(t) for t in texts]
