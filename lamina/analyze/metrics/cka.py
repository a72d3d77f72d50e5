"""Linear centered kernel alignment (CKA) between layers, exact and streaming.

Kornblith et al. 2019 define linear CKA from centered features X (N, D1), Y (N, D2):

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

which equals HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T.
The exact functions pick whichever side is cheaper per layer: the (D, D)
cross-covariance route when N >= D, the (N, N) Gram route when N < D.

For data too large to hold, ``MinibatchCKA`` follows Nguyen, Raghu & Kornblith
2021: the unbiased HSIC estimator of Song et al. 2012 (HSIC_1) is averaged
over minibatches and only then combined into CKA; memory depends on the batch
size, not on N. Because HSIC_1 is unbiased, the average converges to the
population CKA as batches accumulate, where the biased full-data formula
overestimates it by O(1/N) (noticeably so for wide, noisy layers).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lamina.errors import UsageError
from lamina.analyze.metrics.split import as_matrix


def linear_cka(x, y) -> float:
    """Linear CKA between (N, D1) ``x`` and (N, D2) ``y`` (rows are the same samples).

    Returns a float in [0, 1], or nan when either input has no variance.
    """
    rx, ry = _rep(_centered(x, "x")), _rep(_centered(y, "y", rows=np.shape(x)[0]))
    return _cka(rx, ry, _self_norm(rx), _self_norm(ry))


def cka_matrix(features: Sequence, others: Sequence | None = None) -> np.ndarray:
    """Linear CKA between every pair of layers.

    Args:
        features: L arrays (N, D_l) of one model.
        others: optional L2 arrays (N, E_m) of another model on the same N samples.

    Returns:
        (L, L) symmetric matrix with an exact 1 on the diagonal when ``others``
        is None, else (L, L2). Rows of a layer without variance are nan.
    """
    reps_a = _reps(features, "features")
    reps_b = reps_a if others is None else _reps(others, "others", rows=reps_a[0][1].shape[0])
    norms_a = [_self_norm(r) for r in reps_a]
    norms_b = norms_a if others is None else [_self_norm(r) for r in reps_b]
    out = np.empty((len(reps_a), len(reps_b)))
    for i, ra in enumerate(reps_a):
        for j, rb in enumerate(reps_b):
            if others is None and j < i:
                out[i, j] = out[j, i]
            elif others is None and i == j:
                out[i, j] = 1.0 if norms_a[i] > 0 else np.nan
            else:
                out[i, j] = _cka(ra, rb, norms_a[i], norms_b[j])
    return out


def cka_permutation_null(x, y, n_perm: int = 100, seed: int = 0) -> dict:
    """Linear CKA of (N, D1) ``x`` and (N, D2) ``y`` against a null of row-permuted ``y``.

    Permuting the rows of ``y`` breaks the pairing of samples but keeps both
    feature distributions, so the null shows what CKA reads by chance at this
    N and these widths (it is far from 0 for wide layers and few samples).

    Returns:
        ``{"score", "null_mean", "null_std", "p_value", "n_perm"}``; p_value is
        (1 + #null >= score) / (1 + n_perm), never 0.
    """
    if int(n_perm) < 1:
        raise UsageError("n_perm must be a positive number of permutations", value=n_perm, fix="e.g. n_perm=100")
    xc = _centered(x, "x")
    yc = _centered(y, "y", rows=xc.shape[0])
    rx, ry = _rep(xc), _rep(yc)
    nx, ny = _self_norm(rx), _self_norm(ry)
    score = _cka(rx, ry, nx, ny)
    n = xc.shape[0]
    rng = np.random.default_rng(seed)
    # Gram route: one N x N re-indexing per permutation instead of an N*D1*D2 product
    use_gram = n <= 2048 and n < xc.shape[1] * yc.shape[1]  # Grams cost 2 * N^2 floats
    kx, ky = (xc @ xc.T, yc @ yc.T) if use_gram else (None, None)
    null = np.empty(int(n_perm))
    for t in range(int(n_perm)):
        perm = rng.permutation(n)
        cross = np.sum(kx * ky[np.ix_(perm, perm)]) if use_gram else np.sum((yc[perm].T @ xc) ** 2)
        null[t] = cross / (nx * ny) if nx > 0 and ny > 0 else np.nan
    return {"score": score, "null_mean": float(null.mean()), "null_std": float(null.std()),
            "p_value": float((1 + np.sum(null >= score)) / (1 + len(null))), "n_perm": int(n_perm)}


class MinibatchCKA:
    """Streaming linear CKA from minibatches (Nguyen, Raghu & Kornblith 2021).

    Each ``update`` takes one minibatch of the same B samples seen by every
    layer of set A (and of set B, another model or the same one) and adds the
    unbiased HSIC_1 of every pair; ``result`` returns
    sum HSIC_1(K_i, L_j) / sqrt(sum HSIC_1(K_i, K_i) * sum HSIC_1(L_j, L_j)).
    Memory is (L_A + L_B) * B^2 floats, whatever the number of batches.

    Example::

        acc = MinibatchCKA()
        for idx in np.array_split(rng.permutation(n), n // 256):
            acc.update([f[idx] for f in layers_a], [f[idx] for f in layers_b])
        matrix = acc.result()  # (L_A, L_B)
    """

    def __init__(self):
        self.n_batches = 0
        self._self_only = None
        self._xy = self._xx = self._yy = None

    def update(self, xs: Sequence, ys: Sequence | None = None) -> "MinibatchCKA":
        """Add one minibatch: ``xs`` L_A arrays (B, D_i), ``ys`` L_B arrays (B, E_j) or None for ``xs``."""
        self_only = ys is None
        if self._self_only is not None and self_only != self._self_only:
            raise UsageError("every update must pass ys, or none may", value="ys=None" if self_only else "ys given",
                             fix="call update(xs) throughout for one set, update(xs, ys) for two")
        kx = _batch_grams(xs, "xs")
        ky = kx if self_only else _batch_grams(ys, "ys", rows=kx.shape[1])
        if self._xy is not None and (self._xy.shape != (len(kx), len(ky))):
            raise UsageError("the number of layers changed between minibatches",
                             value=f"{len(kx)} x {len(ky)}", allowed=f"{self._xy.shape[0]} x {self._xy.shape[1]}",
                             fix="pass the same layers in every update")
        xy = _hsic1(kx, ky)
        xx = np.diagonal(xy).copy() if self_only else np.diagonal(_hsic1(kx, kx)).copy()
        yy = xx if self_only else np.diagonal(_hsic1(ky, ky)).copy()
        if self._xy is None:
            self._self_only, self._xy, self._xx, self._yy = self_only, xy, xx, yy
        else:
            self._xy, self._xx, self._yy = self._xy + xy, self._xx + xx, self._yy + yy
        self.n_batches += 1
        return self

    def result(self) -> np.ndarray:
        """(L_A, L_B) CKA matrix; nan where a layer's accumulated HSIC_1 is not positive."""
        if self._xy is None:
            raise UsageError("MinibatchCKA.result() called before any update", fix="call update(xs, ys) first")
        denom = np.sqrt(np.outer(np.clip(self._xx, 0, None), np.clip(self._yy, 0, None)))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(denom > 0, self._xy / np.where(denom > 0, denom, 1), np.nan)
        if self._self_only:  # the ratio is 1 up to rounding; make it exact, and symmetric
            out = (out + out.T) / 2
            np.fill_diagonal(out, np.where(self._xx > 0, 1.0, np.nan))
        return out


def streaming_cka(get_batch_a: Callable[[np.ndarray], Sequence],
                  get_batch_b: Callable[[np.ndarray], Sequence] | None, n: int,
                  batch_size: int = 256, seed: int = 0, epochs: int = 1) -> np.ndarray:
    """Minibatch CKA over ``n`` samples read through callables (e.g. memory-mapped stores).

    Args:
        get_batch_a: sorted (B,) int indices -> L_A arrays (B, D_i) of those rows.
        get_batch_b: the same for set B (another model on the same samples), or None.
        n: number of samples; batch_size: rows per minibatch (>= 4);
        seed: shuffling seed; epochs: passes over the data, each reshuffled.

    Returns:
        (L_A, L_B) matrix, or (L_A, L_A) when ``get_batch_b`` is None.

    Every sample is used once per epoch: the shuffled indices are cut into
    n // batch_size nearly equal batches (none smaller than ``batch_size``).
    """
    if int(batch_size) < 4 or int(n) < int(batch_size):
        raise UsageError("streaming CKA needs 4 <= batch_size <= n", value=f"batch_size={batch_size}, n={n}",
                         fix="the unbiased HSIC estimator needs at least 4 samples per batch")
    rng = np.random.default_rng(seed)
    acc = MinibatchCKA()
    for _ in range(int(epochs)):
        for idx in np.array_split(rng.permutation(int(n)), int(n) // int(batch_size)):
            idx = np.sort(idx)  # sorted reads are sequential on a memory map
            acc.update(get_batch_a(idx), None if get_batch_b is None else get_batch_b(idx))
    return acc.result()


def _centered(x, name: str, rows: int | None = None) -> np.ndarray:
    a = as_matrix(x, name, rows=rows)
    return a - a.mean(axis=0)


def _reps(features: Sequence, name: str, rows: int | None = None) -> list[tuple[str, np.ndarray]]:
    features = list(features)
    if not features:
        raise UsageError(f"{name} is empty", value=0, fix="pass a list of (N, D) arrays")
    first = np.shape(features[0])[0] if rows is None else rows
    return [_rep(_centered(f, f"{name}[{i}]", rows=first)) for i, f in enumerate(features)]


def _rep(xc: np.ndarray) -> tuple[str, np.ndarray]:
    """A centered layer as features (N >= D) or as its (N, N) Gram (N < D): the smaller one."""
    return ("gram", xc @ xc.T) if xc.shape[0] < xc.shape[1] else ("feat", xc)


def _self_norm(rep) -> float:
    """||X^T X||_F (= ||X X^T||_F)."""
    kind, m = rep
    return float(np.linalg.norm(m if kind == "gram" else m.T @ m))


def _cross(ra, rb) -> float:
    """||Y^T X||_F^2 = tr(K L) for any pair of representations."""
    (ka, a), (kb, b) = ra, rb
    if ka == "feat" and kb == "feat":
        return float(np.sum((b.T @ a) ** 2))
    if ka == "gram" and kb == "gram":
        return float(np.sum(a * b))
    gram, feat = (a, b) if ka == "gram" else (b, a)
    return float(np.sum(feat * (gram @ feat)))


def _cka(ra, rb, norm_a: float, norm_b: float) -> float:
    if norm_a <= 0 or norm_b <= 0:
        return float("nan")
    return _cross(ra, rb) / (norm_a * norm_b)


def _batch_grams(xs: Sequence, name: str, rows: int | None = None) -> np.ndarray:
    """(L, B, B) Gram matrices of one minibatch with zeroed diagonals (what HSIC_1 uses)."""
    xs = list(xs)
    if not xs:
        raise UsageError(f"{name} is empty", value=0, fix="pass a list of (B, D) arrays")
    b = np.shape(xs[0])[0] if rows is None else rows
    if b < 4:
        raise UsageError("a minibatch needs at least 4 rows for the unbiased HSIC estimator",
                         value=b, fix="use a larger batch_size")
    # HSIC_1 is invariant to shifting the features, so removing the batch mean
    # changes nothing but avoids cancellation when activations have a large offset
    grams = np.stack([(c @ c.T) for c in (_centered(x, f"{name}[{i}]", rows=b) for i, x in enumerate(xs))])
    idx = np.arange(b)
    grams[:, idx, idx] = 0.0
    return grams


def _hsic1(kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of every pair: (La, B, B), (Lb, B, B) -> (La, Lb).

    HSIC_1(K, L) = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n(n-3)),
    K and L with zero diagonals.
    """
    n = kx.shape[1]
    trace = kx.reshape(len(kx), -1) @ ky.reshape(len(ky), -1).T
    sums = np.outer(kx.sum((1, 2)), ky.sum((1, 2)))
    rows = kx.sum(2) @ ky.sum(2).T
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows) / (n * (n - 3))
