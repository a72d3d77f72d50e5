"""Linear probes: lamina's batched solver against one scikit-learn fit per layer per C.

Both sides see the same standardized features (train mean/std) and choose C
on validation accuracy the same way (the smallest C among ties), so the only
difference is the solver. Only the ratio of the two times means something on
shared CPUs: both are measured in the same process, one after the other.

Threads matter more than anything else on a shared two-core machine: with
other processes running, OpenMP/BLAS threads of both torch and scikit-learn
can run ten times slower than one thread. ``--threads 1`` pins both sides to
one thread, the fair and reproducible comparison; the default leaves both at
their library defaults, which is what a user gets.

Run ``python bench/probe_vs_sklearn.py`` for a synthetic demo (4000 x 384,
7 layers, 2 classes); ``--classes 10`` and ``--dim 1280`` try the other cases.
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


def _sklearn_probe(x: np.ndarray, labels: np.ndarray, split: dict, Cs) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    tr = x[split["train"]]
    mean, std = tr.mean(0), tr.std(0)
    std[std <= 1e-12 * (1 + np.abs(mean))] = 1.0
    parts = {p: (x[idx] - mean) / std for p, idx in split.items()}
    val, test = [], []
    for c in np.sort(np.asarray(Cs, dtype=np.float64)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # weak C may hit max_iter: that is the baseline
            model = LogisticRegression(C=c, max_iter=1000).fit(parts["train"], labels[split["train"]])
        val.append(model.score(parts["val"], labels[split["val"]]))
        test.append(model.score(parts["test"], labels[split["test"]]))
    best = int(np.argmax(val))
    return {"C": float(np.sort(Cs)[best]), "val": val, "test_accuracy": float(test[best])}


def compare(features, labels, split, Cs=tuple(np.logspace(-4, 2, 7)), repeats: int = 3) -> dict:
    """Time and compare lamina's ``probe_layers`` with per-layer, per-C sklearn fits.

    lamina runs first: sklearn's OpenMP threads, left spinning after its fits, slow down
    torch ops that follow them on a two-core machine.

    Args:
        features: L arrays (N, D_l); labels: (N,); split: train/val/test indices; Cs: C grid.
        repeats: lamina runs (the median time is kept); sklearn runs once.

    Returns:
        ``lamina_s``, ``sklearn_s`` (seconds), ``probe_speedup_vs_sklearn``,
        ``probe_max_acc_gap`` (largest |test accuracy difference| over layers,
        in accuracy units: 0.01 is one point), ``max_val_gap_same_C`` (the
        largest validation gap at equal C: the solvers themselves), and per
        layer ``lamina``/``sklearn`` test accuracies and chosen C.
    """
    labels = np.asarray(labels)
    load_before = os.getloadavg()[0]  # other processes on shared CPUs skew both timings
    times, results = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        results = probe_layers(features, labels, split, Cs=Cs)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    reference = [_sklearn_probe(x, labels, split, Cs) for x in features]
    sklearn_s = time.perf_counter() - start
    lamina_s = float(np.median(times))
    gaps = [abs(r.test_accuracy - s["test_accuracy"]) for r, s in zip(results, reference)]
    val_gaps = [float(np.max(np.abs(np.subtract(r.val_accuracy_by_C, s["val"]))))
                for r, s in zip(results, reference)]
    return {
        "n": int(len(labels)), "dims": [int(np.shape(x)[1]) for x in features],
        "n_classes": int(len(np.unique(labels))), "n_Cs": int(len(Cs)),
        "lamina_s": lamina_s, "sklearn_s": sklearn_s,
        "probe_speedup_vs_sklearn": sklearn_s / lamina_s,
        "probe_max_acc_gap": float(max(gaps)), "max_val_gap_same_C": float(max(val_gaps)),
        "lamina_converged": all(r.converged for r in results),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "layers": [{"layer": r.layer, "lamina_test_accuracy": r.test_accuracy, "lamina_C": r.C,
                    "sklearn_test_accuracy": s["test_accuracy"], "sklearn_C": s["C"]}
                   for r, s in zip(results, reference)],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="samples")
    parser.add_argument("--dim", type=int, default=384, help="feature width of every layer")
    parser.add_argument("--layers", type=int, default=7, help="number of layers")
    parser.add_argument("--classes", type=int, default=2, help="number of classes")
    parser.add_argument("--seed", type=int, default=0, help="data and split seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both sides (torch, BLAS, OpenMP); default: leave as is")
    args = parser.parse_args(argv)
    features, labels = synthetic_layers(args.n, args.dim, args.layers, args.classes, args.seed)
    with contextlib.ExitStack() as stack:
        if args.threads:
            import sklearn.linear_model  # noqa: F401  (load its OpenMP/BLAS libraries so the limit reaches them)
            import torch
            from threadpoolctl import threadpool_limits  # installed with scikit-learn

            previous = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            stack.callback(torch.set_num_threads, previous)
            stack.enter_context(threadpool_limits(limits=args.threads))
        result = compare(features, labels, stratified_split(labels, seed=args.seed))
    result["threads"] = args.threads
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
