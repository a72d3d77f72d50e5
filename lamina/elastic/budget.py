"""Budgets: which sub-model of the nested family a point of the grid names, and what it keeps.

A :class:`Budget` is (depth, ffn, heads, channels): the number of blocks kept
and the fraction of FFN neurons, attention key-value groups and expanded CNN
channels kept. After :func:`lamina.elastic.order.order_` every prefix of an
axis is its most important subset, so a budget keeps

    blocks     all but the first ``n - depth`` of the recorded block order
    FFN        the first ``I - n_removed(1 - ffn, I)`` neurons of every block
    heads      the first ``heads * n_kv`` KV groups (their query heads with them)
    channels   the first ``C_j - n_removed(1 - channels, C_j)`` channels of MBConv block j

(``n_removed`` rounds half up, the rule of ``lamina prune``). A head fraction
must name whole KV groups: 0.5 of 2 groups is 1 group; 0.75 of 2 is refused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

from ..compress.plan import n_removed
from ..errors import UsageError

AXES = ("depth", "ffn", "heads", "channels")


@dataclass(frozen=True, order=True)
class Budget:
    """One member of the family: blocks kept, and the kept fraction of each width axis."""

    depth: int
    ffn: float = 1.0
    heads: float = 1.0
    channels: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"depth {self.depth}, ffn {self.ffn:g}, heads {self.heads:g}, channels {self.channels:g}"


def parse_list(text, flag: str, kind: type) -> tuple:
    """'6,4,3' (or a list/tuple) -> a tuple of ``kind``; UsageError naming ``flag`` otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        vals = tuple(kind(str(v).strip()) if isinstance(v, str) else kind(v) for v in items if str(v).strip())
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag} must be a comma-separated list of {'integers' if kind is int else 'numbers'}",
                         value=text, allowed="e.g. 6,4,3" if kind is int else "e.g. 1,0.75,0.5",
                         fix=f"{flag} {'6,4,3' if kind is int else '1,0.75,0.5'}") from e
    if not vals:
        raise UsageError(f"{flag} is empty, so the budget grid has no member", value=text,
                         allowed="at least one value", fix=f"{flag} {'6,4' if kind is int else '1,0.5'}")
    if kind is float:
        bad = [v for v in vals if not (math.isfinite(v) and 0 < v <= 1)]
        if bad:
            raise UsageError(f"{flag} takes kept fractions in (0, 1]", value=bad, allowed="e.g. 1,0.75,0.5",
                             fix=f"{flag} 1,0.5")
    else:
        bad = [v for v in vals if v < 1]
        if bad:
            raise UsageError(f"{flag} takes numbers of blocks kept (>= 1)", value=bad, allowed="e.g. 6,4,3",
                             fix=f"{flag} 6,4,3")
    return tuple(sorted(set(vals), reverse=True))


@dataclass(frozen=True)
class Grid:
    """The trained budgets: the product of the four axes (each sorted, largest first, full size included)."""

    depths: tuple[int, ...]
    ffn: tuple[float, ...] = (1.0,)
    heads: tuple[float, ...] = (1.0,)
    channels: tuple[float, ...] = (1.0,)

    def members(self) -> list[Budget]:
        """Every budget, the full model first, the smallest last."""
        return [Budget(*b) for b in itertools.product(self.depths, self.ffn, self.heads, self.channels)]

    @property
    def full(self) -> Budget:
        return Budget(self.depths[0], self.ffn[0], self.heads[0], self.channels[0])

    @property
    def smallest(self) -> Budget:
        return Budget(self.depths[-1], self.ffn[-1], self.heads[-1], self.channels[-1])

    def to_dict(self) -> dict:
        return {"depths": list(self.depths), "widths": list(self.ffn), "heads": list(self.heads),
                "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(int(x) for x in d["depths"]), tuple(float(x) for x in d["widths"]),
                   tuple(float(x) for x in d["heads"]), tuple(float(x) for x in d["channels"]))

    def check(self, budget: Budget) -> Budget:
        """``budget`` when the grid holds it, else a UsageError naming the axis and the trained values."""
        for axis, vals in zip(AXES, (self.depths, self.ffn, self.heads, self.channels)):
            v = getattr(budget, axis)
            if not any(math.isclose(v, x, abs_tol=1e-9) for x in vals):
                raise UsageError(f"--{axis} {v:g} is not in the trained budget grid (a sub-model outside it was "
                                 f"never trained, so it is not extracted)", value=v,
                                 allowed=", ".join(f"{x:g}" for x in vals),
                                 fix=f"pick one of the trained values, or train it: lamina elastic ... --"
                                     f"{'depths' if axis == 'depth' else 'widths' if axis == 'ffn' else axis} "
                                     f"...,{v:g}")
        return budget


def make_grid(n_blocks: int, depths, widths, heads, channels) -> Grid:
    """The grid of the flags, each axis with its full value added (the sandwich rule trains the full model)."""
    d = parse_list(depths, "--depths", int) if depths is not None else (n_blocks,)
    bad = [x for x in d if x > n_blocks]
    if bad:
        raise UsageError("--depths asks for more blocks than the teacher has", value=bad,
                         allowed=f"1..{n_blocks}", fix=f"--depths {n_blocks},{max(1, n_blocks * 2 // 3)}")
    axes = [tuple(sorted({n_blocks, *d}, reverse=True))]
    for text, flag in ((widths, "--widths"), (heads, "--heads"), (channels, "--channels")):
        vals = parse_list(text, flag, float) if text is not None else (1.0,)
        axes.append(tuple(sorted({1.0, *vals}, reverse=True)))
    return Grid(*axes)


def kept_count(fraction: float, n: int) -> int:
    """Units of ``n`` a kept fraction keeps (``n_removed`` of the rest, rounded half up; at least 1)."""
    return max(1, n - n_removed(1.0 - fraction, n))


def kept_groups(fraction: float, n_kv: int) -> int:
    """Whole KV groups a head fraction keeps; UsageError when it does not name a whole number of them."""
    g = fraction * n_kv
    if abs(g - round(g)) > 0.01 or round(g) < 1:  # 0.667 of 3 groups is 2
        ok = ", ".join(f"{k / n_kv:g}" for k in range(n_kv, 0, -1))
        raise UsageError("a head fraction must keep a whole number of key-value groups (query heads move with "
                         "their group)", value=f"{fraction:g} of {n_kv} groups = {g:g}", allowed=ok,
                         fix=f"--heads {ok.split(', ')[0]},{ok.split(', ')[-1]}")
    return int(round(g))


class Written:
    """What an elastic stage wrote (the shape :class:`ElasticResult` and :class:`ExtractResult` share): a folder
    with ``model_path`` (the saved model) and ``record`` (its elastic.json / extract.json, all of it)."""

    model_path: str
    record: dict

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)
