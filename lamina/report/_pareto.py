"""The trade-off the report exists for: test accuracy against measured latency and parameters, per model.

Points are collected generically: every JSON record in the run folder and the
``--stages`` folders that gives a model's test accuracy, parameter count or
latency adds to that model's point. Known records:

    finetune.json   test.accuracy, parameters              (the teacher)
    plan.json       result.parameters_after                (a pruned model)
    distill.json    test.accuracy, parameters.student      (a distilled student)
    bench.json      per model: accuracy, parameters, latency at each batch size
    quant_plan.json model.parameters                        (a quantized model: ``lamina quantize`` OUT)
    extract.json    parameters                              (an extracted elastic member)
    elastic.json    members: val_metric, parameters, latency_ms at latency_batch  (every member of the family)

A quantized model and an extracted member record no test metric of their own:
they become points once a bench.json measured them (``lamina bench Q``: the
quantized model as a user reloads it, on its source's test rows). The members of
an elastic family carry only their validation metric (``lamina elastic`` never
scores the test rows) and the latency elastic measured: they are drawn with it,
their stage says "(validation)", and their latency counts only at the batch
size every timed point shares.

And any other ``*.json`` with a numeric ``test.accuracy`` (or ``accuracy``) and
an integer ``parameters`` (later stages: transfer heads, elastic, quantized
models) becomes a point named after its folder. Records of one model (its
folder, or ``FOLDER/model``) merge into one point; bench.json's measurements win
over a stage's own numbers, since all its models are measured on the same rows.

The front: a model is on it when no other model is at least as accurate and
at most as costly, and strictly better in one of the two.

Language models: when every point has a test perplexity (finetune/distill
records of an LM task, bench.json of causal LMs), perplexity takes
accuracy's place (axis, table, tiles) and lower is better; the front is then
"no other model at most as perplexed and at most as costly".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from . import _context as ctx
from . import _plots as plots

KINDS = {"finetune.json": "fine-tuned", "plan.json": "pruned", "distill.json": "distilled",
         "quant_plan.json": "quantized", "extract.json": "elastic member"}
MEMBER_KIND = "elastic member (validation)"
# a stage folder whose model/ IS its model (quantize's OUT/model is the float model the plan is applied to: the
# quantized model is OUT itself, and OUT/model is not it)
_MODEL_IS_OUT = ("finetune.json", "plan.json", "distill.json", "extract.json")


def _key(path: str | Path) -> str:
    """One key per model: a stage folder and its ``model/`` subfolder are the same model."""
    p = Path(str(path))
    if p.name == "model" and any((p.parent / f).exists() for f in _MODEL_IS_OUT):
        p = p.parent
    try:
        return str(p.resolve()) if p.exists() else str(path)
    except OSError:
        return str(path)


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def _read(f: Path):
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the stage sections report unreadable files; a point is simply missing


def _records(f: Path, d) -> list[dict]:
    if not isinstance(d, dict):
        return []
    folder = f.parent
    base = {"key": _key(folder), "name": folder.name, "source": f.name}
    if f.name == "bench.json" and isinstance(d.get("models"), list):
        out = []
        for m in d["models"]:
            if not isinstance(m, dict) or "model" not in m:
                continue
            lat = {str(b): _num((v or {}).get("median_ms")) for b, v in (m.get("latency") or {}).items()}
            name = Path(str(m["model"])).name
            name = Path(str(m["model"])).parent.name if name == "model" else name
            out.append({"key": _key(m["model"]), "name": name or str(m["model"]), "source": f.name,
                        "accuracy": _num(m.get("accuracy")), "perplexity": _num(m.get("perplexity")),
                        "parameters": _num(m.get("parameters")),
                        "latency": {b: v for b, v in lat.items() if v is not None}, "bench": True})
        return out
    if f.name == "elastic.json":
        return _members(f, d)
    if f.name == "quant_plan.json":  # its validation numbers are not a test metric: bench.json gives the point's
        model = d.get("model") if isinstance(d.get("model"), dict) else {}
        return [{**base, "kind": KINDS[f.name], "parameters": _num(model.get("parameters"))}]
    if f.name == "extract.json":
        return [{**base, "kind": KINDS[f.name], "parameters": _num(d.get("parameters"))}]
    if f.name == "plan.json":
        res = d.get("result") or {}
        return [{**base, "kind": "pruned", "parameters": _num(res.get("parameters_after"))}] if res else []
    test = d.get("test") if isinstance(d.get("test"), dict) else {}
    acc = _num(test.get("accuracy")) if test else _num(d.get("accuracy"))
    params = d.get("parameters")
    if isinstance(params, dict):
        params = params.get("student")
    params = _num(params)
    if f.name in KINDS:
        ppl = _num(test.get("perplexity")) if test else None
        return [{**base, "kind": KINDS[f.name], "accuracy": acc, "perplexity": ppl, "parameters": params}]
    if f.name in ("scores.json", "config.json", "compare.json") or acc is None or params is None:
        return []
    return [{**base, "kind": f.stem, "accuracy": acc, "parameters": params}]  # a later stage's record


def _members(f: Path, d: dict) -> list[dict]:
    """One point per member of an elastic family, by its validation metric and elastic's own latency."""
    metric = d.get("metric") if isinstance(d.get("metric"), str) else "accuracy"
    if metric not in ("accuracy", "perplexity") or not isinstance(d.get("members"), list):
        return []  # another metric has no place on the accuracy / perplexity axis
    out = []
    for i, m in enumerate(d["members"]):
        if not isinstance(m, dict):
            continue
        budget = " ".join(f"{k[0]}{m[k]:g}" for k in ("depth", "ffn", "heads", "channels")
                          if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool))
        lat, batch = _num(m.get("latency_ms")), m.get("latency_batch")
        out.append({"key": f"{_key(f.parent)}#member{i}", "name": f"{f.parent.name} {budget or i}".strip(),
                    "source": f.name, "kind": MEMBER_KIND, metric: _num(m.get("val_metric")),
                    "parameters": _num(m.get("parameters")),
                    "latency": {str(batch): lat} if lat is not None and isinstance(batch, int) else {}})
    return out


def collect(run: Path, extra) -> list[dict]:
    """One dict per model: name, kind, accuracy, parameters, latency {batch: median ms}, sources."""
    folders = []
    for e in [run] + [Path(x) for x in extra or ()]:
        e = e.parent if e.is_file() else e
        if e.is_dir() and e not in folders:
            folders.append(e)
    points: dict[str, dict] = {}
    for folder in folders:
        for f in sorted(folder.glob("*.json")):
            for r in _records(f, _read(f)):
                p = points.setdefault(r["key"], {"name": r["name"], "kind": None, "accuracy": None,
                                                 "perplexity": None, "parameters": None, "latency": {},
                                                 "sources": []})
                p["sources"].append(f"{folder.name}/{r['source']}")
                if r.get("kind") and not p["kind"]:
                    p["kind"] = r["kind"]
                for k in ("accuracy", "perplexity", "parameters"):
                    if r.get(k) is not None and (p[k] is None or r.get("bench")):
                        p[k] = r[k]
                p["latency"].update(r.get("latency") or {})
    return [p for p in points.values() if p["accuracy"] is not None]


def metric_of(points: list[dict]) -> str:
    """'perplexity' when every point is a language model's (lower is better), else 'accuracy'."""
    return "perplexity" if points and all(p.get("perplexity") is not None for p in points) else "accuracy"


def _up(p: dict, metric: str) -> float:
    """The point's quality as 'higher is better' (the front's convention)."""
    return -p[metric] if metric == "perplexity" else p[metric]


LABELS = {"accuracy": "test accuracy", "perplexity": "test perplexity (lower is better)"}


def front(xs: list[float], ys: list[float]) -> list[bool]:
    """Pareto-optimal points for (low x, high y)."""
    n = len(xs)
    return [not any((xs[j] <= xs[i] and ys[j] >= ys[i]) and (xs[j] < xs[i] or ys[j] > ys[i]) for j in range(n))
            for i in range(n)]


def batch_size(points: list[dict]) -> str | None:
    """The batch size whose latency every timed point has (the largest such), or None."""
    timed = [p for p in points if p["latency"]]
    if not timed:
        return None
    common = set.intersection(*(set(p["latency"]) for p in timed))
    return max(common, key=lambda b: int(b) if b.isdigit() else 0) if common else None


def _axis(ax, pts: list[dict], xs: list[float], prefix: str, xlabel: str, log: bool,
          metric: str = "accuracy") -> None:
    ys = [p[metric] for p in pts]
    on = front(xs, [_up(p, metric) for p in pts])
    order = sorted((i for i in range(len(pts)) if on[i]), key=lambda i: xs[i])
    if len(order) > 1:
        ax.step([xs[i] for i in order], [ys[i] for i in order], where="post", color=plots.MAIN, alpha=0.45,
                linewidth=1.5, zorder=2, label="front (no model both faster/smaller and more accurate)"
                if metric == "accuracy" else "front (no model both faster/smaller and less perplexed)")
    for i, p in enumerate(pts):
        ax.plot([xs[i]], [ys[i]], "o", markersize=7, zorder=3, gid=f"{prefix}-point-{i}",
                color=plots.MAIN if on[i] else plots.CONTROL, markeredgecolor="white")
        ax.annotate(p["name"], (xs[i], ys[i]), textcoords="offset points", xytext=(6, 5 if i % 2 == 0 else -11),
                    fontsize=8.5, color=plots.INK)
    if log:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.7, not 7x10^-1
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(LABELS[metric])
    lo, hi = min(ys), max(ys)
    if metric == "perplexity":  # unbounded above; the best (lowest) model at the bottom
        pad = max(0.5, (hi - lo) * 0.15)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.margins(x=0.18)
        return
    pad = max(0.02, (hi - lo) * 0.15)
    ax.set_ylim(lo - pad, hi + pad)  # room above the best point for its label
    if hi <= 1:  # an accuracy: no tick above 1
        ax.set_yticks([t for t in ax.get_yticks() if lo - pad <= t <= 1 + 1e-9])
    ax.margins(x=0.18)


def figure(points: list[dict], fmt: str) -> dict | None:
    """The Pareto figure (accuracy against latency, and against parameters) and its table."""
    if len(points) < 1:
        return None
    bs = batch_size(points)
    timed = [p for p in points if bs is not None and bs in p["latency"]]
    sized = [p for p in points if p["parameters"] is not None]
    metric = metric_of(points)
    scale, unit = (1e6, "millions") if any(p["parameters"] >= 1e6 for p in sized) else (1e3, "thousands")
    panels = [(timed, [p["latency"][bs] for p in timed], "lat", f"median latency at batch {bs}, ms (log)", True)] \
        if timed else []
    panels += [(sized, [p["parameters"] / scale for p in sized], "params", f"parameters, {unit}", False)] if sized \
        else []
    markup = None
    if panels:
        with plots._style():
            fig = Figure(figsize=(4.4 * len(panels), 3.3), layout="constrained")
            axes = np.atleast_1d(fig.subplots(1, len(panels)))
            for ax, (pts, xs, prefix, label, log) in zip(axes, panels):
                _axis(ax, pts, xs, prefix, label, log, metric)
            fig.suptitle("Accuracy against cost: up and to the left is better" if metric == "accuracy" else
                         "Perplexity against cost: down and to the left is better", x=0.01, ha="left",
                         fontsize=10, fontweight="bold")
            handles, labels = axes[0].get_legend_handles_labels()
            if handles:
                fig.legend(handles, labels, loc="outside lower center", fontsize=8)
            markup = plots.render(fig, fmt, f"{LABELS[metric]} against latency and parameters, one point per model")
    lat_on = dict(zip([id(p) for p in timed], front([p["latency"][bs] for p in timed],
                                                    [_up(p, metric) for p in timed]))) if timed else {}
    par_on = dict(zip([id(p) for p in sized], front([p["parameters"] for p in sized], [_up(p, metric) for p in sized])))
    rows = []
    for p in sorted(points, key=lambda p: -_up(p, metric)):
        on = [x for x, d in (("latency", lat_on), ("parameters", par_on)) if d.get(id(p))]
        rows.append([p["name"], p["kind"] or "", ctx.fmt(p[metric]),
                     ctx.fmt(int(p["parameters"])) if p["parameters"] is not None else "–",
                     ctx.fmt(p["latency"].get(bs)) if bs and bs in p["latency"] else "not benched",
                     ", ".join(on) if on else "no", ", ".join(dict.fromkeys(p["sources"]))])
    table = {"title": "Every model", "columns": ["model", "stage", LABELS[metric], "parameters",
                                                 f"ms @ batch {bs}" if bs else "latency", "on the front (by)",
                                                 "from"], "rows": rows}
    return {"figure": markup if markup is None else Markup(markup), "table": table, "n": len(points),
            "batch": bs, "benched": len(timed), "metric": metric}


def _count(n: float) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else f"{n:.0f}"


def cards(points: list[dict], bs: str | None) -> list[dict]:
    """Summary tiles: one per model, accuracy first, with its cost."""
    out = []
    metric = metric_of(points)
    for p in points:
        cost = []
        if p["parameters"] is not None:
            cost.append(f"{_count(p['parameters'])} parameters")
        if bs and bs in p["latency"]:
            cost.append(f"{p['latency'][bs]:.1f} ms @ batch {bs}")
        out.append({"label": f"{p['kind'] or 'model'}: {p['name']}", "value": ctx.fmt(p[metric]),
                    "note": LABELS[metric] + (", " + ", ".join(cost) if cost else "")})
    return out
