"""``--l2-cv K``: a linear head fitted to convergence with an L2 penalty chosen by K-fold CV on the training rows.

The default linear heads train with AdamW and stop early on the validation rows. On a small task those are a few
dozen rows (MiniLM on 600 sentences: 60, one row 1.7 points), too few to choose anything, and the head stops
after a few epochs wherever validation happened to peak. This is the standard L2-regularized logistic regression
instead: the penalty is chosen by stratified K-fold cross-validation on the training rows (every training row
scores once), then the head is refitted on all of them. bench/transfer_recipes.py measured it against lamina's
default on MiniLM's held-out rows; tests/test_transfer_l2cv.py checks it against scikit-learn.

Objective (scikit-learn's parametrization, so ``C`` reads the same): minimise
``sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 C)`` over the standardized features (bias not penalized), divided by
the row count for the solver: full-batch L-BFGS with a strong-Wolfe line search, in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heads import ConcatLinear

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))  # 1e-4 .. 1e2, half-decades


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) of each row: each class's rows shuffled (``seed``) and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        fold[rng.permutation(idx)] = (np.arange(len(idx)) + start) % k
        start += len(idx)  # the next class starts where this one stopped: folds stay equal in size
    return fold


def fit_l2(head: ConcatLinear, z: torch.Tensor, y: torch.Tensor, c: float, max_iter: int = 100) -> None:
    """Fit ``head.linear`` on standardized inputs ``z`` to the minimum of the objective above (in place); at most
    ``max_iter`` L-BFGS iterations, scikit-learn's default too (a weak penalty on separable rows converges slowly
    and gains nothing from more)."""
    lin = head.linear
    w = torch.zeros(lin.weight.shape, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(lin.bias.shape, dtype=torch.float64, requires_grad=True)
    z64, n = z.double(), len(y)
    # two classes: softmax over two weight rows is binary logistic regression on their difference w1 - w2 = 2 w1,
    # whose norm^2 is half of ||w1||^2 + ||w2||^2 at the optimum; doubling the penalty makes C read as
    # scikit-learn's binary C (more classes: multinomial, as scikit-learn's)
    scale = 2.0 if lin.weight.shape[0] == 2 else 1.0
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z64 @ w.T + b, y, reduction="sum") / n + scale * (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        lin.bias.copy_(b.float())


def _fitted(X: dict, names: list[str], rows: np.ndarray, y: torch.Tensor, n_classes: int, c: float):
    head = ConcatLinear([X[n].shape[1] for n in names], n_classes)
    feats = [X[n][rows] for n in names]
    head.fit_norm_(feats)  # standardized on the rows it is fitted on (each fold its own)
    with torch.no_grad():
        z = head.norm(head.inputs(feats))
    fit_l2(head, z, y[rows], c)
    return head.eval()


def _accuracy(head, X, names, y, rows) -> float:
    with torch.no_grad():
        return float((head([X[n][rows] for n in names]).argmax(-1) == y[rows]).float().mean())


def linear_l2cv(X: dict, names: list[str], labels, split: dict, n_classes: int, k: int, seed: int) -> tuple:
    """(head, history): the penalty ``C`` of C_GRID with the best mean K-fold CV accuracy on the training rows
    (ties: the stronger penalty), refitted on every training row; history holds the CV table and the validation
    accuracy (``best_val_accuracy``, as the loop's history does)."""
    from ..errors import UsageError
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    tr = np.asarray(split["train"])
    smallest = int(np.unique(np.asarray(labels)[tr], return_counts=True)[1].min()) if len(tr) else 0
    if smallest < k:
        raise UsageError("--l2-cv needs at least one training row of every class in every fold",
                         value=f"{k} folds, smallest class has {smallest} training rows", allowed=f"<= {smallest}",
                         fix=f"--l2-cv {max(smallest, 2)}, or leave --l2-cv out")
    fold = stratified_folds(np.asarray(labels)[tr], k, seed)
    cv = {}
    for c in C_GRID:
        cv[c] = float(np.mean([_accuracy(_fitted(X, names, tr[fold != f], y, n_classes, c), X, names, y,
                                         tr[fold == f]) for f in range(k)]))
    best = max(C_GRID, key=lambda c: (cv[c], -c))
    head = _fitted(X, names, tr, y, n_classes, best)
    val = _accuracy(head, X, names, y, np.asarray(split["val"])) if len(split["val"]) else float("nan")
    return head.train(), {"method": "l2_cv", "folds": k, "C": best, "cv_accuracy": {f"{c:g}": a for c, a in cv.items()},
                          "best_cv_accuracy": cv[best], "best_val_accuracy": val}
