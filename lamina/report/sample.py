"""Synthetic ``scores.json`` content for tests and previews of the report.

The numbers are made up (smooth curves with a little seeded noise), shaped
like what ``lamina analyze`` writes for a small encoder: accuracy that rises
and flattens with depth, geometry that tightens, a random-init control that
stays near chance. The dict carries ``"synthetic": true`` so a report made
from it says so at the top. Never use it as a measurement.
"""

from __future__ import annotations

import numpy as np

DEFINITIONS = {
    "probe_acc": "Test accuracy of an L2 logistic-regression probe (binary for two classes, multinomial for "
                 "more) on the layer's pooled features; the regularization strength C is chosen on the "
                 "validation split.",
    "probe_ci_low": "Lower end of the 95% Wilson interval of the probe's test accuracy.",
    "probe_ci_high": "Upper end of the 95% Wilson interval of the probe's test accuracy.",
    "probe_C": "Inverse L2 regularization strength of the probe, chosen on the validation split.",
    "knn_acc": "Test accuracy of a k-nearest-neighbour classifier (cosine similarity) against the training split.",
    "ncc_acc": "Test accuracy of assigning each sample to the nearest class mean of the training split.",
    "effective_rank": "exp of the entropy of the normalized singular values of the centred features "
                      "(Roy & Vetterli); how many directions the layer really uses.",
    "within_between_ratio": "Trace of the within-class covariance divided by the trace of the between-class "
                            "covariance (NC1-style); lower means more separable classes.",
    "cdnv": "Class-distance normalized variance: mean over class pairs of (var_i + var_j) / (2 ||mu_i - mu_j||^2); "
            "lower means tighter, better separated classes.",
    "cka_to_last": "Linear CKA between this layer's features and the last layer's, on the same samples.",
    "cka": "Linear centred kernel alignment between the features of two layers on the same samples; "
           "1 on the diagonal, symmetric.",
    "block_influence": "1 - mean cosine similarity between a block's input and output (ShortGPT); "
                       "low means the block barely changes its input.",
    "skip_nmse": "sum (M_full - M_skip)^2 / sum M_full^2 where M is the final hidden state and the block is "
                 "bypassed through its residual (Nemotron Elastic); low means the block can go.",
}


def _curve(n: int, start: float, peak: float, end: float, at: float) -> np.ndarray:
    """A smooth rise from ``start`` to ``peak`` at relative depth ``at``, then a drift to ``end``."""
    t = np.linspace(0.0, 1.0, n)
    rise = start + (peak - start) * (1 - np.exp(-4.0 * t / max(at, 1e-6)))
    fall = np.where(t > at, (end - peak) * ((t - at) / max(1 - at, 1e-6)) ** 2, 0.0)
    return rise + fall


def _wilson(p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _metrics(n: int, rng: np.random.Generator, random_init: bool, n_test: int) -> dict:
    noise = lambda scale: rng.normal(0.0, scale, n)  # noqa: E731
    if random_init:
        probe = 0.56 + 0.02 * np.exp(-np.arange(n) / 2) + noise(0.008)
        knn, ncc = probe - 0.03 + noise(0.006), probe - 0.02 + noise(0.006)
        rank = np.linspace(60, 20, n) + noise(1.0)
        wb = np.linspace(9.0, 11.0, n) + noise(0.2)
        cdnv = np.linspace(30.0, 36.0, n) + noise(0.5)
        cka_last = np.clip(np.linspace(0.75, 1.0, n) + noise(0.01), 0, 1)
    else:
        probe = _curve(n, 0.64, 0.84, 0.81, 0.65) + noise(0.004)
        knn = _curve(n, 0.60, 0.80, 0.78, 0.7) + noise(0.006)
        ncc = _curve(n, 0.58, 0.79, 0.78, 0.7) + noise(0.006)
        rank = np.linspace(95, 38, n) ** 1.0 + noise(1.5)
        wb = 4.0 * np.exp(-1.6 * np.linspace(0, 1, n)) + 0.6 + noise(0.05)
        cdnv = 14.0 * np.exp(-2.0 * np.linspace(0, 1, n)) + 1.5 + noise(0.2)
        cka_last = np.clip(np.linspace(0.25, 1.0, n) ** 1.5 + noise(0.01), 0, 1)
    cka_last[-1] = 1.0
    probe = np.clip(probe, 0.0, 1.0)
    low, high = _wilson(probe, n_test)
    grid = np.array([0.01, 0.1, 1.0, 10.0])
    c = grid[np.clip(np.round(np.linspace(2, 0, n) + noise(0.3)).astype(int), 0, 3)]
    out = {"probe_acc": probe, "probe_ci_low": low, "probe_ci_high": high, "probe_C": c,
           "knn_acc": np.clip(knn, 0, 1), "ncc_acc": np.clip(ncc, 0, 1), "effective_rank": rank,
           "within_between_ratio": wb, "cdnv": cdnv, "cka_to_last": cka_last}
    return {k: [round(float(x), 4) for x in v] for k, v in out.items()}


def _cka(n: int, rng: np.random.Generator, width: float) -> list[list[float]]:
    i = np.arange(n)
    m = np.exp(-np.abs(i[:, None] - i[None, :]) / width) + rng.normal(0, 0.01, (n, n))
    m = np.clip((m + m.T) / 2, 0, 1)
    np.fill_diagonal(m, 1.0)
    return [[round(float(x), 4) for x in row] for row in m]


def _importance(blocks: list[str], rng: np.random.Generator, random_init: bool) -> dict:
    n = len(blocks)
    t = np.linspace(0, 1, n)
    scale = 0.15 if random_init else 1.0
    bi = scale * (0.05 + 0.35 * np.exp(-6 * t) + 0.25 * t ** 6) + np.abs(rng.normal(0, 0.005, n))
    nmse = scale * (0.01 + 0.30 * np.exp(-5 * t) + 0.45 * t ** 5) + np.abs(rng.normal(0, 0.003, n))
    skippable = [True] * n
    if n >= 4:  # like a CNN stage that changes width: it has no residual to bypass it
        skippable[0] = False
    return {"blocks": blocks,
            "block_influence": [round(float(v), 4) if s else None for v, s in zip(bi, skippable)],
            "skip_nmse": [round(float(v), 4) if s else None for v, s in zip(nmse, skippable)],
            "skippable": skippable, "target": "final hidden states"}


def sample_scores(n_layers: int = 7, control: bool = True, *, seed: int = 0) -> dict:
    """A plausible, **synthetic** ``scores.json`` dict for tests and report previews.

    ``n_layers`` counts the embedding output plus the blocks (7 = embed and
    six blocks, like MiniLM). With ``control``, a random-init control with the
    same keys is included. When there are four blocks or more, ``blocks.0`` is
    marked not skippable (as a CNN's width-changing block would be) so that
    every element of the report is exercised. Deterministic given ``seed``.
    """
    if n_layers < 2:
        raise ValueError(f"n_layers must be at least 2 (the embedding and one block), got {n_layers}")
    rng = np.random.default_rng(seed)
    layers = ["embed"] + [f"blocks.{i}" for i in range(n_layers - 1)]
    n, n_test = 2000, 400
    scores = {
        "lamina_version": "0.1.0",
        "synthetic": True,
        "model": {"name": "minilm", "fingerprint": "synthetic0000000", "parameters": 22713216,
                  "class": "BertModel"},
        "data": {"name": "rotten-tomatoes", "n": n, "classes": ["rotten", "fresh"], "class_counts": [844, 1156]},
        "pooling": "mean",
        "seed": seed,
        "split": {"fractions": [0.6, 0.2, 0.2], "n_train": 1200, "n_val": 400, "n_test": n_test},
        "layers": layers,
        "definitions": dict(DEFINITIONS),
        "metrics": _metrics(n_layers, rng, False, n_test),
        "cka": _cka(n_layers, rng, 2.5),
        "importance": _importance(layers[1:], rng, False),
        "control": None,
        "versions": {"torch": "synthetic", "transformers": "synthetic"},
    }
    if control:
        scores["control"] = {"metrics": _metrics(n_layers, rng, True, n_test),
                             "cka": _cka(n_layers, rng, 12.0),
                             "importance": _importance(layers[1:], rng, True)}
    return scores
