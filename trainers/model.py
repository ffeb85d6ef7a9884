"""The model: a hashed n-gram ``EmbeddingBag`` classifier with optional hidden layers."""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UnsafeFile(ValueError):
    """A model or checkpoint file that holds more than tensors and plain values."""


def load_tensors(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """Read a ``model.pt`` or checkpoint that holds only tensors and plain Python values
    (``torch.load(weights_only=True)``), so that loading a file someone else could have written
    runs no code; a file that carries any other pickled object raises :class:`UnsafeFile`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFile(
            f"{path}: refused, it holds pickled Python objects besides tensors and plain values "
            f"(loading it could run code): {first}"
        ) from exc


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved beside its weights)."""

    num_buckets: int
    dim: int
    hidden: tuple[int, ...]
    num_classes: int

    @property
    def capacity(self) -> str:
        """``buckets×dim×hidden``, the ``model_capacity`` param (docs/architecture.md, "MLflow
        record")."""
        hidden = "-".join(map(str, self.hidden)) or "0"
        return f"{self.num_buckets}x{self.dim}x{hidden}"

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(
            int(data["num_buckets"]),
            int(data["dim"]),
            tuple(data["hidden"]),
            int(data["num_classes"]),
        )


class NgramClassifier(nn.Module):
    """Mean of the query's n-gram embeddings → (hidden layers →) class logits, like fastText."""

    def __init__(self, spec: ModelSpec, *, sparse: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.embedding = nn.EmbeddingBag(spec.num_buckets, spec.dim, mode="mean", sparse=sparse)
        layers: list[nn.Module] = []
        width = spec.dim
        for size in spec.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.output = nn.Linear(width, spec.num_classes)
        self.hidden = nn.Sequential(*layers)
        with torch.no_grad():  # fastText's initialization: small uniform inputs, zero outputs
            self.embedding.weight.uniform_(-1.0 / spec.dim, 1.0 / spec.dim)
            self.output.weight.zero_()
            self.output.bias.zero_()

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(self.embedding(ids, offsets)))

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the embedding table: the hidden and output layers, which travel
        whole (flattened into one vector) where the table's touched rows travel alone."""
        return [p for name, p in self.named_parameters() if not name.startswith("embedding.")]


def split_like(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """``flat`` (the parameters, or their gradients, flattened and concatenated in order) as
    views shaped like each of ``params``."""
    return [
        part.view_as(p)
        for part, p in zip(flat.split([p.numel() for p in params]), params, strict=True)
    ]
