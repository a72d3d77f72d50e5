"""Everything the template shows, computed from the run folder's JSON files.

The template only lays out; every number, label and table is decided here so
it can be tested without parsing HTML. Values are formatted once (``fmt``) so
the page and its tables agree on precision.
"""

from __future__ import annotations

import json
import math

from . import _catalog as cat
from ._scores import Importance, Scores, Side

# Top-level scores.json keys the page already shows in its own way.
_SHOWN = {"lamina_version", "synthetic", "model", "data", "pooling", "seed", "split", "layers", "definitions",
          "metrics", "cka", "importance", "control", "versions"}
_MAX_LIST = 20   # longer lists of numbers are summarized, not printed
_MAX_ROWS = 50   # longer lists of records are summarized, not tabulated


def fmt(v) -> str:
    """A value as the report prints it: 3 decimals for fractions, 3 significant digits at the extremes."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        if a >= 100:
            return f"{v:,.1f}"
        if a >= 10:
            return f"{v:.2f}"
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def flatten(d: dict, prefix: str = "", depth: int = 0) -> tuple[list[tuple[str, str]], list[dict]]:
    """Key/value rows (nested objects as dotted keys) and sub-tables (lists of flat records) of a JSON object."""
    rows, tables = [], []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if _scalar(v):
            rows.append((key, fmt(v)))
        elif isinstance(v, list) and all(_scalar(x) for x in v):
            rows.append((key, fmt(v) if len(v) <= _MAX_LIST else
                         f"{len(v)} values: {fmt(v[:3])}, …, {fmt(v[-1])}"))
        elif (isinstance(v, list) and 0 < len(v) <= _MAX_ROWS and all(isinstance(x, dict) for x in v)
              and all(_scalar(y) or (isinstance(y, list) and len(y) <= 8) for x in v for y in x.values())):
            cols = list(dict.fromkeys(c for x in v for c in x))
            tables.append({"title": key, "columns": cols,
                           "rows": [[fmt(x.get(c)) for c in cols] for x in v]})
        elif isinstance(v, dict) and depth < 2:
            r, t = flatten(v, f"{key}.", depth + 1)
            rows += r
            tables += t
        elif isinstance(v, dict):
            rows.append((key, f"object with {len(v)} keys (see the JSON file)"))
        else:
            rows.append((key, f"list of {len(v)} items (see the JSON file)"))
    return rows, tables


def _params(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return fmt(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit} ({int(n):,})"
    return f"{int(n):,}"


def chance(s: Scores) -> float | None:
    """Accuracy of always answering the most frequent class, from the class counts."""
    counts = s.info("data").get("class_counts")
    if isinstance(counts, list) and counts and all(isinstance(c, (int, float)) for c in counts) and sum(counts):
        return max(counts) / sum(counts)
    return None


def subtitle(s: Scores) -> list[str]:
    """The line under the title: architecture, size, data, pooling, depth."""
    m, d = s.info("model"), s.info("data")
    parts = [fmt(m["class"])] if m.get("class") else []
    if isinstance(m.get("parameters"), (int, float)):
        parts.append(f"{_params(m['parameters']).split(' (')[0]} parameters")
    if d.get("n") is not None:
        parts.append(f"{fmt(d['n'])} samples")
    if isinstance(d.get("classes"), list):
        parts.append(f"{len(d['classes'])} classes")
    if s.raw.get("pooling"):
        parts.append(f"{fmt(s.raw['pooling'])} pooling")
    parts.append(f"{len(s.layers)} layers")
    return parts


def run_facts(s: Scores) -> list[tuple[str, str]]:
    m, d, sp = s.info("model"), s.info("data"), s.info("split")
    rows = []
    if m:
        rows.append(("model", " · ".join(fmt(m[k]) for k in ("name", "class") if m.get(k) is not None)))
        if "parameters" in m:
            rows.append(("parameters", _params(m["parameters"])))
        if m.get("fingerprint"):
            rows.append(("fingerprint", fmt(m["fingerprint"])))
    if d:
        if d.get("name") is not None:
            rows.append(("data", fmt(d["name"])))
        if d.get("n") is not None:
            rows.append(("samples", fmt(d["n"])))
        classes, counts = d.get("classes"), d.get("class_counts")
        if isinstance(classes, list):
            if isinstance(counts, list) and len(counts) == len(classes):
                rows.append(("classes", ", ".join(f"{fmt(c)} ({fmt(k)})" for c, k in zip(classes, counts))))
            else:
                rows.append(("classes", fmt(classes)))
    for key in ("pooling", "seed"):
        if key in s.raw:
            rows.append((key, fmt(s.raw[key])))
    if sp:
        parts = [f"{name} {fmt(sp[k])}" for name, k in (("train", "n_train"), ("val", "n_val"), ("test", "n_test"))
                 if k in sp]
        if isinstance(sp.get("fractions"), list):
            parts.append("(" + " / ".join(fmt(f) for f in sp["fractions"]) + ")")
        rows.append(("split", " · ".join(parts)))
    n_blocks = sum(1 for x in s.layers if x.startswith("blocks."))
    rows.append(("layers", f"{len(s.layers)}" + (f" ({n_blocks} blocks)" if n_blocks else "")))
    if s.main.importance is not None and s.main.importance.target:
        rows.append(("importance target", s.main.importance.target))
    for k, v in s.raw.items():  # whatever else the analysis recorded at the top level
        if k not in _SHOWN and _scalar(v):
            rows.append((k, fmt(v)))
    if "lamina_version" in s.raw:
        rows.append(("lamina", fmt(s.raw["lamina_version"])))
    versions = s.info("versions")
    if versions:
        rows.append(("versions", ", ".join(f"{k} {fmt(v)}" for k, v in versions.items())))
    return rows


def _best(values) -> int | None:
    idx = [i for i, v in enumerate(values) if v is not None]
    return max(idx, key=lambda i: values[i]) if idx else None


def highlights(s: Scores) -> list[dict]:
    """The few facts a reader wants first: which layer to read, how it compares, which blocks can go."""
    out = []
    accs = [n for n in cat.ordered(s.main.metrics) if cat.is_accuracy(n)]
    if accs:
        name = accs[0]
        vals = s.main.metrics[name]
        b = _best(vals)
        if b is not None:
            note = cat.label(name).lower()
            lo, hi = (s.main.metrics.get(k, [None] * len(vals))[b] for k in cat.BAND)
            if name == "probe_acc" and lo is not None and hi is not None:
                note += f", 95% CI {fmt(lo)}–{fmt(hi)}"
            out.append({"label": "best layer", "value": s.layers[b], "note": f"{fmt(vals[b])} {note}"})
            if name == "probe_acc" and lo is not None:
                first = next(i for i, v in enumerate(vals) if v is not None and v >= lo)
                if first < b:
                    out.append({"label": "earliest layer as good", "value": s.layers[first],
                                "note": f"{fmt(vals[first])}, inside the best layer's 95% CI: "
                                        f"a cheaper place for a head"})
            last = len(vals) - 1
            if b != last and vals[last] is not None:
                out.append({"label": "last layer", "value": fmt(vals[last]),
                            "note": f"{cat.label(name).lower()} of {s.layers[last]}"})
            ctrl = s.control.metrics.get(name) if s.control else None
            if ctrl and ctrl[b] is not None:
                out.append({"label": "gain over random init", "value": f"{vals[b] - ctrl[b]:+.3f}",
                            "note": f"at {s.layers[b]}: {fmt(vals[b])} vs {fmt(ctrl[b])} with random weights"})
    c = chance(s)
    if c is not None:
        out.append({"label": "majority class", "value": fmt(c), "note": "accuracy of always guessing the "
                    "most frequent class"})
    imp = s.main.importance
    if imp is not None:
        ranked = sorted((v, b) for v, b, ok in zip(imp.skip_nmse, imp.blocks, imp.skippable)
                        if ok and v is not None)
        if ranked:
            out.append({"label": "least needed blocks", "value": ", ".join(b for _, b in ranked[:3]),
                        "note": "lowest skip nMSE: " + ", ".join(fmt(v) for v, _ in ranked[:3])})
        ppl = sorted((v, b) for v, b, ok in zip(imp.lm.get("perplexity_change") or [], imp.blocks, imp.skippable)
                     if ok and v is not None)
        if ppl:
            out.append({"label": "least needed blocks (perplexity)", "value": ", ".join(b for _, b in ppl[:3]),
                        "note": "lowest perplexity change when skipped (lower is better): "
                                + ", ".join(f"{v:+.4g}" for v, _ in ppl[:3])})
        if ppl:
            out += _method_sets(s)
        fixed = [b for b, ok in zip(imp.blocks, imp.skippable) if not ok]
        if fixed:
            out.append({"label": "not skippable", "value": str(len(fixed)),
                        "note": ", ".join(fixed[:6]) + (" …" if len(fixed) > 6 else "")})
    return out


SET_FRACTION = 0.25  # the budget at which the report shows each depth method's choice (Gromov et al. drop ~25%)
SET_METHODS = ("perplexity", "block_influence", "skip_nmse", "angular", "even")


def method_sets(s: Scores) -> dict[str, dict]:
    """For a causal LM's scores: the blocks each depth method of ``lamina prune`` would remove at a quarter of the
    blocks, ``{method: plan.json's "depth"}``, computed by prune's own plan rule (so the report and prune cannot
    disagree). A method the scores cannot serve (e.g. no angular span of that size) is left out rather than guessed;
    so is ``joint``, which chooses on the model itself, not from scores.json. Empty for other scores."""
    from ..compress.plan import PlanConfig, make_plan
    from ..errors import LaminaError
    imp = s.main.importance
    if imp is None or "perplexity_change" not in imp.lm:
        return {}
    out = {}
    for m in SET_METHODS:
        try:
            depth = make_plan(s.raw, PlanConfig(drop_blocks=SET_FRACTION, method=m))["depth"]
        except LaminaError:
            continue
        if depth and depth.get("remove"):
            out[m] = depth
    return out


def _method_sets(s: Scores) -> list[dict]:
    return [{"label": f"{m} would remove", "value": ", ".join(d["remove"]),
             "note": f"lamina prune --method {m} --drop-blocks {SET_FRACTION} "
                     f"({d['n_removed']} of {d['n_blocks']} blocks); marked on the importance bars"}
            for m, d in method_sets(s).items()]


def _importance_by_layer(imp: Importance | None) -> dict[str, tuple]:
    if imp is None:
        return {}
    lm = list(imp.lm.values())
    return {b: (bi, sk, ok, *[v[i] for v in lm])
            for i, (b, bi, sk, ok) in enumerate(zip(imp.blocks, imp.block_influence, imp.skip_nmse, imp.skippable))}


def _cell(text: str, sub: str = "", best: bool = False, muted: bool = False) -> dict:
    return {"text": text, "sub": sub, "best": best, "muted": muted}


def layer_table(layers: list[str], side: Side) -> dict:
    """Per-layer numbers: one row per layer, one column per metric (the CI beside the probe), then importance."""
    names = [n for n in cat.ordered(side.metrics) if n not in cat.BAND]
    band = all(b in side.metrics for b in cat.BAND)
    best = {n: _best(side.metrics[n]) for n in names if cat.is_accuracy(n)}
    imp = _importance_by_layer(side.importance)
    cols = [{"name": cat.column(n), "title": cat.label(n)} for n in names]
    if imp:
        cols += [{"name": cat.column("block_influence"), "title": cat.label("block_influence")},
                 {"name": cat.column("skip_nmse"), "title": cat.label("skip_nmse")}]
        cols += [{"name": cat.column(k), "title": f"{cat.label(k)} ({cat.hint(k)})"} for k in side.importance.lm]
    n_imp = 2 + (len(side.importance.lm) if side.importance else 0)
    rows = []
    for i, layer in enumerate(layers):
        cells = []
        for n in names:
            v = side.metrics[n][i]
            sub = ""
            if n == "probe_acc" and band and v is not None:
                lo, hi = side.metrics[cat.BAND[0]][i], side.metrics[cat.BAND[1]][i]
                sub = f"{fmt(lo)}–{fmt(hi)}" if lo is not None and hi is not None else ""
            text = f"{v:g}" if n in cat.LOG_SCALE and v is not None else fmt(v)  # grid values: 0.01, 1, 10
            cells.append(_cell(text, sub, best=best.get(n) == i))
        if imp:
            if layer in imp:
                bi, sk, ok, *lm = imp[layer]
                cells += [_cell(fmt(v)) for v in (bi, sk, *lm)] if ok else [_cell("not skippable", muted=True)] * n_imp
            else:
                cells += [_cell("")] * n_imp
        rows.append({"layer": layer, "cells": cells})
    return {"columns": cols, "rows": rows}


def definitions(s: Scores) -> list[dict]:
    """Every definition the analysis wrote, known metrics in the report's order first."""
    names = cat.ordered(s.definitions)
    return [{"name": n, "label": cat.label(n), "text": s.definitions[n]} for n in names]
