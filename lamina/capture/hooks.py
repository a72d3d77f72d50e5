"""Hooks that record (and pool) block outputs during one forward pass.

Pooling runs inside the hook, so a full (B, T, D) activation is reduced to
(B, D) as soon as it exists and is never kept for all layers at once: that is
what keeps capture at the cost of a bare forward pass.

Shapes:
    text    block output (B, T, D), mask (B, T) of 0/1 -> pooled (B, D)
    vision  (B, T, D) tokens without a mask -> mean over all tokens
    CNN     (B, C, H, W) -> spatial mean (B, C) for every pooling but 'none'

A module that one forward runs k times (ALBERT's shared layer) is k taps with
``Tap.call`` 0..k-1: its hook counts the calls of each forward and records
each call under its own name, instead of keeping only the last.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ..blocks import Tap

POOLINGS = ("mean", "cls", "last", "none")


def pool(x: torch.Tensor, mode: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool one activation; see the module docstring for shapes.

    ``mean`` counts only positions where ``mask`` is 1; ``last`` takes the last
    position where ``mask`` is 1 (works for left and right padding); ``cls``
    takes position 0; ``none`` returns ``x`` unchanged.
    """
    if mode == "none":
        return x
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"cannot pool an activation of shape {tuple(x.shape)}")
    if mode == "cls":
        return x[:, 0]
    if mask is None or mask.shape[:2] != x.shape[:2]:
        return x.mean(dim=1) if mode == "mean" else x[:, -1]
    m = mask.to(x.dtype)
    if mode == "mean":
        return (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    # last non-pad position: highest index whose mask is 1
    pos = torch.arange(x.shape[1], device=x.device).expand_as(m)
    last = torch.where(m > 0, pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)
    return x[torch.arange(x.shape[0], device=x.device), last]


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _first_tensor(out.to_tuple()[0])
    raise TypeError(f"cannot find a tensor in a block output of type {type(out).__name__}")


def _block_input(args, kwargs, name: str) -> torch.Tensor:
    """The tensor a block is fed: its first positional argument, else ``hidden_states``
    or the first tensor keyword argument (blocks called with keywords only)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find the input tensor of {name}: the block was called without a tensor argument")


class Recorder:
    """Holds what the hooks saw in the last forward pass.

    ``mask`` is set by the caller before each forward (text models);
    ``outputs[name]`` is the pooled tensor of each tap after it.
    """

    def __init__(self, pooling: str):
        self.pooling = pooling
        self.mask: torch.Tensor | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    def _store(self, name: str, x: torch.Tensor) -> None:
        # Pooled in float32 whatever the compute dtype (a no-op for float32
        # activations): a bfloat16 mean over hundreds of tokens loses digits.
        self.outputs[name] = pool(x.detach().float(), self.pooling, self.mask)


@contextlib.contextmanager
def recording(model: nn.Module, taps: list[Tap], pooling: str = "mean") -> Iterator[Recorder]:
    """Register hooks for ``taps`` on ``model``; always removed on exit, also on error."""
    rec = Recorder(pooling)
    modules = dict(model.named_modules())
    handles = []
    # Taps on one module and side share one hook. A module run k times per forward (ALBERT's shared layer)
    # is k taps told apart by ``call``: the hook counts its calls, restarted by a pre-hook on the model.
    groups: dict[tuple[str, str], dict] = {}
    for tap in taps:
        groups.setdefault((tap.path, tap.side), {})[tap.call] = tap.name
    counts = {key: 0 for key in groups}

    def names(key) -> list[str]:
        by_call = groups[key]
        if None in by_call:
            return [by_call[None]]
        k, counts[key] = counts[key], counts[key] + 1
        return [by_call[k]] if k in by_call else []

    try:
        if any(None not in g for g in groups.values()):
            handles.append(model.register_forward_pre_hook(lambda *_: counts.update({k: 0 for k in counts})))
        for key in groups:
            mod = modules[key[0]]
            if key[1] == "input":
                def pre(_m, args, kwargs, _key=key):
                    for n in names(_key):
                        rec._store(n, _block_input(args, kwargs, n))
                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_m, _args, out, _key=key):
                    for n in names(_key):
                        rec._store(n, _first_tensor(out))
                handles.append(mod.register_forward_hook(post))
        yield rec
    finally:
        for h in handles:
            h.remove()
