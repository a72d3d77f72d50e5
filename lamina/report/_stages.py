"""The report's sections for later stages: fine-tuning, compression plan, distillation, bench.

They are read from the run folder and from any folders named with
``--stages`` (the OUT folders of ``lamina finetune`` / ``prune`` / ``distill`` /
``bench``). ``finetune.json``, ``distill.json`` and ``bench.json`` get their
own summary table and figure (measured speed-up next to the parameter and
FLOP ratios; loss and validation curves); other files are shown as flattened
key/value rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import _catalog as cat
from . import _context as ctx
from . import _plots as plots

# (file, section id, heading), in pipeline order
STAGE_FILES = (("finetune.json", "finetune", "Fine-tuning"), ("plan.json", "plan", "Compression plan"),
               ("distill.json", "distill", "Distillation"), ("bench.json", "bench", "Speed and accuracy"),
               ("transfer.json", "transfer", "Frozen-backbone heads"),
               ("elastic.json", "elastic", "Elastic family"))


def stage_paths(run: Path, extra) -> list[tuple[Path, str, str]]:
    """(file, id, heading) of every stage file in ``run`` and in the ``extra`` folders / files."""
    found = []
    for base in [run] + [Path(e) for e in extra or ()]:
        for name, sid, heading in STAGE_FILES:
            f = base if base.is_file() and base.name == name else base / name
            if f.is_file() and f not in [x[0] for x in found]:
                found.append((f, sid, heading))
    order = {sid: i for i, (_, sid, _) in enumerate(STAGE_FILES)}
    found.sort(key=lambda x: order[x[1]])
    out, seen = [], {}
    for f, sid, heading in found:
        seen[sid] = seen.get(sid, 0) + 1
        uid = sid if seen[sid] == 1 else f"{sid}-{seen[sid]}"
        out.append((f, uid, heading if f.parent == run else f"{heading}: {f.parent.name}"))
    return out


def section(kind: str, data: dict, fmt: str, points: list[dict] | None = None) -> dict:
    """rows, tables and figure for one stage file (``points``: the run's models, for elastic's comparison).

    A file whose shape the stage's own view does not expect (written by another version, or edited by hand)
    is shown as its plain fields with a note, so one odd file never takes the whole report down.
    """
    try:
        return _section(kind, data, fmt, points)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        rows, tables = ctx.flatten(data) if isinstance(data, dict) else ([("value", ctx.fmt(data))], [])
        note = f"this {kind} file is not in the shape this version draws ({type(e).__name__}: {e}); its fields:"
        return {"rows": [("note", note)] + rows, "tables": tables, "figure": None}


def _section(kind: str, data: dict, fmt: str, points: list[dict] | None = None) -> dict:
    if kind == "elastic":
        from ._elastic import elastic_section
        return elastic_section(data, fmt, points)
    if kind == "transfer" and isinstance(data, dict) and "heads" in data:
        from ._transfer import transfer_section
        return transfer_section(data, fmt)
    if kind == "bench" and isinstance(data, dict) and "models" in data:
        return _bench(data, fmt)
    if kind in ("distill", "finetune") and isinstance(data, dict) and "history" in data:
        return _training(kind, data, fmt)
    if kind == "plan" and isinstance(data, dict) and "lamina_plan" in data:
        return _plan(data, fmt)
    rows, tables = ctx.flatten(data) if isinstance(data, dict) else ([("value", ctx.fmt(data))], [])
    return {"rows": rows, "tables": tables, "figure": None}


def _bench(d: dict, fmt: str) -> dict:
    models = d["models"]
    bss = list(models[0]["latency"])
    # a language model is judged by perplexity (lower is better), and by decode speed beside prefill
    lm = models[0].get("metric") == "perplexity"
    quality = ["perplexity (lower is better)", "perplexity ratio"] if lm else ["accuracy", "accuracy kept"]
    decode = all("decode" in m for m in models)
    cols = ["model", "parameters", "parameter ratio", "FLOPs / sample", "FLOP ratio", "ideal speed-up"] \
        + [f"speed-up @{b}" for b in bss] + [f"efficiency @{bss[-1]}"] + quality \
        + (["decode tokens/s", "decode speed-up"] if decode else [])
    rows = []
    for m in models:
        v = m["vs_first"]
        eff = (v.get("speedup_efficiency") or {}).get(bss[-1])
        q = [m.get("perplexity"), v.get("perplexity_ratio")] if lm else [m.get("accuracy"), v.get("accuracy_retained")]
        rows.append([Path(str(m["model"])).name or m["model"], ctx.fmt(m["parameters"]), ctx.fmt(v["parameter_ratio"]),
                     ctx.fmt(float(m["flops_per_sample"])), ctx.fmt(v["flop_ratio"]), ctx.fmt(v["ideal_speedup"])]
                    + [ctx.fmt(v["speedup"][b]) for b in bss] + [ctx.fmt(eff)] + [ctx.fmt(x) for x in q]
                    + ([ctx.fmt(m["decode"]["tokens_per_s"]), ctx.fmt(v.get("decode_speedup"))] if decode else []))
    lat = [[Path(str(m["model"])).name or m["model"]] + [
        f"{ctx.fmt(m['latency'][b]['median_ms'])} ({ctx.fmt(m['latency'][b]['p25_ms'])}–"
        f"{ctx.fmt(m['latency'][b]['p75_ms'])})" for b in bss] for m in models]
    mach = d.get("machine", {})
    info = [("task", f"{d['task'].get('data')} ({d.get('test_rows')} test rows)"),
            ("timing", f"{d['settings'].get('warmup')} warm-up calls, {d['settings'].get('repeats')} interleaved "
                       f"repeats per batch size, medians"),
            ("machine", f"{mach.get('processor')}, {mach.get('cpu_count')} CPUs, {mach.get('threads')} torch "
                        f"thread(s), torch {mach.get('torch')}")]
    fig = _bench_figure(models, bss)
    return {"rows": info, "figure": plots.render(fig, fmt, "measured vs ideal speed-up"),
            "tables": [{"title": "Ratios to the first model", "columns": cols, "rows": rows},
                       {"title": "Latency, ms: median (quartiles)", "columns": ["model"] + [f"batch {b}" for b in bss],
                        "rows": lat}]}


def _bench_figure(models: list, bss: list) -> Figure:
    with plots._style():
        fig = Figure(figsize=(8.6, 3.1), layout="constrained")
        ax = fig.subplots()
        names = [Path(str(m["model"])).name or str(m["model"]) for m in models]
        x = np.arange(len(models))
        w = 0.8 / (len(bss) + 2)
        series = [("ideal (FLOPs)", [m["vs_first"]["ideal_speedup"] or 0 for m in models], "#9ca3af"),
                  ("1 / parameter ratio", [1 / m["vs_first"]["parameter_ratio"] for m in models], "#d1d5db")]
        series += [(f"measured @{b}", [m["vs_first"]["speedup"][b] for m in models], c)
                   for b, c in zip(bss, ("#93c5fd", "#3b82f6", "#1d4ed8", "#1e3a8a"))]
        for i, (label, ys, color) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * w, ys, w, label=label, color=color, zorder=3)
        ax.axhline(1.0, color=plots.MUTED, linewidth=0.8, zorder=2)
        ax.set_xticks(x, names)  # a few models, wide bars: names fit side by side
        ax.set_ylabel("× the first model")
        ax.set_title("Speed-up: measured next to the FLOP and parameter ratios")
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper left", ncol=3)
        return fig


def _training(kind: str, d: dict, fmt: str) -> dict:
    h = d["history"]
    ep = h.get("epochs") or []
    test = d.get("test") or {}
    lm = d.get("metric") == "perplexity"  # a language model: perplexity first, accuracy is next-token accuracy
    info = ([("test perplexity (lower is better)", ctx.fmt(test.get("perplexity")))] if lm else []) + [
            ("test next-token accuracy" if lm else "test accuracy", ctx.fmt(test.get("accuracy"))),
            ("test rows", ctx.fmt(test.get("n"))),
            ("best epoch", ctx.fmt(h.get("best_epoch"))), ("best validation accuracy", ctx.fmt(h.get("best_val_accuracy"))),
            ("stopped early", _stopped(h, d)), ("ranks", ctx.fmt(h.get("world_size")))]
    if kind == "distill":
        p = d.get("parameters") or {}
        info = [("teacher", d.get("teacher")), ("student", d.get("student")),
                ("teacher test perplexity" if lm else "teacher test accuracy",
                 ctx.fmt((d.get("teacher_test") or {}).get("perplexity" if lm else "accuracy"))),
                ("accuracy retained", ctx.fmt(d.get("accuracy_retained"))),
                ("parameters", f"{ctx.fmt(p.get('student'))} of {ctx.fmt(p.get('teacher'))}"),
                ("layer map", f"{d.get('layer_map_source')}: {ctx.fmt(d.get('layer_map'))}"),
                ("loss weights", ctx.fmt(d.get("weights")))] + info
    else:
        info = [("model", (d.get("model") or {}).get("name")), ("mode", d.get("mode")),
                ("trained parameters", f"{ctx.fmt(d.get('trainable_parameters'))} of {ctx.fmt(d.get('parameters'))}"),
                ("data", (d.get("task") or {}).get("data")), ("split", _split(d.get("split_sizes")))] + info
    parts = list(dict.fromkeys(k for e in ep for k in e["train"]))
    table = {"title": "Per epoch", "columns": ["epoch"] + [f"train {k}" for k in parts] + ["val accuracy", "seconds"],
             "rows": [[ctx.fmt(e["epoch"])] + [ctx.fmt(e["train"].get(k)) for k in parts]
                      + [ctx.fmt(e["val_accuracy"]), ctx.fmt(e["seconds"])] for e in ep]}
    fig = None
    if ep:
        with plots._style():
            f = Figure(figsize=(8.6, 2.9), layout="constrained")
            a, b = f.subplots(1, 2)
            xs = [e["epoch"] for e in ep]
            for k, c in zip(parts, plots.EXTRA + ("#2563eb", "#16a34a")):
                a.plot(xs, [e["train"][k] for e in ep], marker="o", label=k, color=c)
            a.set_title("Training losses")
            a.set_xlabel("epoch")
            a.legend()
            b.plot(xs, [e["val_accuracy"] for e in ep], marker="o", color=plots.MAIN, label="validation")
            if test.get("accuracy") is not None:
                b.axhline(test["accuracy"], color=plots.MUTED, linestyle=":", label="test (best epoch)")
            t = (d.get("teacher_test") or {}).get("accuracy")
            if t is not None:
                b.axhline(t, color="#ea580c", linestyle="--", label="teacher test")
            b.set_title("Accuracy")
            b.set_xlabel("epoch")
            b.legend()
            for ax in (a, b):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            fig = plots.render(f, fmt, f"{kind} curves")
    return {"rows": [(k, v if isinstance(v, str) else ctx.fmt(v)) for k, v in info], "tables": [table],
            "figure": fig}


def _split(sizes) -> str:
    """{'train': 960, 'val': 120, 'test': 240} -> 'train 960 · validation 120 · test 240'."""
    if not isinstance(sizes, dict):
        return ctx.fmt(sizes)
    names = {"train": "train", "val": "validation", "test": "test"}
    return " · ".join(f"{names.get(k, k)} {ctx.fmt(v)}" for k, v in sizes.items())


def _stopped(h: dict, d: dict) -> str:
    ran = len(h.get("epochs") or [])
    asked = (d.get("config") or {}).get("epochs")
    if h.get("stopped_early"):
        return f"yes: {ran} of {ctx.fmt(asked)} epochs ran (no validation gain for --patience epochs)"
    return f"no: {ran} of {ctx.fmt(asked)} epochs ran" if asked is not None else "no"


_PARTS = (("ffn", "FFN channels"), ("heads", "attention heads"), ("channels", "expanded CNN channels"))


def _plan(d: dict, fmt: str) -> dict:
    """The plan as a reader wants it: what went, by which rule, with the scores that decided it."""
    model = d.get("model") or {}
    res = d.get("result") or {}
    depth = d.get("depth") or {}
    info = [("pruned model", f"{model.get('name')} (fingerprint {str(model.get('fingerprint'))[:12]})")]
    if res.get("scores_computed_by") == "prune":
        info.append(("importance from", "measured by prune on the model's own training rows (no --scores given)"))
    elif res.get("scores"):
        info.append(("importance from", f"{res['scores']} (lamina analyze)"))
    if res:
        before, after = res.get("parameters_before"), res.get("parameters_after")
        pct = f" (−{100 * (1 - after / before):.1f}%)" if before and after is not None else ""
        info.append(("parameters", f"{ctx.fmt(before)} → {ctx.fmt(after)}{pct}"))
        info.append(("blocks", f"{ctx.fmt(res.get('blocks_before'))} → {ctx.fmt(res.get('blocks_after'))}"))
    tables, figure = [], None
    if depth:
        removed = list(depth.get("remove") or [])
        info.append(("blocks removed", ", ".join(removed) if removed else "none"))
        budget = f"--drop-blocks {depth['fraction']}" if depth.get("fraction") is not None else \
            f"--target-params {ctx.fmt(depth.get('target_params'))}"
        info.append(("rule", f"{depth.get('method')} ({budget}): {depth.get('definition')}"))
        scores = depth.get("scores") or {}
        skippable = depth.get("skippable") or {}
        rounds = depth.get("rounds")
        rows = []
        for b in skippable or scores:
            v = scores.get(b)
            verdict = "removed" if b in removed else ("kept" if skippable.get(b, True) else "kept: not skippable")
            rows.append([b, ctx.fmt(v) if v is not None else "–", verdict])
        if rows:
            tables.append({"title": f"Block scores that decided it ({depth.get('method')}; lowest go first)",
                           "columns": ["block", "score", "decision"], "rows": rows})
        if rounds:
            tables.append({"title": "Iterative rounds (skip nMSE re-measured after each removal)",
                           "columns": ["round", "removed", "its score"],
                           "rows": [[ctx.fmt(i + 1), r.get("removed"), ctx.fmt(r.get("skip_nmse"))]
                                    for i, r in enumerate(rounds) if isinstance(r, dict)]})
        if any(v is not None for v in scores.values()):
            figure = _plan_figure(scores, removed, model.get("name"), depth.get("method"), fmt)
    for key, label in _PARTS:
        part = d.get(key)
        if part:
            how = "across all blocks ranked together" if part.get("per_layer") else "in every block"
            info.append((label, f"{part.get('fraction'):.0%} removed {how}, by {part.get('importance')}: "
                                f"{part.get('definition')}"))
    if d.get("bn_recalibrated") is not None:
        info.append(("BatchNorm", "running statistics re-estimated on the calibration samples"))
    return {"rows": [(k, v if isinstance(v, str) else ctx.fmt(v)) for k, v in info], "tables": tables,
            "figure": figure}


def _plan_figure(scores: dict, removed: list, name, method, fmt: str):
    names = list(scores)
    vals = [scores[b] if scores[b] is not None else 0.0 for b in names]
    with plots._style(len(names)):
        f = Figure(figsize=(8.6, 2.6), layout="constrained")
        ax = f.subplots()
        colors = ["#dc2626" if b in removed else plots.MAIN for b in names]
        ax.bar(range(len(names)), vals, color=colors, zorder=3)
        plots.label_axis(ax, [cat.short_layer(b) for b in names])
        ax.set_ylabel(cat.label(method) if method in ("skip_nmse", "block_influence") else "score")
        ax.set_title(f"Importance of the model that was pruned ({name}); red: removed")
        ax.grid(axis="x", visible=False)
        return plots.render(f, fmt, f"block importance of {name} that the plan used")
