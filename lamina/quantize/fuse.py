"""Sibling int8fused Linears that read the same input, run as one GEMM.

An attention block's query, key and value projections (and a gated MLP's gate and up projections) all read the same
hidden states. In ``int8fused`` each is its own ``linear_dynamic`` call: each quantizes the same activations again
(min / max pass, uint8 copy) and runs a small GEMM. Measured on MiniLM's shapes (batch 8 x 32 tokens, one thread;
BENCHMARKS.md "quantize"): three 384 -> 384 calls cost more than one 384 -> 1152 call.

Fusing them is exact, not an approximation: ``int8fused`` quantizes the activations with one scale and zero point
from the whole input's min / max, so every member quantizes the same input identically; the weights carry one
scale per output channel, so stacking the members' rows stacks their int8 rows and scales unchanged; the int32
accumulation is exact. The fused output, split by rows, is each member's output (the tests check equality with
the separate layers). Each member stays an :class:`Int8FusedLinear` under its own name with its own int8 weight
and scale (so plans, parameter counts and state dicts are unchanged); only its forward is routed through the
shared group.

The group computes once per input tensor: the first member called with a new input runs the fused GEMM and keeps
the outputs until every member has taken its part (then drops them, so nothing is held between forwards). A
member called with another input (a model that feeds the siblings different tensors) recomputes the fused GEMM for
that input: still correct, only slower.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Sibling names that read the same input in the architectures lamina loads (BERT, DistilBERT, LLaMA-style).
GROUPS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"),
          ("gate_proj", "up_proj"))


class FusedInt8Group:
    """One packed int8 weight for several :class:`Int8FusedLinear` members (a plain object, not a module: the
    members own the parameters)."""

    def __init__(self, members: list):
        from .formats import _prepack
        q = torch.cat([m.weight.detach() for m in members])
        scale = torch.cat([m.weight_scale for m in members])
        biases = [m.bias for m in members]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, members)])
        self.sizes = [m.out_features for m in members]
        self.reduce_range = members[0].reduce_range
        self._weights = (q, scale, bias)  # kept to re-pack a copy (see __deepcopy__)
        self._packed = _prepack(q, scale, bias)
        self._x = self._parts = None
        self._left: set = set()

    def __call__(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._x is not x or index not in self._left:  # a new input (or a member asking twice): one fused GEMM
            y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range)
            self._x, self._parts, self._left = x, y.split(self.sizes, dim=-1), set(range(len(self.sizes)))
        out = self._parts[index]
        self._left.discard(index)
        if not self._left:  # every member served: hold nothing between forwards
            self._x = self._parts = None
        return out.to(x.dtype)

    def __deepcopy__(self, memo):
        # Re-packed for onednn, as built: copying the packed object itself re-packs it for the global engine.
        from .formats import _prepack
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.sizes, new._weights = list(self.sizes), copy.deepcopy(self._weights, memo)
        new.reduce_range = self.reduce_range
        new._packed = _prepack(*new._weights)
        new._x = new._parts = None
        new._left = set()
        return new


def fuse_int8(module: nn.Module) -> int:
    """Route each group of sibling :class:`Int8FusedLinear` layers (named as in :data:`GROUPS`, the same input
    width) through one :class:`FusedInt8Group`; returns how many groups were formed. In place."""
    from .formats import Int8FusedLinear
    n = 0
    for parent in module.modules():
        for names in GROUPS:
            members = [getattr(parent, k, None) for k in names]
            members = [m for m in members if isinstance(m, Int8FusedLinear)]
            if len(members) < 2 or len({m.in_features for m in members}) != 1:
                continue
            group = FusedInt8Group(members)
            for i, m in enumerate(members):
                m._group, m._index = group, i
            n += 1
    return n
