"""select: the active-learning batch, the unlabeled pool queries the champion is least sure of.

It runs last, after evaluate and the registry's verdict, so it asks the model that has just
earned ``champion``. The champion's ``model.pt`` is fetched from the MLflow registry on the
driver, shipped to the executors with ``SparkContext.addFile`` and loaded once per Python
worker; the pool is scored in Arrow batches by ``mapInPandas``, never collected. A query's
score is its uncertainty under ``select.strategy`` (``margin``, ``entropy``,
``least_confidence``) times its Zipf bucket's weight (the tail is favoured); queries the
champion predicts with at least ``select.skip_confidence`` are skipped, as are pool queries
whose cluster belongs to validation or test (a label there would not train anything) and
queries labeled already. At most one query per near-duplicate cluster and at most
``select.max_class_share`` of the batch per predicted label keep the batch diverse; the
``select.budget`` best go to ``selected/`` (Parquet) and ``to_label/to_label.csv`` (the
hand-off file for people: fill in ``label``, then ``zipfline label import``). ``random`` is
the baseline: uniform over the same candidates, one per cluster, nothing skipped. With no
champion yet the stage falls back to that and says so. With ``label.oracle=generator`` the
generated log's truth answers the batch at once, so the loop runs unattended.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (this file would hide `select`)

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import SelectConfig
from core.errors import ConfigError, StageError
from core.layout import SELECTED_DIR, RunContext, StageResult
from querylog.generator import label_names, truth_path
from querylog.labels import import_labels, read_labels
from querylog.splitting import hash_uniform, home_split_of

STAGE = "select"
TO_LABEL_DIR = "to_label"
TO_LABEL_FILE = "to_label.csv"
ORACLE = "oracle:generator"
SCORE_FIELDS = [
    T.StructField("predicted_label", T.StringType()),
    T.StructField("confidence", T.DoubleType()),
    T.StructField("margin", T.DoubleType()),
    T.StructField("entropy", T.DoubleType()),
]
OUTCOMES = ("selected", "over_budget", "class_cap", "same_cluster", "confident")


def uncertainty(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of class probabilities: ``confidence`` (top-1), ``margin`` (top-1 − top-2) and
    ``entropy`` normalized to [0, 1] by log K."""
    k = probs.shape[1]
    top = np.sort(probs, axis=1)
    confidence = top[:, -1] if k else np.zeros(len(probs))
    second = top[:, -2] if k > 1 else np.zeros(len(probs))
    p = np.clip(probs, 1e-12, 1.0)
    entropy = -(probs * np.log(p)).sum(axis=1) / np.log(k) if k > 1 else np.zeros(len(probs))
    return {
        "confidence": confidence.astype(np.float64),
        "margin": (confidence - second).astype(np.float64),
        "entropy": np.clip(entropy, 0.0, 1.0).astype(np.float64),
    }


_PREDICTORS: dict[str, object] = {}


def _predictor(name: str):  # noqa: ANN202
    """The model shipped as ``name``, loaded once per Python worker (workers are reused)."""
    if name not in _PREDICTORS:
        # start-up speed: on the Spark worker, once per model
        from pyspark import SparkFiles

        from trainers.predictor import Predictor

        _PREDICTORS.clear()  # one champion at a time
        _PREDICTORS[name] = Predictor.from_file(SparkFiles.get(name))
    return _PREDICTORS[name]


def ship_model(spark: SparkSession, model_file: Path) -> str:
    """Send a ``model.pt`` to every executor under a name unique to its content (the copy sits
    beside the file, so it goes when the file's folder goes)."""
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()[:12]
    shipped = model_file.parent / f"model-{digest}.pt"
    shutil.copyfile(model_file, shipped)
    spark.sparkContext.addFile(str(shipped))
    return shipped.name


def score_queries(df: DataFrame, model_name: str) -> DataFrame:
    """``df`` plus the shipped model's ``predicted_label``, ``confidence``, ``margin`` and
    ``entropy`` for its ``query``, in Arrow batches on the executors."""
    schema = T.StructType(df.schema.fields + SCORE_FIELDS)

    def apply(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        predictor = _predictor(model_name)
        labels = np.asarray(predictor.labels, dtype=object)
        for batch in batches:
            probs = predictor.predict_proba(batch["query"].fillna(""))
            best = probs.argmax(axis=1) if len(batch) else np.zeros(0, dtype=int)
            yield batch.assign(predicted_label=labels[best], **uncertainty(probs))

    return df.mapInPandas(apply, schema)


def _uniform(seed: int, salt: str) -> Column:
    return hash_uniform(F.col("query"), F.lit(seed), F.lit(salt))


def strategy_score(strategy: str, seed: int, round_: str) -> Column:
    """How much a label for the row would teach the champion: higher is more informative."""
    if strategy == "random":
        return _uniform(seed, f"random:{round_}")
    return {
        "least_confidence": 1.0 - F.col("confidence"),
        "margin": 1.0 - F.col("margin"),
        "entropy": F.col("entropy"),
    }[strategy]


def class_cap(share: float, budget: int, num_labels: int) -> int:
    """Rows of one predicted label a batch may hold: ``share`` of it, but never so few that
    ``num_labels`` labels cannot fill it (two labels at 25% would leave half the budget)."""
    floor = 1.0 / num_labels if num_labels > 0 else 0.0  # 0: not known
    return max(1, int(np.ceil(max(share, floor) * budget - 1e-9)))


def rank_candidates(
    scored: DataFrame,
    cfg: SelectConfig,
    strategy: str,
    budget: int,
    round_: str,
    num_labels: int = 0,
) -> DataFrame:
    """``outcome`` per candidate (``selected``, or why not: ``confident``, ``same_cluster``,
    ``class_cap``, ``over_budget``), its ``score`` and ``priority``.

    ``random`` (and a pool with no champion: no ``predicted_label``) skips nothing and caps
    nothing but the one-per-cluster rule. ``num_labels``: the labels the champion knows.
    """
    guided = strategy != "random"
    weights = F.create_map(*[F.lit(x) for kv in cfg.bucket_weights.items() for x in kv])
    score = strategy_score(strategy, cfg.seed, round_)
    df = scored.withColumn("score", score.cast("double")).withColumn(
        "priority",
        F.col("score") * F.coalesce(weights[F.col("bucket")], F.lit(1.0)) if guided else score,
    )
    tie = _uniform(cfg.seed, f"tie:{round_}")
    order = [F.desc("priority"), tie, F.col("query")]
    outcome = F.lit(None).cast("string")
    if guided:
        outcome = F.when(F.col("confidence") >= cfg.skip_confidence, "confident")
    df = df.withColumn("outcome", outcome)
    live = F.col("outcome").isNull()
    by_cluster = Window.partitionBy("cluster_id").orderBy(F.when(live, 0).otherwise(1), *order)
    df = df.withColumn(
        "outcome", F.when(live & (F.row_number().over(by_cluster) > 1), "same_cluster")
        .otherwise(F.col("outcome"))
    )  # fmt: skip
    if guided:
        cap = class_cap(cfg.max_class_share, budget, num_labels)
        by_class = Window.partitionBy("predicted_label").orderBy(
            F.when(F.col("outcome").isNull(), 0).otherwise(1), *order
        )
        df = df.withColumn(
            "outcome", F.when(F.col("outcome").isNull() & (F.row_number().over(by_class) > cap),
                              "class_cap").otherwise(F.col("outcome"))
        )  # fmt: skip
    best = (
        df.where(F.col("outcome").isNull())
        .orderBy(*order)
        .limit(budget)
        .select("query", F.lit(True).alias("_in_batch"))
    )
    df = df.join(best, "query", "left").withColumn(
        "outcome",
        F.when(F.col("outcome").isNotNull(), F.col("outcome"))
        .when(F.col("_in_batch"), "selected")
        .otherwise("over_budget"),
    )
    return df.drop("_in_batch")


def oracle_answers(
    selected: pd.DataFrame, truth_file: Path, answer: str, seed: int, round_: str
) -> pd.DataFrame:
    """The generator's answers for the selected queries: a draw from each query's true label
    distribution (``sample``) or its ``majority`` label; queries it does not know stay out."""
    truth = pd.read_parquet(truth_file, columns=["query", "label_probs", "majority_label"])
    known = selected[["query"]].merge(truth, on="query", how="inner")
    if known.empty:
        return pd.DataFrame({"query": [], "label": [], "round": []}, dtype=str)
    if answer == "majority":
        labels = known["majority_label"].to_numpy()
    else:
        names = np.asarray(label_names(len(known["label_probs"].iloc[0])), dtype=object)
        labels = []
        for query, probs in zip(known["query"], known["label_probs"], strict=True):
            rng = np.random.default_rng([seed, zlib.crc32(query.encode("utf-8"))])
            p = np.asarray(probs, dtype=np.float64)
            labels.append(names[rng.choice(len(p), p=p / p.sum())])
    return pd.DataFrame({"query": known["query"], "label": labels, "round": round_})


def ask_oracle(ctx: RunContext, selected: pd.DataFrame, round_: str) -> dict[str, float]:
    """``label.oracle=generator``: answer the batch from the truth and import the answers."""
    truth = truth_path(ctx)
    if truth is None:
        raise ConfigError(
            "label.oracle = generator: this data has no generator truth (_truth/queries.parquet "
            "beside the raw log); set label.oracle=none and label to_label/ by hand"
        )
    cfg = ctx.cfg.label
    answers = oracle_answers(selected, truth, cfg.oracle_answer, cfg.seed, round_)
    digest = hashlib.sha256(pd.util.hash_pandas_object(answers, index=False).to_numpy().tobytes())
    raw = ctx.spark.createDataFrame(answers.assign(source_file=ORACLE), schema=
                                    "query string, label string, round string, source_file string")  # fmt: skip
    raw = raw.withColumn("_corrupt_record", F.lit(None).cast("string"))
    result = import_labels(ctx.spark, ctx.cfg, raw, import_id=f"oracle-{digest.hexdigest()[:12]}",
                           by=ORACLE, source=ORACLE, round_=round_)  # fmt: skip
    print(f"[select] oracle (generator, {cfg.oracle_answer}): {result.describe()}",
          file=sys.stderr, flush=True)  # fmt: skip
    return {
        "oracle_unanswered": float(len(selected) - len(answers)),
        "labels_imported": float(result.imported),
        "label_conflicts": float(result.conflicts),
    }


def skip_precision(ctx: RunContext, model_name: str) -> dict[str, float]:
    """How often the champion is right on validation where it is confident enough to be
    skipped: what justifies skipping those pool queries."""
    validation = ctx.spark.read.parquet(str(ctx.require("split") / "validation"))
    scored = score_queries(validation.select("query", "majority_label"), model_name)
    confident = F.col("confidence") >= ctx.cfg.select.skip_confidence
    row = scored.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(confident.cast("int")).alias("confident"),
        F.sum((confident & (F.col("predicted_label") == F.col("majority_label"))).cast("int"))
        .alias("right"),
    ).first()  # fmt: skip
    n, conf, right = int(row["n"]), int(row["confident"] or 0), int(row["right"] or 0)
    out = {"skip_coverage": conf / n if n else 0.0}
    if conf:
        out["skip_precision"] = right / conf
    return out


def run(ctx: RunContext, out: Path) -> StageResult:
    cfg = ctx.cfg.select
    round_ = ctx.run_date
    pool = ctx.spark.read.parquet(str(ctx.require("split") / "pool"))
    pool = pool.select("query", "cluster_id", "bucket", "count").withColumn(
        "home", home_split_of(ctx.cfg)
    )
    labeled = read_labels(ctx.spark, ctx.root)
    if labeled is not None:
        pool = pool.join(labeled.select("query").distinct().withColumn("_labeled", F.lit(True)),
                         "query", "left")  # fmt: skip
    else:
        pool = pool.withColumn("_labeled", F.lit(None).cast("boolean"))
    pool = pool.persist()
    funnel = {
        r["k"]: int(r["n"])
        for r in pool.groupBy(
            F.when(F.col("_labeled"), "labeled_already")
            .when(F.col("home") != "train", "held_out_cluster")
            .otherwise("candidate").alias("k")
        ).agg(F.count(F.lit(1)).alias("n")).collect()
    }  # fmt: skip
    candidates = pool.where(F.col("_labeled").isNull() & (F.col("home") == "train")).drop(
        "home", "_labeled"
    )
    tmp = Path(tempfile.mkdtemp(prefix="zipfline-champion-"))
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    try:
        if ctx.champion is None:
            raise StageError(
                "select: no registry to ask for the champion (run it through zipfline run or "
                "spark-submit jobs/select.py, which connect the registry)"
            )
        champion = ctx.champion(ctx.cfg, tmp)
        strategy = cfg.strategy
        if champion is None:
            strategy = "random"
            tags["select_fallback"] = "no champion yet: diverse random sample"
            print(f"[select] no champion of {ctx.cfg.registry.model_name} in the registry yet: "
                  "a diverse random batch (one query per cluster)", file=sys.stderr, flush=True)  # fmt: skip
            scored = candidates.select(
                "*", *[F.lit(None).cast(f.dataType).alias(f.name) for f in SCORE_FIELDS]
            )
        else:
            name = ship_model(ctx.spark, champion.model_file)
            scored = score_queries(candidates, name)
            tags["champion_version"] = champion.version
            metrics |= skip_precision(ctx, name)
        scored = scored.persist()  # ranking reads it more than once: score the pool once
        train = ctx.spark.read.parquet(str(ctx.require("split") / "train"))
        num_labels = train.select("majority_label").distinct().count()
        ranked = rank_candidates(scored, cfg, strategy, cfg.budget, round_, num_labels).persist()
        batch = (
            ranked.where(F.col("outcome") == "selected")
            .withColumn("strategy", F.lit(strategy))
            .withColumn("round", F.lit(round_))
            .withColumn(  # the batch is small: one partition ranks it
                "rank",
                F.row_number().over(
                    Window.partitionBy(F.lit(0)).orderBy(F.desc("priority"), "query")
                ),
            )
            .drop("outcome")
        )
        batch.coalesce(1).write.parquet(str(out / SELECTED_DIR))
        for r in ranked.groupBy("outcome").count().collect():
            funnel[r["outcome"]] = int(r["count"])
        ranked.unpersist()
        scored.unpersist()
    finally:
        pool.unpersist()
        shutil.rmtree(tmp, ignore_errors=True)
    selected = ctx.spark.read.parquet(str(out / SELECTED_DIR)).toPandas().sort_values("rank")
    to_label = selected.assign(label="")[
        ["query", "label", "predicted_label", "confidence", "score", "cluster_id", "count",
         "bucket", "round", "strategy"]
    ]  # fmt: skip
    (out / TO_LABEL_DIR).mkdir()
    to_label.to_csv(out / TO_LABEL_DIR / TO_LABEL_FILE, index=False)
    n = len(selected)
    metrics |= {f"pool_{k}": float(funnel.get(k, 0))
                for k in ("candidate", "held_out_cluster", "labeled_already")}  # fmt: skip
    metrics |= {k: float(funnel.get(k, 0)) for k in OUTCOMES}
    metrics["pool_rows"] = float(sum(funnel.get(k, 0) for k in
                                     ("candidate", "held_out_cluster", "labeled_already")))  # fmt: skip
    if n:
        metrics["selected_tail_share"] = float((selected["bucket"] == "tail").mean())
        metrics["selected_mean_score"] = float(selected["score"].mean())
    if ctx.cfg.label.oracle == "generator" and n:
        metrics |= ask_oracle(ctx, selected, round_)
    print(f"[select] {strategy}: {n:,} of {metrics['pool_rows']:,.0f} pool queries → "
          f"{ctx.stage_dir(STAGE) / TO_LABEL_DIR / TO_LABEL_FILE} (" +
          ", ".join(f"{k} {funnel.get(k, 0):,}" for k in (*OUTCOMES[1:], "held_out_cluster",
                                                          "labeled_already")) + ")",
          file=sys.stderr, flush=True)  # fmt: skip
    return StageResult(
        rows_in=n,
        rows_out=n,
        metrics=metrics,
        params={"strategy": cfg.strategy, "budget": cfg.budget, "round": round_},
        tags=tags | {"strategy_used": strategy},
        artifacts=[f"{TO_LABEL_DIR}/{TO_LABEL_FILE}"],
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
