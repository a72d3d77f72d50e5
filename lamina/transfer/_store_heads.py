"""``last``, ``best``, ``mix``, ``select``: heads trained on the captured store alone (no backbone pass).

Each returns (head, layers it reads, details for transfer.json). Inputs are
the pooled features of the store, float32 in memory: ``X[name]`` (N, D) (with
several poolings, each layer's ways concatenated: (N, k * D)). ``at`` is
(device, autocast dtype) of the training.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..train import Loop
from ._l2cv import linear_l2cv
from ._train import counts, train_head
from .heads import ConcatLinear, MixHead

CPU = (torch.device("cpu"), torch.float32)
# select: what is tried on validation when --keep / --group-lasso are not given. Head2Toe tunes both on
# validation; its 1% is of hundreds of thousands of features (every pooling of every layer of a ViT-B), so
# thousands are kept. Here 1% of MiniLM's 2,688 or EfficientNet's 3,120 is 27-32 features, too few for the
# classes: that is why 1% lost to last (bench/results/transfer.json, BENCHMARKS.md "transfer").
KEEP_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
LASSO_GRID = (1e-3, 1e-2, 1e-1)


def _inputs(X: dict, names: list[str]):
    def rows_input(rows):
        return [X[n][rows] for n in names], None
    return rows_input


def _prepare(head, X, names, split):
    torch.manual_seed(0)
    head.fit_norm_([X[n][split["train"]] for n in names])
    return head


def linear(X: dict, names: list[str], labels, split, loop: Loop, n_classes: int, keep=None, at=CPU) -> tuple:
    """A linear head on the standardized concatenation of ``names`` (features ``keep`` only)."""
    torch.manual_seed(loop.seed)
    head = ConcatLinear([X[n].shape[1] for n in names], n_classes, keep)
    _prepare(head, X, names, split)
    hist = train_head(head, list(head.parameters()), _inputs(X, names), labels, split, loop, device=at[0],
                      dtype=at[1])
    return head, hist


def _linear_of(cfg):
    """The linear-head trainer ``cfg`` asks for: the shared loop, or L2 chosen by k-fold CV (--l2-cv)."""
    folds = getattr(cfg, "l2_cv", None)
    if not folds:
        return linear

    def fit(X, names, labels, split, loop, n_classes, keep=None, at=CPU):
        return linear_l2cv(X, names, labels, split, n_classes, folds, loop.seed)
    return fit


def fit_last(X, layers, labels, split, loop, n_classes, cfg, at=CPU) -> tuple:
    name = layers[-1]
    head, hist = _linear_of(cfg)(X, [name], labels, split, loop, n_classes, at=at)
    return head, [name], {"history": hist}


def fit_best(X, layers, labels, split, loop, n_classes, cfg, at=CPU) -> tuple:
    """One linear head per layer; the one with the best validation accuracy (ties: the shallower)."""
    per, best = {}, None
    for name in layers:
        head, hist = _linear_of(cfg)(X, [name], labels, split, loop, n_classes, at=at)
        per[name] = hist["best_val_accuracy"]
        if best is None or per[name] > per[best[0]]:
            best = (name, head, hist)
    name, head, hist = best
    return head, [name], {"history": hist, "val_accuracy_per_layer": per, "chosen": name}


def fit_mix(X, layers, labels, split, loop, n_classes, cfg, fixed=None, at=CPU) -> tuple:
    torch.manual_seed(loop.seed)
    head = MixHead([X[n].shape[1] for n in layers], n_classes, cfg.hidden, fixed)
    _prepare(head, X, layers, split)
    hist = train_head(head, list(head.parameters()), _inputs(X, layers), labels, split, loop, device=at[0],
                      dtype=at[1])
    w = head.weights().detach().tolist()
    return head, layers, {"history": hist, "mix_weights": dict(zip(layers, w))}


def _rank(X, layers, labels, split, loop, n_classes, lam, at) -> tuple:
    """Head2Toe's stage 1: group-lasso linear map on every feature; returns (score per feature, history)."""
    torch.manual_seed(loop.seed)
    full = ConcatLinear([X[n].shape[1] for n in layers], n_classes)
    _prepare(full, X, layers, split)
    hist = train_head(full, list(full.parameters()), _inputs(X, layers), labels, split, loop,
                      penalty=lambda: lam * full.linear.weight.norm(dim=0).sum(), device=at[0], dtype=at[1])
    return full.linear.weight.detach().norm(dim=0).cpu(), full.dims, hist


def _val(head, X, names, labels, rows) -> tuple[float, float]:
    """(validation accuracy, minus mean validation loss): larger is better, loss breaks accuracy ties."""
    c, n, loss = counts(head, _inputs(X, names), torch.as_tensor(labels, dtype=torch.long), rows)
    return c / max(n, 1), -loss / max(n, 1)


def fit_select(X, layers, labels, split, loop, n_classes, cfg, at=CPU) -> tuple:
    """Head2Toe: group lasso over every feature of every layer, keep the top fraction, retrain a linear head.

    Stage 1 trains a linear map W (F features x K classes) on the standardized
    concatenation with ``group_lasso * sum_f ||W_f||_2`` added (a feature is one
    group: its weights to every class); a feature's score is ||W_f||_2. Stage 2
    trains a fresh linear head on the ``keep`` fraction with the highest scores
    (indices kept in their original order). ``keep`` / ``group_lasso`` not
    given: every pair of KEEP_GRID x LASSO_GRID is tried and the one with the
    best validation accuracy kept (ties: lower validation loss, then fewer
    features): the test rows never choose.
    """
    lams = (cfg.group_lasso,) if cfg.group_lasso is not None else LASSO_GRID
    keeps = (cfg.keep,) if cfg.keep is not None else KEEP_GRID
    tried, best = [], None
    for lam in lams:
        score, dims, hist1 = _rank(X, layers, labels, split, loop, n_classes, lam, at)
        total = sum(dims)
        order = torch.argsort(score, descending=True, stable=True)
        for frac in keeps:
            n_keep = max(1, math.ceil(frac * total))
            keep = sorted(order[:n_keep].tolist())  # original order
            head, hist = linear(X, layers, labels, split, loop, n_classes, keep, at=at)
            head.cpu()
            v = _val(head, X, layers, labels, split["val"])
            tried.append({"group_lasso": lam, "keep": frac, "features": n_keep, "val_accuracy": v[0],
                          "val_loss": -v[1]})
            if best is None or (v, -n_keep) > (best[0], -len(best[2])):
                best = (v, (lam, frac), keep, head, hist, hist1)
    _, (lam, frac), keep, head, hist, hist1 = best
    bounds = np.cumsum([0] + dims)
    kept = np.asarray(keep)
    per_layer = {n: int(((kept >= bounds[i]) & (kept < bounds[i + 1])).sum()) for i, n in enumerate(layers)}
    reads = [n for n in layers if per_layer[n]]
    # the deployable head reads only the layers that hold kept features: re-index into their concatenation
    offs = {n: bounds[i] for i, n in enumerate(layers)}
    starts = np.cumsum([0] + [dims[layers.index(n)] for n in reads])
    remap = []
    for k in keep:
        i = int(np.searchsorted(bounds, k, side="right") - 1)
        remap.append(int(starts[reads.index(layers[i])] + k - offs[layers[i]]))
    slim = ConcatLinear([dims[layers.index(n)] for n in reads], n_classes, remap)
    state = head.state_dict()
    state["keep"] = slim.keep  # positions in the slim concatenation, not in the full one
    slim.load_state_dict(state)
    return slim, reads, {"history": hist, "selection_history": hist1, "features_total": total,
                         "features_kept": len(kept), "kept_per_layer": per_layer, "kept_features": keep,
                         "group_lasso": lam, "keep": frac, "chosen_on_validation": len(tried) > 1,
                         "tried": tried}


def accuracy_on(head, X, names, labels, rows) -> float:
    c, n, _ = counts(head, _inputs(X, names), torch.as_tensor(labels, dtype=torch.long), rows)
    return c / max(n, 1)


FITTERS = {"last": fit_last, "best": fit_best, "mix": fit_mix, "select": fit_select}
