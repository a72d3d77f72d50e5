"""--l2-cv: the linear head fitted with an L2 penalty chosen by K-fold CV on the training rows.

Checked against scikit-learn, an independent solver of the same problem: the fitted head's probabilities equal
LogisticRegression's at the same C, and the CV table equals one computed with scikit-learn on the same folds.
"""

import warnings

import numpy as np
import pytest
import torch

from lamina.errors import UsageError
from lamina.store import FeatureStore
from lamina.analyze.metrics.split import stratified_split
from lamina.transfer import TransferConfig, transfer
from lamina.transfer._l2cv import C_GRID, fit_l2, linear_l2cv, stratified_folds
from lamina.transfer.heads import ConcatLinear

sk = pytest.importorskip("sklearn.linear_model")


@pytest.fixture(scope="module")
def run(bert_run):
    return bert_run


def _data(run):
    store = FeatureStore.open(run)
    name = store.layers[-1]
    X = {name: torch.from_numpy(np.array(store.load(name), dtype=np.float32))}
    return X, name, np.asarray(store.labels), stratified_split(store.labels, (0.6, 0.2, 0.2), 0)


def _z(x, fit_rows, rows):
    mu, sd = x[fit_rows].mean(0), x[fit_rows].std(0, ddof=1)  # unbiased, as the head's standardization
    sd = np.where(sd > 1e-8, sd, 1.0)
    return (x[rows] - mu) / sd


def _sklearn(z, y, c):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk.LogisticRegression(C=c, tol=1e-10, max_iter=20000).fit(z, y)


@pytest.mark.parametrize("c", [1e-2, 1.0])
def test_fit_equals_scikit_learns_logistic_regression_at_the_same_c(run, c):
    X, name, y, split = _data(run)
    tr = split["train"]
    x = X[name].numpy().astype(np.float64)
    z = _z(x, tr, tr)
    head = ConcatLinear([x.shape[1]], int(y.max()) + 1)
    fit_l2(head, torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(y[tr]), c)
    with torch.no_grad():
        ours = torch.softmax(head.linear(torch.as_tensor(z, dtype=torch.float32)), -1).numpy()
    ref = _sklearn(z, y[tr], c).predict_proba(z)
    assert np.abs(ours - ref).max() < 2e-3


def test_cv_table_and_choice_equal_scikit_learn_on_the_same_folds(run):
    X, name, y, split = _data(run)
    tr = np.asarray(split["train"])
    k = 3
    head, hist = linear_l2cv(X, [name], y, split, int(y.max()) + 1, k, seed=0)
    fold = stratified_folds(y[tr], k, 0)
    assert sorted(np.bincount(fold).tolist())[-1] - sorted(np.bincount(fold).tolist())[0] <= 1
    for f in range(k):  # every class in every fold
        assert set(y[tr][fold == f]) == set(y[tr])
    x = X[name].numpy().astype(np.float64)
    ref = {}
    for c in C_GRID:
        accs = []
        for f in range(k):
            a, b = tr[fold != f], tr[fold == f]
            accs.append(_sklearn(_z(x, a, a), y[a], c).score(_z(x, a, b), y[b]))
        ref[c] = float(np.mean(accs))
    one_row = 1.0 / min(np.bincount(fold))
    for c in C_GRID:  # a row on the decision boundary may flip between two solvers: at most one per fold
        assert abs(hist["cv_accuracy"][f"{c:g}"] - ref[c]) <= one_row / k + 1e-9
    assert ref[hist["C"]] >= max(ref.values()) - one_row / k - 1e-9
    assert hist["best_cv_accuracy"] == max(hist["cv_accuracy"].values())


def test_transfer_with_l2_cv_records_the_choice_and_round_trips(run):
    res = transfer(run, TransferConfig(head="last", l2_cv=3, overwrite=True, progress=False))
    h = res.record["history"]
    assert h["method"] == "l2_cv" and h["folds"] == 3 and h["C"] in C_GRID
    assert res.record["config"]["l2_cv"] == 3 and res.record["reload_check"]["max_abs_difference"] == 0.0
    assert 0 <= res.test_accuracy <= 1


@pytest.mark.parametrize("kw", [dict(head="mix", l2_cv=5), dict(head="last", l2_cv=1),
                                dict(head="last", l2_cv=True), dict(head="side", l2_cv=3)])
def test_l2_cv_refuses_what_it_cannot_do(kw):
    with pytest.raises(UsageError, match="l2.cv is a number of folds"):
        TransferConfig(**kw)


def test_l2_cv_refuses_more_folds_than_a_class_has_rows(run):
    with pytest.raises(UsageError, match="every class in every fold"):
        transfer(run, TransferConfig(head="last", l2_cv=1000, overwrite=True, progress=False))
