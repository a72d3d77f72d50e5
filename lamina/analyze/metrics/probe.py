"""Linear-probe accuracy for every layer and every regularization strength at once.

Design decisions:

- The objective is scikit-learn's ``LogisticRegression`` (L2, lbfgs):
  ``C * sum(log loss) + 0.5 * ||W||^2`` with an unpenalized intercept. Two
  classes use one weight vector (as sklearn does); three or more use the full
  multinomial K x D parametrization. So the accuracies agree with sklearn.
- Features are standardized with the train mean and std, then rotated onto
  their principal axes (eigh of the smaller of the D x D and N x N Grams).
  The rotation is orthogonal, so the penalty and the optimum do not change,
  but the Hessian becomes nearly diagonal, which makes a cheap preconditioner
  (a scalar per direction for two classes, a K x K block per direction for K
  classes) work well. Directions with no variance get no gradient and stay
  exactly zero, so they are dropped: exact, and N < D costs N, not D.
- All C values of a layer are solved together by truncated Newton
  (preconditioned conjugate gradient on the Hessian, Armijo backtracking).
  Every step is one matmul over (N, r) x (r, n_C * K); a layer costs a few
  dozen passes over its features where sklearn runs lbfgs (hundreds of passes)
  once per C.
- float64 for the objective, gradient, line search and stopping test (weak
  regularization makes the problem badly conditioned); only the Hessian
  products inside CG run in float32, which halves the dominant memory traffic
  and cannot move the optimum (inexact Newton: the step only has to be good to
  the CG tolerance, the gradient that decides convergence is float64).
- On a busy two-core machine torch's intra-op threads can be far slower than
  one thread (barrier waits); ``torch.set_num_threads(1)`` is the cure there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lamina.errors import UsageError
from lamina.analyze.metrics.split import as_labels, as_matrix, check_split, stratified_split

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
_BLOCK_BUDGET = 2 ** 25  # float64 elements (256 MiB) for the K x K block preconditioner
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
                 tol: float = 1e-5, max_iter: int = 100) -> list[ProbeResult]:
    """Fit an L2 logistic-regression probe on every layer, choosing C on validation.

    Args:
        features: L arrays, each (N, D_l) (numpy or memory-mapped; only the
            rows in ``split`` are read).
        labels: (N,) class labels.
        split: ``{"train", "val", "test"}`` index arrays over N; None makes
            ``stratified_split(labels, seed=seed)``.
        Cs: inverse regularization strengths (sklearn's C).
        seed: seed of the split when ``split`` is None (the solver is deterministic).
        tol: stop when max |gradient| / N_train <= tol (sklearn's lbfgs stops at
            1e-4 on the same scale, so this is tighter).
        max_iter: Newton iterations at most.

    Returns:
        One ``ProbeResult`` per layer, in order.
    """
    features = list(features)
    if not features:
        raise UsageError("probe_layers got no layers", value=0, fix="pass a list of (N, D) arrays")
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
    k = len(classes)
    missing = np.setdiff1d(np.arange(k), codes[parts["train"]])
    if missing.size:
        raise UsageError("some classes have no training sample", value=classes[missing][:5].tolist(),
                         fix="use stratified_split(labels) so every class is in every part")
    ys = {p: torch.from_numpy(codes[idx].astype(np.int64)) for p, idx in parts.items()}
    lam = torch.from_numpy(1.0 / cs)
    results = []
    for i, x in enumerate(features):
        if len(np.shape(x)) != 2 or np.shape(x)[0] != len(y):
            raise UsageError(f"features[{i}] does not have one row per label", value=f"shape {np.shape(x)}",
                             allowed=f"({len(y)}, D)", fix="pass features and labels of the same samples")
        rows = {p: as_matrix(np.asarray(x[idx]), f"features[{i}]") for p, idx in parts.items()}
        xtr = torch.from_numpy(rows["train"])
        mean = xtr.mean(0)
        std = xtr.std(0, unbiased=False)
        std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))  # sklearn: constant -> 1
        xtr = (xtr - mean) / std
        axes = _principal_axes(xtr)
        w, converged = _fit(xtr @ axes, ys["train"], lam, k, tol, max_iter)
        # back to standardized coordinates: cheaper than rotating the val and test rows
        coef, bias = w[:, :, :-1] @ axes.T, w[:, :, -1]
        val, test = (_accuracy((torch.from_numpy(rows[p]) - mean) / std, ys[p], coef, bias) for p in ("val", "test"))
        if not converged:
            logger.warning("probe of layer %d: some C did not reach tol=%g in %d Newton steps", i, tol, max_iter)
        best = int(np.argmax(val))  # Cs ascending, argmax takes the first: strongest C among ties
        n_test = len(parts["test"])
        correct = int(round(test[best] * n_test))
        lo, hi = wilson_interval(correct, n_test)
        results.append(ProbeResult(layer=i, C=float(cs[best]), val_accuracy=float(val[best]),
                                   test_accuracy=correct / n_test, ci_low=lo, ci_high=hi, n_test=n_test,
                                   n_train=len(parts["train"]), Cs=tuple(float(c) for c in cs),
                                   val_accuracy_by_C=tuple(float(v) for v in val),
                                   converged=converged))
    return results


def _principal_axes(x: torch.Tensor, rel_eps: float = 1e-10) -> torch.Tensor:
    """(D, r) orthonormal principal axes of the (N, D) matrix ``x`` with nonzero variance."""
    n, d = x.shape
    if d <= n:
        ev, vecs = torch.linalg.eigh(x.T @ x)
        keep = ev > rel_eps * ev.max().clamp_min(0)
        return vecs[:, keep]
    # N < D: eigenvectors of the N x N Gram give the same axes at N^2 D cost
    ev, u = torch.linalg.eigh(x @ x.T)
    keep = ev > rel_eps * ev.max().clamp_min(0)
    return (x.T @ u[:, keep]) / ev[keep].sqrt()


def _accuracy(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """Accuracy (P,) of P probes, coef (P, Kq, D) and bias (P, Kq), on standardized x (n, D)."""
    p, kq, d = coef.shape
    logits = (x @ coef.reshape(-1, d).T).view(len(x), p, kq) + bias
    pred = (logits[..., 0] > 0).long() if kq == 1 else logits.argmax(-1)
    return (pred == y[:, None]).double().mean(0).numpy()


def _fit(z: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, n_classes: int, tol: float,
         max_iter: int) -> tuple[torch.Tensor, bool]:
    """Minimize sum(log loss) + lam/2 ||W||^2 for every lam at once (lam = 1/C).

    z: (N, r) centered features; y: (N,) class codes; lam: (P,).
    Returns W (P, Kq, r+1), the last column the intercept (Kq = 1 for two
    classes), and whether every problem met the tolerance.
    """
    n, r = z.shape
    a = torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], 1)  # (N, r+1); z is centered, so 1 is orthogonal to it
    # float32 copies for the Hessian products inside CG (see _newton_direction)
    a32, a2_32 = a.float(), (a * a).float()
    kq = 1 if n_classes == 2 else n_classes
    n_prob = lam.numel()
    target = (y.double().view(n, 1, 1) if kq == 1
              else torch.nn.functional.one_hot(y, kq).double().view(n, 1, kq))
    pen_mask = torch.ones(r + 1, dtype=z.dtype)
    pen_mask[-1] = 0  # intercept unpenalized
    w = torch.zeros(n_prob, kq, r + 1, dtype=z.dtype)
    logits = torch.zeros(n, n_prob, kq, dtype=z.dtype)  # A W, kept up to date so steps cost one matmul
    active = torch.arange(n_prob)
    converged = torch.zeros(n_prob, dtype=torch.bool)
    for _ in range(max_iter):
        wa, la = w[active], logits[:, active]
        lam_pen = lam[active].view(-1, 1, 1) * pen_mask
        loss, prob = _log_loss(la, target)
        f = loss + 0.5 * (lam_pen * wa * wa).sum((1, 2))
        g = ((prob - target).reshape(n, -1).T @ a).view(-1, kq, r + 1) + lam_pen * wa
        done = g.abs().amax((1, 2)) / n <= tol
        converged[active[done]] = True
        keep = ~done
        if not keep.any():
            break
        active, wa, la, lam_pen, f, g, prob = (active[keep], wa[keep], la[:, keep], lam_pen[keep], f[keep],
                                               g[keep], prob[:, keep])
        step = _newton_direction(a32, a2_32, prob, g, lam_pen)
        a_step = (a @ step.reshape(-1, r + 1).T).view(n, -1, kq)
        t = _armijo(la, a_step, wa, step, lam_pen, target, f, (g * step).sum((1, 2)))
        w[active] = wa + t.view(-1, 1, 1) * step
        logits[:, active] = la + t.view(1, -1, 1) * a_step
        active = active[t > 0]  # no decrease possible: at the float64 floor, stop it
        if active.numel() == 0:
            break
    return w, bool(converged.all())


def _log_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log loss per problem (P,) and probabilities (N, P, Kq) from logits (N, P, Kq)."""
    if logits.shape[2] == 1:
        return ((torch.nn.functional.softplus(logits) - target * logits).sum((0, 2)), torch.sigmoid(logits))
    logp = torch.log_softmax(logits, -1)
    return -(logp * target).sum((0, 2)), logp.exp()


def _newton_direction(a, a2, prob, g, lam_pen, max_cg: int = 200):
    """Approximately solve H d = -g by preconditioned CG, for every problem at once.

    a: (N, r+1) float32 design and its square a2; prob: (N, P, Kq) probabilities;
    g, lam_pen: (P, Kq, r+1) float64. Returns the step (P, Kq, r+1) in float64.

    The passes over the data run in float32 (half the memory traffic): CG only
    needs the direction to a relative accuracy eta >= ~1e-3, far above float32
    rounding, while the objective, gradient and line search stay float64, so
    the optimum and the stopping test are float64-exact (inexact Newton).
    """
    n, r1 = a.shape
    n_prob, kq, _ = g.shape
    prob = prob.float()
    if kq == 1:
        s = prob * (1 - prob)  # (N, P, 1): binary Hessian weights
        diag = (s.reshape(n, -1).T @ a2).view(n_prob, 1, r1).double() + lam_pen

        def hess(v):
            u = (a @ v.reshape(-1, r1).T.float()).view(n, n_prob, 1)
            return ((s * u).reshape(n, -1).T @ a).view(n_prob, 1, r1).double() + lam_pen * v

        def precond(res):
            return res / diag
    else:
        def hess(v):
            u = (a @ v.reshape(-1, r1).T.float()).view(n, n_prob, kq)
            rr = prob * (u - (prob * u).sum(-1, keepdim=True))  # softmax Hessian: diag(p) - p p^T
            return (rr.reshape(n, -1).T @ a).view(n_prob, kq, r1).double() + lam_pen * v

        # K x K blocks per direction, unless K is so large that they would not fit comfortably
        small = max(n, n_prob * r1) * kq * kq <= _BLOCK_BUDGET
        precond = _block_preconditioner(a2, prob, lam_pen) if small else _diagonal_preconditioner(a2, prob, lam_pen)
    # forcing term: loose solves far from the optimum, tighter near it (superlinear Newton)
    gnorm = g.flatten(1).norm(dim=1)
    eta = (gnorm / n).sqrt().clamp(max=0.5)
    x = torch.zeros_like(g)
    res = -g
    zr = precond(res)
    d = zr.clone()
    rz = (res * zr).sum((1, 2))
    live = torch.ones(n_prob, dtype=torch.bool)
    for _ in range(max_cg):
        hd = hess(d)
        dhd = (d * hd).sum((1, 2)).clamp_min(1e-300)
        alpha = torch.where(live, rz / dhd, torch.zeros_like(rz)).view(-1, 1, 1)
        x += alpha * d
        res -= alpha * hd
        live &= res.flatten(1).norm(dim=1) > eta * gnorm
        if not live.any():
            break
        zr = precond(res)
        rz_new = (res * zr).sum((1, 2))
        d = zr + (rz_new / rz.clamp_min(1e-300)).view(-1, 1, 1) * d
        rz = rz_new
    return x


def _block_preconditioner(a2, prob, lam_pen):
    """K x K class block of the Hessian for each principal direction (cross-direction terms dropped).

    a2: (N, r+1) squared design, prob: (N, P, K) float32; blocks and solves in float64.
    """
    n, r1 = a2.shape
    _, n_prob, kq = prob.shape
    blocks = torch.empty(n_prob, r1, kq, kq, dtype=torch.float64)
    for q in range(n_prob):  # one problem at a time keeps the (N, K^2) temporary small
        pq = prob[:, q]
        outer = (pq.unsqueeze(2) * pq.unsqueeze(1)).reshape(n, kq * kq)
        blocks[q] = -(outer.T @ a2).T.reshape(r1, kq, kq)
    blocks += torch.diag_embed((prob.reshape(n, -1).T @ a2).view(n_prob, kq, r1).transpose(1, 2).double()
                               + lam_pen.transpose(1, 2))
    # the intercept block is singular along (1, ..., 1) (softmax is shift-invariant and the
    # intercept is unpenalized); residuals have no component there, so fill it to invert safely
    fill = blocks[:, -1].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12) / kq
    blocks[:, -1] += fill.view(-1, 1, 1)
    chol, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):  # numerically indefinite block: fall back to the diagonal
        return _diagonal_preconditioner(a2, prob, lam_pen)
    return lambda res: torch.cholesky_solve(res.transpose(1, 2).unsqueeze(-1), chol).squeeze(-1).transpose(1, 2)


def _diagonal_preconditioner(a2, prob, lam_pen):
    """Diagonal of the multinomial Hessian (P, Kq, r+1): cheap, weaker than the blocks."""
    n, r1 = a2.shape
    diag = ((prob * (1 - prob)).reshape(n, -1).T @ a2).view(lam_pen.shape[0], -1, r1).double() + lam_pen
    diag = diag.clamp_min(1e-12)
    return lambda res: res / diag


def _armijo(logits, a_step, w, step, lam_pen, target, f, slope, shrink: float = 0.5, tries: int = 30):
    """Per-problem backtracking step sizes (P,) with sufficient decrease.

    The logits move linearly with the step, so each trial costs no matmul.
    """
    t = torch.ones(len(w), dtype=w.dtype)
    ok = torch.zeros(len(w), dtype=torch.bool)
    for _ in range(tries):
        loss, _ = _log_loss(logits + t.view(1, -1, 1) * a_step, target)
        w_t = w + t.view(-1, 1, 1) * step
        ok |= loss + 0.5 * (lam_pen * w_t * w_t).sum((1, 2)) <= f + 1e-4 * t * slope
        if ok.all():
            break
        t = torch.where(ok, t, t * shrink)
    return torch.where(ok, t, torch.zeros_like(t))
