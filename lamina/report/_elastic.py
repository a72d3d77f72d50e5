"""The report's section for ``elastic.json``: the nested family's accuracy against measured latency and parameters.

One figure, two panels: every member of the family (``members`` of
elastic.json) as a point, accuracy against its measured latency (at the batch
size elastic.json states) and against its parameter count; the members on the
Pareto front (no other member at least as accurate and at most as costly,
strictly better in one) are drawn in colour and joined by a step line, the
rest in grey. Beside them, as diamonds, the separately pruned + distilled
models of the run (and the fine-tuned teacher: the full budget's separate
counterpart), found the way the "Which model" section finds models
(``_pareto.collect``); one appears on the latency panel only when a bench.json
timed it at the family's batch size, since latencies at other batch sizes are
not comparable.

The members are drawn by their validation metric (``val_metric``: what
``lamina elastic`` scores every member by, and what ``extract --params`` /
``--latency-ms`` ranks by; lamina elastic does not touch the test rows), the
separately made models by their test metric, and the axis says so. When the
metric is lower-is-better (``higher_is_better: false``, a perplexity), the
front keeps the low values.

elastic.json is checked before anything is drawn: a file whose members are
missing, or whose parameters, latency or accuracy are not finite numbers of
the right sign, is refused with a message naming the member and the field
(shown on the page), never a traceback.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from ..errors import LaminaError
from . import _context as ctx
from . import _plots as plots
from ._pareto import front

SEPARATE_KINDS = ("fine-tuned", "pruned", "distilled")  # what _pareto.collect calls the separate route's models
_FIX = "re-run `lamina elastic` to rewrite elastic.json (it is derived data; do not edit it by hand)"


def _number(v, positive: bool) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > 0 if positive else True))


def _refuse(what: str, value) -> LaminaError:
    return LaminaError(f"elastic.json refused: {what}", value=value, fix=_FIX)


def parse_elastic(d) -> tuple[list[dict], str, bool]:
    """The members of elastic.json, checked; the metric's name; whether higher is better.

    Raises LaminaError naming the first malformed member and field.
    """
    if not isinstance(d, dict):
        raise _refuse("it is not a JSON object", type(d).__name__)
    members = d.get("members")
    if not isinstance(members, list) or not members:
        raise _refuse("'members' is not a non-empty list", ctx.fmt(members) if not isinstance(members, list)
                      else "[]")
    hib = d.get("higher_is_better", True)
    if not isinstance(hib, bool):
        raise _refuse("'higher_is_better' is not true or false", hib)
    for i, m in enumerate(members):
        if not isinstance(m, dict):
            raise _refuse(f"members[{i}] is not an object", m)
        for key in ("parameters", "latency_ms"):
            if not _number(m.get(key), positive=True):
                raise _refuse(f"members[{i}].{key} is not a positive number", m.get(key))
        if not _number(m.get("val_metric"), positive=False):
            raise _refuse(f"members[{i}].val_metric is not a finite number", m.get("val_metric"))
        if m.get("latency_batch") is not None and not (isinstance(m["latency_batch"], int)
                                                       and not isinstance(m["latency_batch"], bool)
                                                       and m["latency_batch"] >= 1):
            raise _refuse(f"members[{i}].latency_batch is not a positive integer", m["latency_batch"])
    name = d.get("metric") if isinstance(d.get("metric"), str) else members[0].get("metric")
    return members, name if isinstance(name, str) and name else "accuracy", hib


def _label(m: dict) -> str:
    """A member's budget in a few characters: d4 f0.5 h0.75 c1 (depth, FFN, heads, channels)."""
    parts = []
    for key, short in (("depth", "d"), ("ffn", "f"), ("heads", "h"), ("channels", "c")):
        v = m.get(key)
        if v is not None:
            parts.append(f"{short}{v:g}" if isinstance(v, (int, float)) else f"{short}{v}")
    return " ".join(parts) or "member"


def _grid(g) -> str:
    if isinstance(g, dict):
        return "; ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in g.items())
    return str(g) if g is not None else "—"


def elastic_section(d, fmt: str, points: list[dict] | None = None) -> dict:
    """rows, tables and figure for elastic.json; ``problem`` (and nothing drawn) when it is malformed."""
    try:
        members, metric, hib = parse_elastic(d)
    except LaminaError as e:
        return {"rows": [], "tables": [], "figure": None, "problem": e.cli_text().replace("\n", " ")}
    # the members carry their validation score (what the selector ranks by); the separate models their test score
    acc_label = metric  # the legend says which split: members validation, separate models test
    batches = {m.get("latency_batch") for m in members}
    batch = batches.pop() if len(batches) == 1 else None
    sep = [p for p in points or () if p.get("kind") in SEPARATE_KINDS and p.get("accuracy") is not None]
    lat = [m["latency_ms"] for m in members]
    par = [m["parameters"] for m in members]
    acc = [m["val_metric"] for m in members]
    good = acc if hib else [-a for a in acc]  # front() keeps the high values: a loss or perplexity is negated
    on_lat, on_par = front(lat, good), front(par, good)

    tr = d.get("training") if isinstance(d.get("training"), dict) else {}
    rt = d.get("runtime") if isinstance(d.get("runtime"), dict) else {}
    teacher = d.get("teacher")
    rows = [("teacher", teacher.get("path") or teacher.get("name") if isinstance(teacher, dict) else teacher),
            ("grid", _grid(d.get("grid"))),
            ("members", f"{len(members)}; on the front: {sum(on_lat)} by latency, {sum(on_par)} by parameters"),
            ("latency measured", f"median at batch {batch if batch is not None else 'per member (differs)'}"
             + (f", {members[0]['latency_threads']} thread(s)" if members[0].get("latency_threads") else "")
             + (f", {rt.get('device')}" if rt.get("device") else "")),
            ("training", ", ".join(f"{k} {ctx.fmt(tr.get(k))}" for k in ("steps", "wall_s", "flops")
                                   if tr.get(k) is not None) or "—"),
            ("one-time, outside training", ", ".join(f"{n} {ctx.fmt(tr.get(k))} s" for k, n in
                                                     (("order_s", "ordering"), ("select_s", "selector"))
                                                     if tr.get(k) is not None) or "—"),
            ("drawn", f"each member's validation {metric} ({'higher' if hib else 'lower'} is better; what "
                      "`extract --params/--latency-ms` ranks by), against the test metric of the models made "
                      "separately")]
    if sep:
        rows.append(("separate models beside it", ", ".join(f"{p['name']} ({p['kind']})" for p in sep)))
    cols = ["member", "depth", "FFN", "heads", "channels", "parameters", f"latency ms @ {batch}" if batch else
            "latency ms", f"validation {metric}", "on the front (by)", "elastic.json front (latency, parameters)"]
    trows = []
    for i in sorted(range(len(members)), key=lambda i: -good[i]):
        m = members[i]
        by = [n for n, on in (("latency", on_lat[i]), ("parameters", on_par[i])) if on]
        trows.append([_label(m), ctx.fmt(m.get("depth")), ctx.fmt(m.get("ffn")), ctx.fmt(m.get("heads")),
                      ctx.fmt(m.get("channels")), ctx.fmt(int(m["parameters"])), ctx.fmt(float(m["latency_ms"])),
                      ctx.fmt(m["val_metric"]), ", ".join(by) or "no",
                      f"{ctx.fmt(m.get('pareto'))}, {ctx.fmt(m.get('pareto_parameters'))}"])
    tables = [{"title": "Every member of the family", "columns": cols, "rows": trows}]
    if sep:
        tables.append({"title": "Made separately (prune + distill; the teacher for the full budget)",
                       "columns": ["model", "stage", f"test {metric}", "parameters",
                                   f"latency ms @ {batch}" if batch else "latency ms"],
                       "rows": [[p["name"], p["kind"], ctx.fmt(p["accuracy"]),
                                 ctx.fmt(int(p["parameters"])) if p.get("parameters") is not None else "—",
                                 ctx.fmt(p["latency"].get(str(batch))) if batch is not None
                                 and str(batch) in (p.get("latency") or {}) else "not benched at this batch"]
                                for p in sep]})
    fig = _figure(members, acc, acc_label, batch, sep, on_lat, on_par)  # the y axis as measured, not negated
    return {"rows": [(k, v if isinstance(v, str) else ctx.fmt(v)) for k, v in rows], "tables": tables,
            "figure": plots.render(fig, fmt, "elastic family: accuracy against latency and parameters"),
            "problem": None}


def _panel(ax, xs, acc, on, labels, prefix: str, sep_pts: list[tuple[str, float, float]]) -> None:
    order = sorted((i for i in range(len(xs)) if on[i]), key=lambda i: xs[i])
    if len(order) > 1:
        ax.step([xs[i] for i in order], [acc[i] for i in order], where="post", color=plots.MAIN, alpha=0.45,
                linewidth=1.5, zorder=2, label="elastic front (validation)")
    for i in range(len(xs)):
        # the gid says front or not: the page can be checked against the numbers without reading colours
        ax.plot([xs[i]], [acc[i]], "o", markersize=6.5, zorder=3, color=plots.MAIN if on[i] else plots.CONTROL,
                markeredgecolor="white", gid=f"elastic-{prefix}-{'front' if on[i] else 'member'}-{i}")
        if on[i]:
            ax.annotate(labels[i], (xs[i], acc[i]), textcoords="offset points", xytext=(5, 4), fontsize=7.5,
                        color=plots.INK)
    for j, (name, x, y) in enumerate(sep_pts):
        ax.plot([x], [y], "D", markersize=6.5, zorder=4, color=plots.EXTRA[1], markeredgecolor="white",
                gid=f"elastic-{prefix}-separate-{j}", label="made separately (test)" if j == 0 else None)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-6, 4), ha="right", fontsize=7.5,
                    color=plots.EXTRA[1])  # left of its point: the family labels sit to the right
    ys = list(acc) + [y for _, _, y in sep_pts]
    lo, hi = min(ys), max(ys)
    pad = max(0.01, (hi - lo) * 0.12)
    ax.set_ylim(lo - pad, hi + pad)
    ax.margins(x=0.12)


def _figure(members, acc, acc_label, batch, sep, on_lat, on_par) -> Figure:
    labels = [_label(m) for m in members]
    params = [m["parameters"] for m in members] + [p["parameters"] for p in sep if p.get("parameters") is not None]
    scale, unit = (1e6, "millions") if max(params) >= 1e6 else (1e3, "thousands")
    with plots._style():
        fig = Figure(figsize=(9.0, 3.6), layout="constrained")
        a, b = fig.subplots(1, 2)
        lat_sep = [(p["name"], p["latency"][str(batch)], p["accuracy"]) for p in sep
                   if batch is not None and str(batch) in (p.get("latency") or {})]
        _panel(a, [m["latency_ms"] for m in members], acc, on_lat, labels, "lat", lat_sep)
        a.set_xlabel(f"measured latency, ms (median, batch {batch})" if batch else "measured latency, ms")
        a.set_title("Accuracy vs latency")
        par_sep = [(p["name"], p["parameters"] / scale, p["accuracy"]) for p in sep if p.get("parameters") is not None]
        _panel(b, [m["parameters"] / scale for m in members], acc, on_par, labels, "par", par_sep)
        b.set_xlabel(f"parameters, {unit}")
        b.set_title("Accuracy vs parameters")
        for ax in (a, b):
            ax.set_ylabel(acc_label)
        handles, names = [], []
        for ax in (a, b):
            for h, n in zip(*ax.get_legend_handles_labels()):
                if n not in names:
                    handles.append(h)
                    names.append(n)
        if handles:
            fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=8)
    return fig

