"""Distillation losses: task CE, Hinton KD, SKT cosine and FSP transfer, CFE centre loss.

Glossary: B batch, K classes, T tokens, C channels, H x W a map, P positions
(the T tokens, or the H*W pixels of a map; 1 for a pooled vector (B, C)). A
*tap* is a layer whose output teacher and student are compared; feature lists
are in tap order, teacher tap l paired with student tap l.

Design decisions:
- The teacher is a fixed target: its logits and features are detached inside
  every loss, so no gradient reaches it even when it ran with grad on.
- Features are compared in float32 (cast here), so a bf16/fp16 student does
  not lose the small differences that cosine and FSP measure.
- Means, not the papers' sums: DESIGN.md states L_cos = sum_taps sum_positions
  (1 - cos) and L_fsp = sum ||FSP_T - FSP_S||^2. lamina averages over positions
  (cosine) and over batch and matrix entries (FSP), so a loss weight means the
  same at any sequence length, image size or width (SKT's 0.5 carries across
  models). Taps (cosine) and tap pairs (FSP) are still summed.
- Padding: a (B, T) mask (1 = real token) removes padded tokens from the
  cosine mean and from FSP's normalization statistics and sums.
- Maps of different resolution are average-pooled (adaptive) to the smaller
  one: both maps of an FSP pair (as SKT does), and a teacher/student tap pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UsageError

ADAPTER_KINDS = ("linear", "conv")
_EPS = 1e-8       # cosine: guards all-zero feature vectors
_NORM_EPS = 1e-5  # instance norm: as nn.InstanceNorm, keeps a constant channel finite

Feats = Sequence[torch.Tensor]


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Task cross-entropy, mean over rows: -log softmax(z)_y.

    ``logits`` (B, K) or (B, T, K); ``labels`` (B,) or (B, T) class ids, -100
    ignored (the Hugging Face convention for padding). Returns a scalar.
    """
    k = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, k).float(), labels.reshape(-1))


def _temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise UsageError("the distillation temperature must be a positive number", value=t,
                         allowed="a finite float > 0 (Hinton et al. use 1-20; lamina defaults to 2)",
                         fix="e.g. temperature=2.0")
    return float(t)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over rows.

    ``student_logits`` and ``teacher_logits`` (B, K) (or (B, T, K), every token a
    row). The T^2 keeps the gradient scale independent of T. Zero when the
    student's logits equal the teacher's. Returns a scalar.
    """
    tau = _temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise UsageError("student and teacher logits differ in shape", value=(tuple(student_logits.shape),
                         tuple(teacher_logits.shape)), allowed="the same (B, K): both models need the same classes",
                         fix="give the student the teacher's classification head size")
    k = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, k), teacher_logits.detach().reshape(-1, k)
    return _ChunkedKD.apply(s, t, tau) / max(s.shape[0], 1)


_KD_CHUNK = 1 << 18  # logits per chunk (1 MB in float32): a chunk's temporaries stay in the core's cache


class _ChunkedKD(torch.autograd.Function):
    """Sum over rows of T^2 KL(softmax(t/T) || softmax(s/T)), a few rows at a time, in float32.

    An LM has a row per position and a 49k vocabulary, so autograd's version kept several
    (rows, V) float tensors and ran each elementwise op over all of them (a second per step on
    SmolLM2 at 4 x 128 tokens). Here the forward computes the loss and its gradient
    T (softmax(s/T) - softmax(t/T)) chunk by chunk while the chunk is in cache, and saves only
    that gradient. No double backward.
    """

    @staticmethod
    def forward(ctx, s, t, tau):
        rows = max(1, _KD_CHUNK // max(s.shape[-1], 1))
        grad = torch.empty(s.shape, dtype=torch.float32, device=s.device) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for a in range(0, s.shape[0], rows):
            zs, zt = s[a:a + rows].float(), t[a:a + rows].float()
            if tau != 1.0:
                zs, zt = zs / tau, zt / tau
            ls, lt = F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1)
            pt = lt.exp()
            total += (pt * (lt - ls)).sum(dtype=torch.float64)
            if grad is not None:
                torch.mul(ls.exp_().sub_(pt), tau, out=grad[a:a + rows])
        ctx.save_for_backward(grad)
        ctx.dtype = s.dtype
        return (total * (tau * tau)).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.dtype) if grad is not None else None, None, None


class Adapter(nn.Module):
    """phi_l of SKT: maps a student tap's width to its teacher tap's width.

    ``kind='linear'`` acts on the last axis of token features (B, T, C) or
    vectors (B, C); ``kind='conv'`` is a 1x1 convolution over maps (B, C, H, W).
    When both widths are equal it starts as the identity (weight = I, bias = 0),
    so a student copied from the teacher starts with zero transfer loss;
    otherwise PyTorch's default initialization.
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "linear"):
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise UsageError(f"unknown adapter kind {kind!r}", value=kind, allowed=", ".join(ADAPTER_KINDS),
                             fix="'linear' for token features (B, T, C), 'conv' for maps (B, C, H, W)")
        for name, d in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise UsageError(f"adapter {name} must be a positive channel count", value=d,
                                 allowed="an int >= 1", fix="pass the channel count (C) of the tapped features")
        self.kind = kind
        self.proj = nn.Linear(student_dim, teacher_dim) if kind == "linear" else nn.Conv2d(student_dim, teacher_dim, 1)
        if student_dim == teacher_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(teacher_dim).view_as(self.proj.weight))
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A linear adapter on a map would silently mix its width axis W.
        if (self.kind == "conv") != (x.dim() == 4):
            raise UsageError(f"a {self.kind!r} adapter got features of shape {tuple(x.shape)}", value=tuple(x.shape),
                             allowed="'conv' for (B, C, H, W), 'linear' for (B, T, C) or (B, C)",
                             fix="build the adapters with make_adapters(student_feats, teacher_feats)")
        return self.proj(x)


def make_adapters(student_feats: Feats, teacher_feats: Feats) -> nn.ModuleList:
    """One :class:`Adapter` per tap, sized from example features (one batch of each model)."""
    _check_taps(teacher_feats, student_feats)
    out = []
    for l, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.dim() != t.dim():
            raise UsageError(f"tap {l}: student and teacher features have different ranks",
                             value=(tuple(s.shape), tuple(t.shape)), allowed="both maps or both token features",
                             fix="pair taps of the same kind (a block with the block it was copied from)")
        conv = t.dim() == 4
        out.append(Adapter(s.shape[1] if conv else s.shape[-1], t.shape[1] if conv else t.shape[-1],
                           "conv" if conv else "linear"))
    return nn.ModuleList(out)


def _check_taps(teacher_feats: Feats, student_feats: Feats) -> int:
    n = len(teacher_feats)
    if n == 0 or len(student_feats) != n:
        raise UsageError("teacher and student need the same, non-zero number of taps",
                         value=(len(teacher_feats), len(student_feats)), allowed="one student tap per teacher tap",
                         fix="record the same number of layers from both models")
    return n


def _per_tap(items, n: int, what: str):
    if items is None or isinstance(items, torch.Tensor):
        return [items] * n
    items = list(items)
    if len(items) != n:
        raise UsageError(f"{what} must have one entry per tap", value=len(items), allowed=f"{n} entries (None allowed)",
                         fix=f"pass a list of {n}, or None")
    return items


def _adapt(adapters, student_feats: Feats) -> list[torch.Tensor]:
    ads = _per_tap(adapters, len(student_feats), "adapters")
    return [s if a is None else a(s) for a, s in zip(ads, student_feats)]


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C) | (B, T, C) | (B, C, H, W) -> (B, P, C) in float32."""
    if x.dim() == 2:
        return x[:, None, :].float()
    if x.dim() == 3:
        return x.float()
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2).float()
    raise UsageError("tapped features must be (B, C), (B, T, C) or (B, C, H, W)", value=tuple(x.shape),
                     allowed="2, 3 or 4 dimensions", fix="tap a block's hidden states or feature map")


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool two maps to the smaller resolution; other features pass as they are."""
    if a.dim() == 4 and b.dim() == 4 and a.shape[2:] != b.shape[2:]:
        size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
        return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
    return a, b


def _mask(mask, x: torch.Tensor, tap: int) -> torch.Tensor | None:
    """The (B, P) float mask of a tap, or None; a shared mask applies to token features only."""
    if mask is None:
        return None
    if x.dim() != 3:
        raise UsageError(f"tap {tap}: a padding mask was given for features of shape {tuple(x.shape)}",
                         value=tuple(x.shape), allowed="masks only for token features (B, T, C)",
                         fix="pass None for this tap's mask")
    if mask.shape != x.shape[:2]:
        raise UsageError(f"tap {tap}: the mask does not match the tokens", value=tuple(mask.shape),
                         allowed=f"(B, T) = {tuple(x.shape[:2])}", fix="pass the batch's attention_mask")
    return mask.to(torch.float32)


def _tap_masks(masks, feats: Feats) -> list[torch.Tensor | None]:
    if isinstance(masks, torch.Tensor):  # one attention mask for every token tap; maps and vectors have no padding
        return [_mask(masks, x, l) if x.dim() == 3 else None for l, x in enumerate(feats)]
    return [_mask(m, x, l) for l, (m, x) in enumerate(zip(_per_tap(masks, len(feats), "masks"), feats))]


def _mismatch(l: int, t: torch.Tensor, s: torch.Tensor, what: str) -> UsageError:
    return UsageError(f"tap {l}: student features (after their adapter) do not match the teacher's {what}",
                      value=(tuple(s.shape), tuple(t.shape)), allowed="the teacher's shape (maps may differ in H, W)",
                      fix="build the adapters with make_adapters(student_feats, teacher_feats)")


def cosine_loss(teacher_feats: Feats, student_feats: Feats, adapters=None, masks=None) -> torch.Tensor:
    """SKT intra-layer pattern transfer: sum_l mean_p (1 - cos(T_l(p), phi_l(S_l)(p))).

    Cosine over channels at every position p (token or pixel), averaged over
    the valid positions of the batch, summed over taps. DESIGN.md's formula
    sums over positions; lamina averages so the weight does not depend on
    sequence length or image size.

    ``teacher_feats[l]`` (B, T, C_l), (B, C_l, H, W) or (B, C_l); ``student_feats[l]``
    the same with its own width (and, for maps, any resolution: both are pooled
    to the smaller). ``adapters``: None (widths already equal), or one module
    (or None) per tap mapping the student width to the teacher's. ``masks``:
    None, a (B, T) mask shared by every token tap, or one mask (or None) per tap.
    Returns a scalar in [0, 2 * n_taps].
    """
    _check_taps(teacher_feats, student_feats)  # refuses empty lists, so total ends a tensor
    ms = _tap_masks(masks, teacher_feats)
    total = 0.0
    for l, (t, s) in enumerate(zip(teacher_feats, _adapt(adapters, student_feats))):
        t, s = _common(t.detach(), s)
        if t.shape != s.shape:
            raise _mismatch(l, t, s, "shape")
        gap = 1 - F.cosine_similarity(_positions(t), _positions(s), dim=-1, eps=_EPS)  # (B, P)
        total = total + (gap.mean() if ms[l] is None else (gap * ms[l]).sum() / ms[l].sum().clamp_min(1))
    return total


def _instance_norm(x: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, C) -> mean 0, std 1 per sample and channel over the valid positions (padding zeroed); and P (B, 1, 1)."""
    w = torch.ones_like(x[..., :1]) if m is None else m[..., None]
    p = w.sum(1, keepdim=True).clamp_min(1)
    mu = (x * w).sum(1, keepdim=True) / p
    var = ((x - mu) ** 2 * w).sum(1, keepdim=True) / p
    return (x - mu) * torch.rsqrt(var + _NORM_EPS) * w, p


def fsp_matrix(fi: torch.Tensor, fj: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SKT/FSP inter-layer relation of two taps of one model: (1/P) sum_p f_i(p) f_j(p)^T.

    ``fi`` (B, T, C_i) and ``fj`` (B, T, C_j) token features with an optional
    (B, T) ``mask``, or maps (B, C_i, H_i, W_i) and (B, C_j, H_j, W_j), first
    average-pooled to the smaller resolution. Both are instance-normalized per
    sample and channel over the (valid) positions, so the matrix holds
    correlations in [-1, 1]. Returns (B, C_i, C_j), float32.
    """
    if fi.dim() not in (3, 4) or fi.dim() != fj.dim():
        raise UsageError("FSP needs two token features (B, T, C) or two maps (B, C, H, W)",
                         value=(tuple(fi.shape), tuple(fj.shape)),
                         allowed="3-D with 3-D or 4-D with 4-D (a pooled (B, C) vector has one position, no relation)",
                         fix="tap block outputs before pooling")
    fi, fj = _common(fi, fj)
    a, b = _positions(fi), _positions(fj)
    if a.shape[:2] != b.shape[:2]:
        raise UsageError("FSP taps differ in batch or token count", value=(tuple(fi.shape), tuple(fj.shape)),
                         allowed="the same (B, T)", fix="record both taps from the same forward pass")
    m = _mask(mask, fi, 0) if mask is not None else None
    a, p = _instance_norm(a, m)
    b, _ = _instance_norm(b, m)
    return a.transpose(1, 2) @ b / p


def fsp_loss(teacher_feats: Feats, student_feats: Feats, adapters=None, masks=None) -> torch.Tensor:
    """SKT inter-layer relation transfer: sum_{i<j} mean_{b,c,c'} (FSP_T(i,j) - FSP_S(i,j))^2.

    FSP matrices from :func:`fsp_matrix`, the student's after its adapters (so
    both are (B, C_i, C_j) in the teacher's widths). The squared error is
    averaged over batch and matrix entries (the paper sums them), so the weight
    does not grow with the widths; pairs are summed. Inputs as
    :func:`cosine_loss`; needs at least two taps. Returns a scalar.
    """
    n = _check_taps(teacher_feats, student_feats)
    if n < 2:
        raise UsageError("the FSP loss relates pairs of taps; one tap was given", value=n, allowed="2 taps or more",
                         fix="record more layers, or set the fsp weight to 0")
    teacher = [t.detach() for t in teacher_feats]
    student = _adapt(adapters, student_feats)
    ms = _tap_masks(masks, teacher)
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            m = ms[i] if ms[i] is not None else ms[j]
            gt, gs = fsp_matrix(teacher[i], teacher[j], m), fsp_matrix(student[i], student[j], m)
            if gt.shape != gs.shape:
                raise _mismatch(j, gt, gs, f"FSP matrix with tap {i}")
            total = total + ((gt - gs) ** 2).mean()
    return total


class CenterLoss(nn.Module):
    """CFE's I²CL with learned class centres c_k (``centers``, (K, D)).

    loss = mean_b (alpha/2) * ||x_b - c_y||^2 / (sum_{k != y} ||x_b - c_k||^2 + 1):
    pulls each feature to its class centre and pushes it from the others.
    ``forward(x, labels)``: ``x`` (B, D) features (pool tokens first), ``labels``
    (B,) class ids. Returns a scalar. The centres train with the student (give
    this module's parameters to the optimizer).
    """

    def __init__(self, n_classes: int, dim: int, alpha: float = 0.2):
        super().__init__()
        for name, v in (("n_classes", n_classes), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"CenterLoss {name} must be a positive int", value=v, allowed="an int >= 1",
                                 fix="pass the number of classes and the feature width")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise UsageError("CenterLoss alpha must be a non-negative number", value=alpha,
                             allowed="a finite float >= 0", fix="alpha=0.2 (the CFE paper)")
        self.alpha = float(alpha)
        self.centers = nn.Parameter(torch.randn(n_classes, dim))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.centers.shape[1]:
            raise UsageError("CenterLoss features must be (B, D)", value=tuple(x.shape),
                             allowed=f"(B, {self.centers.shape[1]})", fix="pool token or pixel features first")
        x, c = x.float(), self.centers.float()
        own = ((x - c[labels]) ** 2).sum(1)
        # sum_k ||x - c_k||^2 in closed form, K||x||^2 - 2 x.sum_k c_k + sum_k ||c_k||^2,
        # so memory stays O(B D + K D) however many classes there are.
        every = c.shape[0] * (x * x).sum(1) - 2 * x @ c.sum(0) + (c * c).sum()
        others = (every - own).clamp_min(0)  # rounding can dip below 0 when all centres sit on x
        return (self.alpha / 2 * own / (others + 1)).mean()


_PARTS = ("ce", "kd", "cosine", "fsp", "center")


@dataclass(frozen=True)
class LossWeights:
    """How much each loss counts in :func:`total_loss`; a weight of 0 skips that loss (not even computed).

    The defaults are SKT's total: task + output matching + 0.5 cosine + 0.5 FSP.
    """

    ce: float = field(default=1.0, metadata={"help": "weight of the task cross-entropy on the labels"})
    kd: float = field(default=1.0, metadata={
        "help": "weight of the KL between softened teacher and student logits (Hinton), already scaled by T^2"})
    temperature: float = field(default=2.0, metadata={
        "help": "softmax temperature T of the KD loss (> 0); higher exposes more of the teacher's dark knowledge"})
    cosine: float = field(default=0.5, metadata={
        "help": "weight of SKT's intra-layer loss: 1 - cos between teacher and adapted student taps, per position"})
    fsp: float = field(default=0.5, metadata={
        "help": "weight of SKT's inter-layer loss: squared FSP-matrix differences over every pair of taps"})
    center: float = field(default=0.0, metadata={
        "help": "weight of CFE's I2CL centre loss on the student's pooled features (0 = off)"})

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UsageError(f"loss weight {f.name!r} must be a non-negative finite number", value=v,
                                 allowed="a float >= 0 (0 turns that loss off)",
                                 fix=f"e.g. LossWeights({f.name}={getattr(LossWeights, f.name)})")
        if self.temperature <= 0:
            raise UsageError("the KD temperature must be > 0", value=self.temperature, allowed="a float > 0",
                             fix="e.g. temperature=2.0 (set kd=0 to turn KD off)")
        if not any(getattr(self, p) > 0 for p in _PARTS):
            raise UsageError("every loss weight is 0, so nothing would be trained", value=self,
                             allowed="at least one of " + ", ".join(_PARTS) + " > 0", fix="e.g. LossWeights(kd=1.0)")


def _need(part: str, weights: LossWeights, **inputs) -> None:
    missing = [k for k, v in inputs.items() if v is None]
    if missing:
        raise UsageError(f"the {part} loss has weight {getattr(weights, part)} but no {' or '.join(missing)} was given",
                         value=missing, allowed=f"{part} needs " + ", ".join(inputs),
                         fix=f"pass {', '.join(missing)} to total_loss, or set LossWeights({part}=0)")


def total_loss(weights: LossWeights, *, student_logits: torch.Tensor | None = None,
               teacher_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               student_feats: Feats | None = None, teacher_feats: Feats | None = None, adapters=None, masks=None,
               center: CenterLoss | None = None, center_feats: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the losses whose weight is not 0; and each part, unweighted, as floats.

    Inputs (each needed only by the losses that use it):
        student_logits, teacher_logits  (B, K)            ce (with labels), kd
        labels                          (B,) class ids    ce, center
        student_feats, teacher_feats    lists per tap     cosine, fsp (see :func:`cosine_loss`)
        adapters, masks                 per tap           cosine, fsp
        center, center_feats            CenterLoss, (B, D) center (the student's pooled features)

    Returns ``(total, parts)``: ``total`` a scalar tensor to back-propagate;
    ``parts`` maps each computed loss (``ce``, ``kd``, ``cosine``, ``fsp``,
    ``center``) to its unweighted value, plus ``total``, for logging.
    """
    terms: dict[str, torch.Tensor] = {}
    if weights.ce > 0:
        _need("ce", weights, student_logits=student_logits, labels=labels)
        terms["ce"] = ce_loss(student_logits, labels)
    if weights.kd > 0:
        _need("kd", weights, student_logits=student_logits, teacher_logits=teacher_logits)
        terms["kd"] = kd_loss(student_logits, teacher_logits, weights.temperature)
    # cosine and FSP each run the adapters (a cheap linear map) themselves, so
    # both stay usable on their own.
    for part, fn in (("cosine", cosine_loss), ("fsp", fsp_loss)):
        if getattr(weights, part) > 0:
            _need(part, weights, student_feats=student_feats, teacher_feats=teacher_feats)
            terms[part] = fn(teacher_feats, student_feats, adapters, masks)
    if weights.center > 0:
        _need("center", weights, center=center, center_feats=center_feats, labels=labels)
        terms["center"] = center(center_feats, labels)
    total = sum(getattr(weights, k) * v for k, v in terms.items())
    parts = {k: float(v.detach()) for k, v in terms.items()}
    parts["total"] = float(total.detach())
    return total, parts
