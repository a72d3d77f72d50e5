"""Linear probes: lamina's batched solver against one scikit-learn fit per layer per C.

Both sides see the same standardized features (train mean/std) and choose C
on validation accuracy the same way (the smallest C among ties), so the only
difference is the solver. Only the ratio of the two times means something on
shared CPUs: both are measured in the same process, interleaved (lamina then
sklearn, ``repeats`` times, after one lamina warm-up), and the medians are
compared. Wall-clock and CPU time (``time.process_time``, which other jobs on
the machine disturb much less) are both reported, with the load average.

Threads matter more than anything else on a shared two-core machine: with
other processes running, OpenMP/BLAS threads of both torch and scikit-learn
can run ten times slower than one thread. ``--settings`` picks the resources:
``one-core`` pins both sides to one thread (torch, and every BLAS/OpenMP pool
through threadpoolctl) and one layer / one fit at a time, the fair and
reproducible comparison; ``two-workers`` gives each side two single-threaded
workers (lamina: two layers at once; scikit-learn: its fits spread over two
joblib processes, the usual way to use more cores for a sweep);
``defaults`` leaves both as a user gets them.

Data: ``--store PATH`` probes every layer of a feature store, e.g. MiniLM on
4,000 rotten-tomatoes sentences (7 layers x 384, 2 classes), captured once with
``lamina.capture("minilm", "rotten-tomatoes", lamina.CaptureConfig(out=PATH,
limit=4000))``. Without it, synthetic correlated features (4000 x 384, 7
layers, 2 classes; ``--classes 10 --dim 1280`` for the multinomial case).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings

import numpy as np

from lamina.analyze.metrics.probe import probe_layers
from lamina.analyze.metrics.split import stratified_split


def synthetic_layers(n: int = 4000, dim: int = 384, n_layers: int = 7, n_classes: int = 2,
                     seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Feature-like data: ``n_layers`` float32 (n, dim) arrays and (n,) labels.

    A shared 48-d latent with a decaying spectrum plus isotropic noise (so the
    features are correlated, like real activations); the class signal grows
    with depth, and 10% of labels are resampled so no layer is separable.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    latent = rng.standard_normal((n, 48))
    class_dirs = rng.standard_normal((n_classes, 48))
    layers = []
    for depth in range(n_layers):
        mix = rng.standard_normal((48, dim)) * np.linspace(1.5, 0.2, 48)[:, None]
        x = (latent + (0.15 + 0.1 * depth) * class_dirs[y]) @ mix
        x += 0.7 * rng.standard_normal((n, dim)) + rng.standard_normal(dim)
        layers.append(x.astype(np.float32))
    noisy = rng.random(n) < 0.1
    return layers, np.where(noisy, rng.integers(0, n_classes, n), y)


def store_layers(path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every layer (in memory) and the labels of a lamina feature store."""
    from lamina import FeatureStore

    store = FeatureStore.open(path)
    return [np.asarray(store.load(name)) for name in store.layers], np.asarray(store.labels)


def _standardized(x: np.ndarray, split: dict) -> dict:
    x = np.asarray(x, dtype=np.float64)
    tr = x[split["train"]]
    mean, std = tr.mean(0), tr.std(0)
    std[std <= 1e-12 * (1 + np.abs(mean))] = 1.0
    return {p: (x[idx] - mean) / std for p, idx in split.items()}


def _fit_score(parts: dict, labels: np.ndarray, split: dict, c: float) -> tuple[float, float]:
    """One scikit-learn fit at C = c: (validation accuracy, test accuracy)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # weak C may hit max_iter: that is the baseline
        model = LogisticRegression(C=c, max_iter=1000).fit(parts["train"], labels[split["train"]])
    return model.score(parts["val"], labels[split["val"]]), model.score(parts["test"], labels[split["test"]])


def _choose(scores, Cs) -> dict:
    val, test = [v for v, _ in scores], [t for _, t in scores]
    best = int(np.argmax(val))
    return {"C": float(np.sort(Cs)[best]), "val": val, "test_accuracy": float(test[best])}


def _sklearn_probe(x: np.ndarray, labels: np.ndarray, split: dict, Cs) -> dict:
    parts = _standardized(x, split)
    return _choose([_fit_score(parts, labels, split, c) for c in np.sort(np.asarray(Cs, dtype=np.float64))], Cs)


def _sklearn_parallel(features, labels: np.ndarray, split: dict, Cs, n_jobs: int) -> list[dict]:
    """Every (layer, C) fit spread over ``n_jobs`` joblib workers (loky processes, one BLAS thread
    each): how a scikit-learn user puts several cores to work on a probe sweep."""
    from joblib import Parallel, delayed, parallel_config

    cs = np.sort(np.asarray(Cs, dtype=np.float64))
    parts = [_standardized(x, split) for x in features]
    with parallel_config(backend="loky", inner_max_num_threads=1):
        scores = Parallel(n_jobs=n_jobs)(delayed(_fit_score)(p, labels, split, c) for p in parts for c in cs)
    return [_choose(scores[i * len(cs):(i + 1) * len(cs)], Cs) for i in range(len(features))]


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare(features, labels, split, Cs=tuple(np.logspace(-4, 2, 7)), repeats: int = 3, workers: int | None = 1,
            sklearn_jobs: int = 1) -> dict:
    """Time and compare lamina's ``probe_layers`` with per-layer, per-C sklearn fits.

    One warm-up of each side, then ``repeats`` rounds of (lamina, sklearn), medians kept.

    Args:
        features: L arrays (N, D_l); labels: (N,); split: train/val/test indices; Cs: C grid.
        repeats: interleaved rounds.
        workers: lamina's ``workers`` (layers solved side by side, one thread each).
        sklearn_jobs: 1 fits one after another in this process; more spreads the fits over
            that many joblib workers.

    Returns:
        ``lamina_s``, ``sklearn_s`` (median wall seconds), their CPU-time twins
        ``lamina_cpu_s``, ``sklearn_cpu_s`` (this process only: joblib workers are not
        counted), ``probe_speedup_vs_sklearn`` (ratio of the wall medians) and
        ``probe_speedup_cpu``, ``probe_max_acc_gap`` (largest |test accuracy
        difference| over layers at each side's validation-chosen C, in accuracy
        units: 0.01 is one point), ``max_val_gap_same_C`` (the largest validation gap
        at equal C: the solvers themselves), the raw times, the load averages before
        and after, and per layer ``lamina``/``sklearn`` test accuracies and chosen C.
    """
    labels = np.asarray(labels)
    load_before = os.getloadavg()  # other processes on shared CPUs skew both timings

    def run_lamina():
        return probe_layers(features, labels, split, Cs=Cs, workers=workers)

    def run_sklearn():
        if sklearn_jobs == 1:
            return [_sklearn_probe(x, labels, split, Cs) for x in features]
        return _sklearn_parallel(features, labels, split, Cs, sklearn_jobs)

    run_lamina()  # warm-up: first calls into MKL/LAPACK
    if sklearn_jobs > 1:
        run_sklearn()  # warm-up: joblib starts its worker processes once
    lam_t, skl_t, results, reference = [], [], None, None
    for _ in range(repeats):
        results, wall, cpu = _timed(run_lamina)
        lam_t.append((wall, cpu))
        reference, wall, cpu = _timed(run_sklearn)
        skl_t.append((wall, cpu))
    lam_wall, lam_cpu = np.median(lam_t, 0)
    skl_wall, skl_cpu = np.median(skl_t, 0)
    gaps = [abs(r.test_accuracy - s["test_accuracy"]) for r, s in zip(results, reference)]
    val_gaps = [float(np.max(np.abs(np.subtract(r.val_accuracy_by_C, s["val"]))))
                for r, s in zip(results, reference)]
    return {
        "n": int(len(labels)), "dims": [int(np.shape(x)[1]) for x in features],
        "n_classes": int(len(np.unique(labels))), "n_Cs": int(len(Cs)), "repeats": repeats,
        "lamina_workers": workers, "sklearn_jobs": sklearn_jobs,
        "lamina_s": float(lam_wall), "sklearn_s": float(skl_wall),
        "lamina_cpu_s": float(lam_cpu), "sklearn_cpu_s": float(skl_cpu),
        "probe_speedup_vs_sklearn": float(skl_wall / lam_wall), "probe_speedup_cpu": float(skl_cpu / lam_cpu),
        "probe_max_acc_gap": float(max(gaps)), "max_val_gap_same_C": float(max(val_gaps)),
        "lamina_converged": all(r.converged for r in results),
        "times_wall_cpu": {"lamina": np.round(lam_t, 4).tolist(), "sklearn": np.round(skl_t, 4).tolist()},
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "layers": [{"layer": r.layer, "lamina_test_accuracy": r.test_accuracy, "lamina_C": r.C,
                    "sklearn_test_accuracy": s["test_accuracy"], "sklearn_C": s["C"]}
                   for r, s in zip(results, reference)],
    }


@contextlib.contextmanager
def thread_setting(threads: int | None):
    """Pin torch and every BLAS/OpenMP pool to ``threads``; None leaves the library defaults."""
    if threads is None:
        yield
        return
    import sklearn.linear_model  # noqa: F401  (load its OpenMP/BLAS libraries so the limit reaches them)
    import torch
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


# name: (threads of torch and every BLAS pool, lamina's workers, scikit-learn's joblib jobs, what it means)
SETTINGS = {
    "one-core": (1, 1, 1, "both on one thread, one layer / one fit at a time (the fair ratio: the headline)"),
    "two-workers": (1, 2, 2, "two single-threaded workers each: lamina two layers at once, scikit-learn "
                             "its fits over two joblib processes"),
    "defaults": (None, None, 1, "both as a user gets them: library default threads, lamina's default workers"),
}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=None, help="feature store directory (default: synthetic data)")
    parser.add_argument("--n", type=int, default=4000, help="synthetic: samples")
    parser.add_argument("--dim", type=int, default=384, help="synthetic: feature width of every layer")
    parser.add_argument("--layers", type=int, default=7, help="synthetic: number of layers")
    parser.add_argument("--classes", type=int, default=2, help="synthetic: number of classes")
    parser.add_argument("--seed", type=int, default=0, help="data and split seed")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--settings", nargs="+", default=["one-core"], choices=sorted(SETTINGS),
                        help="resource settings to run: " + "; ".join(f"{k}: {v[3]}" for k, v in SETTINGS.items()))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.store:
        features, labels = store_layers(args.store)
    else:
        features, labels = synthetic_layers(args.n, args.dim, args.layers, args.classes, args.seed)
    split = stratified_split(labels, seed=args.seed)
    results = []
    for setting in args.settings:
        threads, workers, jobs, _ = SETTINGS[setting]
        with thread_setting(threads):
            result = compare(features, labels, split, repeats=args.repeats, workers=workers, sklearn_jobs=jobs)
        result["setting"] = setting
        result["data"] = args.store or f"synthetic seed {args.seed}"
        results.append(result)
        print(json.dumps(result, indent=2), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
