"""Train/validation/test splits, and the input checks every metric shares.

Every analysis of a run reads the same split (DESIGN.md, "Analyses"), so the
split is a pure function of the labels and a seed: the same labels and seed
give the same indices on any machine and numpy version (``default_rng`` with
an explicit seed is stable across versions).
"""

from __future__ import annotations

import numpy as np

from lamina.errors import UsageError

PARTS = ("train", "val", "test")


def stratified_split(labels, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> dict[str, np.ndarray]:
    """Split sample indices into train/val/test, stratified by label.

    Args:
        labels: (N,) class labels of any hashable dtype (ints, strings).
        fractions: three positive numbers summing to 1: train, val, test.
        seed: the split is a pure function of ``labels`` and ``seed``.

    Returns:
        ``{"train": (N_train,), "val": (N_val,), "test": (N_test,)}``, sorted
        int64 indices into ``labels``; together they cover every sample once.

    Each class is shuffled on its own and cut with per-class rounding, and every
    class gets at least one sample in every part, so the part sizes can differ
    from ``fractions`` by up to one sample per class.
    """
    y = as_labels(labels, "labels")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or not np.all(np.isfinite(fr)) or np.any(fr <= 0) or abs(fr.sum() - 1) > 1e-6:
        raise UsageError("split fractions must be three positive numbers (train, val, test) summing to 1",
                         value=tuple(fractions), allowed="e.g. (0.6, 0.2, 0.2)",
                         fix="pass fractions=(train, val, test) with every part > 0")
    classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise UsageError("the labels hold only one class, so there is nothing to classify",
                         value=f"class {classes[0]!r} for all {len(y)} samples" if len(y) else "no samples",
                         allowed="at least 2 classes", fix="check the label column")
    small = [(c, n) for c, n in zip(classes, counts) if n < 3]
    if small:
        shown = ", ".join(f"{c!r}: {n}" for c, n in small[:5])
        raise UsageError("some classes have too few samples for a train/val/test split",
                         value=shown + (" ..." if len(small) > 5 else ""),
                         allowed="at least 3 samples per class (one for each part)",
                         fix="add samples, merge or drop the rare classes")
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(codes == c))
        n = len(idx)
        n_val = max(1, int(round(n * fr[1])))
        n_test = max(1, int(round(n * fr[2])))
        while n - n_val - n_test < 1:  # tiny class: give train its one sample back
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        n_train = n - n_val - n_test
        out["train"].append(idx[:n_train])
        out["val"].append(idx[n_train:n_train + n_val])
        out["test"].append(idx[n_train + n_val:])
    return {p: np.sort(np.concatenate(v)).astype(np.int64) for p, v in out.items()}


def check_split(split, n: int) -> dict[str, np.ndarray]:
    """Validate a user-given split over ``n`` samples; returns int64 index arrays."""
    if not isinstance(split, dict) or any(p not in split for p in PARTS):
        got = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise UsageError("a split must be a dict with keys 'train', 'val' and 'test'", value=got,
                         allowed=list(PARTS), fix="build one with stratified_split(labels)")
    parts = {}
    for p in PARTS:
        idx = np.asarray(split[p])
        if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise UsageError(f"split[{p!r}] must be a non-empty 1-D array of integer indices",
                             value=f"shape {idx.shape}, dtype {idx.dtype}", fix="use stratified_split(labels)")
        if idx.min() < 0 or idx.max() >= n:
            raise UsageError(f"split[{p!r}] holds indices outside the {n} samples",
                             value=f"range {idx.min()}..{idx.max()}", allowed=f"0..{n - 1}",
                             fix="build the split from the same labels as the features")
        parts[p] = idx.astype(np.int64)
    return parts


def as_labels(labels, name: str = "labels") -> np.ndarray:
    """``labels`` as a 1-D numpy array; raises UsageError otherwise."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise UsageError(f"{name} must be a 1-D array of class labels", value=f"shape {y.shape}",
                         fix="pass one label per sample, e.g. labels.ravel()")
    return y


def as_matrix(x, name: str, rows: int | None = None) -> np.ndarray:
    """``x`` as a finite float64 (N, D) array; raises UsageError naming ``name``."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise UsageError(f"{name} must be a 2-D (samples, features) array", value=f"shape {a.shape}",
                         fix="pool or flatten the features to one row per sample")
    if rows is not None and a.shape[0] != rows:
        raise UsageError(f"{name} has a different number of rows than the labels",
                         value=f"{a.shape[0]} rows", allowed=f"{rows} rows (one per label)",
                         fix="pass features and labels of the same samples")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        bad = int(np.count_nonzero(~np.isfinite(a).all(axis=1)))
        raise UsageError(f"{name} holds NaN or inf values", value=f"{bad} of {a.shape[0]} rows",
                         allowed="finite numbers",
                         fix="check that layer for overflow (float16 capture?) or drop the bad samples")
    return a
