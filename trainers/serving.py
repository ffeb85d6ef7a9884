"""Serving: the trained model as an MLflow pyfunc that predicts from raw query text.

:class:`QueryClassifierModel` wraps :class:`~trainers.predictor.Predictor` (plain torch +
numpy, the featurizer inside: train/serve parity); its input is a frame with a ``query``
column (or a list of strings), its output has ``label``, ``confidence`` and ``probabilities``
(in the order of ``labels``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from trainers.predictor import Predictor

__all__ = ["Predictor", "QueryClassifierModel", "pyfunc_kwargs", "quiet_pyfunc", "save_pyfunc"]


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


MODEL_CODE = Path(__file__).resolve().with_name("pyfunc_code.py")


def pyfunc_kwargs(model_file: Path) -> dict[str, Any]:
    """Arguments for ``mlflow.pyfunc.save_model``/``log_model``: one definition for both. The
    model is logged from code (``trainers/pyfunc_code.py``), not pickled; ``trainers/`` goes
    along as its code path."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {"model": str(model_file)},
        "code_paths": [str(Path(__file__).resolve().parent)],
        "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
    }


@contextmanager
def quiet_pyfunc() -> Iterator[None]:
    """Silence MLflow's INFO and WARNING lines while a model is saved or logged."""
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
