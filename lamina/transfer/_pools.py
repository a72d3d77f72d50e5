"""Several poolings of one layer, and reading a ``--pooling none`` store (Head2Toe's multi-pooling; ``side``).

Head2Toe pools each layer more than one way and lets the group lasso choose
among all of them. A pooled store holds one pooling only (capture reduces each
activation as soon as it exists), so more than one needs a store captured with
``--pooling none``: its token sequences / feature maps are pooled here, every
way asked, and the ways are concatenated per layer, so a head sees one
(B, k * D) vector per layer and needs nothing new.

Ways (``POOLS``):
    token sequences (B, T, D), mask (B, T):  mean, max (both over real tokens only), cls, last
    CNN maps (B, C, H, W):                    mean, max (spatial), mean2x2 (2x2 grid of means: 4C)

A spec is the ways joined by '+', e.g. ``mean+max``; the deployable model
records it and pools its taps the same way. Text rows of a none store are
padded after their last token (``lengths.npy`` says how many are real).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..capture.hooks import pool as pool_one
from ..errors import UsageError

POOLS = ("mean", "max", "cls", "last", "mean2x2")
_TEXT = ("mean", "max", "cls", "last")
_MAP = ("mean", "max", "mean2x2")


def parse(spec: str) -> list[str]:
    """'mean,max' or 'mean+max' -> ['mean', 'max'] (order kept, duplicates refused)."""
    ways = [w.strip() for w in spec.replace(",", "+").split("+") if w.strip()]
    bad = [w for w in ways if w not in POOLS]
    if not ways or bad or len(set(ways)) != len(ways):
        raise UsageError("unknown or repeated pooling in --pooling", value=spec, allowed=", ".join(POOLS)
                         + " joined by ',' (each once)", fix="--pooling mean,max")
    return ways


def pool_many(x: torch.Tensor, ways: list[str], mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) or (B, C, H, W) [or already pooled (B, D)] -> (B, k * D'): each way, concatenated."""
    if x.dim() == 2:
        return x
    out = []
    for w in ways:
        if x.dim() == 4:
            if w == "max":
                out.append(x.amax(dim=(2, 3)))
            elif w == "mean2x2":
                out.append(F.adaptive_avg_pool2d(x, 2).flatten(1))
            elif w == "mean":
                out.append(x.mean(dim=(2, 3)))
            else:
                raise ValueError(f"pooling {w!r} is for token sequences, not feature maps")
        elif w == "max":
            if mask is not None and mask.shape[:2] == x.shape[:2]:
                x_ = x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
                out.append(x_.amax(1))
            else:
                out.append(x.amax(1))
        elif w == "mean2x2":
            raise ValueError("pooling 'mean2x2' is for feature maps, not token sequences")
        else:
            out.append(pool_one(x, w, mask))
    return out[0] if len(out) == 1 else torch.cat(out, 1)


def check_ways(ways: list[str], shapes: dict[str, tuple]) -> None:
    """Refuse a way that does not fit the layers' kind (per-sample shapes (T, D) or (C, H, W))."""
    maps = {len(s) == 3 for s in shapes.values()}
    allowed = _MAP if maps == {True} else _TEXT
    bad = [w for w in ways if w not in allowed]
    if bad:
        raise UsageError("that pooling does not apply to these layers", value=bad, allowed=", ".join(allowed),
                         fix="--pooling " + ",".join(allowed[:2]))


def store_rows(store, name: str, rows, lengths: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of one layer of a none store as float32, trimmed to the longest real row, and the (B, T) mask."""
    x = torch.from_numpy(store.read_rows(name, np.sort(np.asarray(rows))).astype(np.float32))
    order = np.argsort(np.argsort(np.asarray(rows)))  # read_rows wants sorted rows: put them back in order
    x = x[torch.as_tensor(order)]
    if lengths is None or x.dim() != 3:
        return x, None
    n = torch.as_tensor(lengths[np.asarray(rows)])
    T = int(n.max()) if len(n) else 0
    mask = (torch.arange(T).unsqueeze(0) < n.unsqueeze(1)).long()
    # a capture batch pads to its own longest row, so the store holds the pad tokens' outputs there: zero them,
    # as a batch of these rows alone would have nothing there
    return x[:, :T] * mask.unsqueeze(-1).to(x.dtype), mask


def pooled_from_store(store, names: list[str], ways: list[str], chunk: int = 256) -> dict[str, torch.Tensor]:
    """``{layer: (N, k * D)}``: every row of a none store pooled each way (read ``chunk`` rows at a time)."""
    lengths = store.lengths
    out = {}
    for name in names:
        parts = []
        for s in range(0, store.n, chunk):
            x, mask = store_rows(store, name, np.arange(s, min(s + chunk, store.n)), lengths)
            parts.append(pool_many(x, ways, mask))
        out[name] = torch.cat(parts)
    return out


def pooled_inputs(store, names: list[str], head: str, asked: str | None) -> tuple[str, dict]:
    """(pooling spec of the deployable model, ``{layer: (N, D) float32}``) for the heads on pooled features."""
    stored = store.manifest.get("pooling", "mean")
    shapes = {n: tuple(store.manifest["layers"][n]["shape"][1:]) for n in names}
    if stored == "none":
        ways = parse(asked or "mean")
        check_ways(ways, shapes)
        return "+".join(ways), pooled_from_store(store, names, ways)
    flat = [n for n, sh in shapes.items() if len(sh) != 1]
    if flat:  # a none store says so above; this is a pooled store with an unpooled layer
        raise UsageError(f"--head {head} needs pooled features, one vector per sample",
                         value=f"{flat[0]}: {list(shapes[flat[0]])}",
                         allowed="a store captured with --pooling mean, cls, last or none",
                         fix="capture again with --pooling mean, or use --head side")
    if asked is not None and parse(asked) != [stored]:
        raise UsageError("the store holds one pooling only, so the head cannot pool another way",
                         value=asked, allowed=stored,
                         fix="capture with --pooling none to pool each layer several ways (--pooling mean,max), "
                             f"or leave --pooling out to use the store's {stored}")
    return stored, {n: torch.from_numpy(np.array(store.load(n), dtype=np.float32)) for n in names}


def kept_per_way(kept: list[int], names: list[str], X: dict, pooling: str, store) -> dict:
    """How many kept features come from each pooling way (a layer's vector is its ways side by side)."""
    ways = parse(pooling)
    out = dict.fromkeys(ways, 0)
    start = 0
    for n in names:
        sh = store.manifest["layers"][n]["shape"][1:]
        unit = sh[0] if len(sh) == 3 else sh[-1]  # channels of a map, width of a token
        widths = [4 * unit if w == "mean2x2" else unit for w in ways]
        bounds = np.cumsum([start] + widths)
        for k in kept:
            if bounds[0] <= k < bounds[-1]:
                out[ways[int(np.searchsorted(bounds, k, side="right")) - 1]] += 1
        start += X[n].shape[1]
    return out
