"""Batch prediction from raw query text: the trained model with its featurizer and label names.

Plain torch + numpy, no MLflow: Spark workers that score a pool import only this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from trainers.featurizer import Featurizer
from trainers.model import ModelSpec, NgramClassifier, load_tensors

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
        """The model saved at ``path``; :class:`~trainers.model.UnsafeFile` if the file holds
        more than tensors and plain values."""
        return cls(load_tensors(path))

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
