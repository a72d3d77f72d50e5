"""Sensitivity from cached block outputs: a Linear inside block k is scored by running only blocks k..N-1.

The naive way to score "only this Linear quantized" runs the whole model once
per (layer, format). But a Linear first called inside block k cannot change
what blocks 0..k-1 computed (they ran before it), so their outputs on the
calibration batches are cached once, in one float forward per batch (the hooks
of skip importance, :mod:`lamina.analyze.importance`), and every later forward
has blocks 0..k-1 return their cached outputs (stubs on the module instances,
no compute): the embeddings still run (cheap, and they recompute what the model
passes every block besides its hidden state: masks, rotary tables), then blocks
k..N-1 and whatever follows them (final norm, pooler, head). Block k receives
exactly the float tensor it received in the full forward, so the output and
its nMSE are the same numbers as the naive route's, not an approximation.

Where a Linear sits is measured, not assumed: during the caching forward a
pre-hook on every Linear records how many blocks had finished when it was first
called (k). A Linear inside block k gives k; one after every block (a pooler,
a classifier, an LM's output head) gives N, so only the post-processing runs;
one before the first block (an embedding projection), or inside a module that is
several blocks (ALBERT's shared layer, first called in block 0), gives 0: the
whole forward, as before. A Linear the forward never calls gives N too (its
score is 0 either way).

Memory: the cache holds every block's output of every calibration batch
(N x rows x T x d floats for a transformer: SmolLM2, 30 blocks x 4 x 128 x 576,
is 35 MB). It is bounded by ``CACHE_BYTES``: the first batch's cache is
measured, and when all batches would exceed the bound the cache is dropped and
sensitivity runs full forwards (the naive route). Which route ran, the cache's
size and the block evaluations it cost go into quant_plan.json's ``cost``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..analyze.importance import _caching, _eval_mode, prefix_stubs
from ..blocks import block_output, patched_forwards, with_output
from .lm import final_hidden, head_name

CACHE_BYTES = 1 << 30  # all calibration batches' block outputs; above it, sensitivity runs full forwards


def _nbytes(obj, seen: set) -> int:
    """Bytes of the distinct tensors inside a block output (a tensor, tuple, list or mapping)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, dict) or hasattr(obj, "values"):
        return sum(_nbytes(o, seen) for o in obj.values())
    return 0


class BlockOutputs:
    """The float model's block outputs on each calibration batch and, per Linear, the first block it may skip to.

    ``start[name]`` = k: blocks 0..k-1 ran before the Linear ``name`` was first called. ``around(name)`` gives a
    callable i -> context manager under which ``lm.forward(batches[i])`` runs only blocks k..N-1 (blocks before
    return their cached outputs). Build it with :func:`cache_blocks`."""

    def __init__(self, mods: list[nn.Module], outputs: list[list], start: dict[str, int], nbytes: int):
        self.mods, self.outputs, self.start, self.nbytes = mods, outputs, start, nbytes
        self.n_blocks = len(mods)

    def around(self, name: str):
        k = self.start.get(name, self.n_blocks)
        if k == 0:
            return lambda i: contextlib.nullcontext()
        return lambda i: patched_forwards(prefix_stubs(self.mods, k, self._fresh(i, k)))

    def _fresh(self, i: int, k: int) -> list:
        """Batch i's cached outputs, block k-1's as a fresh copy: block k reads it and might write in place."""
        outs = list(self.outputs[i][:k])
        y = block_output(outs[-1])
        outs[-1] = with_output(outs[-1], y.clone()) if y is not None else outs[-1]
        return outs

    def block_runs(self, name: str) -> int:
        """Block evaluations per calibration batch when ``name`` is scored (N on the naive route)."""
        return self.n_blocks - self.start.get(name, self.n_blocks)


def cache_blocks(lm, batches, names: list[str], limit: int | None = None) -> tuple[BlockOutputs | None, str]:
    """(the cache, "") or (None, why the naive route runs instead): no blocks, a block not run exactly once per
    forward, or a cache over ``limit`` bytes (``CACHE_BYTES`` when None; estimated from the first batch)."""
    limit = CACHE_BYTES if limit is None else limit
    paths = tuple(getattr(lm.blocks, "block_paths", ()) or ())
    if not paths:
        return None, "the model has no blocks lamina can find"
    by_path = dict(lm.module.named_modules())
    mods = [by_path[p] for p in paths]
    linears = {n: lm.module.get_submodule(n) for n in names}
    outputs, start, total = [], {}, 0
    head = head_name(lm)
    with torch.inference_mode(), _eval_mode(lm.module):
        for i, b in enumerate(batches):
            with _caching(mods, keep=True) as cache, _first_calls(linears, cache, start if i == 0 else None):
                if head is not None:  # an LM: stopped before its output head, the full logits are not needed
                    final_hidden(lm, b, head)  # (so the head is never called here: start N, after every block)
                else:
                    lm.forward(b)
            if any(c != 1 for c in cache.calls):
                return None, f"a block ran {max(cache.calls)} times in one forward (shared or skipped blocks)"
            if any(block_output(o) is None for o in cache.outputs):
                return None, "a block's output holds no tensor"
            outputs.append(list(cache.outputs))
            total += _nbytes(cache.outputs, set())
            if i == 0 and total * len(batches) > limit:
                return None, (f"the block outputs of {len(batches)} calibration batches (~{total * len(batches):,} "
                              f"bytes) exceed the cache bound of {limit:,} bytes")
            del cache
    return BlockOutputs(mods, outputs, start, total), ""


@contextlib.contextmanager
def _first_calls(linears: dict[str, nn.Module], cache, start: dict | None):
    """Record in ``start`` how many leading blocks had finished when each Linear was first called."""
    if start is None:
        yield
        return
    handles = []

    def finished() -> int:
        return next((j for j, o in enumerate(cache.outputs) if o is None), len(cache.outputs))

    try:
        for name, mod in linears.items():
            def pre(_m, _args, _name=name):
                start.setdefault(_name, finished())
            handles.append(mod.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
