"""Per-block importance: Block Influence (ShortGPT) and skip importance (Nemotron Elastic).

Definitions (both per block j of ``model.blocks``):

    Block Influence  BI_j = 1 - mean cos(x_j, y_j)
        x_j the block's input, y_j its output; the cosine runs over the hidden
        (channel) dimension at each position: a token of a (B, T, D) sequence,
        a pixel of a (B, C, H, W) map, the single row of a (B, D) vector. The
        mean is ONE global mean over every valid position of every sample
        (padding excluded through ``attention_mask``), not a mean of per-sample
        means: long sentences weigh more, exactly as their tokens count.
        cos = x.y / max(|x| |y|, 1e-8) in float64: a zero vector (a dead ReLU
        pixel) has cosine 0 with anything, so it adds 1 to BI.
        None when x_j and y_j differ in shape (a stride-2 or channel-changing
        block): there is no position-wise cosine to take.

    Skip importance  s_j = sum (M_full - M_-j)^2 / sum M_full^2
        summed over the whole dataset. M is the model output: its logits when it
        has a head (an output with ``.logits``, or a plain tensor from a model
        whose BlockMap names a head), else its final hidden states
        (``last_hidden_state`` or the raw tensor). Padding positions of (B, T, ...)
        outputs are excluded. M_-j is the output with block j bypassed through its
        residual: its output replaced by its input. A block whose output shape
        differs from its input shape cannot be bypassed: it is reported
        ``skippable=False`` with s_j None, never scored. Nor is a block that
        prune could not remove faithfully (a kept block would be rebuilt
        differently at its new position: T5's first block owns the
        relative-position bias; see ``compress.depth.config_mismatch``), so the
        scores describe only models prune can save.
    Shared blocks: a module that is several blocks (ALBERT's layer group, called
    once per block) is scored per call: call j bypassed, the other calls run.

Design decisions:
- Cost. Per batch, one full forward caches every block's input and output
  (first tensor cloned, so a later in-place op cannot corrupt the cache). Then,
  for each block j, the blocks before j have their ``forward`` replaced by a stub
  that returns the cached output (no compute), block j by a stub that returns its
  cached input in the structure of its output, and blocks j+1..N-1 plus the
  model's own post-processing (final norm, pooler, head) run normally. All N
  blocks cost 1 full forward + sum_j (N-1-j) block evaluations, about (N+1)/2
  full forwards, versus N+1 for :func:`naive_skip_importance`. Embeddings still
  run each time; they are cheap.
- Generic. Stubs sit on the module instance, so any block calling convention
  works (HF layers with many keyword arguments, EfficientNet's
  ``block(x, drop_connect_rate=...)``, plain ``nn.Module``). Tensor, tuple, list
  and ``ModelOutput`` block outputs are supported.
- Clean. Hooks and stubs are removed in ``finally``, also on error; the model's
  train/eval flags are restored; nothing runs with gradients (inference mode).

Shapes: text batches give block tensors (B, T, D) and a mask (B, T); ViT
(B, T, D) without a mask; CNNs (B, C, H, W).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..blocks import PerCall, block_input, block_output, bypass, patched_forwards, select_taps, with_output
from ..data import Dataset, load_data
from ..errors import LaminaError, UsageError
from ..models import LoadedModel, load_model

TARGETS = ("logits", "final hidden states")

DEFINITIONS = {
    "block_influence": "1 - mean cos(block input, block output); cosine over the hidden/channel dimension at each "
                       "position (token or pixel); one global mean over every non-padding position of every sample "
                       "(ShortGPT). None when input and output shapes differ.",
    "skip_importance": "sum (M_full - M_skip)^2 / sum M_full^2 over the dataset, padding excluded; M the logits or "
                       "final hidden states (see 'target'); M_skip the output with the block replaced by identity "
                       "(Nemotron Elastic). None when the block is not skippable (input and output shapes differ).",
}


@dataclass(frozen=True)
class BlockScore:
    """The importance of one block.

    Attributes:
        name: canonical name ('blocks.3').
        path: module path ('encoder.layer.3').
        block_influence: BI (see module docstring), or None when not applicable.
        skippable: False when the block changes the shape of what it is fed.
        skip_importance: s_j, or None when not skippable.
        note: why a score is missing, else None.
    """

    name: str
    path: str
    block_influence: float | None
    skippable: bool
    skip_importance: float | None
    note: str | None = None


@dataclass(frozen=True)
class ImportanceResult:
    """Per-block importance of one model on one dataset.

    Attributes:
        model: model name; arch: its family ('bert', 'efficientnet', ...).
        n_samples: samples the sums ran over.
        target: what skip importance compares, 'logits' or 'final hidden states'.
        blocks: one :class:`BlockScore` per scored block, in forward order.
        batch_size, max_length, image_size: the settings used.
    """

    model: str
    arch: str
    n_samples: int
    target: str
    blocks: tuple[BlockScore, ...]
    batch_size: int = 32
    max_length: int = 128
    image_size: int | None = None

    @property
    def skip_importance(self) -> dict[str, float | None]:
        return {b.name: b.skip_importance for b in self.blocks}

    @property
    def block_influence(self) -> dict[str, float | None]:
        return {b.name: b.block_influence for b in self.blocks}

    def to_dict(self) -> dict:
        return {"analysis": "importance", "model": self.model, "arch": self.arch, "n_samples": self.n_samples,
                "target": self.target, "definitions": dict(DEFINITIONS),
                "settings": {"batch_size": self.batch_size, "max_length": self.max_length,
                             "image_size": self.image_size},
                "blocks": [{"name": b.name, "path": b.path, "block_influence": b.block_influence,
                            "skippable": b.skippable, "skip_importance": b.skip_importance, "note": b.note}
                           for b in self.blocks]}


# ---------------------------------------------------------------- per-forward cache of block inputs/outputs

class _Cache:
    """Input, output and call count of each block in one full forward."""

    def __init__(self, n: int):
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.outputs: list[object] = [None] * n
        self.calls = [0] * n
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def clone(self, x: torch.Tensor) -> torch.Tensor:
        # Block j's output object is usually block j+1's input: remembering the
        # last copy made copies each activation once, and holding only that one
        # original lets the others be freed as the forward goes on.
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        c = x.clone()
        self._last = (x, c)
        return c


@contextlib.contextmanager
def _caching(mods: list[nn.Module], keep: bool) -> Iterator[_Cache]:
    """Record every block's input and output (cloned when ``keep``); hooks removed on exit."""
    cache = _Cache(len(mods))
    handles = []
    # A module that is several blocks (ALBERT's shared layer, run once per block) maps its k-th call to
    # its k-th block; calls past those are counted on its last block, so _check_calls reports them.
    index: dict[nn.Module, list[int]] = {}
    for i, mod in enumerate(mods):
        index.setdefault(mod, []).append(i)
    seen = {mod: 0 for mod in index}
    current = {}
    try:
        for mod, idx in index.items():
            def pre(_m, args, kwargs, _idx=idx):
                k = seen[_m]
                seen[_m] += 1
                i = current[_m] = _idx[min(k, len(_idx) - 1)]
                x = block_input(args, kwargs)
                cache.inputs[i] = cache.clone(x) if keep and x is not None else x
                cache.calls[i] += 1

            def post(_m, _args, out):
                y = block_output(out)
                cache.outputs[current[_m]] = with_output(out, cache.clone(y)) if keep and y is not None else out

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mod.register_forward_hook(post))
        yield cache
    finally:
        for h in handles:
            h.remove()
        cache._last = None


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; every submodule's own flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


# ---------------------------------------------------------------- targets and sums

def _target(out, has_head: bool) -> tuple[str, torch.Tensor]:
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return "logits", logits
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return "final hidden states", hidden
    x = block_output(out)
    if x is None:
        raise LaminaError("cannot find a tensor in the model output", value=type(out).__name__,
                          allowed="a tensor, a tuple of tensors, or an output with .logits / .last_hidden_state",
                          fix="wrap the model so its forward returns the logits or final hidden states")
    return ("logits" if has_head else "final hidden states"), x


def _position_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) mask as float64 when x is (B, T, ...), else None (every position counts)."""
    if mask is None or x.dim() < 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask.to(device=x.device, dtype=torch.float64)


def _sq_sums(full: torch.Tensor, other: torch.Tensor | None, mask) -> float:
    """sum (full - other)^2 (or sum full^2 when other is None), padding excluded.

    The difference is one float32 rounding; the squares are summed in float64.
    """
    if other is not None and full.dtype in (torch.bfloat16, torch.float16):
        full, other = full.double(), other.double()  # a half-precision difference would lose the small ones
    d = full if other is None else full - other
    m = _position_mask(full, mask)
    if m is None:
        return float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    per_position = torch.linalg.vector_norm(d.reshape(*d.shape[:2], -1), dim=-1, dtype=torch.float64)
    return float((per_position.square() * m).sum())


class _Float64:
    """float64 copies and channel norms of the activations of one batch, made once each.

    Block j's input is usually the very tensor cached as block j-1's output, so
    converting by identity halves the work; fewer large ops also matter on a
    busy shared CPU, where every parallel op waits for its slowest thread.
    """

    def __init__(self):
        self._seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def get(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        for orig, xd, norm in self._seen[-2:]:
            if orig is x:
                return xd, norm
        xd = x.double()
        norm = torch.linalg.vector_norm(xd, dim=dim)
        self._seen = self._seen[-1:] + [(x, xd, norm)]
        return xd, norm


def _cos_sums(x: torch.Tensor, y: torch.Tensor, mask, f64: _Float64) -> tuple[float, int]:
    """(sum of cos(x, y) over valid positions, number of valid positions), in float64.

    cos = x.y / max(|x| |y|, 1e-8): a zero vector has cosine 0 with anything.
    """
    dim = 1 if x.dim() == 4 else -1  # NCHW maps: channels; sequences and vectors: last dim
    (xd, nx), (yd, ny) = f64.get(x, dim), f64.get(y, dim)
    cos = torch.linalg.vecdot(xd, yd, dim=dim) / (nx * ny).clamp_min(1e-8)
    m = _position_mask(x, mask)
    if m is None:
        return float(cos.sum()), cos.numel()
    return float((cos * m).sum()), int(m.sum())


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise LaminaError(f"non-finite values (NaN or inf) in {what}", value=what, allowed="finite values",
                          fix="check the inputs and the model's weights; importance needs finite activations")


# ---------------------------------------------------------------- batches and selection

def _prepare(model, data, layers, batch_size, max_length, image_size):
    lm = load_model(model)
    if isinstance(data, (str, os.PathLike)):
        data = load_data(data)
    for name, v in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise UsageError(f"{name} must be a positive integer", value=v, allowed=">= 1", fix=f"{name}=32")
    taps = [t for t in select_taps(lm.blocks, layers) if t.name.startswith("blocks.")]
    if not taps:
        raise UsageError("the selection names no block", value=layers,
                         allowed="None (all), n (last n), indices, or names/globs such as 'blocks.*'",
                         fix="importance scores blocks; 'embed' and 'final_norm' are not blocks")
    idx = [int(t.name.split(".")[1]) for t in taps]
    if isinstance(data, Dataset):
        if len(data) == 0:
            raise UsageError(f"dataset {data.name!r} is empty", value=data.source or data.name,
                             allowed="at least 1 sample", fix="check the file or the filter that produced it")
        n = len(data)

        def batches():
            for start in range(0, n, batch_size):
                yield lm.batch(data, np.arange(start, min(n, start + batch_size)), max_length, image_size)
        return lm, idx, batches(), (n + batch_size - 1) // batch_size
    if isinstance(data, Sequence) and data and all(isinstance(b, Mapping) for b in data):
        return lm, idx, iter(data), len(data)
    raise UsageError("data must be a lamina Dataset or a list of batches from model.batch()",
                     value=type(data).__name__, allowed="Dataset, a dataset name or path, list[dict[str, Tensor]]",
                     fix="load it with lamina.load_data(...)")


def _progress(it, total: int, show: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="batch", disable=not show)


def _batch_size(batch: Mapping) -> int:
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])


def _check_calls(cache: _Cache, paths) -> None:
    for i, c in enumerate(cache.calls):
        if c != 1:
            raise LaminaError(f"block {paths[i]!r} ran {c} times in one forward pass", value=c,
                              allowed="each block runs exactly once per forward",
                              fix="name blocks that run once each (--blocks PATH or GLOB); shared or skipped "
                                  "blocks cannot be scored one by one")


# ---------------------------------------------------------------- public API

def block_importance(model: LoadedModel, data, *, batch_size: int = 32, max_length: int = 128,
                     image_size: int | None = None, progress: bool = True, layers=None) -> ImportanceResult:
    """Block Influence and skip importance of every block (see module docstring).

    Args:
        model: a LoadedModel (or anything :func:`lamina.load_model` accepts).
        data: a :class:`~lamina.data.Dataset`, a dataset name or path
            (:func:`lamina.load_data`), or a list of batch dicts from
            ``model.batch`` (reused as they are; e.g. to time several runs on the
            same inputs).
        batch_size, max_length, image_size: how rows become batches
            (``model.batch``); ignored when ``data`` is already batches.
        progress: show a progress bar over batches.
        layers: which blocks to score (the same selection as CaptureConfig.layers): None (all), n (the last n), a list of
            indices (negative from the end), or names/globs ('blocks.0,blocks.-1'),
            as in :func:`lamina.blocks.select_taps`.
    Returns:
        ImportanceResult, one BlockScore per selected block in forward order.

    Cost per batch: 1 full forward + sum over skippable selected j of (N-1-j)
    block evaluations, N the number of blocks.
    """
    lm, sel, batches, n_batches = _prepare(model, data, layers, batch_size, max_length, image_size)
    paths = lm.blocks.block_paths
    mods_by_path = dict(lm.module.named_modules())
    mods = [mods_by_path[p] for p in paths]
    n = len(mods)
    cos_sum, cos_n = np.zeros(n), np.zeros(n, dtype=np.int64)
    num, den = np.zeros(n), 0.0
    same_shape = {j: True for j in sel}
    target, n_samples = None, 0
    with torch.inference_mode(), _eval_mode(lm.module):
        for batch in _progress(batches, n_batches, progress, f"importance {lm.name}"):
            mask = batch.get("attention_mask")
            with _caching(mods, keep=True) as cache:
                out = lm.forward(batch)
            _check_calls(cache, paths)
            target, full = _target(out, lm.blocks.head is not None)
            _check_finite(full, f"the output of {lm.name!r}")
            den += _sq_sums(full, None, mask)
            n_samples += _batch_size(batch)
            f64 = _Float64()
            for j in sel:
                x, y = cache.inputs[j], block_output(cache.outputs[j])
                if x is None or y is None or x.shape != y.shape:
                    same_shape[j] = False
                    continue
                s, c = _cos_sums(x, y, mask, f64)
                if not np.isfinite(s):
                    _check_finite(y, f"block {paths[j]!r} (blocks.{j})")
                    _check_finite(x, f"the input of block {paths[j]!r} (blocks.{j})")
                cos_sum[j] += s
                cos_n[j] += c
            for j in sel:
                if not same_shape[j]:
                    continue
                with patched_forwards(_skip_stubs(mods, j, cache)):
                    out_j = lm.forward(batch)
                num[j] += _sq_sums(full, _target(out_j, lm.blocks.head is not None)[1], mask)
            del cache, out, f64
    scores = []
    unfaithful = _not_removable(lm, [j for j in sel if same_shape[j]])
    for j in sel:
        ok = same_shape[j]
        why = unfaithful.get(j)
        skip = ok and why is None
        note = None if ok else "input and output shapes differ: not skippable, no Block Influence"
        scores.append(BlockScore(
            f"blocks.{j}", paths[j],
            block_influence=float(1.0 - cos_sum[j] / cos_n[j]) if ok and cos_n[j] else None,
            skippable=skip, skip_importance=float(num[j] / den) if skip and den > 0 else (
                float("nan") if skip else None),
            note=note if why is None else f"not skippable: the pruned model would differ from the bypassed one "
                                          f"({why})"))
    return ImportanceResult(lm.name, lm.blocks.arch, n_samples, target or TARGETS[0], tuple(scores),
                            batch_size, max_length, image_size)


def _not_removable(lm: LoadedModel, sel: list[int]) -> dict[int, str]:
    """{j: why} for blocks that prune could not remove alone without changing what the kept blocks compute.

    Skip importance bypasses block j in the full model; prune saves a model
    rebuilt from its config. They agree unless a kept block would be rebuilt
    differently at its new position (T5's first block owns the relative-position
    bias every later block reuses; a Swin block's window shift alternates with
    its position). Such blocks are scored as not skippable, so no plan picks
    them (:func:`lamina.compress.depth.config_mismatch`).
    """
    if not lm.blocks.container:
        return {}
    from ..compress.depth import base_for_checks, config_mismatch
    out, base = {}, base_for_checks(lm.module)
    for j in sel:
        why = config_mismatch(lm.module, [j], lm.blocks.container, _base=base)
        if why:
            out[j] = why
    return out


def _skip_stubs(mods: list[nn.Module], j: int, cache: _Cache) -> dict:
    """Forwards that make one model forward compute "block j skipped": blocks before j return their cached
    outputs, block j its cached input, later blocks run."""
    return prefix_stubs(mods, j, cache.outputs, _identity_from_cache(cache.outputs[j], cache.inputs[j]))


def prefix_stubs(mods: list[nn.Module], k: int, outputs: list, at_k=None) -> dict:
    """Forwards for one model forward in which blocks 0..k-1 return ``outputs[i]`` (no compute), block k runs
    ``at_k`` (None: its own forward) and later blocks run. Used by skip importance and by quantize's
    sensitivity from cached block outputs (:mod:`lamina.quantize._cached`). A module that is several blocks
    (ALBERT) gets one :class:`~lamina.blocks.PerCall` forward, one handler per call: make a fresh set per
    model forward."""
    per_mod: dict[nn.Module, list] = {}
    for i, m in enumerate(mods):
        fn = _returning(outputs[i]) if i < k else (at_k if i == k else None)
        per_mod.setdefault(m, []).append(fn)
    stubs = {}
    for m, fns in per_mod.items():
        if len(fns) > 1:
            stubs[m] = PerCall(m.forward, fns)  # a fresh count: one forward per set of stubs
        elif fns[0] is not None:
            stubs[m] = fns[0]
    return stubs


def _returning(value):
    def stub(*_args, **_kwargs):  # a block before j: its cached output, no compute
        return value
    return stub


def _identity_from_cache(out, x: torch.Tensor):
    def stub(*_args, **_kwargs):  # block j: its own input, a fresh copy (later blocks may write in place)
        return with_output(out, x.clone())
    return stub


def naive_skip_importance(model: LoadedModel, data, *, batch_size: int = 32, max_length: int = 128,
                          image_size: int | None = None, progress: bool = True,
                          layers=None) -> dict[str, float | None]:
    """Reference skip importance: one reference forward, then one full forward per block.

    Block j is bypassed with :func:`lamina.blocks.bypass` (its input returned in
    the structure of its output); every other block is recomputed. Same
    arguments, target and definition as :func:`block_importance`; returns
    {'blocks.j': s_j, or None when block j is not skippable}. Costs N+1 full
    forwards (minus one block each) per batch; meant for tests and benchmarks.
    """
    lm, sel, batches, n_batches = _prepare(model, data, layers, batch_size, max_length, image_size)
    paths = lm.blocks.block_paths
    mods_by_path = dict(lm.module.named_modules())
    mods = [mods_by_path[p] for p in paths]
    num, den = {j: 0.0 for j in sel}, 0.0
    skippable = {j: True for j in sel}
    with torch.inference_mode(), _eval_mode(lm.module):
        for batch in _progress(batches, n_batches, progress, f"naive skip {lm.name}"):
            mask = batch.get("attention_mask")
            with _caching(mods, keep=False) as cache:  # structure and shapes only, no copies
                out = lm.forward(batch)
            _check_calls(cache, paths)
            full = _target(out, lm.blocks.head is not None)[1]
            den += _sq_sums(full, None, mask)
            for j in sel:
                x, y = cache.inputs[j], block_output(cache.outputs[j])
                if x is None or y is None or x.shape != y.shape:
                    skippable[j] = False
                    continue
                # like=: block j does not run; its input comes back in its output's structure
                # (a shared block's other calls still run, so it runs too)
                like = {} if lm.blocks.shared else {paths[j]: cache.outputs[j]}
                with bypass(lm.module, [j], lm.blocks, like=like):
                    out_j = lm.forward(batch)
                num[j] += _sq_sums(full, _target(out_j, lm.blocks.head is not None)[1], mask)
    return {f"blocks.{j}": (num[j] / den if den > 0 else float("nan")) if skippable[j] else None for j in sel}
