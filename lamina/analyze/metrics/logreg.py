"""L2 logistic regression for many regularization strengths at once: the probe's solver.

Shapes: N rows, D features, P problems (one per C), Kq weight rows per problem
(1 for two classes, K for K classes).

Design decisions:

- The objective is scikit-learn's ``LogisticRegression`` (L2, lbfgs):
  ``C * sum(log loss) + 0.5 * ||W||^2`` with an unpenalized intercept. Two
  classes use one weight vector (as sklearn does); three or more use the full
  multinomial K x D parametrization. So the accuracies agree with sklearn.
- Stopping rule: max |gradient| / N_train <= ``tol`` = 1e-4, sklearn's own lbfgs
  rule (``gtol=1e-4`` on its mean loss, the same scale). It was 1e-5; on
  MiniLM that cost 101 CG steps over 7 layers instead of 85 and 5-10% more
  time for the same accuracies. Against a tol=1e-7 solve, on MiniLM, 3
  synthetic 4000 x 384 sets and 8 smaller ones (the test generator), 1e-4 and
  1e-5 both change at most one validation or test prediction at any C of any
  layer; 3e-4 up to 3, 1e-3 up to 4 (of 800), 2e-3 up to 13 and one layer's
  chosen C. Accuracy needs only the argmax, but looser than sklearn's rule is
  not safe.
- Features are standardized with the train mean (float64) and std (from the
  Gram's diagonal; sklearn's constant-feature rule). All C values of a layer are solved together
  by truncated Newton: preconditioned conjugate gradient on the Hessian, Armijo
  backtracking. A pass over the data is one matmul of (n_C * K, D) by (D, N);
  on MiniLM features a layer costs ~30 passes for the 7 default C values,
  where sklearn's lbfgs makes ~650 (one fit per C).
- Preconditioner: the Hessian ``X^T S X + lam I`` with the per-sample weights S
  replaced by their mean (a scalar for two classes, a K x K matrix for K):
  ``S_mean (x) X^T X + lam I``. One eigendecomposition of the Gram X^T X per
  layer, and of the small S_mean per Newton step, invert it exactly for every
  C (Kronecker eigenbasis), and the preconditioner follows S as the fit
  sharpens. It needs 7x fewer CG steps than Jacobi.
- Two classes keep the features unrotated and apply the eigenbasis in each CG
  step (two (n_C, D) x (D, D) products, cheap next to the passes). Multinomial
  probes rotate the design onto the eigenvectors once per layer (2 N D^2
  flops): their CG steps are ~7x as many and their rows K times as many, so the
  per-step basis products (4 n_C K D^2 flops; the two passes are 4 n_C K D N)
  cost more than the rotation. 10 classes x 1280 dims (synthetic, one
  thread): 1.44 -> 1.12 s per layer, 3.8x -> 4.8x scikit-learn's time. The
  gradient tolerance is still checked in the original coordinates (max |g| is
  not rotation invariant).
- float32 for every pass over the data (half the bytes, 2x the MKL speed) when
  ``tol`` allows it: the gradient's float32 rounding is ~1e-8 on the max |g| / N
  scale, and CG only needs the direction to ~1e-2. Weights, logits, objective
  and line search stay float64; logits advance by the step's own float32 image,
  so the Armijo test compares f along one consistent line. ``tol`` below
  ``_FLOAT32_TOL``, or float64 features, keep float64 throughout.
- Layers are solved one after the other: a layer's float32 design (3.7 MB for
  2400 x 385) stays in cache across its passes, and stacking layers in torch's
  batched matmul measured several times slower than plain matmuls.
- C values leave the batch as they converge. MKL's time for these thin matmuls
  is ~0.3 ms from 3 to 7 rows (2400 x 385, one thread) and 0.09 ms at 1 row.
  The logits of the Newton step are accumulated from the CG products, so the
  line search costs no pass.
- Matmuls are laid out as (rows, D) x (D, N) and (rows, N) x (N, D): MKL on
  this CPU runs X^T u 10-25x slower than u^T X for thin u.
- Threads: every kernel here is thin (a few rows against the data) or small
  (a 385 x 385 eigh), and on a shared two-core machine a second intra-op
  thread made the whole probe 3x slower (barrier waits). ``probe_layers`` runs
  the solver with one thread per layer and solves layers side by side instead.

Where the time goes (MiniLM, 2400 train rows x 384, 7 C values, one thread, an
AMD EPYC (Zen 4, AVX-512) shared with other jobs, so +-5% between runs; line
profile of 2026-11-29): ~30 ms per layer, of which the eigendecomposition
7.5-8.2 ms, the Gram 3.9-4.2 ms, 12 CG steps (24 passes) 6-7.5 ms, 6 gradient
passes 1.9-2.7 ms, gathers and standardization ~2.5 ms, and small torch ops
the rest (~5 ms). scikit-learn takes 183-214 ms per layer (49 lbfgs fits of
2764 iterations in all, 1.28-1.50 s between runs), so the 10x target of issue
3 leaves 18-21 ms per layer, and the heavy kernels alone (Gram, eigh, the 30
passes, gathers: 20.8-24 ms) take all of it before any bookkeeping. Every
replacement for a kernel measured below pays its saving back elsewhere.
Measured and not kept (CG steps counted over the 7 layers; 101 is the tol=1e-5
baseline, 85 the tol=1e-4 one):

- Top-k eigenpairs only, the rest one scalar (the "randomized/partial"
  preconditioner), k = 64/128/192: 640/441/306 CG steps; randomized subspace
  iteration the same. The Gram's spectrum runs from ~13 to 7.5e4 (median
  ~600) plus one exact 0 (the linear constraint of LayerNorm outputs), and the
  weakly regularized C values need all of it.
- The Gram from a row subsample (1200/800/600 of 2400 rows): 222/299/549 steps.
  The Gram in bfloat16: 2.4x the steps. The previous layer's eigenbasis with
  this layer's Rayleigh quotients: 1711 steps (697 when refreshed every other
  layer). Warm start from the previous layer's weights: 2x the steps (the
  intercept-only start makes the first Newton step exact).
- One Cholesky factor per C of ``s0 G + lam I`` (s0 the weight at the start):
  batched 3.4 ms instead of the eigh's 7.5, but ``cholesky_solve`` over the 7
  factors costs 0.24 ms per CG step (the eigenbasis: two 0.03 ms products) and
  the frozen weights need 101 CG steps instead of 85: 0.295 s vs 0.20 s in all.
- The same preconditioner exactly, from a tridiagonal reduction instead of the
  eigendecomposition (LAPACK ``ssytrd`` 3.4 ms + ``householder_product`` 1.5 ms,
  then one ``sptsv`` per C per CG step): the same 85 steps, 0.203 s vs 0.198 s.
  LAPACK's ``ssyevd`` through scipy (7.0 ms vs torch's 8.0): no gain end to end.
- bfloat16 CG products (0.13 instead of 0.31 ms a pass): on CPU the product
  comes back rounded to bfloat16, CG needs 13% more steps and the line search a
  float32 image of the step: no gain. oneDNN's float32 linear
  (``torch.ops.mkldnn._linear_pointwise``, 0.22 ms a pass alone): 12-19%
  slower end to end. MKL's packed GEMM; rows padded to 64 bytes; rows padded to
  a multiple of 4 (MKL: 8 rows 0.255 ms, 7 rows 0.307 ms alone); a contiguous
  design with the intercept apart and torch instead of numpy for centering and
  scaling (4x faster alone on the strided view): each within noise end to end
  (15 interleaved rounds, medians 0.2103 / 0.2095 / 0.2095 s). Forcing term 0.5
  or 0.8 instead of 0.3: no gain. A looser tol (3e-4 / 1e-3): only 10% / 12%
  faster, since the eigh and the Gram do not shrink.
"""

from __future__ import annotations

import torch

CG_STEPS_GUESS = (12, 90)  # CG steps per layer, about: two classes (MiniLM), ten classes (synthetic, D=1280)


def gram_basis(z: torch.Tensor, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenbasis of the Gram of the centered features z (N, D), with the intercept as one more axis.

    Returns basis (D+1, r+1), the eigenvectors with a last unit axis for the
    intercept, and the eigenvalues (r,). r = D when N >= D (``gram`` = z^T z if
    the caller has it). When N < D the N x N Gram gives the same nonzero part
    at N^2 D cost, r = N, and the other D - N directions carry no data: their
    Hessian is just lam. float64 there, because the preconditioner then
    subtracts the projection onto the basis, which float32 would leave 1e-7 off.
    """
    n, d = z.shape
    if d <= n:
        if gram is None:
            gram = torch.from_numpy(z.numpy().T @ z.numpy()) if z.device.type == "cpu" else z.T @ z
        ev, vecs = torch.linalg.eigh(gram)
        ev = ev.clamp_min(0)
    else:
        z64 = z.double()
        ev, u = torch.linalg.eigh(z64 @ z64.T)
        keep = ev > 1e-10 * ev.max().clamp_min(1e-300)
        ev, vecs = ev[keep], (z64.T @ u[:, keep]) / ev[keep].sqrt()
    r = len(ev)
    basis = torch.zeros(d + 1, r + 1, dtype=vecs.dtype, device=z.device)
    basis[:d, :r] = vecs
    basis[d, r] = 1
    return basis, ev


def fit_logistic(z: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, n_classes: int, tol: float,
         max_iter: int) -> tuple[torch.Tensor, bool]:
    """Minimize sum(log loss) + lam/2 ||W||^2 for every lam at once (lam = 1/C).

    z: (N, D) centered features (their dtype is the dtype of every pass over
    the data); y: (N,) class codes; lam: (P,) float64.
    Returns W (P, Kq, D+1) float64, the last column the intercept (Kq = 1 for
    two classes), and whether every problem met the tolerance.
    """
    return solve_logistic(torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], 1), y, lam,
                          n_classes, tol, max_iter)


def solve_logistic(a: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, n_classes: int, tol: float,
           max_iter: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """``fit_logistic`` on the design a = [z, 1] (N, D+1); ``gram``: z^T z when the caller has it.

    Runs where ``a`` is (y, lam and gram on the same device): every tensor made here is made there, so on a
    GPU the whole solve stays on it (float64 included, so not on Apple MPS).
    """
    n, d1 = a.shape
    dt, dev = a.dtype, a.device
    basis, ev = gram_basis(a[:, :-1], gram)
    kq = 1 if n_classes == 2 else n_classes
    n_prob = lam.numel()
    # rotating the data onto the Gram's eigenvectors costs 2 N D^2 flops once and saves the preconditioner's
    # two (P Kq, D) x (D, D) products, 4 P Kq D^2 flops, in every CG step: worth it from N / (2 P Kq) steps
    steps = CG_STEPS_GUESS[0 if kq == 1 else 1]
    rotate = basis.shape[0] == basis.shape[1] and 2 * n_prob * kq * steps >= n
    back = None
    if rotate:
        # numpy's matmul on the CPU (MKL through torch measured slower for this shape), torch's elsewhere
        rotated = torch.from_numpy(a.numpy() @ basis.numpy()) if dev.type == "cpu" else a @ basis
        a, back, basis = rotated, basis, None
    counts = torch.bincount(y, minlength=n_classes).double()
    if kq == 1:
        target = y.double().view(1, 1, n)
        b0 = torch.log(counts[1] / counts[0]).view(1, 1)  # the optimum of the intercept alone
    else:
        target = torch.nn.functional.one_hot(y, kq).double().T.reshape(1, kq, n)
        b0 = torch.log(counts) - torch.log(counts).mean()
    w_out = torch.zeros(n_prob, kq, d1, dtype=torch.float64, device=dev)
    w_out[:, :, -1] = b0
    converged = torch.zeros(n_prob, dtype=torch.bool, device=dev)
    act = torch.arange(n_prob, device=dev)  # problems still in the batch
    w = w_out.clone()
    lam_pen = lam.view(-1, 1, 1) * _free_intercept(d1, dev)
    logits = w[:, :, -1:].expand(n_prob, kq, n).clone()  # A W (P, Kq, N), advanced with each step
    f = _objective(logits, target, w, lam_pen)
    for _ in range(max_iter):
        prob = torch.sigmoid(logits) if kq == 1 else torch.softmax(logits, 1)
        g = torch.addmm((lam_pen * w).to(dt).view(-1, d1), (prob - target).to(dt).view(-1, n), a)
        g = g.view(len(act), -1)
        # the tolerance is on the gradient in the original coordinates (max |g| is not rotation invariant)
        g_orig = g if back is None else torch.mm(g.view(-1, d1), back.T).view(len(act), -1)
        done = g_orig.abs().amax(1) <= tol * n
        if bool(done.any()):
            w_out[act[done]] = w[done]
            converged[act[done]] = True
            keep = ~done
            if not bool(keep.any()):
                break
            act, w, lam_pen, logits, f, prob, g = (act[keep], w[keep], lam_pen[keep], logits[keep], f[keep],
                                                   prob[keep], g[keep])
        # a residual below half the tolerance is good enough whatever the forcing term says
        step, a_step = newton_direction(a, basis, ev, prob, g, lam_pen[:, 0, 0], 0.5 * tol * n)
        slope = torch.linalg.vecdot(g, step).double()
        step, a_step = step.double().view_as(w), a_step.double().view_as(logits)
        t, f = _armijo(logits, a_step, w, step, lam_pen, target, f, slope)
        w += t.view(-1, 1, 1) * step
        logits += t.view(-1, 1, 1) * a_step
        stuck = t == 0  # no decrease possible: at the float64 floor, stop it unconverged
        if bool(stuck.any()):
            w_out[act[stuck]] = w[stuck]
            keep = ~stuck
            if not bool(keep.any()):
                break
            act, w, lam_pen, logits, f = act[keep], w[keep], lam_pen[keep], logits[keep], f[keep]
    else:
        w_out[act] = w
    if back is not None:
        w_out = (w_out.view(-1, d1) @ back.double().T).view_as(w_out)
    return w_out, bool(converged.all())


def _free_intercept(d1: int, dev) -> torch.Tensor:
    """(D+1,) float64 ones with a 0 last: the penalty's mask (the intercept is not penalized)."""
    m = torch.ones(d1, dtype=torch.float64, device=dev)
    m[-1] = 0
    return m


def _objective(logits, target, w, lam_pen):
    """sum(log loss) + penalty per problem (P,), from logits (P, Kq, N)."""
    if logits.shape[1] == 1:
        loss = (torch.nn.functional.softplus(logits) - target * logits).sum((1, 2))
    else:
        loss = -(torch.log_softmax(logits, 1) * target).sum((1, 2))
    return loss + 0.5 * (lam_pen * w * w).sum((1, 2))


def newton_direction(a, basis, ev, prob, g, lam, floor, max_cg: int = 200):
    """Approximately solve H d = -g by preconditioned CG, for every problem at once.

    a: (N, D+1) design; basis, ev: from ``gram_basis``; prob: (P, Kq, N)
    float64; g: (P, Kq (D+1)) in the data dtype; lam: (P,) float64; floor: a
    residual norm that is good enough whatever eta says (tol is near).
    Returns the step (P, Kq (D+1)) and its image A d (P, Kq N), accumulated
    from the CG products so the line search needs no extra pass.
    """
    n, d1 = a.shape
    n_prob, kq = prob.shape[:2]
    dt = a.dtype
    prob_d = prob.to(dt)
    if kq == 1:
        s = prob_d.view(n_prob, n) * (1 - prob_d.view(n_prob, n))  # binary Hessian weights
        s_eig, s_vec = s.mean(1, keepdim=True).double(), None
    else:  # mean of the per-sample softmax Hessians diag(p) - p p^T
        s_mean = torch.diag_embed(prob.mean(2)) - prob @ prob.transpose(1, 2) / n
        s_eig, s_vec = torch.linalg.eigh(s_mean)  # (P, K), (P, K, K); one eigenvalue ~0 (shift invariance)
        s_vec = s_vec.to(dt)
    precond = _kron_preconditioner(basis, ev, s_eig, s_vec, lam, n, dt)
    lam_d = (lam.view(-1, 1, 1) * _free_intercept(d1, a.device)).to(dt).expand(n_prob, kq, d1).reshape(n_prob, -1)
    gnorm = torch.linalg.vector_norm(g, dim=1)
    # forcing term: loose solves far from the optimum, tighter near it (superlinear Newton);
    # 0.3 sqrt(|g| / N) measured fewest passes on MiniLM and synthetic features (1.0: +10%)
    target = torch.maximum((0.3 * (gnorm / n).sqrt()).clamp(max=0.5) * gnorm, torch.full_like(gnorm, floor))
    a_t = a.T
    res = -g
    x = torch.zeros_like(g)
    ax = torch.zeros(n_prob, kq * n, dtype=dt, device=a.device)
    zr = precond(res)
    p_dir = zr
    rz = torch.linalg.vecdot(res, zr)
    live = torch.ones(n_prob, dtype=torch.bool, device=a.device)
    zero = torch.zeros((), dtype=dt, device=a.device)
    for _ in range(max_cg):
        u = torch.mm(p_dir.view(-1, d1), a_t)  # (P Kq, N)
        if kq == 1:
            q = s * u
        else:
            u3 = u.view(n_prob, kq, n)
            q = (prob_d * (u3 - (prob_d * u3).sum(1, keepdim=True))).view(-1, n)
        hd = torch.addcmul(torch.mm(q, a).view(n_prob, -1), lam_d, p_dir)
        # a problem that met its target stays put: float32 CG run on past it loses accuracy
        alpha = torch.where(live, rz / torch.linalg.vecdot(p_dir, hd), zero).view(-1, 1)
        x.addcmul_(alpha, p_dir)
        ax.addcmul_(alpha, u.view(n_prob, -1))
        res.addcmul_(alpha, hd, value=-1)
        live &= torch.linalg.vector_norm(res, dim=1) > target
        if not bool(live.any()):
            break
        zr = precond(res)
        rz_new = torch.linalg.vecdot(res, zr)
        p_dir = torch.addcmul(zr, (rz_new / rz.clamp_min(1e-30)).view(-1, 1), p_dir)
        rz = rz_new
    return x, ax


def _kron_preconditioner(basis, ev, s_eig, s_vec, lam, n, dt):
    """Inverse of ``S_mean (x) X^T X + lam I`` (weights) and ``n S_mean`` (intercept), per problem.

    basis (D+1, r+1), ev (r,): from ``gram_basis`` (r < D: the rest has no
    data, Hessian lam); s_eig (P, Kq), s_vec (P, Kq, Kq) or None for two
    classes; lam (P,). In the product eigenbasis the matrix is diagonal:
    sigma_k * ev_j + lam for weights, n * sigma_k for the intercept.
    Acts on residuals (P, Kq (D+1)) of dtype ``dt``.
    """
    n_prob, kq = s_eig.shape
    r = len(ev)
    d1 = r + 1 if basis is None else basis.shape[0]
    full = basis is None or basis.shape[0] == basis.shape[1]
    s_pos = s_eig.clamp_min(0)
    scale = torch.empty(n_prob, kq, r + 1, dtype=torch.float64, device=ev.device)
    scale[:, :, :r] = 1 / (s_pos.unsqueeze(2) * ev.double() + lam.view(-1, 1, 1))
    # intercept: n S_mean is singular along (1, ..., 1) for K classes; residuals have no component
    # there (gradients and Hessian products sum to 0 over classes), so any finite fill is exact
    s_int = n * s_pos
    big = s_int.amax(1, keepdim=True)
    scale[:, :, r] = 1 / torch.where(s_int > 1e-10 * big, s_int, big).clamp_min(1e-300)
    scale = scale.view(n_prob * kq, r + 1).to(dt if basis is None else basis.dtype)
    inv_lam = None if full else (1 / lam).repeat_interleave(kq).view(-1, 1)

    def apply(res):
        res = res.view(n_prob * kq, d1)
        if s_vec is not None:  # rotate the class axis onto the eigenvectors of S_mean
            res = torch.bmm(s_vec.transpose(1, 2), res.view(n_prob, kq, -1)).view(n_prob * kq, -1)
        if basis is None:  # the data is rotated onto the eigenvectors: the inverse is diagonal
            out = res * scale
        else:
            rb = res.to(basis.dtype)
            proj = torch.mm(rb, basis)
            out = torch.mm(proj * scale, basis.T)
        if not full:  # directions without data: Hessian lam
            out += (rb - torch.mm(proj, basis.T)) * inv_lam
        out = out.to(dt)
        if s_vec is not None:
            out = torch.bmm(s_vec, out.view(n_prob, kq, -1))
        return out.reshape(n_prob, -1)

    return apply


def _armijo(logits, a_step, w, step, lam_pen, target, f, slope, shrink: float = 0.5, tries: int = 30):
    """Per-problem backtracking step sizes (P,) with sufficient decrease, and f there.

    The logits move linearly with the step, so each trial costs no matmul.
    """
    t = torch.ones(len(w), dtype=w.dtype, device=w.device)
    ok = torch.zeros(len(w), dtype=torch.bool, device=w.device)
    f_ok = f.clone()
    for _ in range(tries):
        f_t = _objective(logits + t.view(-1, 1, 1) * a_step, target, w + t.view(-1, 1, 1) * step, lam_pen)
        new = ~ok & (f_t <= f + 1e-4 * t * slope)
        f_ok = torch.where(new, f_t, f_ok)
        ok |= new
        if bool(ok.all()):
            break
        t = torch.where(ok, t, t * shrink)
    return torch.where(ok, t, torch.zeros_like(t)), f_ok
