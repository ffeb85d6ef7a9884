"""The one config loader: YAML under ``conf/base/`` merged with ``conf/<env>/`` and ``--set``.

Config is loaded into frozen dataclasses and validated before any work starts
(docs/architecture.md, "Config"). An
unknown key or a bad value raises :class:`ConfigError` naming the key, the value and what is
allowed. Only ``yaml.safe_load`` is used.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.errors import ConfigError

Format = Literal["auto", "csv", "jsonl", "parquet"]


@dataclass(frozen=True)
class DataConfig:
    raw_path: str | None = None
    """Raw logs to ingest: a file or a folder (read recursively). Empty: ``generate`` makes them."""
    raw_format: Format = "auto"
    """Format of the raw files; ``auto`` picks it per file from the extension."""
    test_path: str | None = None
    """Optional external test set (same columns plus optional ``weight``); replaces the test split."""
    test_format: Format = "auto"
    """Format of the external test set; ``auto`` picks it per file from the extension."""
    root: str = "data"
    """Where every stage writes ``<root>/<run_date>/<stage>/``."""
    labels: tuple[str, ...] = ()
    """Allowed labels; when set, any other label is quarantined as ``unknown_label``."""


@dataclass(frozen=True)
class GenerateConfig:
    source: Literal["synthetic", "wordnet"] = "synthetic"
    """``synthetic``: made-up words that carry their label. ``wordnet``: real English, WordNet's
    glosses (definitions) labeled by their lexicographer file (``noun.animal``, ``verb.motion``,
    …; 45 labels, so ``num_labels``, ``words_per_label``, ``ambiguous_fraction`` and
    ``label_noise`` do not apply), with a held-out test file of glosses the log never shows."""
    wordnet_dir: str = "/usr/share/wordnet"
    """WordNet 3 ``dict`` folder (Debian's ``wordnet-base``) for ``source: wordnet``."""
    test_fraction: float = 0.1
    """``source: wordnet``: glosses held out of the log, as a share of ``num_queries``, written
    to ``_test/test.csv`` (``query,label``) for ``data.test_path``."""
    num_events: int = 200_000
    """Events (log lines) to generate."""
    num_queries: int = 20_000
    """Distinct queries in the generator's universe (``wordnet``: at most what WordNet has,
    about 116,000 distinct glosses less the held-out ones)."""
    words_per_label: int = 0
    """Topical vocabulary per label (0: about 3·√(num_queries / num_labels), at least 40)."""
    num_labels: int = 12
    """Categories (labels)."""
    zipf_exponent: float = 1.05
    """Exponent s of query popularity p(rank) ∝ rank^(-s)."""
    unlabeled_fraction: float = 0.1
    """Share of events that carry no label."""
    ambiguous_fraction: float = 0.1
    """Share of distinct queries whose labels split between two categories."""
    label_noise: float = 0.03
    """Probability mass an unambiguous query spreads over the other labels."""
    dirty_fraction: float = 0.002
    """Share of events made messy on purpose (blank, too long, odd case and spacing)."""
    near_dup_rate: float = 0.05
    """Planted near-duplicates (typo, word order, punctuation) per base query; the truth's
    ``group`` says which belong together."""
    format: Literal["csv", "jsonl", "parquet"] = "csv"
    """File format of the generated log."""
    num_files: int = 4
    """Files the generated log is written as."""
    seed: int = 7
    """Seed: the same seed gives the same log whatever the partitioning."""

    def __post_init__(self) -> None:
        _check_positive(self, "generate", ("num_events", "num_queries", "num_files"))
        if self.num_labels < 2:
            raise ConfigError(f"generate.num_labels = {self.num_labels}: must be at least 2")
        if self.zipf_exponent <= 0:
            raise ConfigError(f"generate.zipf_exponent = {self.zipf_exponent}: must be > 0")
        for name in ("unlabeled_fraction", "ambiguous_fraction", "label_noise", "dirty_fraction",
                     "near_dup_rate", "test_fraction"):  # fmt: skip
            _check_fraction(f"generate.{name}", getattr(self, name), upper_open=True)


@dataclass(frozen=True)
class IngestConfig:
    max_query_chars: int = 1024
    """Queries longer than this (after normalization) are quarantined as ``too_long``."""

    def __post_init__(self) -> None:
        _check_positive(self, "ingest", ("max_query_chars",))


@dataclass(frozen=True)
class DedupeConfig:
    near_enabled: bool = True
    """Cluster near-duplicates (typos, word order, punctuation) after the exact dedupe."""
    num_bands: int = 12
    """MinHash LSH bands; more bands find more candidate pairs."""
    band_rows: int = 3
    """MinHash values per band; more rows make a band match only for closer queries."""
    max_bucket: int = 200
    """LSH buckets with more queries than this are skipped (hot keys bound the pair count)."""
    max_edits: int = 1
    """A candidate pair is a near-duplicate when at most this many typo edits (insert, delete,
    substitute, swap neighbours) apart, or when both have the same words in another order."""
    max_iterations: int = 20
    """Rounds of the connected-components propagation that turns pairs into clusters."""

    def __post_init__(self) -> None:
        _check_positive(
            self, "dedupe", ("num_bands", "band_rows", "max_bucket", "max_iterations", "max_edits")
        )


@dataclass(frozen=True)
class SplitConfig:
    validation_fraction: float = 0.1
    """Share of near-duplicate clusters that go to validation."""
    test_fraction: float = 0.1
    """Share of clusters that go to test (ignored when ``data.test_path`` is set)."""
    head_share: float = 0.5
    """Traffic share of the most frequent queries that form the ``head`` bucket."""
    torso_share: float = 0.4
    """Traffic share of the next queries that form the ``torso`` bucket; the rest is ``tail``."""
    seed: int = 0
    """Seed of the split hash."""

    def __post_init__(self) -> None:
        _check_fraction("split.validation_fraction", self.validation_fraction, upper_open=True)
        _check_fraction("split.test_fraction", self.test_fraction, upper_open=True)
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError(
                "split.validation_fraction + split.test_fraction = "
                f"{self.validation_fraction + self.test_fraction}: must be below 1"
            )
        _check_fraction("split.head_share", self.head_share, upper_open=True)
        _check_fraction("split.torso_share", self.torso_share, upper_open=True)
        if self.head_share + self.torso_share > 1:
            raise ConfigError("split.head_share + split.torso_share must be at most 1")


AugmentOp = Literal["synonym", "insert", "swap", "delete", "typo"]


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = False
    """Add EDA-style variants of tail training queries (the stage is left out when false). Off by
    default: on the generated log it cost 0.4–0.7 points of test error (README, Training data)."""
    max_count: int = 2
    """Training queries seen at most this many times in the log get variants."""
    variants: int = 2
    """Variants per tail query (k), each by one operation."""
    ops: tuple[AugmentOp, ...] = ("synonym", "insert", "swap", "delete", "typo")
    """Operations drawn from: WordNet synonym replacement, insertion of a synonym, swap of two
    words, random deletion, a keyboard typo."""
    alpha: float = 0.1
    """Share of a query's words one operation changes (at least one)."""
    weight: float = 0.5
    """A variant's training weight relative to the query it came from."""
    wordnet_dir: str = "/usr/share/wordnet"
    """WordNet 3 ``dict`` folder (Debian's ``wordnet-base``), read when ``synonym`` or
    ``insert`` is among the ops."""
    seed: int = 0
    """Seed of the variant draws."""

    def __post_init__(self) -> None:
        _check_positive(self, "augment", ("max_count", "variants"))
        _check_fraction("augment.alpha", self.alpha, upper_open=False)
        _check_fraction("augment.weight", self.weight, upper_open=False)
        if self.enabled and not self.ops:
            raise ConfigError("augment.ops is empty: name at least one op or set enabled=false")


@dataclass(frozen=True)
class ShardConfig:
    shards_per_worker: int = 2
    """Shards written per training worker: ``train.world_size × shards_per_worker`` in all."""
    sampling: Literal["unique", "count", "sqrt_count"] = "sqrt_count"
    """Training weight of a distinct query: 1, its count, or the square root of its count."""
    seed: int = 0
    """Seed of the shard shuffle."""

    def __post_init__(self) -> None:
        _check_positive(self, "shard", ("shards_per_worker",))


@dataclass(frozen=True)
class FeaturizerConfig:
    num_buckets: int = 1 << 20
    """Hash buckets of the n-gram embedding table."""
    word_ngrams: int = 2
    """Word n-grams from 1 up to this length."""
    char_ngram_min: int = 0
    """Shortest character n-gram (0 turns character n-grams off)."""
    char_ngram_max: int = 0
    """Longest character n-gram (0 turns character n-grams off)."""

    def __post_init__(self) -> None:
        _check_positive(self, "featurizer", ("num_buckets", "word_ngrams"))
        if self.num_buckets > 2**31 - 1:
            raise ConfigError(f"featurizer.num_buckets = {self.num_buckets}: must fit in int32")
        if (self.char_ngram_min == 0) != (self.char_ngram_max == 0) or (
            self.char_ngram_min > self.char_ngram_max
        ):
            raise ConfigError(
                f"featurizer.char_ngram_min/max = {self.char_ngram_min}/{self.char_ngram_max}: "
                "both 0 (off), or 1 <= min <= max"
            )


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    """Embedding dimension."""
    hidden: tuple[int, ...] = ()
    """Sizes of optional hidden layers between the embedding bag and the output."""

    def __post_init__(self) -> None:
        _check_positive(self, "model", ("dim",))
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"model.hidden = {list(self.hidden)}: sizes must be positive")


@dataclass(frozen=True)
class TrainConfig:
    world_size: int = 2
    """Training processes (data-parallel workers)."""
    precision: Literal["fp64", "fp32", "bf16", "fp16"] = "fp32"
    """Numeric precision; ``fp16`` needs a GPU (it uses a gradient scaler)."""
    mode: Literal["auto", "sync", "local_sgd", "shared", "async"] = "auto"
    """``sync``: every step, the gradients of the embedding rows some worker touched are
    exchanged (DDP's all-reduce on GPUs). ``local_sgd``: each worker steps on its own and the
    models are averaged every ``sync_every`` steps (only the embedding rows some worker touched
    travel), trading staleness for far less communication. ``shared``: the numba kernel's
    workers on one host update one copy of the weights in shared memory without locks
    (Hogwild!, as fastText's threads); nothing travels (``local_sgd`` where they cannot share).
    ``async``: rank 0 is a parameter server and the other ranks workers that pull the rows
    their batch touches, compute and push the gradients, each applied at once with the step
    divided by its staleness (needs 2 or more ranks; plain SGD at ``lr`` on every parameter).
    ``auto``: ``local_sgd`` where the numba kernel runs (``--budget`` picks ``shared`` where the
    budget is too short to converge), ``sync`` elsewhere."""
    sync_every: int = 50
    """Steps between model averages in ``local_sgd`` mode."""
    max_staleness: int = 32
    """``async`` mode: a push computed more than this many server versions ago is dropped (and
    counted) instead of applied."""
    lambda_max: float | None = None
    """The largest eigenvalue of the loss's Hessian, where known (null: unknown; ``--budget`` in
    async mode measures it over the whole model, whose every parameter the server steps at
    ``lr``). ``async`` mode then caps its rate so that η₀·λ_max stays at
    ``auto_lr_safety`` of the stability bound max(t, 1)·2·sin(π/(4t+2)) at its lowest for the
    staleness t up to its pushes' 95th percentile τ (2 at τ = 0, else 1)."""
    exchange_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """The precision gradients travel in between workers in ``sync`` mode: the row exchange on
    CPU (rows and dense gradients cast for the wire, summed back in the model's precision), or
    DDP's all-reduce on GPUs (its fp16 or bf16 compression hook; the sum is then taken in that
    precision). ``fp32``: as computed (fp64 for an fp64 model). Half the bytes of fp32, at the
    cost of rounding each gradient: bf16 to 8 bits with fp32's range; fp16 to 11 bits but
    without loss scaling, so gradients under 6e-5 lose bits and under 6e-8 vanish (prefer bf16;
    under ``precision=fp16`` the scaled gradients can overflow fp16, and the scaler skips those
    steps). Other modes send no gradients, so it changes nothing there."""
    time_budget_s: float = 60.0
    """Wall-clock budget for the whole training; all ranks stop at the same step."""
    epochs: int | None = None
    """Optional cap on passes over the training shards (null: none, so the budget or
    convergence ends the run)."""
    batch_size: int = 256
    """Examples per worker per step."""
    optimizer: Literal["adagrad", "sgd", "sparse_adam"] = "adagrad"
    """Optimizer of the embedding table (sparse gradients on CPU); ``sparse_adam`` is CPU only.
    Under the numba kernel ``adagrad`` is row-wise Adagrad (one accumulator per row) and the
    output layer takes the same optimizer and ``lr``."""
    kernel: Literal["auto", "numba", "torch"] = "auto"
    """The training loop: ``numba``, fastText's per-example update compiled for the CPU
    (linear model, fp32/fp64, ``sgd`` or ``adagrad``; workers average every ``sync_every``
    steps, or share one copy in ``shared`` mode); ``torch``, mini-batches through autograd; ``auto`` (the default), numba where it
    applies (CPU, no hidden layer, fp32/fp64, sgd/adagrad, and a ``mode`` other than ``sync``
    or one worker), torch elsewhere."""
    threads: int = 1
    """Threads per worker under the numba kernel (Hogwild!: lock-free shared updates, as
    fastText does); 1 is deterministic for one worker or in ``local_sgd`` mode (``shared``
    workers update one copy without locks, as threads do)."""
    lr: float = 0.5
    """Learning rate of the embedding optimizer."""
    dense_optimizer: Literal["adagrad", "sgd", "adam"] = "adam"
    """Optimizer of the dense layers (hidden and output)."""
    dense_lr: float = 0.003
    """Learning rate of the dense optimizer."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Decay of both learning rates over the planned steps: as many as the rest of the budget
    leaves room for at the measured step time (timed after a warm-up, measured again at every
    stop vote and after every evaluation), at most ``epochs`` × steps per epoch."""
    warmup_steps: int = 0
    """Steps of linear warm-up before the schedule."""
    checkpoint_every: int = 200
    """Steps between atomic checkpoints (0: only the final one); a rerun resumes from the last."""
    timeout_s: float = 600.0
    """How long a collective waits for a missing rank before the run fails."""
    tolerance: float = 1e-3
    """ρ: an evaluation (one per epoch) improves on the best validation loss so far when it is
    at least this much lower."""
    patience: int = 3
    """Evaluations in a row that do not improve by ``tolerance`` before the run stops as
    converged."""
    auto: bool = False
    """Choose the batch size, a learning-rate cap and the precision from measurements on a
    probe of the training rows (``zipfline run --budget``); the measuring counts against
    ``time_budget_s``."""
    auto_probe_rows: int = 512
    """``auto``: training rows measured on (per-example gradients, Hessian-vector products)."""
    auto_grad_rel_error: float = 0.5
    """``auto``: ε of Chebyshev's batch bound, as a share of the mean gradient's norm."""
    auto_delta: float = 0.1
    """``auto``: δ of Chebyshev's batch bound (the chance of missing by more than ε)."""
    auto_lr_safety: float = 0.5
    """``auto``: c of the learning-rate cap c · 2/λ_max."""
    use_gpu: bool = False
    """Train on CUDA devices (one per local rank, NCCL) instead of CPU (gloo)."""
    launcher: Literal["distributor", "processes"] = "distributor"
    """Who starts the training processes: Spark's TorchDistributor, or ``processes``:
    torch.multiprocessing on this machine alone, without Spark (seconds sooner to start; for a
    single machine)."""
    local_mode: bool = True
    """TorchDistributor local mode (processes on the driver) or barrier tasks on executors."""
    seed: int = 0
    """Seed of initialization and of the per-epoch shuffle."""

    def __post_init__(self) -> None:
        _check_positive(
            self, "train", ("world_size", "batch_size", "sync_every", "threads", "patience",
                            "auto_probe_rows", "auto_grad_rel_error", "auto_lr_safety"),
        )  # fmt: skip
        if not 0 < self.auto_delta < 1:
            raise ConfigError(f"train.auto_delta = {self.auto_delta}: must be in (0, 1)")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs = {self.epochs}: must be positive, or null for no cap")
        if self.lambda_max is not None and not self.lambda_max > 0:
            raise ConfigError(f"train.lambda_max = {self.lambda_max}: must be positive, or null")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.max_staleness < 0:
            raise ConfigError(
                "train.warmup_steps, train.checkpoint_every and train.max_staleness must be >= 0"
            )
        if self.optimizer == "sparse_adam" and self.use_gpu:
            raise ConfigError(
                "train.optimizer = sparse_adam needs sparse gradients, which NCCL cannot "
                "all-reduce; on GPUs use adagrad or sgd"
            )
        for name in ("time_budget_s", "lr", "dense_lr", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} = {getattr(self, name)}: must be > 0")
        if self.tolerance < 0:
            raise ConfigError(f"train.tolerance = {self.tolerance}: must be >= 0")
        if self.precision == "fp16" and not self.use_gpu:
            raise ConfigError(
                "train.precision = fp16 needs a GPU (set train.use_gpu=true on CUDA nodes); "
                "on CPU use bf16 or fp32"
            )


@dataclass(frozen=True)
class EvalConfig:
    breadth_recall: float = 0.8
    """A label counts towards ``breadth`` when its recall on the test set is at least this."""
    bootstrap_rounds: int = 500
    """Resamples of the distinct test queries for the 95% intervals of the errors (0: none)."""
    top_confusions: int = 5
    """Most confused (true, predicted) label pairs reported."""
    seed: int = 0
    """Seed of the bootstrap."""
    decompose: bool = True
    """Decompose the test error into approximation, estimation and optimization error with
    reference runs (trained to convergence on n/8, n/4, n/2 and n of the training rows)."""
    reference_budget_s: float = 300.0
    """Time budget of one reference run; one that runs out has not converged (reported missing)."""
    reference_epochs: int = 20
    """Upper bound on a reference run's passes over its data."""
    reference_tolerance: float = 0.0001
    """A reference run stops when validation loss improves by less than this (tighter than
    ``train.tolerance``: it stands for training to convergence)."""
    dask_scheduler: str = ""
    """A Dask scheduler address for the reference runs; empty: a LocalCluster on 127.0.0.1."""
    dask_workers: int = 2
    """Workers of that LocalCluster (one training process each)."""
    local_cluster_min_rows: int = 20_000
    """With no ``dask_scheduler``, training splits below this many rows have their reference
    runs one after another in the evaluate stage's own process: starting a LocalCluster's
    workers (each imports torch) then costs more than the runs. 0: always the LocalCluster."""

    def __post_init__(self) -> None:
        _check_fraction("eval.breadth_recall", self.breadth_recall, upper_open=False)
        if self.local_cluster_min_rows < 0:
            raise ConfigError(
                f"eval.local_cluster_min_rows: {self.local_cluster_min_rows} is negative (0: "
                "always the LocalCluster)"
            )


Gate = Literal["ingest", "dedupe", "split", "shard"]
Policy = Literal["fail", "warn", "quarantine"]


@dataclass(frozen=True)
class ExtraExpectation:
    gate: Gate
    """The gate that runs it: ``ingest``, ``dedupe``, ``split`` or ``shard``."""
    name: str
    """Its name: the quarantine ``reason`` and the key in the gate's results."""
    type: str
    """A Great Expectations 1.x expectation type, e.g. ``expect_column_values_to_be_between``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The expectation's arguments, e.g. ``{column: count, max_value: 1000000}``."""
    frame: str = ""
    """The gate's frame it checks (empty: the gate's main one, see the README)."""
    policy: Policy = "fail"
    """``fail`` (stop the run), ``warn`` (log and go on) or ``quarantine`` (move the failing
    rows to quarantine with this name as ``reason``)."""


@dataclass(frozen=True)
class DqConfig:
    enabled: bool = True
    """Run the Great Expectations gates after ingest, dedupe, split and shard."""
    policies: dict[str, dict[str, Policy]] = field(default_factory=dict)
    """Policy per expectation over the defaults: ``{<gate>: {<name>: fail | warn | quarantine}}``,
    e.g. ``--set dq.policies.dedupe.zipf_exponent=warn``."""
    max_quarantined_share: float = 0.2
    """ingest: the most of the input rows that may be quarantined."""
    zipf_exponent_min: float = 0.5
    """dedupe: bounds of the exponent fitted to the rank-frequency curve of query counts."""
    zipf_exponent_max: float = 2.5
    zipf_min_queries: int = 1000
    """dedupe: the Zipf checks run only with at least this many distinct queries."""
    top_share_min: float = 0.05
    """dedupe: bounds of the traffic share of the top 1% of distinct queries."""
    top_share_max: float = 0.95
    split_tolerance: float = 0.05
    """split: how far a split's share of clusters may be from its configured fraction (widened
    by 3 binomial standard deviations on small data)."""
    shard_balance: float = 0.01
    """shard: the most a train shard's row count may differ from the mean, relative."""
    extra: tuple[ExtraExpectation, ...] = ()
    """More expectations, written in conf (no Python): gate, name, type, kwargs, policy."""
    result_format: Literal["BOOLEAN_ONLY", "BASIC", "SUMMARY"] = "BOOLEAN_ONLY"
    """How much Great Expectations keeps per expectation; failing ones get samples anyway."""

    def __post_init__(self) -> None:
        for key in ("max_quarantined_share", "top_share_min", "top_share_max", "split_tolerance",
                    "shard_balance"):  # fmt: skip
            _check_fraction(f"dq.{key}", getattr(self, key), upper_open=False)
        for gate in self.policies:
            if gate not in typing.get_args(Gate):
                raise ConfigError(
                    f"dq.policies.{gate}: no such gate (gates: {', '.join(typing.get_args(Gate))})"
                )
        names = [f"{e.gate}.{e.name}" for e in self.extra]
        if len(set(names)) != len(names):
            raise ConfigError(f"dq.extra: expectation names repeat: {', '.join(sorted(names))}")


@dataclass(frozen=True)
class SweepConfig:
    budgets_s: tuple[float, ...] = (1.0, 3.0, 10.0)
    """Training time budgets (seconds) of the trade-off sweep."""
    fractions: tuple[float, ...] = (0.25, 1.0)
    """Shares of the training rows (n)."""
    dims: tuple[int, ...] = (16, 64)
    """Embedding sizes (capacity)."""
    precisions: tuple[Literal["fp64", "fp32", "bf16", "fp16"], ...] = ("fp32", "bf16")
    """Precisions (fp16 needs a GPU)."""
    workers: int = 2
    """Dask LocalCluster workers (one training each at a time), unless eval.dask_scheduler."""

    def __post_init__(self) -> None:
        for name in ("budgets_s", "fractions", "dims", "precisions"):
            if not getattr(self, name):
                raise ConfigError(f"sweep.{name} is empty: give at least one value")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"sweep.fractions = {list(self.fractions)}: each must be in (0, 1]")
        _check_positive(self, "sweep", ("workers",))


SelectStrategy = Literal["margin", "entropy", "least_confidence", "random"]


@dataclass(frozen=True)
class SelectConfig:
    enabled: bool = True
    """Pick an active-learning batch from the unlabeled pool after each run (the last stage)."""
    strategy: SelectStrategy = "margin"
    """How informative a pool query is to the champion: ``margin`` (1 − top-1 + top-2
    probability), ``entropy`` (normalized), ``least_confidence`` (1 − top-1), or ``random``
    (the baseline: uniform, one per cluster, nothing skipped)."""
    budget: int = 500
    """Rows per selection, written to ``to_label/``."""
    skip_confidence: float = 0.9
    """Pool queries the champion predicts with at least this confidence are skipped (it gets
    them right; the stage logs how often on validation as ``skip_precision``)."""
    max_class_share: float = 0.25
    """The most of a batch one predicted label may take (at least 1/number of labels, so a
    few labels can still fill the budget)."""
    bucket_weights: dict[str, float] = field(
        default_factory=lambda: {"head": 0.6, "torso": 0.8, "tail": 1.0}
    )
    """A query's score is multiplied by its Zipf bucket's weight: the tail is favoured."""
    seed: int = 0
    """Seed of ``random`` (and of ties)."""

    def __post_init__(self) -> None:
        _check_positive(self, "select", ("budget",))
        _check_fraction("select.skip_confidence", self.skip_confidence, upper_open=False)
        _check_fraction("select.max_class_share", self.max_class_share, upper_open=False)
        if self.max_class_share <= 0:
            raise ConfigError("select.max_class_share = 0: must be in (0, 1]")
        unknown = set(self.bucket_weights) - {"head", "torso", "tail"}
        if unknown:
            raise ConfigError(
                f"select.bucket_weights: unknown bucket(s) {', '.join(sorted(unknown))} "
                "(buckets: head, torso, tail)"
            )
        if any(w < 0 for w in self.bucket_weights.values()):
            raise ConfigError(f"select.bucket_weights = {self.bucket_weights}: must be >= 0")


@dataclass(frozen=True)
class LabelConfig:
    oracle: Literal["none", "generator"] = "none"
    """Who answers a selection: ``none`` (people, via ``to_label/`` and ``zipfline label
    import``) or ``generator`` (the generated log's ground truth, so the loop runs unattended)."""
    oracle_answer: Literal["sample", "majority"] = "sample"
    """The generator oracle's answer: a label drawn from the query's true label distribution
    (a labeler with the log's noise) or its majority label (an expert)."""
    seed: int = 0
    """Seed of the oracle's draws."""


@dataclass(frozen=True)
class RetrainConfig:
    budget_s: float = 7200.0
    """Wall-clock budget of one ``zipfline retrain`` (the cron entry); over it, the run stops
    with exit 1 and the lock is released."""

    def __post_init__(self) -> None:
        _check_positive(self, "retrain", ("budget_s",))


@dataclass(frozen=True)
class RegistryConfig:
    enabled: bool = True
    """Register every trained model after evaluation and move ``champion`` on merit."""
    model_name: str = "zipfline"
    """The registered model's name."""
    margin: float = 0.001
    """How much lower ``test_error_weighted`` must be than the champion's, on the same test
    set, for the alias ``champion`` to move."""


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; relative sqlite paths are relative to the working folder."""
    experiment: str = "zipfline"
    """MLflow experiment name."""


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    """Spark master; ignored under ``spark-submit``, which sets its own."""
    app_name: str = "zipfline"
    """Spark application name."""
    driver_memory: str = "4g"
    """Driver memory for the embedded local session."""
    shuffle_partitions: int = 8
    """``spark.sql.shuffle.partitions``."""
    conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings, passed as they are."""

    def __post_init__(self) -> None:
        _check_positive(self, "spark", ("shuffle_partitions",))


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dq: DqConfig = field(default_factory=DqConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), for logging and for YAML round trips."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _check_positive(obj: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name} = {getattr(obj, name)}: must be a positive number")


def _check_fraction(key: str, value: float, *, upper_open: bool) -> None:
    ok = 0 <= value < 1 if upper_open else 0 <= value <= 1
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"{key} = {value}: must be in {bound}")


# --- loading -------------------------------------------------------------------------------


def default_conf_dir() -> Path:
    """The conf folder: ``$ZIPFLINE_CONF_DIR``, else ``./conf`` when it has ``base/``, else the
    one shipped beside the package (an editable install from the repository)."""
    env = os.environ.get("ZIPFLINE_CONF_DIR")
    if env:
        return Path(env)
    cwd_conf = Path.cwd() / "conf"
    if (cwd_conf / "base").is_dir():
        return cwd_conf
    return Path(__file__).resolve().parents[1] / "conf"


def load_config(
    env: str = "local",
    overrides: typing.Sequence[str] = (),
    conf_dir: Path | None = None,
) -> Config:
    """Merge ``conf/base/*.yaml``, ``conf/<env>/*.yaml`` and ``--set`` overrides; validate.

    ``env`` ``local`` may be absent (it is git-ignored); any other env must exist.
    """
    conf_dir = conf_dir or default_conf_dir()
    base = conf_dir / "base"
    if not base.is_dir():
        raise ConfigError(
            f"config folder {base} not found (set ZIPFLINE_CONF_DIR or run from the repo)"
        )
    merged: dict[str, Any] = {}
    for path in sorted(base.glob("*.y*ml")):
        _deep_merge(merged, _read_yaml(path), str(path))
    env_dir = conf_dir / env
    if env_dir.is_dir():
        for path in sorted(env_dir.glob("*.y*ml")):
            _deep_merge(merged, _read_yaml(path), str(path))
    elif env != "local":
        known = sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "base")
        raise ConfigError(
            f"--env {env}: no folder {env_dir} (known envs: {', '.join(known) or 'none'})"
        )
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(merged, key, value)
    return build(Config, merged, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``dotted.key=value`` → (key, YAML-parsed value); an empty value means null."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.world_size=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[last] = value


def _deep_merge(target: dict[str, Any], update: dict[str, Any], source: str) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value, source)
        else:
            target[key] = value


_T = typing.TypeVar("_T")


def build(cls: type[_T], data: Any, prefix: str) -> _T:
    """Build dataclass ``cls`` from a mapping, converting and checking every field's type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} = {data!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key {key!r} (allowed in {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {
        name: _convert(hints[name], data[name], f"{prefix}{name}")
        for name in fields
        if name in data
    }
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch is a bug
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{key} = {value!r}: not allowed (allowed: {', '.join(map(str, args))})"
            )
        return value
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        if value in (None, ""):
            items = []
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        if args and args[1] is Any:
            return dict(value)
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if tp is str:
        if value is None or isinstance(value, dict | list):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")  # pragma: no cover
