"""Metrics against scikit-learn / plain numpy references and against their invariants.

Small seeded data only: the whole file runs in a few seconds on two cores.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from lamina.errors import UsageError
from lamina.analyze.metrics import (DEFAULT_CS, MinibatchCKA, ProbeResult, cka_matrix, cka_permutation_null,
                                    components_for_variance, effective_rank, explained_variance, knn_accuracy,
                                    knn_predict, linear_cka, ncc_accuracy, probe_layers, separability,
                                    stratified_split, streaming_cka, wilson_interval)
from lamina.analyze.metrics.logreg import fit_logistic

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_openmp_thread():
    """sklearn and torch ship separate OpenMP runtimes, and numpy its own BLAS threads; on a
    busy two-core machine their spinning threads make small ops wait for the scheduler (0.7 s
    for a 2 ms k-NN here). One thread everywhere in this module keeps the file fast."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1):
        yield


def _layers(n=600, dims=(40, 40, 60), n_classes=2, signal=(0.2, 0.5, 1.0), seed=0):
    """Correlated features with label noise: like activations, and never separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    latent = rng.standard_normal((n, 8))
    dirs = rng.standard_normal((n_classes, 8))
    layers = []
    for d, s in zip(dims, signal):
        mix = rng.standard_normal((8, d)) * np.linspace(2, 0.3, 8)[:, None]
        layers.append(((latent + s * dirs[y]) @ mix + 0.5 * rng.standard_normal((n, d)) + 3).astype(np.float32))
    noisy = rng.random(n) < 0.1
    return layers, np.where(noisy, rng.integers(0, n_classes, n), y)


def _standardized(x, split):
    x = np.asarray(x, dtype=np.float64)
    mean, std = x[split["train"]].mean(0), x[split["train"]].std(0)
    std[std == 0] = 1.0
    return {p: (x[i] - mean) / std for p, i in split.items()}


# ---------------------------------------------------------------- split

def test_split_is_deterministic_stratified_and_covering():
    labels = np.repeat(np.array(["a", "b", "c"]), [50, 30, 5])
    split = stratified_split(labels, seed=3)
    again = stratified_split(labels, seed=3)
    other = stratified_split(labels, seed=4)
    assert all(np.array_equal(split[p], again[p]) for p in split)
    assert not np.array_equal(split["train"], other["train"])
    everything = np.concatenate(list(split.values()))
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))  # disjoint and complete
    for part in split.values():
        assert np.all(np.diff(part) > 0) and part.dtype == np.int64
        assert set(labels[part]) == {"a", "b", "c"}  # every class in every part, even the 5-sample one
    assert [int(np.sum(labels[split["val"]] == c)) for c in "ab"] == [10, 6]


@pytest.mark.parametrize("labels, fractions, needle", [
    (np.zeros(20), (0.6, 0.2, 0.2), "only one class"),
    (np.array([0] * 10 + [1] * 2), (0.6, 0.2, 0.2), "too few samples"),
    (np.array([0, 1] * 10), (0.5, 0.5, 0.5), "summing to 1"),
    (np.array([0, 1] * 10), (1.0, 0.0, 0.0), "summing to 1"),
])
def test_split_rejects_impossible_requests(labels, fractions, needle):
    with pytest.raises(UsageError, match=needle):
        stratified_split(labels, fractions)


# ---------------------------------------------------------------- probe

def test_wilson_interval_known_values_and_symmetry():
    # Wilson (1927) score interval with z = 1.96, worked by hand (statsmodels uses z = 1.95996)
    assert wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    lo, hi = wilson_interval(7, 20)
    lo2, hi2 = wilson_interval(13, 20)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2))
    with pytest.raises(UsageError):
        wilson_interval(11, 10)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_solver_reaches_sklearns_optimum(n_classes):
    """Same objective as sklearn (C convention, unpenalized intercept, binary vs multinomial)."""
    layers, y = _layers(n=300, dims=(12,), n_classes=n_classes, signal=(0.8,))
    x = layers[0].astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    import torch
    cs = np.array([0.01, 1.0, 100.0])
    w, converged = fit_logistic(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(1 / cs),
                        n_classes, tol=1e-10, max_iter=100)
    assert converged
    for q, c in enumerate(cs):
        ref = LogisticRegression(C=c, tol=1e-12, max_iter=20000).fit(x, y)
        coef = w[q, :, :-1].numpy()
        intercept = w[q, :, -1].numpy()
        if n_classes > 2:  # the multinomial intercept is defined up to a shared constant
            intercept, ref_intercept = intercept - intercept.mean(), ref.intercept_ - ref.intercept_.mean()
        else:
            ref_intercept = ref.intercept_
        scale = np.abs(ref.coef_).max()
        np.testing.assert_allclose(coef, ref.coef_, atol=1e-4 * scale)
        np.testing.assert_allclose(intercept, ref_intercept, atol=1e-4 * max(scale, 1))


@pytest.mark.parametrize("device", [None, "cpu"])
@pytest.mark.parametrize("n_classes, dims", [(2, (40, 40, 60)), (4, (40, 30, 60)), (2, (400, 500, 300))])
def test_probe_layers_agrees_with_sklearn(n_classes, dims, device):
    """Per-C validation accuracy and the chosen test accuracy within 1 point, or one sample where
    a part is smaller than 100: on separable data (the N < D case) sklearn's lbfgs stops at its
    tol=1e-4 short of the optimum, and moves one sample at C=100 (checked against tol=1e-8).
    ``device``: the device path (Gram, eigenbasis and solve in torch where the device is, as on a GPU)."""
    layers, y = _layers(n=600 if max(dims) < 100 else 300, dims=dims, n_classes=n_classes)
    layers[0][:, 3] = 7.0  # a constant feature: sklearn's StandardScaler convention (std -> 1)
    split = stratified_split(y, seed=1)
    cs = np.logspace(-3, 2, 6)
    results = probe_layers(layers, y, split, Cs=cs, device=device)
    for res, x in zip(results, layers):
        parts = _standardized(x, split)
        val, test = [], []
        for c in cs:
            model = LogisticRegression(C=c, max_iter=1000).fit(parts["train"], y[split["train"]])
            val.append(model.score(parts["val"], y[split["val"]]))
            test.append(model.score(parts["test"], y[split["test"]]))
        assert res.converged
        np.testing.assert_allclose(res.val_accuracy_by_C, val, atol=max(0.01, 1 / len(split["val"])) + 1e-9)
        assert abs(res.test_accuracy - test[int(np.argmax(val))]) <= max(0.01, 1 / len(split["test"])) + 1e-9
        assert res.ci_low <= res.test_accuracy <= res.ci_high
        assert res.n_test == len(split["test"]) and res.C in cs


@pytest.mark.parametrize("n_classes", [2, 4])
def test_float32_solver_lands_on_the_float64_optimum(n_classes):
    """The default tol runs every pass over the data in float32: its logits must match the
    float64 solve to far below any decision margin, at every C of the default grid."""
    import torch
    layers, y = _layers(n=600, dims=(40,), n_classes=n_classes, signal=(0.8,))
    x = layers[0].astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    lam, yt = torch.from_numpy(1 / np.asarray(DEFAULT_CS)), torch.from_numpy(y.astype(np.int64))
    w64, ok64 = fit_logistic(torch.from_numpy(x), yt, lam, n_classes, tol=1e-10, max_iter=100)
    w32, ok32 = fit_logistic(torch.from_numpy(x.astype(np.float32)), yt, lam, n_classes, tol=1e-5, max_iter=100)
    assert ok64 and ok32
    a = np.c_[x, np.ones(len(x))]
    logits64, logits32 = (np.einsum("nd,pkd->pkn", a, w.numpy()) for w in (w64, w32))
    if n_classes > 2:  # defined up to a shared constant per sample
        logits64, logits32 = logits64 - logits64.mean(1, keepdims=True), logits32 - logits32.mean(1, keepdims=True)
    assert np.abs(logits32 - logits64).max() < 2e-3


@pytest.mark.parametrize("n_classes, rows, dims", [(2, 300, 12), (4, 600, 40), (2, 30, 50)])
def test_solver_makes_every_tensor_where_its_inputs_are(n_classes, rows, dims):
    """On a GPU the solver must never make a tensor on the CPU (a device mismatch, or a silent copy).
    Tested on this CPU-only machine: inside ``torch.device('meta')`` every tensor made without an
    explicit device lands on 'meta', and mixing it with the CPU inputs raises. The result is the
    plain run's, bit for bit. Covers binary, rotated multinomial, and the N < D basis."""
    import torch
    layers, y = _layers(n=rows, dims=(dims,), n_classes=n_classes, signal=(0.8,))
    x = layers[0].astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    args = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(1 / np.asarray(DEFAULT_CS)),
            n_classes)
    w, ok = fit_logistic(*args, tol=1e-4, max_iter=100)
    with torch.device("meta"):
        w_dev, ok_dev = fit_logistic(*args, tol=1e-4, max_iter=100)
    assert w_dev.device.type == "cpu" and ok_dev == ok
    assert torch.equal(w, w_dev)


def test_probe_device_path_makes_every_tensor_on_its_device():
    """The probe's device path (Gram, standardization, held-out logits in torch): the same check."""
    import torch
    layers, y = _layers(n=300, dims=(20, 30), n_classes=3)
    split = stratified_split(y, seed=0)
    ref = probe_layers(layers, y, split, device="cpu")
    with torch.device("meta"):
        got = probe_layers(layers, y, split, device="cpu")
    assert [r.to_dict() for r in got] == [r.to_dict() for r in ref]
    with pytest.raises(UsageError, match="float64"):
        probe_layers(layers, y, split, device="mps")


def test_rotated_multinomial_solve_lands_on_the_unrotated_optimum(monkeypatch):
    """Multinomial probes rotate the design onto the Gram's eigenvectors (no basis products per CG
    step); the weights come back to the original axes and the tolerance is checked there."""
    import torch
    from lamina.analyze.metrics import logreg
    layers, y = _layers(n=600, dims=(40,), n_classes=4, signal=(0.8,))
    x = layers[0].astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    args = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(1 / np.asarray(DEFAULT_CS)), 4)
    w_rot, ok_rot = fit_logistic(*args, tol=1e-10, max_iter=100)  # 2 * 7 C * 4 classes * 90 steps >= 600 rows: rotated
    monkeypatch.setattr(logreg, "CG_STEPS_GUESS", (0, 0))  # never rotate
    w_plain, ok_plain = fit_logistic(*args, tol=1e-10, max_iter=100)
    assert ok_rot and ok_plain
    a = np.c_[x, np.ones(len(x))]
    logits = [np.einsum("nd,pkd->pkn", a, w.numpy()) for w in (w_rot, w_plain)]
    logits = [lg - lg.mean(1, keepdims=True) for lg in logits]  # defined up to a shared constant per sample
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)


def test_probe_many_classes_converges_at_every_C():
    """Ten classes, the default C grid: the strongest C finishes its CG early while the weak ones go on
    (a float32 CG that kept iterating past its target once derailed C=1e-4 here)."""
    layers, y = _layers(n=1000, dims=(64,), n_classes=10, signal=(1.5,))
    split = stratified_split(y, seed=0)
    res = probe_layers(layers, y, split)[0]
    parts = _standardized(layers[0], split)
    val = [LogisticRegression(C=c, max_iter=1000).fit(parts["train"], y[split["train"]]).score(parts["val"],
                                                                                            y[split["val"]])
           for c in DEFAULT_CS]
    assert res.converged
    np.testing.assert_allclose(res.val_accuracy_by_C, val, atol=1 / len(split["val"]) + 1e-9)


def test_batched_cg_leaves_each_C_at_its_own_target():
    """All C values share the CG passes, but one that meets its forcing target must stay put while the
    others iterate on (float32 CG run past its target derailed the strongest C of a 10-class probe):
    a C's Newton step does not depend on which other C values share the batch."""
    import torch
    from lamina.analyze.metrics.logreg import gram_basis, newton_direction
    layers, y = _layers(n=600, dims=(40,), signal=(0.8,))
    z = torch.from_numpy(((layers[0] - layers[0].mean(0)) / layers[0].std(0)).astype(np.float32))
    a = torch.cat([z, torch.ones(len(z), 1)], 1)
    basis, ev = gram_basis(z)
    lam = torch.tensor([1e2, 1e-2], dtype=torch.float64)
    # near the weak C's optimum (small gradient, tight target, many CG steps), far from the strong C's
    w_weak, _ = fit_logistic(z, torch.from_numpy(y.astype(np.int64)), lam[1:], 2, 1e-5, 100)
    w = w_weak[0].expand(2, 41) + torch.from_numpy(np.random.default_rng(0).normal(0, 1e-3, (2, 41)))
    prob = torch.sigmoid(w @ a.double().T).view(2, 1, -1)
    g = ((prob[:, 0] - torch.from_numpy(y).double()) @ a.double() + lam[:, None] * w * (torch.arange(41) < 40)).float()
    both, image = newton_direction(a, basis, ev, prob, g, lam, 0.0)
    alone, _ = newton_direction(a, basis, ev, prob[:1], g[:1], lam[:1], 0.0)
    np.testing.assert_allclose(both[0].numpy(), alone[0].numpy(), rtol=1e-4, atol=1e-6 * float(alone.abs().max()))
    np.testing.assert_allclose(image.numpy(), (both @ a.T).numpy(), rtol=1e-3, atol=1e-4)  # A d, accumulated


def test_probe_input_forms_give_the_same_result(tmp_path):
    """float32, float64 (kept float64 inside) and a memory-mapped file: the same probe."""
    layers, y = _layers(n=400, dims=(24,), signal=(0.8,))
    split = stratified_split(y, seed=2)
    path = tmp_path / "layer.npy"
    np.save(path, layers[0])
    forms = [layers[0], layers[0].astype(np.float64), np.load(path, mmap_mode="r")]
    results = [probe_layers([x], y, split)[0] for x in forms]
    for res in results[1:]:
        assert res.C == results[0].C and res.test_accuracy == results[0].test_accuracy
        np.testing.assert_allclose(res.val_accuracy_by_C, results[0].val_accuracy_by_C)


@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_probe_rejects_non_finite_rows_in_every_part(part):
    layers, y = _layers(n=200, dims=(6,), signal=(1.0,))
    split = stratified_split(y)
    bad = layers[0].copy()
    bad[split[part][3], 1] = np.inf
    with pytest.raises(UsageError, match=r"features\[0\].*NaN or inf"):
        probe_layers([bad], y, split)


def test_probe_result_round_trips_through_json():
    layers, y = _layers(n=200, dims=(8,), signal=(1.0,))
    res = probe_layers(layers, y, Cs=[0.1, 1.0])[0]
    d = json.loads(json.dumps(res.to_dict()))
    assert ProbeResult(**{**d, "Cs": tuple(d["Cs"]), "val_accuracy_by_C": tuple(d["val_accuracy_by_C"])}) == res


def test_probe_of_a_constant_layer_predicts_the_majority_class():
    layers, y = _layers(n=200, dims=(8,), n_classes=3, signal=(1.0,))
    res = probe_layers([np.full((200, 5), 2.5)], y, Cs=[1.0])[0]
    split = stratified_split(y)
    majority = np.bincount(y[split["train"]]).argmax()
    assert res.converged and res.test_accuracy == pytest.approx(np.mean(y[split["test"]] == majority))


def test_probe_layers_rejects_bad_input():
    layers, y = _layers(n=120, dims=(6, 6), signal=(1.0, 1.0))
    split = stratified_split(y)
    bad = layers[1].copy()
    bad[5, 2] = np.nan
    with pytest.raises(UsageError, match=r"features\[1\]"):
        probe_layers([layers[0], bad], y, split)
    with pytest.raises(UsageError, match="Cs"):
        probe_layers(layers, y, split, Cs=[0.0, 1.0])
    no_class_1 = {**split, "train": split["train"][y[split["train"]] == 0]}
    with pytest.raises(UsageError, match="no training sample"):
        probe_layers(layers, y, no_class_1)
    with pytest.raises(UsageError, match="one row per label"):
        probe_layers([layers[0][:-1]], y, split)


def test_probe_workers_do_not_change_the_result_and_threads_come_back():
    """Layers solved side by side give the very same numbers as one after another; torch's thread
    setting is back afterwards, also when a layer fails inside a worker."""
    import torch
    layers, y = _layers(n=300, dims=(12, 20, 16, 12), n_classes=3, signal=(0.3, 0.6, 0.9, 1.2))
    split = stratified_split(y, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = probe_layers(layers, y, split, workers=1)
        parallel = probe_layers(layers, y, split, workers=3)
        assert serial == parallel
        assert torch.get_num_threads() == 2
        bad = layers[2].copy()
        bad[split["val"][0], 0] = np.nan
        with pytest.raises(UsageError, match=r"features\[2\]"):
            probe_layers(layers[:2] + [bad] + layers[3:], y, split, workers=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for value in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="workers"):
            probe_layers(layers, y, split, workers=value)


# ---------------------------------------------------------------- k-NN

def test_knn_matches_sklearn_cosine():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.standard_normal((300, 16)) + np.outer(y, rng.standard_normal(16))
    for k in (1, 5, 11):  # odd k with two classes: no vote ties, so the tie rule cannot differ
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x[:200], y[:200])
        pred = knn_predict(x[:200], y[:200], x[200:], k=k, chunk=7)  # small chunks: several blocks
        np.testing.assert_array_equal(pred, ref.predict(x[200:]))
        assert knn_accuracy(x[:200], y[:200], x[200:], y[200:], k=k, chunk=7) == ref.score(x[200:], y[200:])


def test_knn_tie_goes_to_the_nearest_neighbours_class():
    train = np.array([[1.0, 0.0], [0.9, 0.5], [0.0, 1.0], [-1.0, 0.2]])
    labels = np.array([7, 3, 3, 7])
    # neighbours of (1, 0.05) in order: 7, 3, 3, 7 -> with k=4 a 2-2 tie, the nearest is class 7
    assert knn_predict(train, labels, np.array([[1.0, 0.05]]), k=4)[0] == 7
    assert knn_predict(train, labels, np.array([[0.8, 0.6]]), k=4)[0] == 3  # nearest is (0.9, 0.5)
    with pytest.raises(UsageError, match="k must be"):
        knn_predict(train, labels, train, k=5)


# ---------------------------------------------------------------- CKA

def _cka_reference(x, y):
    """Textbook linear CKA: HSIC = tr(K H L H) with centering matrix H."""
    n = len(x)
    h = np.eye(n) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _related(n=80, dims=(5, 20, 120), seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 6))
    return [z @ rng.standard_normal((6, d)) + 0.8 * rng.standard_normal((n, d)) + 2 for d in dims]


def test_linear_cka_matches_gram_reference_on_every_route():
    layers = _related()  # widths below, near and above N = 80: feature, mixed and Gram routes
    for x, y in itertools.product(layers, layers):
        assert linear_cka(x, y) == pytest.approx(_cka_reference(x, y), abs=1e-5, rel=1e-9)


def test_cka_matrix_symmetric_unit_diagonal_and_cross_model():
    layers = _related()
    m = cka_matrix(layers)
    assert np.array_equal(m, m.T) and np.all(np.diag(m) == 1.0)
    expected = np.array([[_cka_reference(a, b) for b in layers] for a in layers])
    np.testing.assert_allclose(m, expected, atol=1e-5)
    other = _related(seed=1)[:2]
    cross = cka_matrix(layers, other)
    assert cross.shape == (3, 2)
    np.testing.assert_allclose(cross, [[_cka_reference(a, b) for b in other] for a in layers], atol=1e-5)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    x, y, _ = _related()
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((20, 20)))
    assert linear_cka(x, 3.7 * y @ q) == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert np.isnan(linear_cka(np.ones((10, 3)), x[:10]))


def test_minibatch_hsic_is_songs_u_statistic():
    """One batch of 7: HSIC_1 equals the brute-force U-statistic over all ordered 4-tuples of
    distinct samples, on the raw (uncentered) features."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 3)) + 5
    y = x[:, :2] @ rng.standard_normal((2, 4)) + rng.standard_normal((7, 4)) - 3

    def u_stat(a, b):
        k, l = a @ a.T, b @ b.T
        return np.mean([k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
                        for i, j, q, r in itertools.permutations(range(7), 4)])

    expected = u_stat(x, y) / np.sqrt(u_stat(x, x) * u_stat(y, y))
    assert MinibatchCKA().update([x], [y]).result()[0, 0] == pytest.approx(expected, rel=1e-9)


def test_minibatch_cka_converges_to_population_value():
    """x = z A, y = z B + noise: the population CKA is known in closed form.

    50 batches of 32: over 30 seeds the unbiased estimate had mean 0.438 and std 0.008
    around the population 0.439, so 0.035 is ~4 std. The average of per-batch biased
    CKA sits near 0.52: the bias the unbiased estimator exists to remove.
    """
    rng0 = np.random.default_rng(0)
    a, b, noise = rng0.standard_normal((4, 48)), rng0.standard_normal((4, 48)), 25.0
    cross = a.T @ b
    population = np.sum(cross ** 2) / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b + noise * np.eye(48)))
    rng = np.random.default_rng(1)
    acc, biased = MinibatchCKA(), []
    for _ in range(50):
        z = rng.standard_normal((32, 4))
        x, y = z @ a, z @ b + np.sqrt(noise) * rng.standard_normal((32, 48))
        acc.update([x], [y])
        biased.append(linear_cka(x, y))
    assert acc.n_batches == 50
    assert abs(acc.result()[0, 0] - population) < 0.035
    assert np.mean(biased) - population > 0.05


def test_streaming_cka_reads_two_memory_mapped_stores(tmp_path):
    layers_a, layers_b = _related(n=400, dims=(8, 30)), _related(n=400, dims=(12,), seed=0)
    stores = []
    for name, layers in (("a", layers_a), ("b", layers_b)):
        maps = []
        for i, x in enumerate(layers):
            m = np.lib.format.open_memmap(tmp_path / f"{name}{i}.npy", mode="w+", dtype=np.float32, shape=x.shape)
            m[:] = x
            maps.append(m)
        stores.append(maps)
    read = lambda maps: (lambda idx: [m[idx] for m in maps])  # noqa: E731
    result = streaming_cka(read(stores[0]), read(stores[1]), n=400, batch_size=64, seed=0)
    assert result.shape == (2, 1)
    # same batches by hand
    acc = MinibatchCKA()
    for idx in np.array_split(np.random.default_rng(0).permutation(400), 400 // 64):
        idx = np.sort(idx)
        acc.update([m[idx] for m in stores[0]], [m[idx] for m in stores[1]])
    np.testing.assert_allclose(result, acc.result())
    # the same latent drives both stores, so the estimate is near the full-data value (0.564,
    # 0.734 here; streaming gives 0.560, 0.731): full-data CKA is biased up by O(D/N), and
    # 6 batches of ~66 rows add a little noise
    full = cka_matrix(layers_a, layers_b)
    np.testing.assert_allclose(result, full, atol=0.02)
    within = streaming_cka(read(stores[0]), None, n=400, batch_size=64)
    assert np.array_equal(within, within.T) and np.all(np.diag(within) == 1.0)


def test_cka_permutation_null_matches_a_plain_loop_and_separates_signal():
    rng = np.random.default_rng(0)
    for n, d in ((60, 30), (200, 6)):  # Gram route, feature route
        x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        out = cka_permutation_null(x, y, n_perm=40, seed=5)
        perm_rng = np.random.default_rng(5)
        null = [linear_cka(x, y[perm_rng.permutation(n)]) for _ in range(40)]
        assert out["null_mean"] == pytest.approx(np.mean(null), rel=1e-9)
        assert out["null_std"] == pytest.approx(np.std(null), rel=1e-9)
        assert out["null_mean"] < 0.6 * d / n + 0.05  # chance level ~ D/N for independent isotropic data
        assert out["p_value"] > 0.05  # independent: the score is just another null draw
        related = cka_permutation_null(x, x @ rng.standard_normal((d, d)) + 0.5 * y, n_perm=40)
        assert related["p_value"] == pytest.approx(1 / 41) and related["score"] > related["null_mean"] + 0.2


# ---------------------------------------------------------------- geometry

def _rank_k(singular, n=50, d=20, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, len(singular)))
    u -= u.mean(0)  # centered columns: centering leaves the matrix (and its spectrum shape) alone
    u, _ = np.linalg.qr(u)
    v, _ = np.linalg.qr(rng.standard_normal((d, len(singular))))
    return u @ np.diag(singular) @ v.T


def test_effective_rank_and_explained_variance():
    assert effective_rank(_rank_k([3.0] * 4)) == pytest.approx(4.0, abs=1e-6)
    skewed = _rank_k([10.0, 3.0, 1.0, 0.5, 0.1])
    assert 1.0 <= effective_rank(skewed) <= 5.0
    assert effective_rank(np.zeros((5, 3))) == 0.0
    assert explained_variance(skewed, 5) == pytest.approx(1.0)
    assert explained_variance(skewed, 1) == pytest.approx(100 / (100 + 9 + 1 + 0.25 + 0.01))
    from sklearn.decomposition import PCA
    x = np.random.default_rng(2).standard_normal((100, 12)) @ np.diag(np.linspace(3, 0.2, 12))
    ratio = PCA().fit(x).explained_variance_ratio_
    assert explained_variance(x, 4) == pytest.approx(ratio[:4].sum())
    assert components_for_variance(x, 0.9) == PCA(n_components=0.9).fit(x).n_components_


def test_separability_matches_explicit_loops():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [20, 30, 10])
    x = rng.standard_normal((60, 5)) + 2 * np.eye(3, 5)[y]
    mu = x.mean(0)
    means = {c: x[y == c].mean(0) for c in range(3)}
    within = sum(np.sum((x[i] - means[y[i]]) ** 2) for i in range(60)) / 60
    between = sum(np.sum(y == c) * np.sum((means[c] - mu) ** 2) for c in range(3)) / 60
    var = {c: np.mean([np.sum((row - means[c]) ** 2) for row in x[y == c]]) for c in range(3)}
    cdnv = np.mean([(var[i] + var[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
                    for i, j in itertools.combinations(range(3), 2)])
    out = separability(x, y)
    assert out["within_between_ratio"] == pytest.approx(within / between)
    assert out["cdnv"] == pytest.approx(cdnv)
    assert out["n_classes"] == 3
    with pytest.raises(UsageError):
        separability(x, np.zeros(60))


def test_ncc_accuracy_matches_sklearn_nearest_centroid():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    x = rng.standard_normal((300, 10)) + 1.5 * np.eye(4, 10)[y]
    ref = NearestCentroid().fit(x[:200], y[:200]).score(x[200:], y[200:])
    assert ncc_accuracy(x[:200], y[:200], x[200:], y[200:]) == pytest.approx(ref)
