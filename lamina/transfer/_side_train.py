"""Token-level block outputs for ``side``: from a ``--pooling none`` store, or the frozen backbone.

:class:`StoreTokens` reads them from a store captured with ``--pooling none``
(no backbone pass at all). :class:`TokenFeatures` computes them:

The backbone runs under ``torch.no_grad`` in eval mode and its outputs are
detached in the hooks, so no gradient can reach it. Each row's outputs are
kept (float16, a text row trimmed to its own tokens) when every training and
validation row fits in ``cache_mb``; otherwise they are recomputed for each
batch of each epoch. A batch is padded back to its longest row with a mask,
as the tokenizer would pad it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime import autocast
from ._pools import store_rows


class TokenFeatures:
    """``rows_input(rows) -> (feats: list of (B, T, D) or (B, C, H, W), mask (B, T) or None)``."""

    def __init__(self, dep, ds, max_length: int, image_size, batch_size: int, cache_rows, cache_mb: int,
                 at=(torch.device("cpu"), torch.float32)):
        self.dep, self.ds = dep, ds
        self.device, self.dtype = at
        dep.module.to(self.device)
        self.max_length, self.image_size, self.batch_size = max_length, image_size, batch_size
        self.cache: dict[int, list] | None = None
        self.text = dep.modality == "text"
        probe, _ = self._compute(np.asarray(cache_rows[:2]))
        self.shapes = [tuple(t.shape) for t in probe[0]]  # one per layer (of the first row)
        per_row = 2 * sum(int(np.prod(s)) for s in self.shapes)  # float16; text rows are usually shorter
        self.estimated_mb = per_row * len(cache_rows) / 2 ** 20
        self.cached = self.estimated_mb <= cache_mb
        if self.cached:
            self.cache = {}

    @torch.no_grad()
    def _compute(self, rows: np.ndarray):
        """Per row, per layer: float tensors (T_i, D) or (C, H, W); and per row its token count."""
        b = self.dep.batch(self.ds, rows, self.max_length, self.image_size)
        b = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        model = self.dep.module
        was = model.training
        model.eval()
        try:
            with autocast(self.device, self.dtype):
                if "pixels" in b:
                    feats = model.features(b["pixels"]) if not self.dep.input_name else \
                        model.features(**{self.dep.input_name: b["pixels"]})
                    n = [None] * len(rows)
                else:
                    feats = model.features(**b)
                    n = b["attention_mask"].sum(1).tolist() if "attention_mask" in b else \
                        [feats[0].shape[1]] * len(rows)
        finally:
            model.train(was)
        feats = [f.float().cpu() for f in feats]  # rows are kept (and padded) on the CPU; batches go to the head
        per = [[f[i, : n[i]] if n[i] is not None else f[i] for f in feats] for i in range(len(rows))]
        return per, n

    def _rows(self, rows) -> list[list[torch.Tensor]]:
        rows = [int(r) for r in rows]
        if self.cache is None:
            out = []
            for s in range(0, len(rows), self.batch_size):
                out += self._compute(np.asarray(rows[s:s + self.batch_size]))[0]
            return out
        todo = [r for r in rows if r not in self.cache]
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            for r, f in zip(chunk, self._compute(np.asarray(chunk))[0]):
                self.cache[r] = [t.half() for t in f]
        return [self.cache[r] for r in rows]

    def __call__(self, rows):
        per = self._rows(rows)
        if not self.text:
            return [torch.stack([p[j].float() for p in per]) for j in range(len(per[0]))], None
        T = max(p[0].shape[0] for p in per)
        mask = torch.zeros(len(per), T, dtype=torch.long)
        feats = []
        for j in range(len(per[0])):
            x = torch.zeros(len(per), T, per[0][j].shape[-1])
            for i, p in enumerate(per):
                x[i, : p[j].shape[0]] = p[j].float()
                mask[i, : p[j].shape[0]] = 1
            feats.append(x)
        return feats, mask

    def to_cpu(self) -> None:
        """After training: the backbone back on the CPU, where the saved model is checked."""
        self.dep.module.to("cpu")
        self.device, self.dtype = torch.device("cpu"), torch.float32


class StoreTokens:
    """The same ``rows_input`` as :class:`TokenFeatures`, read from a ``--pooling none`` store.

    Text rows are trimmed to the batch's longest real row (``lengths.npy``)
    with a (B, T) mask, as the tokenizer pads a batch; feature maps are read
    as stored. Nothing is cached: the operating system's page cache holds the
    store's files between epochs.
    """

    cached = True  # the store is the cache

    def __init__(self, store, names: list[str]):
        self.store, self.names = store, list(names)
        self.lengths = store.lengths
        self.shapes = [tuple(store.manifest["layers"][n]["shape"][1:]) for n in self.names]
        if self.lengths is not None:  # per-row shape of the first row, as TokenFeatures reports it
            self.shapes = [(int(self.lengths[0]), *s[1:]) for s in self.shapes]
        self.estimated_mb = 0.0

    def __call__(self, rows):
        feats, mask = [], None
        for n in self.names:
            x, m = store_rows(self.store, n, rows, self.lengths)
            feats.append(x)
            mask = m if m is not None else mask
        return feats, mask

    def to_cpu(self) -> None:
        pass
