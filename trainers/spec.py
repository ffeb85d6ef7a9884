"""The training spec: everything one training process needs, typed, in one frozen dataclass.

A :class:`TrainSpec` is built in one way from a :class:`~core.config.Config`
(:meth:`TrainSpec.from_config`); every other spec (a sweep point, a reference run of the error
decomposition, a test's or a benchmark's variant) is derived from one with :meth:`with_train`,
:meth:`with_model` or :func:`dataclasses.replace`. It pickles (TorchDistributor and Dask ship it
to their processes) and round-trips through JSON (``train_spec.json``, which a ``torchrun``
launch and the evaluate stage read back, validated key by key like the config).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import write_text
from core.config import Config, ModelConfig, TrainConfig, build
from core.errors import ConfigError
from trainers.featurizer import FEATURIZER_VERSION, NORMALIZATION, Featurizer

if TYPE_CHECKING:
    from trainers.model import ModelSpec


@dataclass(frozen=True)
class TrainSpec:
    """One training: the shards it learns from, where it writes, and how it trains."""

    shard_dir: str
    """The shard stage's folder (``manifest.json`` and the Parquet shards)."""
    out_dir: str
    """Where rank 0 writes ``model.pt`` and ``train_result.json`` and every rank its
    ``ranks/rank-<r>.json``."""
    train: TrainConfig
    """How it trains (``train.*`` of the config)."""
    model: ModelConfig
    """The network's size (``model.*`` of the config)."""
    featurizer: Featurizer
    """The featurizer the shards were written with; :meth:`featurizer_settings` is what the
    shard manifest records, and the shards must agree with it exactly."""
    checkpoint_dir: str | None = None
    """Where checkpoints are written and resumed from; None: no checkpoints."""
    train_fraction: float = 1.0
    """The seeded share of each rank's training rows it learns from (reference runs of the
    error decomposition and sweep points learn from less than all)."""
    early_stop: bool = True
    """Stop when validation loss improves by less than ``train.tolerance`` after an epoch.
    ``train.tolerance`` is at least 0, so a training that must run every epoch (a benchmark, a
    test) turns this off; then only the budget and ``train.epochs`` end it."""

    def __post_init__(self) -> None:
        if not self.shard_dir:
            raise ConfigError("shard_dir is empty: name the shard stage's folder")
        if not self.out_dir:
            raise ConfigError("out_dir is empty: name where the training writes")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction = {self.train_fraction}: must be in (0, 1]")

    # --- building -----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        shard_dir: Path | str,
        out_dir: Path | str,
        checkpoint_dir: Path | str | None = None,
    ) -> TrainSpec:
        """The one way to make a spec: the config's training, model and featurizer settings."""
        return cls(
            shard_dir=str(shard_dir),
            out_dir=str(out_dir),
            checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None,
            train=cfg.train,
            model=cfg.model,
            featurizer=Featurizer.from_config(cfg.featurizer),
        )

    def with_train(self, **changes: Any) -> TrainSpec:
        """This spec with some ``train.*`` settings changed (validated like the config)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))

    def with_model(self, **changes: Any) -> TrainSpec:
        """This spec with some ``model.*`` settings changed (validated like the config)."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **changes))

    # --- what it means --------------------------------------------------------------------

    def featurizer_settings(self) -> dict[str, Any]:
        """The featurizer settings as the shard manifest and a saved model record them."""
        return self.featurizer.settings()

    def model_spec(self, num_classes: int) -> ModelSpec:
        """The network for ``num_classes`` labels."""
        from trainers.model import ModelSpec  # torch: only where a network is sized or built

        return ModelSpec(
            num_buckets=self.featurizer.num_buckets,
            dim=self.model.dim,
            hidden=tuple(self.model.hidden),
            num_classes=num_classes,
        )

    def params(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The MLflow params of this training on the shards of ``manifest`` (the names the
        report and the README rely on, plus the optimizers, the schedule and the sizes)."""
        t, f = self.train, self.featurizer
        labels = manifest.get("labels") or []
        return {
            "precision": t.precision,
            "world_size": t.world_size,
            "mode": t.mode,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "model_capacity": self.model_spec(max(len(labels), 1)).capacity,
            "n_train": int(manifest["splits"]["train"]["rows"]),
            "time_budget_s": t.time_budget_s,
            "tolerance": t.tolerance,
            "patience": t.patience,
            "seed": t.seed,
            "epochs": t.epochs,
            "optimizer": t.optimizer,
            "dense_optimizer": t.dense_optimizer,
            "dense_lr": t.dense_lr,
            "lr_schedule": t.lr_schedule,
            "warmup_steps": t.warmup_steps,
            "sync_every": t.sync_every,
            "exchange_precision": t.exchange_precision,
            "max_staleness": t.max_staleness,
            "dim": self.model.dim,
            "hidden": "-".join(map(str, self.model.hidden)) or "0",
            "num_buckets": f.num_buckets,
            "word_ngrams": f.word_ngrams,
            "char_ngrams": f"{f.char_ngram_min}-{f.char_ngram_max}",
        } | ({"lambda_max": t.lambda_max} if t.lambda_max is not None else {})

    def settings_payload(self, *, leave_out: tuple[str, ...]) -> dict[str, Any]:
        """What decides the trained model, as plain JSON data for fingerprints and cache keys:
        the ``train.*`` settings less ``leave_out``, the model, the featurizer, and
        ``early_stop`` when it is off (only then, so that the payload of a run that may stop
        early is what it was before the flag existed, and so are its hashes; the same for
        ``train.exchange_precision`` at fp32 and ``train.max_staleness`` outside async mode)."""
        data = self.to_dict()
        train = {k: v for k, v in data["train"].items() if k not in leave_out}
        if train.get("exchange_precision") == "fp32":  # as before the setting existed
            del train["exchange_precision"]
        if train.get("mode") != "async":  # they change nothing in the other modes
            train.pop("max_staleness", None)
            train.pop("lambda_max", None)
        elif train.get("lambda_max") is None:
            train.pop("lambda_max", None)
        payload = {"train": train, "model": data["model"], "featurizer": data["featurizer"]}
        if not self.early_stop:
            payload["early_stop"] = False
        return payload

    # --- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples as lists, the featurizer as its settings)."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        data["featurizer"] = self.featurizer_settings()
        return data

    def to_json(self) -> str:
        """Indented JSON, read back by :meth:`from_json`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> TrainSpec:
        """Validate and build, naming the key of a bad value (like the config loader)."""
        if not isinstance(data, dict):
            raise ConfigError(f"train spec = {data!r}: expected a mapping")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"train spec: missing key {missing[0]!r} (required: "
                              f"{', '.join(required)})")  # fmt: skip
        data = dict(data)
        settings = data.get("featurizer")
        if isinstance(settings, dict):
            settings = dict(settings)
            version = settings.pop("version", None)
            normalization = settings.pop("normalization", None)
            if version != FEATURIZER_VERSION or normalization != NORMALIZATION:
                raise ConfigError(
                    f"featurizer.version/normalization = {version!r}/{normalization!r}: written "
                    f"by another featurizer (this one is {FEATURIZER_VERSION!r}/{NORMALIZATION!r})"
                )
            data["featurizer"] = settings
        return build(cls, data, "")

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        """Read :meth:`to_json`'s output back."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"train spec: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def write(self, path: Path) -> None:
        """Write the spec to ``path`` atomically."""
        write_text(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> TrainSpec:
        """Read a spec :meth:`write` wrote; a bad file or value raises ``ConfigError`` naming
        the file and the key."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the train spec ({exc})") from exc
        try:
            return cls.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
