"""The heads that read pooled features of a frozen backbone (``last``, ``best``, ``mix``, ``select``).

Every head takes ``feats``: a list of (B, D_l) pooled features, one per layer
it reads, in forward order, and returns (B, K) class scores. Each head owns
the standardization of its inputs (train-split mean and std as buffers), so
a saved head needs nothing but its own tensors to run.

- :class:`ConcatLinear`: standardized concatenation of its layers, optionally
  restricted to ``keep`` feature indices (Head2Toe's selection), then one
  linear layer. One layer and all features: the linear probe of ``last``/``best``.
- :class:`MixHead`: HiCMAE / ELMo scalar mix, ``f = sum_l softmax(w)_l z_l``
  over standardized layers (``w`` starts equal), then a linear layer or a
  one-hidden-layer MLP. When the layers differ in width (CNN stages) each gets
  its own linear map to a common width before the mix: a scalar mix needs one
  space to sum in.

A head's constructor arguments are plain numbers and lists (:meth:`spec`), so a
saved head is rebuilt from JSON, never from code named in a file.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _Standardize(nn.Module):
    """(x - mean) / std with the train split's statistics (buffers)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit_(self, x: torch.Tensor) -> None:
        x = x.double()
        self.mean.copy_(x.mean(0).float())
        # a constant feature (std 0) is left centred, not blown up
        self.std.copy_(torch.where(x.std(0) > 1e-8, x.std(0), torch.ones_like(x[0])).float())

    def forward(self, x):
        return (x - self.mean) / self.std


class ConcatLinear(nn.Module):
    """Linear head on the standardized concatenation of ``dims`` layers, features ``keep`` only."""

    kind = "concat_linear"

    def __init__(self, dims: list[int], n_classes: int, keep: list[int] | None = None):
        super().__init__()
        self.dims, self.n_classes = [int(d) for d in dims], int(n_classes)
        total = sum(self.dims)
        self.keep_list = sorted(int(i) for i in keep) if keep is not None else None
        self.register_buffer("keep", torch.tensor(self.keep_list if keep is not None else [], dtype=torch.long))
        n = len(self.keep_list) if keep is not None else total
        self.norm = _Standardize(n)
        self.linear = nn.Linear(n, self.n_classes)

    def spec(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "n_classes": self.n_classes, "keep": self.keep_list}

    def inputs(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(feats, 1) if len(feats) > 1 else feats[0]
        return x[:, self.keep] if self.keep_list is not None else x

    def fit_norm_(self, feats: list[torch.Tensor]) -> None:
        self.norm.fit_(self.inputs(feats))

    def forward(self, feats: list[torch.Tensor], mask=None) -> torch.Tensor:
        return self.linear(self.norm(self.inputs(feats)))


class MixHead(nn.Module):
    """Softmax-weighted sum over layers, then a linear or MLP head; ``fixed``: weights given, not learned."""

    kind = "mix"

    def __init__(self, dims: list[int], n_classes: int, hidden: int | None = None,
                 fixed: list[float] | None = None):
        super().__init__()
        self.dims, self.n_classes, self.hidden = [int(d) for d in dims], int(n_classes), hidden
        self.fixed = [float(v) for v in fixed] if fixed is not None else None
        self.norms = nn.ModuleList(_Standardize(d) for d in self.dims)
        self.shared = len(set(self.dims)) == 1
        if self.shared:
            self.proj = None
            width = self.dims[0]
        else:  # one space to sum in: per-layer maps to the hidden width (or straight to class scores)
            width = hidden or self.n_classes
            self.proj = nn.ModuleList(nn.Linear(d, width) for d in self.dims)
        if hidden:
            self.out = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, self.n_classes)) \
                if self.shared else nn.Sequential(nn.GELU(), nn.Linear(hidden, self.n_classes))
        else:
            self.out = nn.Linear(width, self.n_classes) if self.shared else nn.Identity()
        if self.fixed is None:
            self.w = nn.Parameter(torch.zeros(len(self.dims)))  # equal weights to start (HiCMAE, ELMo)
        else:
            self.register_buffer("w_fixed", torch.tensor(self.fixed))

    def spec(self) -> dict:
        return {"kind": self.kind, "dims": self.dims, "n_classes": self.n_classes, "hidden": self.hidden,
                "fixed": self.fixed}

    def weights(self) -> torch.Tensor:
        """(L,) the layer weights: softmax(w), or the fixed ones."""
        return self.w_fixed if self.fixed is not None else torch.softmax(self.w, 0)

    def fit_norm_(self, feats: list[torch.Tensor]) -> None:
        for n, x in zip(self.norms, feats):
            n.fit_(x)

    def forward(self, feats: list[torch.Tensor], mask=None) -> torch.Tensor:
        a = self.weights()
        zs = [n(x) for n, x in zip(self.norms, feats)]
        if self.proj is not None:
            zs = [p(z) for p, z in zip(self.proj, zs)]
        f = sum(a[i] * z for i, z in enumerate(zs))
        return self.out(f)


def build_head(spec: dict) -> nn.Module:
    """A head from its :meth:`spec` (plain JSON)."""
    from .side import ConvSide, TokenSide
    kinds = {c.kind: c for c in (ConcatLinear, MixHead, TokenSide, ConvSide)}
    kind = spec.get("kind")
    if kind not in kinds:
        from ..errors import LaminaError
        raise LaminaError("unknown head kind in the saved model", value=kind, allowed=", ".join(kinds),
                          fix="save the model again with this lamina")
    return kinds[kind](**{k: v for k, v in spec.items() if k != "kind"})
