"""Read ``scores.json`` into one checked, normalized form for the report.

Lenient where the analysis may legitimately say less (``control``, ``cka``,
``importance``, single values may be null or absent; unknown keys are
ignored), strict where a wrong file would draw a wrong picture: per-layer
lists must have one value per layer, matrices must be layers x layers.
Values become ``float`` or ``None``; NaN and inf count as missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LaminaError

_FIX = "run `lamina analyze RUN` again to rewrite scores.json"
LM_KEYS = ("perplexity_change", "angular_1")  # what the report shows of a causal LM's importance


@dataclass
class Importance:
    blocks: list[str]
    block_influence: list[float | None]
    skip_nmse: list[float | None]
    skippable: list[bool]
    target: str | None = None
    lm: dict[str, list[float | None]] = field(default_factory=dict)  # a causal LM's extra per-block scores


@dataclass
class Side:
    """One model's per-layer results: the pretrained model or its random-init control."""

    metrics: dict[str, list[float | None]] = field(default_factory=dict)
    cka: list[list[float | None]] | None = None
    importance: Importance | None = None


@dataclass
class Scores:
    raw: dict
    layers: list[str]
    main: Side
    control: Side | None
    definitions: dict[str, str]

    def info(self, key: str) -> dict:
        """A top-level object such as ``model`` or ``data``; ``{}`` when absent or not an object."""
        v = self.raw.get(key)
        return v if isinstance(v, dict) else {}


def _bad(what: str, source: Path, value=None, allowed=None) -> LaminaError:
    return LaminaError(f"{source}: {what}", value=value, allowed=allowed, fix=_FIX)


def _num(v, where: str, source: Path) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{where} is not a number", source, value=v, allowed="a number or null")
    v = float(v)
    return v if math.isfinite(v) else None


def _series(v, n: int, where: str, source: Path) -> list[float | None]:
    if not isinstance(v, list):
        raise _bad(f"{where} is not a list", source, value=type(v).__name__, allowed=f"a list of {n} values")
    if len(v) != n:
        raise _bad(f"{where} has {len(v)} values for {n} layers", source, value=len(v), allowed=n)
    return [_num(x, f"{where}[{i}]", source) for i, x in enumerate(v)]


def _metrics(v, n: int, where: str, source: Path) -> dict[str, list[float | None]]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"{where} is not an object", source, value=type(v).__name__, allowed="{name: [values]}")
    # Scalars or nested objects under metrics are not per-layer: leave them to the raw data.
    return {k: _series(x, n, f"{where}.{k}", source) for k, x in v.items() if isinstance(x, list)}


def _matrix(v, n: int, where: str, source: Path) -> list[list[float | None]] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n:
        got = len(v) if isinstance(v, list) else type(v).__name__
        raise _bad(f"{where} is not a {n} x {n} matrix (one row per layer)", source, value=got, allowed=n)
    return [_series(row, n, f"{where}[{i}]", source) for i, row in enumerate(v)]


def _importance(v, where: str, source: Path) -> Importance | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("blocks"), list):
        raise _bad(f"{where} has no 'blocks' list", source, value=v if not isinstance(v, dict) else sorted(v),
                   allowed="{blocks: [...], block_influence: [...], skip_nmse: [...], skippable: [...]}")
    blocks = [str(b) for b in v["blocks"]]
    n = len(blocks)
    none = [None] * n
    bi = _series(v["block_influence"], n, f"{where}.block_influence", source) if "block_influence" in v else none
    # analyze's importance result calls the same number skip_importance; accept either name.
    sk_key = "skip_nmse" if "skip_nmse" in v else "skip_importance"
    sk = _series(v[sk_key], n, f"{where}.{sk_key}", source) if sk_key in v else none
    skippable = v.get("skippable")
    if skippable is None:  # not stated: a block is skippable where it has a skip score
        skippable = [x is not None for x in sk]
    elif not isinstance(skippable, list) or len(skippable) != n:
        raise _bad(f"{where}.skippable does not have one flag per block", source,
                   value=skippable if not isinstance(skippable, list) else len(skippable), allowed=n)
    target = v.get("target")
    lm = {}
    if v.get("kind") == "lm":  # perplexity change and the one-block angular distance, lower = can go
        for key in LM_KEYS:
            raw = (v.get("angular") or {}).get("1") if key == "angular_1" else v.get(key)
            if raw is not None:
                lm[key] = _series(raw, n, f"{where}.{key}", source)
    return Importance(blocks, bi, sk, [bool(s) for s in skippable], str(target) if target is not None else None, lm)


def parse_scores(raw, source: Path) -> Scores:
    """Check and normalize a loaded ``scores.json``; raises :class:`LaminaError` naming the bad key."""
    if not isinstance(raw, dict):
        raise _bad("is not a JSON object", source, value=type(raw).__name__, allowed="an object")
    layers = raw.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _bad("has no 'layers' list", source, value=layers, allowed="a non-empty list of layer names")
    layers = [str(x) for x in layers]
    n = len(layers)
    main = Side(metrics=_metrics(raw.get("metrics"), n, "metrics", source),
                cka=_matrix(raw.get("cka"), n, "cka", source),
                importance=_importance(raw.get("importance"), "importance", source))
    control = None
    c = raw.get("control")
    if isinstance(c, dict):
        control = Side(metrics=_metrics(c.get("metrics"), n, "control.metrics", source),
                       cka=_matrix(c.get("cka"), n, "control.cka", source),
                       importance=_importance(c.get("importance"), "control.importance", source))
    elif c is not None:
        raise _bad("'control' is not an object", source, value=type(c).__name__, allowed="an object or null")
    defs = raw.get("definitions")
    defs = {str(k): str(v) for k, v in defs.items()} if isinstance(defs, dict) else {}
    return Scores(raw=raw, layers=layers, main=main, control=control, definitions=defs)
