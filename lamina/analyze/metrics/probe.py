"""Linear-probe accuracy for every layer and every regularization strength at once.

``probe_layers`` is the public verb: per layer, standardize the train rows,
solve every C of the grid together (``logreg.solve_logistic``: truncated
Newton with a Gram-eigenbasis preconditioner; its docstring has the design and
the measurements), choose C on validation, and read the test accuracy with a
Wilson interval.

Design decisions:

- The objective and the stopping rule are scikit-learn's (``LogisticRegression``,
  lbfgs, tol 1e-4 on the mean-loss gradient), so the accuracies agree with it.
- Features are standardized with the train mean (float64) and std (from the
  Gram's diagonal; sklearn's constant-feature rule). The held-out rows are
  never standardized: the standardization is folded into the weights.
- float32 for every pass over the data unless the features are float64 or
  ``tol`` is below ``_FLOAT32_TOL`` (then float64 throughout).
- Threads: inside the probe torch and the BLAS run one thread each
  (``lamina.threads.limit_threads``), and
  ``workers`` layers are solved side by side (Python threads; the heavy kernels
  release the GIL). On two shared cores a second intra-op thread made the probe
  3x slower, while two layer workers make it 1.45x faster (MiniLM, 7 layers:
  0.68 s at torch's default threads, 0.21 s pinned, 0.14 s with 2 workers).
  The results do not depend on ``workers``: each layer is solved alone.
- On a CUDA device (``device=``, what ``analyze --device cuda`` passes) the
  same solver runs there: the rows are still gathered and centered with numpy
  (they come from a memory-mapped store), then the Gram, the eigenbasis, every
  pass and the held-out logits are torch on the device, float64 where the CPU
  path has it. Every tensor the solver makes is made on its inputs' device
  (tested on the CPU under ``torch.device('meta')``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from lamina.errors import UsageError
from lamina.threads import limit_threads
from lamina.analyze.metrics.logreg import solve_logistic
from lamina.analyze.metrics.split import as_labels, as_matrix, check_split, stratified_split

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
_FLOAT32_TOL = 1e-6  # below this gradient tolerance float32 rounding could decide convergence: float64
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """Linear-probe result of one layer.

    Attributes:
        layer: index of the layer in the ``features`` list.
        C: inverse regularization strength chosen on validation accuracy
            (sklearn's convention; the smallest C among ties).
        val_accuracy: validation accuracy at ``C``.
        test_accuracy: test accuracy at ``C``.
        ci_low, ci_high: 95% Wilson interval of ``test_accuracy``.
        n_test: number of test samples.
        n_train: number of training samples.
        Cs: every C tried, ascending.
        val_accuracy_by_C: validation accuracy for each of ``Cs``.
        converged: whether every C met the gradient tolerance.
    """

    layer: int
    C: float
    val_accuracy: float
    test_accuracy: float
    ci_low: float
    ci_high: float
    n_test: int
    n_train: int
    Cs: tuple[float, ...]
    val_accuracy_by_C: tuple[float, ...]
    converged: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["Cs"] = list(self.Cs)
        d["val_accuracy_by_C"] = list(self.val_accuracy_by_C)
        return d


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion ``correct / n`` (z = 1.96: 95%).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at
    0% or 100% accuracy.
    """
    if n <= 0 or not 0 <= correct <= n:
        raise UsageError("wilson_interval needs 0 <= correct <= n and n > 0",
                         value=f"correct={correct}, n={n}", fix="pass counts, not fractions")
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def probe_layers(features, labels, split: dict | None = None, Cs=DEFAULT_CS, seed: int = 0,
                 tol: float = 1e-4, max_iter: int = 100, workers: int | None = None,
                 device: torch.device | str | None = None) -> list[ProbeResult]:
    """Fit an L2 logistic-regression probe on every layer, choosing C on validation.

    Args:
        features: L arrays, each (N, D_l) (numpy or memory-mapped; only the
            rows in ``split`` are read).
        labels: (N,) class labels.
        split: ``{"train", "val", "test"}`` index arrays over N; None makes
            ``stratified_split(labels, seed=seed)``.
        Cs: inverse regularization strengths (sklearn's C).
        seed: seed of the split when ``split`` is None (the solver is deterministic).
        tol: stop when max |gradient| / N_train <= tol (sklearn's lbfgs default
            rule, 1e-4 on the same scale).
        max_iter: Newton iterations at most.
        workers: layers solved side by side, each on one thread; None: one per
            CPU this process may use, at most L. The results do not depend on it.
        device: where the solver runs (a CUDA GPU for ``analyze --device cuda``); None: the CPU, with
            numpy for the gathers and the Gram. The rows are gathered and standardized on the CPU either
            way; the Gram, the eigenbasis, every Newton/CG pass and the held-out logits run on ``device``
            (float64 weights, so not Apple MPS). Layers are solved one after the other there.

    Returns:
        One ``ProbeResult`` per layer, in order.

    Example:
        >>> res = probe_layers([x_embed, x_block0], y)   # doctest: +SKIP
        >>> [round(r.test_accuracy, 3) for r in res]     # doctest: +SKIP
    """
    features = list(features)
    if not features:
        raise UsageError("probe_layers got no layers", value=0, fix="pass a list of (N, D) arrays")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError("workers must be a positive integer or None", value=workers,
                         allowed="None (one per CPU) or >= 1", fix="workers=1 solves the layers one after another")
    y = as_labels(labels)
    classes, codes = np.unique(y, return_inverse=True)
    parts = stratified_split(y, seed=seed) if split is None else check_split(split, len(y))
    cs = np.sort(np.asarray(Cs, dtype=np.float64).ravel())
    if cs.size == 0 or not np.all(np.isfinite(cs)) or np.any(cs <= 0):
        raise UsageError("Cs must be positive finite numbers", value=list(np.asarray(Cs).ravel()),
                         allowed="e.g. numpy.logspace(-4, 2, 7)", fix="pass C > 0 values")
    if len(classes) < 2:
        raise UsageError("the labels hold only one class", value=repr(classes[:1].tolist()),
                         allowed="at least 2 classes", fix="check the label column")
    missing = np.setdiff1d(np.arange(len(classes)), codes[parts["train"]])
    if missing.size:
        raise UsageError("some classes have no training sample", value=classes[missing][:5].tolist(),
                         fix="use stratified_split(labels) so every class is in every part")
    for i, x in enumerate(features):  # every shape is checked before any work starts
        if len(np.shape(x)) != 2 or np.shape(x)[0] != len(y):
            raise UsageError(f"features[{i}] does not have one row per label", value=f"shape {np.shape(x)}",
                             allowed=f"({len(y)}, D)", fix="pass features and labels of the same samples")
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type == "mps":
        raise UsageError("the probe's solver needs float64, which Apple's MPS does not have", value=str(dev),
                         allowed="cpu or a CUDA device", fix="leave the probe on the CPU (device=None)")
    task = _Task(parts, {p: torch.from_numpy(codes[idx].astype(np.int64)).to(dev or "cpu")
                         for p, idx in parts.items()},
                 np.concatenate([parts["val"], parts["test"]]), cs, len(classes), tol, max_iter, dev)
    # on a GPU the layers queue on one stream anyway: one worker, no CPU threads competing to feed it
    n_workers = 1 if dev is not None else min(len(features), workers or _usable_cpus())
    with limit_threads(1):
        if n_workers == 1:
            return [task.layer(i, x) for i, x in enumerate(features)]
        with ThreadPoolExecutor(n_workers, thread_name_prefix="lamina-probe") as pool:
            return list(pool.map(task.layer, range(len(features)), features))


@dataclass(frozen=True)
class _Task:
    """What every layer's probe shares: the split, the label codes per part, the held-out rows (val then
    test: one gather, one matmul), the grid, the solver settings, and each worker thread's buffers."""

    parts: dict
    ys: dict
    held_out: np.ndarray
    cs: np.ndarray
    n_classes: int
    tol: float
    max_iter: int
    device: torch.device | None = None  # None: the CPU path (numpy Gram)
    local: threading.local = field(default_factory=threading.local)  # freed with the task, not kept per thread

    def layer(self, i: int, x) -> ProbeResult:
        """The probe of one layer x (N, D): standardize, solve every C, pick C on validation."""
        parts, ys, cs, held_out = self.parts, self.ys, self.cs, self.held_out
        n_val, n_test, n_train = len(parts["val"]), len(parts["test"]), len(parts["train"])
        # float64 features stay float64 (no overflow to inf), the rest is float32 unless tol asks for more
        dtype = np.float64 if self.tol < _FLOAT32_TOL or np.asarray(x[:0]).dtype == np.float64 else np.float32
        d = np.shape(x)[1]
        design, xho = self._buffers(d, dtype)
        z = design[:, :-1]
        _gather(x, parts["train"], z)
        _gather(x, held_out, xho)
        mean = z.mean(0, dtype=np.float64)
        if not np.isfinite(mean).all():  # a float64 sum of finite float32 rows cannot overflow
            as_matrix(x[parts["train"]], f"features[{i}]")  # raises the shared, descriptive error
        z -= mean.astype(dtype)
        # the Gram of the centered rows (numpy's z.T @ z is a syrk, half a gemm) holds the variances:
        # exact zeros for constant columns (sklearn's rule below), no float32 overflow below |x| ~ 1e17
        dev = self.device
        if dev is None:
            gram = z.T @ z if d <= n_train else None
            var = np.diag(gram) if gram is not None else np.einsum("ij,ij->j", z, z, dtype=np.float64)
        else:  # the same products on the device (the Gram is the O(N D^2) part)
            design_t = torch.from_numpy(design).to(dev)
            zt = design_t[:, :-1]
            gram_t = zt.T @ zt if d <= n_train else None
            var = (torch.diagonal(gram_t) if gram_t is not None else torch.einsum("ij,ij->j", zt.double(), zt.double())
                   ).cpu().numpy()
        std = np.sqrt(var.astype(np.float64) / n_train)
        std[std <= 1e-12 * (1 + np.abs(mean))] = 1.0  # sklearn: a constant feature keeps scale 1
        inv = (1 / std).astype(dtype)
        if dev is None:
            z *= inv
            if gram is not None:
                gram *= inv[:, None] * inv  # now the Gram of the standardized rows
            design_t, gram_t = torch.from_numpy(design), None if gram is None else torch.from_numpy(gram)
        else:
            inv_t = torch.from_numpy(inv).to(dev)
            zt *= inv_t
            if gram_t is not None:
                gram_t *= inv_t[:, None] * inv_t
        w, converged = solve_logistic(design_t, ys["train"], torch.from_numpy(1.0 / cs).to(dev or "cpu"),
                                      self.n_classes, self.tol, self.max_iter, gram_t)
        if not converged:
            logger.warning("probe of layer %d: some C did not reach tol=%g in %d Newton steps", i, self.tol,
                           self.max_iter)
        # fold the standardization into the weights: the held-out rows are used as they are
        coef = w[:, :, :-1] / torch.from_numpy(std).to(w.device)
        bias = w[:, :, -1:] - coef @ torch.from_numpy(mean).to(w.device).view(-1, 1)
        xho_t = torch.from_numpy(xho).to(w.device)
        logits = torch.addmm(bias.reshape(-1, 1).to(xho_t.dtype), coef.reshape(-1, d).to(xho_t.dtype), xho_t.T)
        if not bool(torch.isfinite(logits).all()):  # a NaN or inf row makes NaN or inf logits
            as_matrix(x[held_out], f"features[{i}]")
        logits = logits.view(len(cs), -1, len(held_out))
        pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        val = (pred[:, :n_val] == ys["val"]).double().mean(1).cpu().numpy()
        test = (pred[:, n_val:] == ys["test"]).double().mean(1).cpu().numpy()
        best = int(np.argmax(val))  # Cs ascending, argmax takes the first: strongest C among ties
        correct = int(round(test[best] * n_test))
        lo, hi = wilson_interval(correct, n_test)
        return ProbeResult(layer=i, C=float(cs[best]), val_accuracy=float(val[best]),
                           test_accuracy=correct / n_test, ci_low=lo, ci_high=hi, n_test=n_test,
                           n_train=n_train, Cs=tuple(float(c) for c in cs),
                           val_accuracy_by_C=tuple(float(v) for v in val), converged=converged)

    def _buffers(self, d: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        """This thread's design (N_train, d + 1), its last column 1 (the intercept), and held-out rows.

        Reused across the layers one thread solves: fresh memory costs page faults on every layer.
        """
        loc = self.local
        if getattr(loc, "key", None) != (d, np.dtype(dtype)):
            loc.design = np.empty((len(self.parts["train"]), d + 1), dtype=dtype)
            loc.design[:, -1] = 1
            loc.held = np.empty((len(self.held_out), d), dtype=dtype)
            loc.key = (d, np.dtype(dtype))
        return loc.design, loc.held


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _gather(x, idx: np.ndarray, out: np.ndarray) -> None:
    """out[:] = x[idx] for an array or memmap (only those rows are read), without a temporary."""
    if isinstance(x, np.ndarray) and x.dtype == out.dtype:
        np.take(x, idx, axis=0, out=out, mode="clip")  # idx is checked; "clip" skips a buffered copy
    else:
        out[:] = np.asarray(x[idx])
