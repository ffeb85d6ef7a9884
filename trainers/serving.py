"""Serving: predictions from raw query text, with the featurizer inside (train/serve parity).

:class:`Predictor` is plain torch + numpy; :class:`QueryClassifierModel` wraps it as an MLflow
pyfunc whose input is a frame with a ``query`` column (or a list of strings) and whose output
has ``label``, ``confidence`` and ``probabilities`` (in the order of ``labels``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from trainers.featurizer import Featurizer
from trainers.model import ModelSpec, NgramClassifier

PREDICT_BATCH = 8192


class Predictor:
    """A trained model with its featurizer and label names, for batch prediction on CPU."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.spec = ModelSpec.from_dict(payload["model_spec"])
        self.labels: list[str] = list(payload["labels"])
        self.featurizer = Featurizer.from_settings(payload["featurizer"])
        self.model = NgramClassifier(self.spec, sparse=False)
        self.model.load_state_dict(payload["state_dict"])
        self.model.eval()

    @classmethod
    def from_file(cls, path: Path | str) -> Predictor:
        return cls(torch.load(path, map_location="cpu", weights_only=False))

    @torch.no_grad()
    def predict_proba(self, queries: list[str] | pd.Series) -> np.ndarray:
        """Class probabilities, one row per raw query."""
        texts = list(queries)
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for start in range(0, len(texts), PREDICT_BATCH):
            chunk = texts[start : start + PREDICT_BATCH]
            flat, offsets = self.featurizer.bags(self.featurizer.ids_raw(t) for t in chunk)
            logits = self.model(torch.from_numpy(flat), torch.from_numpy(offsets))
            out[start : start + len(chunk)] = torch.softmax(logits, dim=1).numpy()
        return out

    def predict_frame(self, queries: list[str] | pd.Series) -> pd.DataFrame:
        probs = self.predict_proba(queries)
        best = probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": np.asarray(self.labels, dtype=object)[best],
                "confidence": probs[np.arange(len(best)), best].astype(np.float64),
                "probabilities": list(probs.astype(np.float64)),
            }
        )


class QueryClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc around :class:`Predictor` (artifact ``model``: the saved ``model.pt``)."""

    # Input is a frame of raw text (or a list of strings): no type-hint schema to validate, and
    # without this MLflow warns at every import that predict() has no type hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:  # noqa: ANN001
        self.predictor = Predictor.from_file(context.artifacts["model"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        if isinstance(model_input, pd.DataFrame):
            queries = model_input["query"] if "query" in model_input else model_input.iloc[:, 0]
        else:
            queries = pd.Series(list(model_input))
        return self.predictor.predict_frame(queries.astype("string").fillna(""))


def pyfunc_kwargs(model_file: Path) -> dict[str, Any]:
    """Arguments for ``mlflow.pyfunc.save_model``/``log_model``: one definition for both."""
    return {
        "python_model": QueryClassifierModel(),
        "artifacts": {"model": str(model_file)},
        "code_paths": [str(Path(__file__).resolve().parent)],
        "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
    }


@contextmanager
def quiet_pyfunc() -> Iterator[None]:
    """Silence MLflow's advice to use models-from-code: this model is pickled on purpose, with
    its code beside it (``code_paths``)."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_pyfunc(model_file: Path, path: Path) -> Path:
    """Save the model as a self-contained MLflow pyfunc folder at ``path``."""
    with quiet_pyfunc():
        mlflow.pyfunc.save_model(path=str(path), **pyfunc_kwargs(model_file))
    return path
