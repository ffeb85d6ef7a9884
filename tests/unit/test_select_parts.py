"""The learning loop's pure parts: uncertainty measures, the generator oracle, import ids, and
a registry that cannot be reached."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs.select import class_cap, oracle_answers, uncertainty
from pipelines.cli import main
from querylog.labels import content_id
from tests.conftest import config_for


def test_uncertainty_orders_rows_as_each_strategy_should():
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # confident
            [0.50, 0.49, 0.01],  # torn between two labels: smallest margin
            [0.34, 0.33, 0.33],  # torn between all three: highest entropy, least confidence
        ]
    )
    u = uncertainty(probs)
    assert np.allclose(u["confidence"], [0.98, 0.50, 0.34])
    assert np.allclose(u["margin"], [0.97, 0.01, 0.01])
    assert np.argmin(u["margin"][:2]) == 1
    assert np.argmax(u["entropy"]) == 2 and u["entropy"][2] == pytest.approx(1.0, abs=1e-3)
    assert u["entropy"][0] < 0.15
    assert np.all((u["entropy"] >= 0) & (u["entropy"] <= 1))
    one = uncertainty(np.ones((2, 1)))  # a single class: nothing to be unsure about
    assert np.allclose(one["margin"], 1.0) and np.allclose(one["entropy"], 0.0)


def test_the_class_cap_leaves_room_for_every_label():
    assert class_cap(0.25, 500, 12) == 125
    assert class_cap(0.25, 40, 2) == 20  # two labels at 25% could fill only half the batch
    assert class_cap(0.1, 7, 3) == 3
    assert class_cap(1.0, 10, 0) == 10 and class_cap(0.2, 10, 0) == 2  # labels not known


def test_the_generator_oracle_answers_from_the_truth_reproducibly(tmp_path):
    truth = pd.DataFrame(
        {
            "query": ["a", "b", "c"],
            "label_probs": [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
            "majority_label": ["travel", "sports", "travel"],
        }
    )
    truth.to_parquet(tmp_path / "queries.parquet")
    selected = pd.DataFrame({"query": ["a", "b", "c", "not in the truth"]})
    majority = oracle_answers(selected, tmp_path / "queries.parquet", "majority", 0, "r1")
    assert list(majority["label"]) == ["travel", "sports", "travel"]  # unknown query left out
    assert set(majority["round"]) == {"r1"}
    sample = oracle_answers(selected, tmp_path / "queries.parquet", "sample", 0, "r1")
    assert list(sample["label"][:2]) == ["travel", "sports"]  # certain queries: always right
    again = oracle_answers(selected, tmp_path / "queries.parquet", "sample", 0, "r1")
    assert list(again["label"]) == list(sample["label"])
    many = pd.DataFrame({"query": ["c"] * 1})
    draws = {
        oracle_answers(many, tmp_path / "queries.parquet", "sample", seed, "r")["label"][0]
        for seed in range(20)
    }
    assert draws == {"travel", "sports"}  # a 50/50 query gets both answers across seeds


def test_an_import_id_follows_the_content_not_the_file_name(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("query,label\nx,travel\n")
    first = content_id(str(a), "ann", None)
    a.touch()
    assert content_id(str(a), "ann", None) == first  # same bytes: same id
    assert content_id(str(a), "bob", None) != first  # another labeler
    a.write_text("query,label\nx,sports\n")
    assert content_id(str(a), "ann", None) != first


def test_an_unreachable_tracking_store_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    raw = tmp_path / "raw.csv"
    raw.write_text("query,label\nx,travel\n")
    cfg = config_for(tmp_path)
    args = ["--set", f"data.root={cfg.data.root}", "--set", "tracking.uri=http://127.0.0.1:9",
            "--set", f"data.raw_path={raw}", "--set", "dq.enabled=false"]  # fmt: skip
    assert main(["retrain", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.uri = http://127.0.0.1:9: cannot reach" in err[0]
