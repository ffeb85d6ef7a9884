"""The CPU hot loop: fastText's own algorithm, compiled with numba, on the model's torch weights.

For the linear model (mean of n-gram embeddings → class logits, no hidden layer), training one
example at a time with plain SGD is what fastText does, and on a CPU it beats any mini-batch
formulation: a step touches only the example's embedding rows and the output layer, with no
gradient tensors, no sparse-tensor bookkeeping and no optimizer pass. The weights stay the
``NgramClassifier``'s torch tensors: the kernel writes into their memory through ``.numpy()``
views, so serving, checkpoints and replica averaging see them unchanged.

Per example with ids ``i_1..i_n``, label ``y`` and weight ``w``, at learning rate ``η``::

    h = mean_k E[i_k]                    (the hidden vector)
    p = softmax(W h + b)
    g = w · (p − onehot(y))              (the gradient of w · cross-entropy wrt the logits)
    W -= η g hᵀ,  b -= η g,  E[i_k] -= η (Wᵀ g) / n   (Wᵀ g taken before W moves)

``rowwise_adagrad`` scales each row's step by 1/√(accumulated mean squared gradient of that
row), fastText-like in cost (one float of state per row). Threads (``threads > 1``) run
Hogwild!: each takes a slice of the examples and updates the shared weights without locks,
which is how fastText trains too; ``threads = 1`` is deterministic (unless the workers share one
copy of the weights: ``train.mode=shared``).

The learning rate decays linearly inside a call from ``lr_start`` to ``lr_end`` (the trainer
passes the schedule's values at the chunk's ends), so a chunk of many examples follows the
schedule as a per-example loop would.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

SGD = 0
ROWWISE_ADAGRAD = 1
OPTIMIZERS = {"sgd": SGD, "rowwise_adagrad": ROWWISE_ADAGRAD}
_EPS = 1e-10


@njit(cache=True, fastmath=True, nogil=True)
def _example(  # noqa: PLR0913
    ids, start, end, label, weight, lr, emb, out_w, out_b, emb_acc, out_acc, opt, hidden, grad,
    probs, touched,
):  # fmt: skip
    """One example's forward pass and update; returns its weighted loss."""
    n = end - start
    dim = emb.shape[1]
    classes = out_w.shape[0]
    if n == 0 or label < 0 or weight == 0.0:
        return 0.0
    for d in range(dim):
        hidden[d] = 0.0
    for k in range(start, end):
        row = ids[k]
        for d in range(dim):
            hidden[d] += emb[row, d]
    inv_n = 1.0 / n
    for d in range(dim):
        hidden[d] *= inv_n
    top = -1e30
    for c in range(classes):
        z = out_b[c]
        for d in range(dim):
            z += out_w[c, d] * hidden[d]
        probs[c] = z
        if z > top:
            top = z
    total = 0.0
    for c in range(classes):
        probs[c] = math.exp(probs[c] - top)
        total += probs[c]
    for c in range(classes):
        probs[c] /= total
    loss = -weight * math.log(max(probs[label], 1e-30))
    for d in range(dim):
        grad[d] = 0.0
    for c in range(classes):
        g = weight * (probs[c] - (1.0 if c == label else 0.0))
        if g == 0.0:
            continue
        step = lr
        if opt == ROWWISE_ADAGRAD:
            sq = g * g  # the bias's gradient, then the row's: their mean square
            for d in range(dim):
                sq += (g * hidden[d]) ** 2
            out_acc[c] += sq / (dim + 1)
            step = lr / math.sqrt(out_acc[c] + _EPS)
        for d in range(dim):
            grad[d] += g * out_w[c, d]
            out_w[c, d] -= step * g * hidden[d]
        out_b[c] -= step * g
    for d in range(dim):
        grad[d] *= inv_n
    step = lr
    if opt == ROWWISE_ADAGRAD:
        sq = 0.0
        for d in range(dim):
            sq += grad[d] * grad[d]
        sq /= dim
    for k in range(start, end):
        row = ids[k]
        touched[row] = 1
        if opt == ROWWISE_ADAGRAD:
            emb_acc[row] += sq
            step = lr / math.sqrt(emb_acc[row] + _EPS)
        for d in range(dim):
            emb[row, d] -= step * grad[d]
    return loss


@njit(cache=True, nogil=True)
def _train_serial(
    ids, offsets, labels, weights, order, lr_start, lr_end, emb, out_w, out_b, emb_acc, out_acc,
    opt, touched,
):  # fmt: skip
    dim = emb.shape[1]
    hidden = np.empty(dim, dtype=emb.dtype)
    grad = np.empty(dim, dtype=emb.dtype)
    probs = np.empty(out_w.shape[0], dtype=emb.dtype)
    total = 0.0
    count = len(order)
    for j in range(count):
        lr = lr_start + (lr_end - lr_start) * j / max(count, 1)
        r = order[j]
        total += _example(ids, offsets[r], offsets[r + 1], labels[r], weights[r], lr, emb,
                          out_w, out_b, emb_acc, out_acc, opt, hidden, grad, probs,
                          touched)  # fmt: skip
    return total


@njit(cache=True, nogil=True, parallel=True)
def _train_hogwild(
    ids, offsets, labels, weights, order, lr_start, lr_end, emb, out_w, out_b, emb_acc, out_acc,
    opt, touched, threads,
):  # fmt: skip
    count = len(order)
    per = (count + threads - 1) // threads
    losses = np.zeros(threads)
    for t in prange(threads):
        dim = emb.shape[1]
        hidden = np.empty(dim, dtype=emb.dtype)
        grad = np.empty(dim, dtype=emb.dtype)
        probs = np.empty(out_w.shape[0], dtype=emb.dtype)
        lo = t * per
        hi = min(count, lo + per)
        acc = 0.0
        for j in range(lo, hi):
            lr = lr_start + (lr_end - lr_start) * j / max(count, 1)
            r = order[j]
            acc += _example(ids, offsets[r], offsets[r + 1], labels[r], weights[r], lr, emb,
                            out_w, out_b, emb_acc, out_acc, opt, hidden, grad, probs,
                            touched)  # fmt: skip
        losses[t] = acc
    return losses.sum()


def train_examples(
    ids: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    order: np.ndarray,
    *,
    lr_start: float,
    lr_end: float,
    emb: np.ndarray,
    out_w: np.ndarray,
    out_b: np.ndarray,
    emb_acc: np.ndarray,
    out_acc: np.ndarray,
    optimizer: str = "sgd",
    threads: int = 1,
    touched: np.ndarray | None = None,
) -> float:
    """Train on the examples ``order`` (row numbers into ``offsets``) in that order, updating the
    weight arrays in place; returns the summed weighted loss before each example's update.
    ``touched`` (uint8, one per embedding row), when given, gets a 1 for every row updated: the
    rows replicas must average."""
    opt = OPTIMIZERS[optimizer]
    if touched is None:
        touched = np.zeros(emb.shape[0], dtype=np.uint8)
    args = (ids, offsets, labels, weights, order, float(lr_start), float(lr_end), emb, out_w,
            out_b, emb_acc, out_acc, opt, touched)  # fmt: skip
    if threads <= 1 or len(order) < 2 * threads:
        return float(_train_serial(*args))
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return float(_train_hogwild(*args, threads))


def warm_hogwild(dtype: np.dtype) -> None:
    """Compile (or load from the cache) the threaded kernel for ``dtype`` weights on a toy."""
    emb = np.zeros((2, 2), dtype=dtype)
    ids = np.zeros(4, dtype=np.int32)
    offsets = np.arange(5, dtype=np.int64)
    _train_hogwild(ids, offsets, np.zeros(4, dtype=np.int64), np.ones(4, dtype=np.float32),
                   np.arange(4, dtype=np.int64), 0.0, 0.0, emb, np.zeros((2, 2), dtype=dtype),
                   np.zeros(2, dtype=dtype), np.zeros(2, dtype=dtype), np.zeros(2, dtype=dtype),
                   SGD, np.zeros(2, dtype=np.uint8), 2)  # fmt: skip
