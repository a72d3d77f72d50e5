"""Calibration passes: per-channel activation sums over batches, padding excluded.

FFN-channel and attention-head importance are both "run the calibration
batches, read one tensor per block through a hook, map it to per-channel
non-negative scores (B, T, K) or (B, K), zero the padding positions, sum".
This module is that loop, once.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import UsageError


@torch.no_grad()
def channel_sums(module: nn.Module, batches: Iterable[Mapping],
                 points: list[tuple[nn.Module, str, Callable[[torch.Tensor], torch.Tensor], int]],
                 what: str) -> list[torch.Tensor]:
    """One float64 (K,) sum per point.

    ``points`` are ``(submodule, side, to_scores, K)``: ``side`` is "input"
    (first positional argument) or "output"; ``to_scores`` maps that tensor to
    non-negative per-channel scores whose last dimension is K. Runs in eval
    mode without gradients; hooks are removed and the train flag restored on exit.
    """
    sums = [torch.zeros(k, dtype=torch.float64) for *_, k in points]
    mask: list[torch.Tensor | None] = [None]

    def add(i: int, x: torch.Tensor, to_scores) -> None:
        s = to_scores(x.detach().double())
        m = mask[0]
        if m is not None and s.dim() == 3 and tuple(m.shape) == tuple(s.shape[:2]):
            s = s * m.to(s.device, torch.float64).unsqueeze(-1)
        sums[i] += s.reshape(-1, s.shape[-1]).sum(0).cpu()

    handles = []
    was_training = module.training
    module.eval()
    try:
        for i, (sub, side, to_scores, _) in enumerate(points):
            if side == "input":
                handles.append(sub.register_forward_pre_hook(
                    lambda _m, args, i=i, f=to_scores: add(i, args[0], f)))
            else:
                handles.append(sub.register_forward_hook(lambda _m, _a, out, i=i, f=to_scores: add(i, out, f)))
        n = 0
        for batch in batches:
            mask[0] = batch.get("attention_mask")
            module(batch["pixels"]) if "pixels" in batch else module(**batch)
            n += 1
        if n == 0:
            raise UsageError(f"no calibration batches for {what}", value=0, allowed="at least one batch",
                             fix="pass batches=[model.batch(ds, range(32))]")
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return sums
