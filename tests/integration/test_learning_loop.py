"""The learning loop's Spark parts: selection scored in Spark by a model whose answers we know,
and labels coming back through `zipfline label import` into the next dedupe."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.config import SelectConfig
from core.layout import LABELS_DIR
from jobs.select import rank_candidates, score_queries, ship_model
from pipelines.cli import main
from pipelines.registry import fetch_champion
from querylog.labels import IMPORT_PREFIX, IMPORTS_LOG, QUARANTINE, read_labels
from tests.conftest import config_for
from trainers.featurizer import Featurizer
from trainers.model import ModelSpec

pytestmark = pytest.mark.integration

LABELS = ["a", "b", "c"]
# query → (the logits the known model gives it, its near-duplicate cluster, its Zipf bucket)
POOL = {
    "sure": ([9.0, 0.0, 0.0], 1, "tail"),  # confident: skipped
    "torn": ([1.0, 0.95, 0.0], 2, "tail"),  # the most uncertain of all
    "torn2": ([1.0, 0.9, 0.0], 2, "tail"),  # same cluster as "torn": left out
    "unsure": ([1.0, 0.8, 0.0], 3, "tail"),
    "doubt": ([1.0, 0.7, 0.0], 4, "tail"),  # third of label a: over the class cap of 2
    "bee": ([0.0, 1.0, 0.5], 5, "tail"),
    "bee2": ([0.0, 1.0, 0.3], 6, "tail"),
    "sea": ([0.0, 0.0, 2.5], 7, "tail"),  # fairly sure (0.86 < 0.95): over the budget
    "headtorn": ([0.8, 0.0, 0.8], 8, "head"),  # more torn than "torn", but head: weighted down
}


def _known_model(tmp_path):
    """A real ``model.pt`` whose class probabilities for the POOL queries are set by hand."""
    featurizer = Featurizer(num_buckets=4096, word_ngrams=1, char_ngram_min=0, char_ngram_max=0)
    spec = ModelSpec(num_buckets=4096, dim=3, hidden=(), num_classes=3)
    emb = torch.zeros(4096, 3)
    for query, (logits, _, _) in POOL.items():
        (bucket,) = featurizer.ids(query)  # one word, one bucket: its row is the query's logits
        emb[int(bucket)] = torch.tensor(logits)
    assert len({int(featurizer.ids(q)[0]) for q in POOL}) == len(POOL), "a hash collision"
    payload = {
        "model_spec": spec.to_dict(),
        "labels": LABELS,
        "featurizer": featurizer.settings(),
        "state_dict": {
            "embedding.weight": emb,
            "output.weight": torch.eye(3),
            "output.bias": torch.zeros(3),
        },
    }
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    return path


def test_selection_picks_the_uncertain_rows_within_cluster_and_class_caps(spark, tmp_path):
    pool = spark.createDataFrame(
        [(q, c, b, 1) for q, (_, c, b) in POOL.items()],
        "query string, cluster_id long, bucket string, count long",
    )
    name = ship_model(spark, _known_model(tmp_path))
    scored = score_queries(pool, name).persist()
    by_query = {r["query"]: r for r in scored.collect()}
    assert by_query["sure"]["predicted_label"] == "a" and by_query["sure"]["confidence"] > 0.99
    assert by_query["bee"]["predicted_label"] == "b"
    assert by_query["torn"]["margin"] < by_query["unsure"]["margin"] < by_query["doubt"]["margin"]

    cfg = SelectConfig(budget=4, skip_confidence=0.95, max_class_share=0.5)
    ranked = rank_candidates(scored, cfg, "margin", cfg.budget, "r1", num_labels=3)
    outcome = {r["query"]: r["outcome"] for r in ranked.collect()}
    assert {q for q, o in outcome.items() if o == "selected"} == {"torn", "unsure", "bee", "bee2"}
    assert outcome["sure"] == "confident"
    assert outcome["torn2"] == "same_cluster"
    assert outcome["doubt"] == "class_cap" and outcome["headtorn"] == "class_cap"
    assert outcome["sea"] == "over_budget"

    flat = SelectConfig(budget=4, skip_confidence=0.95, max_class_share=0.5,
                        bucket_weights={"head": 1.0, "torso": 1.0, "tail": 1.0})  # fmt: skip
    ranked = rank_candidates(scored, flat, "margin", flat.budget, "r1", num_labels=3)
    flat_outcome = {r["query"]: r["outcome"] for r in ranked.collect()}
    assert flat_outcome["headtorn"] == "selected" and flat_outcome["unsure"] == "class_cap"

    rand = rank_candidates(scored, cfg, "random", 100, "r1").collect()
    picked = [r for r in rand if r["outcome"] == "selected"]
    assert len(picked) == len(POOL) - 1  # the baseline skips nothing but a cluster's twin
    assert len({r["cluster_id"] for r in picked}) == len(picked)

    def random_batch(round_: str) -> set[str]:
        ranked = rank_candidates(scored, cfg, "random", 3, round_)
        return {r["query"] for r in ranked.where("outcome = 'selected'").collect()}

    first = random_batch("r1")
    assert len(first) == 3 and random_batch("r2") != first  # a new round, a new draw
    scored.unpersist()


def test_a_registry_without_a_champion_has_none(tmp_path, empty_store):
    cfg = config_for(tmp_path)
    assert fetch_champion(cfg, tmp_path / "dl") is None


def _log(path):
    rows = []
    for i in range(40):
        rows += [{"query": f"novel {i}", "label": "books"}] * 3
        rows += [{"query": f"guitar {i}", "label": "music"}] * 3
        rows += [{"query": f"poetry {i}", "label": ""}]  # never labeled: the pool
    pd.DataFrame(rows).to_csv(path, index=False)


def test_label_import_round_trip_with_conflicts_quarantine_and_lineage(
    spark, in_tmp, empty_store, capsys
):
    raw = in_tmp / "log.csv"
    _log(raw)
    cfg = config_for(in_tmp, f"data.raw_path={raw}")
    sets = ["--set", f"data.raw_path={raw}", "--set", f"data.root={cfg.data.root}",
            "--set", f"tracking.uri={cfg.tracking.uri}", "--set", "spark.master=local[2]",
            "--set", "dq.enabled=false"]  # fmt: skip
    run = ["run", "--run-date", "2026-01-05", *sets]
    assert main([*run, "--to", "dedupe"]) == 0
    capsys.readouterr()

    labels = in_tmp / "labels.csv"
    pd.DataFrame(
        [
            ("novel 1", "books"),  # agrees with the log
            ("Novel 2", "music"),  # the log says books: a conflict, kept
            ("guitar 3", "music"),
            ("guitar 3", "music"),  # a repeat: merged
            ("guitar 4", "books"),  # two answers in one file, and the log says music
            ("guitar 4", "music"),
            ("poetry 1", "books"),  # a pool query gets its first label
            ("unknown thing", "books"),
            ("novel 5", ""),
            ("   ", "books"),
            ("novel 6", "poetryx"),
        ],
        columns=["query", "label"],
    ).to_csv(labels, index=False)
    assert main(["label", "import", str(labels), "--by", "ann", *sets]) == 0
    out = capsys.readouterr().out
    assert "imported 6 of 11 label rows" in out
    assert "3 disagree with an earlier label" in out and "1 repeated rows merged" in out
    assert "quarantined 4 (empty_query 1, missing_label 1, unknown_label 1, unknown_query 1)" in out

    root = cfg.data.root
    store = read_labels_frame(root)
    assert len(store) == 6 and set(store["labeled_by"]) == {"ann"}
    assert store.set_index(["query", "label"])["conflict"].to_dict() == {
        ("novel 1", "books"): False, ("novel 2", "music"): True, ("guitar 3", "music"): False,
        ("guitar 4", "books"): True, ("guitar 4", "music"): True, ("poetry 1", "books"): False,
    }  # fmt: skip
    bad = pd.read_parquet(Path(root) / LABELS_DIR / QUARANTINE)
    assert sorted(bad["reason"]) == ["empty_query", "missing_label", "unknown_label",
                                     "unknown_query"]  # fmt: skip
    entry = json.loads((Path(root) / LABELS_DIR / IMPORTS_LOG).read_text().splitlines()[-1])
    assert entry["rows_in"] == entry["imported"] + entry["quarantined"] + entry["merged"]

    assert main(["label", "import", str(labels), "--by", "ann", *sets]) == 0  # again: no-op
    assert "were imported before" in capsys.readouterr().out
    assert len(list((Path(root) / LABELS_DIR).glob(f"{IMPORT_PREFIX}*"))) == 1

    more = in_tmp / "more.jsonl"
    more.write_text(json.dumps({"query": "poetry 2", "label": "books", "round": "2026-01-04"})
                    + "\n" + "{not json\n")  # fmt: skip
    assert main(["label", "import", str(more), "--by", "bob", *sets]) == 0
    assert "quarantined 1 (malformed_row 1)" in capsys.readouterr().out
    store = read_labels_frame(root)
    assert store.set_index("query").loc["poetry 2", "round"] == "2026-01-04"

    nolabel = in_tmp / "nolabel.csv"
    nolabel.write_text("query,answer\nnovel 1,books\n")
    assert main(["label", "import", str(nolabel), *sets]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'label' column" in err[0] and "nolabel.csv" in err[0]

    assert main([*run, "--from", "dedupe", "--to", "split", "--force"]) == 0
    day = Path(root) / "2026-01-05"
    deduped = pd.read_parquet(day / "dedupe" / "rows").set_index("query")
    assert dict(deduped.loc["novel 2", "label_counts"]) == {"books": 3, "music": 1}
    assert deduped.loc["novel 2", "majority_label"] == "books"  # the log's 3 events outweigh it
    assert deduped.loc["novel 2", "count"] == 3  # a label is not traffic
    assert deduped.loc["poetry 1", "num_imported"] == 1
    assert int(deduped["num_imported"].sum()) == 7
    pool = pd.read_parquet(day / "split" / "pool")
    assert "poetry 1" not in set(pool["query"]) and "poetry 3" in set(pool["query"])

    capsys.readouterr()  # no champion in this registry yet: a diverse random batch, said so
    assert main([*run, "--from", "select", "--to", "select", "--set", "select.budget=10"]) == 0
    assert "no champion of zipfline in the registry yet" in capsys.readouterr().err
    batch = pd.read_csv(day / "select" / "to_label" / "to_label.csv")
    assert len(batch) == 10 and batch["cluster_id"].is_unique
    assert set(batch["strategy"]) == {"random"} and batch["label"].isna().all()
    assert set(batch["query"]) <= set(pool["query"])


def read_labels_frame(root: str) -> pd.DataFrame:
    from pyspark.sql import SparkSession

    frame = read_labels(SparkSession.getActiveSession(), Path(root).resolve())
    assert frame is not None
    return frame.toPandas()
