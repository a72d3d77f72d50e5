"""The report's section for ``RUN/transfer.json``: frozen-backbone heads against fine-tuning.

One figure, four panels: test accuracy against trainable parameters and
against training time (each head a point with its 95% interval; fine-tuning,
when transfer ran with ``--task``, as a reference point), the mix head's
learned weight per layer, and how many of the select head's kept features
come from each layer. A table lists every head's numbers.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from . import _context as ctx
from . import _plots as plots

_ORDER = ("last", "best", "mix", "select", "side")


def transfer_section(d: dict, fmt: str) -> dict:
    heads = {k: d["heads"][k] for k in sorted(d.get("heads", {}), key=lambda h: (_ORDER + (h,)).index(h))}
    ref = d.get("reference") or {}
    split = d.get("split") or {}
    info = [("model", (d.get("model") or {}).get("name")), ("data", (d.get("data") or {}).get("name")),
            ("rows", f"{split.get('source')}: {ctx.fmt(d.get('split_sizes'))}"
                     + (f" (the task of {split.get('task')})" if split.get("source") == "task" else "")),
            ("pooling", d.get("pooling"))]
    if ref:
        info.append(("fine-tuning (same test rows)", f"{ref.get('mode')}: accuracy {ctx.fmt(ref.get('accuracy'))}, "
                     f"{ctx.fmt(ref.get('trainable_parameters'))} trainable parameters, "
                     f"{ctx.fmt(ref.get('seconds'))} s"))
    cols = ["head", "test accuracy", "95% interval", "trainable parameters", "training s", "peak memory MiB",
            "layers read", "deepest block", "deployed parameters"]
    rows = []
    for h, r in heads.items():
        t = r["test"]
        layers = r["layers"]
        rows.append([h, ctx.fmt(t["accuracy"]), f"{ctx.fmt(t['ci_low'])}–{ctx.fmt(t['ci_high'])}",
                     ctx.fmt(r["trainable_parameters"]), ctx.fmt(r["seconds"]),
                     ctx.fmt(r["peak_memory_bytes"] / 2 ** 20),
                     (layers[0] if len(layers) == 1 else f"{len(layers)} ({layers[0]} … {layers[-1]})")
                     + (f", pooled {r['pooling']}" if r.get("pooling") and r["pooling"] != d.get("pooling") else ""),
                     f"{r['deepest_block']} of {r['n_blocks']}", ctx.fmt(r.get("deployed_parameters"))])
    fig = plots.render(_figure(heads, ref), fmt, "frozen-backbone heads") if heads else None
    return {"rows": [(k, v if isinstance(v, str) else ctx.fmt(v)) for k, v in info],
            "tables": [{"title": "Heads", "columns": cols, "rows": rows}], "figure": fig}


def _figure(heads: dict, ref: dict) -> Figure:
    with plots._style():
        fig = Figure(figsize=(9.4, 6.2), layout="constrained")
        (a, b), (c, e) = fig.subplots(2, 2)
        colors = dict(zip(_ORDER, ("#9ca3af",) + plots.EXTRA))
        for ax, key, label in ((a, "trainable_parameters", "trainable parameters"), (b, "seconds", "training time, s")):
            for h, r in heads.items():
                t = r["test"]
                x = max(float(r[key]), 1e-3)
                ax.errorbar([x], [t["accuracy"]], yerr=[[t["accuracy"] - t["ci_low"]], [t["ci_high"] - t["accuracy"]]],
                            fmt="o", color=colors.get(h, plots.MAIN), label=h, capsize=3, zorder=3)
            if ref.get(key if key != "seconds" else "seconds") is not None and ref.get("accuracy") is not None:
                ax.scatter([max(float(ref[key]), 1e-3)], [ref["accuracy"]], marker="*", s=140, color="#111827",
                           label=f"fine-tuning ({ref.get('mode')})", zorder=4)
            ax.set_xscale("log")
            ax.set_xlabel(label + " (log)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"Accuracy vs {label.split(',')[0]}")
        a.legend(loc="lower right", fontsize=8)
        w = (heads.get("mix") or {}).get("mix_weights")
        if w:
            c.bar(range(len(w)), list(w.values()), color=colors["mix"], zorder=3)
            c.set_xticks(range(len(w)), list(w), rotation=60, fontsize=7)
            c.axhline(1 / len(w), color="#6b7280", linestyle=":", label="equal (start)")
            c.legend(fontsize=8)
        c.set_title("mix: learned weight per layer")
        k = (heads.get("select") or {}).get("kept_per_layer")
        if k:
            e.bar(range(len(k)), list(k.values()), color=colors["select"], zorder=3)
            e.set_xticks(range(len(k)), list(k), rotation=60, fontsize=7)
            sel = heads["select"]
            ways = sel.get("kept_per_pooling")
            e.set_title(f"select: where the {sel.get('features_kept')} kept features (of "
                        f"{sel.get('features_total')}) come from\nkeep {sel.get('keep')}, group lasso "
                        f"{sel.get('group_lasso')}" + (" (chosen on validation)" if sel.get("chosen_on_validation")
                                                       else "")
                        + ("; per pooling: " + ", ".join(f"{w} {n}" for w, n in ways.items()) if ways else ""),
                        fontsize=9)
        else:
            e.set_title("select: not trained")
        return fig
