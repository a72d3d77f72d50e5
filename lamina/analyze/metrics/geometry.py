"""Shape of a layer's feature cloud: effective rank, explained variance, class separability.

All functions take features as (N, D) arrays; spectra are computed on the
centered matrix (the mean is not a direction of variation), in float64.
"""

from __future__ import annotations

import numpy as np

from lamina.errors import UsageError
from lamina.analyze.metrics.split import as_labels, as_matrix


def variance_spectrum(x) -> np.ndarray:
    """Fraction of the total variance on each principal component of (N, D) ``x``.

    Returns:
        (min(N, D),) non-negative, descending, summing to 1 (all zeros when
        ``x`` has no variance).
    """
    s = _singular_values(x)
    var = s * s
    total = var.sum()
    return var / total if total > 0 else var


def effective_rank(x) -> float:
    """Effective rank of (N, D) ``x`` (Roy & Vetterli 2007): exp(entropy of the singular values
    normalized to sum 1), on the centered matrix.

    Lies in [1, rank(x)] and equals k for k equal nonzero singular values;
    0.0 when ``x`` has no variance (the definition needs a nonzero matrix).
    """
    s = _singular_values(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def explained_variance(x, k: int) -> float:
    """Fraction of the variance of (N, D) ``x`` on its top ``k`` principal components."""
    spectrum = variance_spectrum(x)
    if int(k) < 1:
        raise UsageError("k must be a positive number of components", value=k,
                         allowed=f"1..{len(spectrum)}", fix="e.g. k=10")
    return float(spectrum[: int(k)].sum())


def components_for_variance(x, fraction: float = 0.9) -> int:
    """Smallest number of principal components of (N, D) ``x`` holding ``fraction`` of the variance."""
    if not 0 < fraction <= 1:
        raise UsageError("fraction must be in (0, 1]", value=fraction, fix="e.g. fraction=0.9")
    cumulative = np.cumsum(variance_spectrum(x))
    if cumulative[-1] <= 0:
        return 0
    # a tiny slack so that fraction=1.0 is not missed by float rounding of the cumulative sum
    return int(min(np.searchsorted(cumulative, fraction - 1e-12) + 1, len(cumulative)))


def separability(x, y) -> dict:
    """Within- vs between-class spread of (N, D) features ``x`` with (N,) labels ``y``.

    Returns:
        ``within_between_ratio``: tr(S_within) / tr(S_between), where
        S_within = (1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T and
        S_between = (1/N) sum_c n_c (mu_c - mu)(mu_c - mu)^T (lower: tighter classes).
        ``cdnv``: class-distance normalized variance (Galanti et al. 2022), the mean over
        class pairs of (var_i + var_j) / (2 ||mu_i - mu_j||^2), var_c the mean squared
        distance of class c to its mean.
        ``n_classes``.
    """
    xm = as_matrix(x, "x")
    labels = as_labels(y, "y")
    if len(labels) != len(xm):
        raise UsageError("x and y have different lengths", value=f"{len(xm)} vs {len(labels)}",
                         fix="pass one label per row")
    classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise UsageError("separability needs at least 2 classes", value=len(classes), fix="check the labels")
    means = _class_means(xm, codes, len(classes), counts)
    sq_dist = np.sum((xm - means[codes]) ** 2, axis=1)  # (N,) distance to own class mean
    var = np.bincount(codes, weights=sq_dist, minlength=len(classes)) / counts
    within = sq_dist.sum() / len(xm)
    between = np.sum(counts * np.sum((means - xm.mean(0)) ** 2, axis=1)) / len(xm)
    i, j = np.triu_indices(len(classes), k=1)
    gaps = np.sum((means[i] - means[j]) ** 2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = within / between if between > 0 else np.inf
        cdnv = np.mean((var[i] + var[j]) / (2 * gaps))
    return {"within_between_ratio": float(ratio), "cdnv": float(cdnv), "n_classes": int(len(classes))}


def ncc_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Nearest-class-centre accuracy: class means of (N, D) ``train_x``, Euclidean distance
    from each (M, D) ``test_x`` row, compared with (M,) ``test_y``."""
    tx = as_matrix(train_x, "train_x")
    qx = as_matrix(test_x, "test_x")
    ty, qy = as_labels(train_y, "train_y"), as_labels(test_y, "test_y")
    if len(ty) != len(tx) or len(qy) != len(qx) or tx.shape[1] != qx.shape[1]:
        raise UsageError("features and labels do not match",
                         value=f"train {tx.shape} / {len(ty)} labels, test {qx.shape} / {len(qy)} labels",
                         fix="pass one label per row, and features of the same layer")
    classes, codes, counts = np.unique(ty, return_inverse=True, return_counts=True)
    means = _class_means(tx, codes, len(classes), counts)
    # ||q - m||^2 = ||q||^2 - 2 q.m + ||m||^2; ||q||^2 is the same for every class
    scores = qx @ means.T * 2 - np.sum(means * means, axis=1)
    return float(np.mean(classes[np.argmax(scores, axis=1)] == qy))


def _class_means(x: np.ndarray, codes: np.ndarray, k: int, counts: np.ndarray) -> np.ndarray:
    onehot = np.zeros((len(codes), k))
    onehot[np.arange(len(codes)), codes] = 1.0
    return (onehot.T @ x) / counts[:, None]


def _singular_values(x) -> np.ndarray:
    """Singular values (min(N, D),) of the centered (N, D) ``x``, descending.

    From the eigenvalues of the smaller Gram matrix: a few times cheaper than an
    SVD for tall feature matrices. Eigenvalues below 1e-12 of the largest are
    rounding noise of a rank-deficient matrix and are set to 0.
    """
    xc = as_matrix(x, "x")
    xc = xc - xc.mean(axis=0)
    gram = xc.T @ xc if xc.shape[0] >= xc.shape[1] else xc @ xc.T
    ev = np.linalg.eigvalsh(gram)[::-1]
    ev[ev < 1e-12 * max(ev[0], 0.0)] = 0.0
    return np.sqrt(np.clip(ev, 0.0, None))
