"""k-NN accuracy and linear CKA with torch kernels, for analyze on a GPU.

The same definitions as :mod:`~lamina.analyze.metrics.knn` and
:mod:`~lamina.analyze.metrics.cka` (cosine k-NN with the nearest-tied-class
vote; linear CKA from the smaller of the feature and Gram forms); analyze uses
them when ``--device`` resolves to a GPU and keeps the NumPy versions on the
CPU. Sums run in float64 where the device has it (not on Apple MPS).
"""

from __future__ import annotations

import numpy as np
import torch


def _float(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def knn_accuracy_torch(train_x, train_y, test_x, test_y, k: int, device: torch.device, chunk: int = 4096) -> float:
    """Accuracy of cosine k-NN on ``device`` (see ``knn.knn_predict`` for the vote and its tie rule)."""
    classes, codes = np.unique(np.asarray(train_y), return_inverse=True)
    dt = _float(device)

    def unit(x):
        t = torch.tensor(np.asarray(x), dtype=dt, device=device)  # a copy: store arrays are read-only
        n = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        return t / torch.where(n > 0, n, torch.ones_like(n))

    train, query = unit(train_x), unit(test_x)
    codes_t = torch.as_tensor(codes, device=device)
    k = int(k)
    preds = []
    for s in range(0, len(query), chunk):
        sims = query[s:s + chunk] @ train.T
        top = sims.topk(k, dim=1).indices  # nearest first
        votes = codes_t[top]  # (c, k)
        counts = torch.nn.functional.one_hot(votes, len(classes)).sum(1)
        tied = counts == counts.max(1, keepdim=True).values
        first = tied.gather(1, votes).to(torch.uint8).argmax(1)  # first neighbour of a tied class
        preds.append(votes[torch.arange(len(votes), device=device), first])
    pred = classes[torch.cat(preds).cpu().numpy()]
    return float(np.mean(pred == np.asarray(test_y)))


def cka_matrix_torch(features, device: torch.device) -> np.ndarray:
    """(L, L) linear CKA of L (N, D) arrays on ``device``."""
    dt = _float(device)
    reps = []
    for f in features:
        x = torch.tensor(np.asarray(f), dtype=dt, device=device)  # a copy: store arrays are read-only
        x = x - x.mean(0)
        reps.append(("gram", x @ x.T) if x.shape[0] < x.shape[1] else ("feat", x))

    def cross(ra, rb) -> float:
        (ka, a), (kb, b) = ra, rb
        if ka == "feat" and kb == "feat":
            return float(((b.T @ a) ** 2).sum())
        if ka == "gram" and kb == "gram":
            return float((a * b).sum())
        gram, feat = (a, b) if ka == "gram" else (b, a)
        return float((feat * (gram @ feat)).sum())

    norms = [float(torch.linalg.matrix_norm(m if kind == "gram" else m.T @ m)) for kind, m in reps]
    n = len(reps)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            v = float("nan") if norms[i] <= 0 or norms[j] <= 0 else cross(reps[i], reps[j]) / (norms[i] * norms[j])
            out[i, j] = out[j, i] = v
    return out
