"""k-nearest-neighbour accuracy under cosine similarity.

Queries are processed in chunks: one (chunk, N_train) similarity block at a
time, so memory is bounded by ``chunk * N_train`` floats whatever the number
of queries.
"""

from __future__ import annotations

import numpy as np

from lamina.errors import UsageError
from lamina.analyze.metrics.split import as_labels, as_matrix


def knn_predict(train_x, train_y, query_x, k: int = 10, chunk: int = 1024) -> np.ndarray:
    """Predict labels by majority vote of the ``k`` most cosine-similar training rows.

    Args:
        train_x: (N, D) training features; train_y: (N,) labels.
        query_x: (M, D) features to classify.
        k: neighbours that vote (1 <= k <= N).
        chunk: queries per similarity block; peak memory ~ chunk * N * 8 bytes.

    Returns:
        (M,) predicted labels, of ``train_y``'s dtype.

    A tie in the vote goes to the tied class whose member is nearest to the
    query (scikit-learn picks the smallest label instead; the two agree when
    there is no tie). All-zero rows have similarity 0 to everything.
    """
    tx = as_matrix(train_x, "train_x")
    qx = as_matrix(query_x, "query_x")
    y = as_labels(train_y, "train_y")
    if len(y) != len(tx):
        raise UsageError("train_x and train_y have different lengths", value=f"{len(tx)} vs {len(y)}",
                         fix="pass one label per training row")
    if tx.shape[1] != qx.shape[1]:
        raise UsageError("train and query features have different widths",
                         value=f"{tx.shape[1]} vs {qx.shape[1]}", fix="use features of the same layer")
    if not 1 <= int(k) <= len(tx):
        raise UsageError("k must be between 1 and the number of training samples", value=k,
                         allowed=f"1..{len(tx)}", fix="lower k")
    if chunk < 1:
        raise UsageError("chunk must be a positive number of queries", value=chunk, fix="e.g. chunk=1024")
    classes, codes = np.unique(y, return_inverse=True)
    train = _unit_rows(tx)
    query = _unit_rows(qx)
    k = int(k)
    out = np.empty(len(qx), dtype=np.int64)
    for start in range(0, len(qx), chunk):
        sims = query[start:start + chunk] @ train.T  # (chunk, N)
        rows = np.arange(len(sims))[:, None]
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # the k nearest, unordered
        order = top[rows, np.argsort(-sims[rows, top], axis=1, kind="stable")]  # nearest first
        votes = codes[order]  # (chunk, k)
        counts = np.zeros((len(votes), len(classes)), dtype=np.int64)
        np.add.at(counts, (np.broadcast_to(rows, votes.shape), votes), 1)
        tied = counts == counts.max(axis=1, keepdims=True)  # classes with the top count
        # first neighbour (in similarity order) whose class is among the tied ones
        first = np.argmax(tied[rows, votes], axis=1)
        out[start:start + chunk] = votes[np.arange(len(votes)), first]
    return classes[out]


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10, chunk: int = 1024) -> float:
    """Accuracy of cosine k-NN (see ``knn_predict``) on (M, D) ``test_x`` with (M,) ``test_y``."""
    ty = as_labels(test_y, "test_y")
    if len(ty) != np.shape(test_x)[0]:
        raise UsageError("test_x and test_y have different lengths",
                         value=f"{np.shape(test_x)[0]} vs {len(ty)}", fix="pass one label per test row")
    pred = knn_predict(train_x, train_y, test_x, k=k, chunk=chunk)
    return float(np.mean(pred == ty))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)
