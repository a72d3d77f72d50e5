"""The report's figures, rendered to inline SVG (or base64 PNG) markup.

Figures are built on ``matplotlib.figure.Figure`` directly, never through
pyplot: nothing touches the caller's pyplot state or GUI backend, and no
window can open (the Agg/SVG canvases render without a display). Style lives
in one ``rc_context`` so a user's rcParams neither leak in nor get changed.
SVG output is deterministic (fixed hash salt, no date) so the same run folder
always gives the same page.
"""

from __future__ import annotations

import base64
import io
import re
from contextlib import contextmanager

import matplotlib
import numpy as np
from markupsafe import Markup, escape
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import _catalog as cat
from ._scores import Importance

INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
CONTROL = "#9ca3af"
MAIN = "#2563eb"
COLORS = {"probe_acc": "#2563eb", "knn_acc": "#ea580c", "ncc_acc": "#16a34a"}
EXTRA = ("#7c3aed", "#db2777", "#0891b2", "#ca8a04")
_RC = {
    "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
    "axes.titlelocation": "left", "axes.labelsize": 9, "axes.edgecolor": "#9ca3af", "axes.labelcolor": INK,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": GRID,
    "grid.linewidth": 0.8, "xtick.color": MUTED, "ytick.color": MUTED, "text.color": INK,
    "legend.frameon": False, "legend.fontsize": 8.5, "lines.linewidth": 2.0, "lines.markersize": 4.5,
    "svg.fonttype": "path", "svg.hashsalt": "lamina-report", "hatch.color": "#9ca3af",
    "figure.facecolor": "white", "axes.facecolor": "white",
}


@contextmanager
def _style(n_points: int = 0):
    # Smaller markers when there are many layers, so points do not merge into a band.
    with matplotlib.rc_context(dict(_RC, **({"lines.markersize": 3.0} if n_points > 20 else {}))):
        yield


def render(fig: Figure, fmt: str, alt: str) -> Markup:
    """Inline markup of ``fig``: an ``<svg>`` element (fmt ``svg``) or a data-URI ``<img>`` (fmt ``png``)."""
    with _style():
        if fmt == "png":
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=144, bbox_inches="tight", metadata={"Software": None})
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            return Markup(f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{data}">')
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE: invalid inside HTML
    # Let CSS size the plot (the viewBox keeps its aspect ratio); label it for screen readers.
    svg = re.sub(r'^<svg([^>]*?) width="[^"]*" height="[^"]*"',
                 lambda m: f'<svg class="plot" role="img" aria-label="{escape(alt)}"{m.group(1)}', svg, count=1)
    return Markup(svg)


def _values(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def ticks(layers: list[str], most: int) -> list[int]:
    """Positions to label: all when few; else ``embed`` and every block whose index is a round multiple."""
    n = len(layers)
    if n <= most:
        return list(range(n))
    step = next((s for s in (2, 4, 5, 8, 10, 16, 20, 25, 50, 100) if n / s <= most), int(np.ceil(n / most)))
    out = []
    for i, name in enumerate(layers):
        if name.startswith("blocks.") and name[7:].isdigit():
            k = int(name[7:])
            if k % step == 0 and not (k == 0 and i > 0):  # blocks.0 would crowd the embedding's label
                out.append(i)
        elif i % step == 0:
            out.append(i)
    return out


def label_axis(ax, labels: list[str], pos: list[int] | None = None) -> None:
    """x tick labels that never run together: when any is longer than 3 characters (EfficientNet's
    'head_conv' next to '15'), all stand upright (90 degrees), each one line-height wide."""
    pos = list(range(len(labels))) if pos is None else pos
    if max((len(t) for t in labels), default=0) > 3:
        ax.set_xticks(pos, labels, rotation=90)
    else:
        ax.set_xticks(pos, labels)


def _layer_axis(ax, layers: list[str], most: int = 24) -> None:
    pos = ticks(layers, most)
    label_axis(ax, [cat.short_layer(layers[i]) for i in pos], pos)
    ax.set_xlim(-0.4, len(layers) - 0.6)
    ax.set_xlabel("layer (emb = embedding output, then block index)")
    ax.grid(axis="x", visible=False)


def accuracy_figure(layers, metrics: dict, control: dict | None, chance: float | None) -> Figure:
    """All ``*_acc`` metrics on one axis; the probe's 95% CI as a band; control dashed in the same colour."""
    with _style(len(layers)):
        fig = Figure(figsize=(9.2, 3.9))
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        names = [n for n in cat.ordered(metrics) if cat.is_accuracy(n)]
        extra = iter(EXTRA)
        handles = []
        for name in names:
            color = COLORS.get(name) or next(extra, MUTED)
            y = _values(metrics[name])
            if name == "probe_acc" and all(b in metrics for b in cat.BAND):
                lo, hi = _values(metrics[cat.BAND[0]]), _values(metrics[cat.BAND[1]])
                ax.fill_between(x, lo, hi, color=color, alpha=0.14, linewidth=0)
            ax.plot(x, y, color=color, marker="o", zorder=3)
            handles.append(Line2D([], [], color=color, marker="o", label=cat.label(name)))
            if control and name in control:
                ax.plot(x, _values(control[name]), color=color, linestyle=(0, (4, 2.5)), linewidth=1.5,
                        marker="o", markerfacecolor="white", markersize=3.0, alpha=0.85, zorder=2)
        if any(b in metrics for b in cat.BAND) and "probe_acc" in names:
            handles.append(Patch(color=COLORS["probe_acc"], alpha=0.14, label="probe 95% CI"))
        if control and any(n in control for n in names):
            handles.append(Line2D([], [], color=MUTED, linestyle=(0, (4, 2.5)), linewidth=1.5,
                                  label="random-init control"))
        if chance is not None:
            ax.axhline(chance, color=MUTED, linestyle=":", linewidth=1.2, zorder=1)
            handles.append(Line2D([], [], color=MUTED, linestyle=":", linewidth=1.2,
                                  label=f"majority class ({chance:.3f})"))
        _layer_axis(ax, layers)
        ax.set_ylabel("test accuracy")
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(handles), 4))
        return fig


def metric_figure(name: str, layers, values, control_values=None) -> Figure:
    """One metric per layer, solid; the control dashed grey. Log scale for wide positive ranges."""
    with _style(len(layers)):
        fig = Figure(figsize=(3.9, 2.5))
        ax = fig.add_subplot()
        x = np.arange(len(layers))
        y = _values(values)
        ax.plot(x, y, color=MAIN, marker="o", zorder=3)
        both = y
        if control_values is not None:
            c = _values(control_values)
            ax.plot(x, c, color=CONTROL, linestyle=(0, (4, 2.5)), linewidth=1.5, marker="o",
                    markerfacecolor="white", markersize=3.0, zorder=2)
            both = np.concatenate([y, c])
        finite = both[np.isfinite(both)]
        if name in cat.LOG_SCALE or (finite.size and finite.min() > 0 and finite.max() / finite.min() > 30):
            if finite.size and finite.min() > 0:
                ax.set_yscale("log")
        # The title and reading hint are HTML around the figure: sharper, searchable, never clipped.
        _layer_axis(ax, layers, most=9)
        ax.set_xlabel("layer")
        if not finite.size:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", color=MUTED)
        return fig


def cka_figure(layers, cka, control_cka=None) -> Figure:
    """Layer x layer linear CKA heatmap(s) on a shared 0..1 colour scale; values printed when few layers."""
    panels = [("pretrained", cka)] + ([("random-init control", control_cka)] if control_cka is not None else [])
    n = len(layers)
    side = min(5.0, max(3.4, 0.36 * n + 1.4))
    with _style():
        fig = Figure(figsize=(side * len(panels) + 1.0, side), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f3f4f6")
        pos = ticks(layers, 14)
        labels = [cat.short_layer(layers[i]) for i in pos]
        im = None
        for ax, (title, m) in zip(axes, panels):
            a = _values([x for row in m for x in row]).reshape(n, n)
            im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title)
            label_axis(ax, labels, pos)
            ax.set_yticks(pos, labels)
            ax.grid(False)
            for s in ax.spines.values():
                s.set_visible(False)
            ax.tick_params(length=0)
            if n <= 14:
                for i in range(n):
                    for j in range(n):
                        if np.isfinite(a[i, j]):
                            ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=8 if n <= 7 else 6.5,
                                    color="white" if a[i, j] < 0.6 else INK)
        fig.colorbar(im, ax=list(axes), shrink=0.85, label="linear CKA")
        return fig


def compare_figure(layers_a, layers_b, cka, name_a: str, name_b: str) -> Figure:
    """Cross-model CKA heatmap: rows (y) are run A's layers, columns (x) run B's, both named on the axes."""
    a = _values([x for row in cka for x in row]).reshape(len(layers_a), len(layers_b))
    with _style():
        fig = Figure(figsize=(min(8.0, 0.4 * len(layers_b) + 2.6), min(6.0, 0.34 * len(layers_a) + 1.8)),
                     layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                       aspect="auto")
        pb, pa = ticks(layers_b, 16), ticks(layers_a, 16)
        label_axis(ax, [cat.short_layer(layers_b[i]) for i in pb], pb)
        ax.set_yticks(pa, [cat.short_layer(layers_a[i]) for i in pa])
        ax.set_xlabel(f"columns: {name_b}")
        ax.set_ylabel(f"rows: {name_a}")
        ax.grid(False)
        fig.colorbar(im, ax=ax, shrink=0.85, label="linear CKA")
        return fig


def _imp_values(side: Importance, key: str) -> list:
    if key in ("block_influence", "skip_nmse"):
        return getattr(side, key)
    return side.lm.get(key) or [None] * len(side.blocks)


# one marker per depth method whose removal set is drawn on the importance bars (a causal LM's report)
SET_MARKS = {"perplexity": ("v", "#0891b2"), "block_influence": ("s", "#7c3aed"), "skip_nmse": ("D", "#db2777"),
             "angular": ("^", "#16a34a"), "even": ("o", "#4b5563")}
_ROW = 0.075  # height of one method's row of markers, as a fraction of the panel


def _mark_sets(ax, marks: dict[str, list[int]], xs) -> None:
    """One row of markers per method in a band above the bars, over each block that method would remove.

    The y limits are stretched (in the axis' own scale, so a symlog panel too) until the bars fill only the part
    below the band; the rows sit at fixed heights of the panel, so every panel lines its rows up the same way.
    Each row is one artist with ``gid`` ``remove-<method>``: its x data are the marked blocks' positions."""
    lo, hi = ax.get_ylim()
    tr = ax.yaxis.get_transform()
    a, b = tr.transform(np.array([lo, hi], dtype=float))
    room = 1.0 - _ROW * (len(marks) + 0.3)
    ax.set_ylim(lo, float(tr.inverted().transform(np.array([a + (b - a) / room]))[0]))
    ax.set_yticks([t for t in ax.get_yticks() if lo <= t <= hi])  # no value ticks beside the band of markers
    ax.set_ylim(lo, float(tr.inverted().transform(np.array([a + (b - a) / room]))[0]))  # set_yticks may widen it
    for k, (method, idx) in enumerate(marks.items()):
        shape, color = SET_MARKS.get(method, ("o", MUTED))
        y = 1.0 - _ROW * (k + 0.65)
        ax.plot([-0.6, len(xs) - 0.4], [y, y], color=GRID, linewidth=0.7, transform=ax.get_xaxis_transform(),
                zorder=2)  # a faint guide: which row a marker is on
        ax.plot([xs[i] for i in idx], [y] * len(idx), linestyle="none", marker=shape, markersize=6.5,
                color=color, markeredgecolor="white", markeredgewidth=0.5, transform=ax.get_xaxis_transform(),
                clip_on=False, zorder=5, gid=f"remove-{method}")


def importance_figure(main: Importance, control: Importance | None = None,
                      marks: dict[str, list[int]] | None = None) -> Figure:
    """Block Influence and skip nMSE bars per block; blocks that cannot be skipped hatched and labelled.

    ``marks``: {depth method: indices into ``main.blocks`` it would remove}; each method gets a row of markers
    above the bars of every panel, over the blocks it removes, and a legend entry, so where methods disagree
    shows at a glance."""
    marks = {m: list(v) for m, v in (marks or {}).items() if v}
    n = len(main.blocks)
    ctrl = control
    panels = [("block_influence", "#7c3aed"), ("skip_nmse", "#db2777")]
    if "perplexity_change" in main.lm:  # a causal LM: the perplexity change when skipped, lower is better
        panels.append(("perplexity_change", "#0891b2"))
    with _style():
        fig = Figure(figsize=(4.6 * len(panels), 3.3 + 0.22 * len(marks)), layout="constrained")
        axes = fig.subplots(1, len(panels))
        x = np.arange(n)
        width = 0.4 if control is not None else 0.7
        for ax, (key, color) in zip(axes, panels):
            y = _values(_imp_values(main, key))
            finite = y[np.isfinite(y)]
            top = float(finite.max()) if finite.size else 1.0
            # a perplexity change may be negative (the block's removal helps); the random-init control's
            # perplexity is of another scale (about the vocabulary size), so that panel shows the model alone
            low = min(0.0, float(finite.min()) if finite.size else 0.0)
            control = ctrl if key != "perplexity_change" else None
            if control is not None:
                c = _values(_imp_values(control, key))
                cf = c[np.isfinite(c)]
                top = max(top, float(cf.max()) if cf.size else 0.0)
            top = top or 1.0
            off = -width / 2 if control is not None else 0.0
            ax.bar(x + off, np.nan_to_num(y), width, color=color, zorder=3)
            if control is not None:
                ax.bar(x + width / 2, np.nan_to_num(c), width, facecolor="white", edgecolor=CONTROL,
                       linestyle=(0, (3, 2)), linewidth=1.2, zorder=3)
            for i in range(n):
                if not main.skippable[i]:
                    ax.bar(i, top * 1.08, 0.86, facecolor="#f3f4f6", edgecolor="#9ca3af", hatch="///",
                           linewidth=0, zorder=1)
                    ax.text(i, top * 0.54, "not skippable", rotation=90, ha="center", va="center",
                            fontsize=7.5, color=MUTED, zorder=4,
                            bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none"))
                elif np.isfinite(y[i]):
                    if n <= 16:
                        ax.text(i + off, y[i] + top * 0.015, f"{y[i]:.3g}", ha="center", va="bottom",
                                fontsize=6.5, color=INK, zorder=4)
                else:
                    ax.text(i + off, top * 0.015, "n/a", ha="center", va="bottom", fontsize=7, color=MUTED)
            ax.set_ylim(low * 1.12, top * 1.12)
            mid = float(np.median(np.abs(finite))) if finite.size else 0.0
            if key == "perplexity_change" and mid > 0 and top > 100 * mid:
                # one block (often the first) can raise perplexity 1000x more than the rest: a symmetric log
                # axis, linear within the typical change, keeps every other bar readable
                ax.set_yscale("symlog", linthresh=mid)
                ax.set_ylim(low * 2 if low < 0 else 0, top * 2)
            ax.set_title(cat.label(key))
            ax.text(1.0, 1.02, cat.hint(key), transform=ax.transAxes, ha="right", va="bottom", fontsize=7.5,
                    color=MUTED)
            pos = ticks(main.blocks, 16)
            label_axis(ax, [cat.short_layer(main.blocks[i]) for i in pos], pos)
            ax.set_xlim(-0.6, n - 0.4)
            ax.set_xlabel("block")
            ax.grid(axis="x", visible=False)
            if marks:
                _mark_sets(ax, marks, x)  # on the block, not on one of its two bars
        handles = [Patch(color="#7c3aed", label="pretrained (Block Influence)"),
                   Patch(color="#db2777", label="pretrained (skip nMSE)")]
        if len(panels) > 2:
            handles.append(Patch(color="#0891b2", label="pretrained (perplexity change)"))
        control = ctrl
        if control is not None:
            handles.append(Patch(facecolor="white", edgecolor=CONTROL, linestyle=(0, (3, 2)),
                                 label="random-init control"))
        if not all(main.skippable):
            handles.append(Patch(facecolor="#f3f4f6", edgecolor="#9ca3af", hatch="///", label="not skippable"))
        for m, idx in marks.items():
            shape, color = SET_MARKS.get(m, ("o", MUTED))
            handles.append(Line2D([], [], linestyle="none", marker=shape, markersize=6.5, color=color,
                                  markeredgecolor="white", label=f"--method {m} removes ({len(idx)})"))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5))
        return fig
