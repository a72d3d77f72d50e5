"""Fold inference BatchNorm into the convolution that feeds it (``lamina bench --fold-batchnorm``).

In eval mode a BatchNorm2d is a per-channel affine map, so ``bn(conv(x))`` equals one convolution with
scaled weights and a shifted bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``): exact in real
arithmetic, equal up to float rounding in practice. On a CPU the BatchNorm is a separate pass over the
whole activation; in the early, high-resolution blocks of a mobile conv net that pass costs as much as
the depthwise convolution itself, which is why a deployed conv net is run folded.

Which BatchNorm follows which convolution is read from one real forward pass, not from module order:
a pair is folded only when the BatchNorm's input *is* the convolution's output tensor (the same object;
nothing in between) and each of the two runs exactly once. The caller then compares the folded model's
outputs with the unfolded ones (:func:`fold_batchnorm`), since a conv output that also feeds another
consumer would make the fold inexact; such a model is put back unfolded.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)


def _pairs(module: nn.Module, run) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where, in the forward pass ``run()``, the BatchNorm2d read exactly the
    Conv2d's output tensor, each called once."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv, output): kept alive so ids stay
    calls: dict[str, int] = {}
    read: dict[str, str | None] = {}  # bn -> the conv whose output it read (None: something else)
    handles = []

    def conv_hook(name):
        def f(_m, _a, out):
            calls[name] = calls.get(name, 0) + 1
            produced[id(out)] = (name, out)
        return f

    def bn_hook(name):
        def f(_m, args):
            calls[name] = calls.get(name, 0) + 1
            hit = produced.get(id(args[0]))  # looked up now: both tensors are alive, so equal ids mean one object
            read[name] = hit[0] if hit is not None and hit[1] is args[0] else None
        return f

    try:
        for name, m in module.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                handles.append(m.register_forward_pre_hook(bn_hook(name)))
            elif isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(conv_hook(name)))
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for bn, conv in read.items():
        if conv is not None and calls.get(conv) == 1 and calls.get(bn) == 1:
            out.append((conv, bn))
    return out


def _set(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


def fold_batchnorm_(module: nn.Module, run) -> int:
    """Fold, in place, every eval-mode BatchNorm2d of ``module`` that directly reads a Conv2d's output in the
    forward pass ``run()`` into that Conv2d (the BatchNorm becomes an Identity). Returns the pairs folded.
    The module must be in eval mode (a training BatchNorm normalises with batch statistics: no fold)."""
    if module.training:
        raise ValueError("fold_batchnorm_ needs a module in eval mode")
    pairs = _pairs(module, run)
    mods = dict(module.named_modules())
    done = 0
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # normalises with the batch's own statistics even in eval mode: not an affine map
        with torch.no_grad():
            fused = fuse_conv_bn_eval(conv, bn)
        _set(module, conv_name, fused)
        _set(module, bn_name, nn.Identity())
        done += 1
    return done


def fold_batchnorm(lm, batch: dict, rtol: float = 1e-4) -> dict:
    """Fold a LoadedModel's BatchNorms (:func:`fold_batchnorm_`) and check the transform on ``batch``: the
    outputs must equal the unfolded ones within ``rtol`` x (1 + max |output|) (float rounding; bfloat16 gets
    a 1e-2 floor). A model whose outputs moved more is put back unfolded. Returns the record bench.json keeps:
    {"pairs", "max_abs_difference", "tolerance", "folded"}."""
    module = lm.module
    with torch.inference_mode():
        ref = lm.forward(batch).float()
    keep = copy.deepcopy(module)  # to put back when the check fails
    n = fold_batchnorm_(module, lambda: lm.forward(batch))
    if n == 0:
        return {"pairs": 0, "max_abs_difference": 0.0, "tolerance": None, "folded": False}
    with torch.inference_mode():
        got = lm.forward(batch).float()
    low = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    tol = max(rtol, 1e-2 if low in (torch.bfloat16, torch.float16) else 0.0) * (1.0 + float(ref.abs().max()))
    diff = float((got - ref).abs().max())
    if not diff <= tol:
        log.warning("folding BatchNorm changed %s's outputs by %.3g (> %.3g): timed unfolded", lm.name, diff, tol)
        lm.module = keep
        return {"pairs": 0, "max_abs_difference": diff, "tolerance": tol, "folded": False,
                "refused_pairs": n}
    return {"pairs": n, "max_abs_difference": diff, "tolerance": tol, "folded": True}
