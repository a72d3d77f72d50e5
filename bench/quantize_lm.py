"""SmolLM2-135M and ``lamina quantize``: a perplexity-budget search, and one format for every Linear.

Parts (each re-runnable alone with ``--part``; results/quantize_lm.json is rewritten after each, and a part this
run skipped is kept from the last file with its own command):

- ``formats``: every Linear of SmolLM2 in one format (float32, bf16, torchao int8dyn): test perplexity on
  ``--blocks`` test blocks of 128 tokens of the bundled debates text, and latency of one forward (batch 1 and 4,
  one thread, interleaved medians after a warm-up). Not a search.
- ``search``: ``lamina.quantize("smollm2", QuantizeConfig(data="debates", max_drop=..., ...))``, the Python form
  of ``lamina quantize smollm2 --data debates --limit 400 --seq-len 64 --calibration-samples 8 --formats
  int8fused,bf16 --max-drop 0.02 --out Q``: validation perplexity before / after, layers per format, the cost of
  the sensitivity pass (211 layers x formats forwards) and of the bisection. ``--q Q`` reads an existing OUT of
  that command instead of running it (the plan records its own cost).
- ``speed``: the searched model (``lamina.load_model(Q)``, the way a user reloads it) against float32 and all-bf16:
  test perplexity on the task's test blocks (what ``lamina bench Q`` reports) and latency of one forward at batch
  1 and 8 blocks of ``--seq-len`` tokens, one thread, A/B/C interleaved (order reversed every round), medians and
  min-max of ``--repeats`` after one warm-up; ``os.getloadavg()`` recorded.

- ``sensitivity``: the cost of quantize's sensitivity pass by its two routes on the same calibration batches,
  interleaved (naive, cached, cached, naive, ...): "naive" runs the whole model per (layer, format), "cached" runs
  blocks k..N-1 from the float model's cached block outputs (:mod:`lamina.quantize._cached`). ``--sens-model``
  (smollm2, calibrated as the search is; or a task-record folder such as the MiniLM teacher), ``--sens-layers K``
  (score K Linears spread evenly over the model, head included, and extrapolate to all of them as setup +
  per-layer time x layers; 0 = every Linear, nothing extrapolated), ``--sens-rounds``. The scores of both
  routes are compared (max relative difference). Stored under ``sensitivity[--sens-label]`` beside the targets
  (not a target).

    PYTHONPATH=. python bench/quantize_lm.py --part search --part speed --work /tmp/qlm

Writes bench/results/quantize_lm.json (top-level ``targets``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine, save_result  # noqa: E402

PARTS = ("formats", "search", "speed", "sensitivity")
NAME = "quantize_lm"


def _interleaved(models: dict, batch: dict, repeats: int) -> dict:
    """{name: median / min / max ms and speed-up against the first} of one forward, order reversed every round."""
    times = {k: [] for k in models}
    with torch.inference_mode():
        for lm in models.values():
            lm.forward(batch)  # warm-up
        for r in range(repeats):
            for k in (list(models) if r % 2 == 0 else list(reversed(list(models)))):
                t = time.perf_counter()
                models[k].forward(batch)
                times[k].append(1000 * (time.perf_counter() - t))
    first = statistics.median(times[next(iter(models))])
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                "speedup": first / statistics.median(v), "repeats": len(v)} for k, v in times.items()}


def part_formats(args) -> dict:
    import lamina
    from lamina.lm_task import LMTaskSpec
    from lamina.quantize.formats import linear_names
    from lamina.quantize.quantize import quantized_copy
    fp = lamina.load_model("smollm2")
    task = LMTaskSpec(data="debates", seq_len=128).prepare(fp)
    rows = task.split["test"][: args.blocks]
    names = linear_names(fp.module)
    models = {"fp32": fp, "all_bf16": quantized_copy(fp, {n: "bf16" for n in names}),
              "all_int8dyn": quantized_copy(fp, {n: "int8dyn" for n in names})}
    ppl = {k: task.evaluate(lm, rows, 4)["perplexity"] for k, lm in models.items()}
    lat = {f"b{bs}_t1": _interleaved(models, task.batch(fp, rows[:bs]), args.repeats) for bs in (1, 4)}
    return {"linear_layers": len(names), "test_blocks": int(len(rows)), "seq_len": 128, "data": "debates",
            "perplexity": ppl, "latency_ms": lat}


def _search_config(args, out: Path):
    from lamina.quantize import QuantizeConfig
    return QuantizeConfig(out=str(out), data="debates", limit=args.limit, seq_len=args.seq_len,
                          calibration_samples=args.calibration_blocks, formats=args.formats,
                          max_drop=args.max_drop, overwrite=True)


def part_search(args) -> dict:
    from lamina.quantize import quantize
    q = Path(args.q) if args.q else Path(args.work) / "q"
    wall = None
    if not args.q:
        t = time.perf_counter()
        quantize("smollm2", _search_config(args, q))
        wall = time.perf_counter() - t
    plan = json.loads((q / "quant_plan.json").read_text())
    return {"q": str(q), "wall_s": wall, "budget": plan["budget"], "max_drop_unit": plan["max_drop_unit"],
            "formats": plan["formats"], "task": plan["task"], "calibration": plan["calibration"],
            "count": plan["count"], "of": plan["of"], "by_format": plan["by_format"],
            "layers_float": sum(not e["quantized"] for e in plan["layers"]),
            "bf16_blocks": len(plan["bf16_blocks"]), "validation": plan["validation"], "search": plan["search"],
            "cost": plan.get("cost"), "reload_check": plan["reload_check"]}


def part_speed(args, search: dict) -> dict:
    import lamina
    from lamina.quantize.formats import linear_names
    from lamina.quantize.quantize import quantized_copy
    from lamina.task import make_task, read_task
    q = search["q"]
    fp = lamina.load_model("smollm2")
    qm = lamina.load_model(q)
    task = make_task(read_task(q), fp)
    names = linear_names(fp.module)
    models = {"fp32": fp, "searched": qm, "all_bf16": quantized_copy(fp, {n: "bf16" for n in names})}
    test = task.split["test"][: args.test_blocks]
    ppl = {k: task.evaluate(lm, test, 8)["perplexity"] for k, lm in models.items()}
    lat = {f"b{bs}_t1": _interleaved(models, task.batch(fp, test[:bs]), args.repeats) for bs in (1, 8)}
    return {"test_blocks": int(len(test)), "seq_len": task.spec.seq_len, "perplexity_test": ppl,
            "perplexity_test_increase": {k: v / ppl["fp32"] - 1 for k, v in ppl.items()}, "latency_ms": lat,
            "load_average_after": list(os.getloadavg())}


def _spread(names: list[str], k: int) -> list[str]:
    """k names evenly spaced over ``names`` (first and last included); every name when k is 0 or too large."""
    if k <= 0 or k >= len(names):
        return list(names)
    return [names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)] if k > 1 else [names[-1]]


def part_sensitivity(args) -> dict:
    import lamina
    from lamina.quantize import QuantizeConfig, sensitivity
    from lamina.quantize.formats import linear_names, parse_formats
    from lamina.quantize.quantize import _calibration
    model = args.sens_model
    lm = lamina.load_model(model)
    cfg = QuantizeConfig(out=str(Path(args.work) / "unused"), data=args.sens_data, limit=args.limit,
                         seq_len=args.seq_len, calibration_samples=args.calibration_blocks,
                         formats=args.sens_formats, fraction=1.0)
    formats = parse_formats(cfg.formats)
    batches, _ = _calibration(lm, model, cfg)
    names = linear_names(lm.module)
    subset = _spread(names, args.sens_layers)
    runs = {"naive": [], "cached": []}
    scores = {}
    for r in range(args.sens_rounds):
        for route in (("naive", "cached") if r % 2 == 0 else ("cached", "naive")):
            cost: dict = {}
            t, c = time.perf_counter(), time.process_time()
            scores[route] = sensitivity(lm, batches, formats, route=route, cost=cost, layers=subset)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            runs[route].append({"wall_s": wall, "cpu_s": cpu, "setup_s": cost["setup_s"],
                                "layers_s": cost["layers_s"], "load_average": list(os.getloadavg())})
            print(f"sensitivity {route} round {r}: {wall:.1f} s ({len(subset)} layers)", flush=True)
    diff = max(abs(scores["cached"][n][f] - scores["naive"][n][f]) / max(abs(scores["naive"][n][f]), 1e-30)
               for n in subset for f in formats)
    out = {"model": str(model), "linear_layers": len(names), "layers_timed": len(subset), "formats": list(formats),
           "blocks": cost["blocks"], "calibration_batches": len(batches),
           "calibration_shape": {k: list(v.shape) for k, v in batches[0].items()},
           "threads": torch.get_num_threads(), "cache_bytes": cost["cache_bytes"] if cost["route"].startswith(
               "cached") else None, "max_relative_score_difference": diff, "rounds": runs}
    for route, rs in runs.items():
        q = statistics.quantiles([x["wall_s"] for x in rs], n=4) if len(rs) > 1 else [rs[0]["wall_s"]] * 3
        setup = statistics.median(x["setup_s"] for x in rs)
        per_layer = statistics.median(x["layers_s"] for x in rs) / len(subset)
        out[route] = {"median_s": statistics.median(x["wall_s"] for x in rs), "quartiles_s": [q[0], q[2]],
                      "median_cpu_s": statistics.median(x["cpu_s"] for x in rs),
                      "setup_s": setup, "per_layer_s": per_layer,
                      "all_layers_s": setup + per_layer * len(names),
                      "all_layers_s_is": "measured" if len(subset) == len(names) else
                      f"extrapolated: setup + median per-layer time of {len(subset)} evenly spread layers x "
                      f"{len(names)}"}
    for what in ("wall_s", "cpu_s"):  # CPU time: the work itself, less exposed to a loaded machine's waits
        pairs = [a[what] / b[what] for a, b in zip(runs["naive"], runs["cached"])]
        out[f"speedup_sampled_{what[:-2]}"] = {"median": statistics.median(pairs), "min": min(pairs),
                                              "max": max(pairs), "per_round": pairs}
    out["speedup_all_layers"] = out["naive"]["all_layers_s"] / out["cached"]["all_layers_s"]
    return out


def _targets(res: dict) -> dict:
    t = {}
    s, sp = res.get("search"), res.get("speed")
    if s:
        d = s["validation"]["drop"]
        t["smollm2_validation_ppl_increase"] = {"value": d, "goal": f"<= {s['budget']['max_drop']} (the --max-drop "
                                                "budget: relative validation perplexity increase)",
                                                "met": d <= s["budget"]["max_drop"]}
    if sp:
        inc = sp["perplexity_test_increase"]["searched"]
        t["smollm2_test_ppl_increase"] = {"value": inc, "goal": "<= 0.02 on the test blocks (not searched on)",
                                          "met": inc <= 0.02}
        for b in ("b1_t1", "b8_t1"):
            v = sp["latency_ms"][b]["searched"]["speedup"]
            t[f"smollm2_searched_speedup_{b}"] = {"value": v, "goal": "> 1 against float32 (one thread)",
                                                  "met": v > 1}
    return t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", action="append", choices=PARTS, help="parts to run (default: formats, search, speed)")
    ap.add_argument("--blocks", type=int, default=16, help="formats: test blocks of 128 tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/qlm")
    ap.add_argument("--q", default=None, help="search: an existing OUT of the quantize command instead of a run")
    ap.add_argument("--limit", type=int, default=400, help="search: debate documents read")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--calibration-blocks", type=int, default=8)
    ap.add_argument("--formats", default="int8fused,bf16")
    ap.add_argument("--max-drop", type=float, default=0.02)
    ap.add_argument("--test-blocks", type=int, default=32, help="speed: test blocks for perplexity")
    ap.add_argument("--sens-model", default="smollm2", help="sensitivity: the model (smollm2, or a task-record "
                                                             "folder)")
    ap.add_argument("--sens-label", default="smollm2", help="sensitivity: key under `sensitivity` in the result")
    ap.add_argument("--sens-data", default="debates", help="sensitivity: --data when the model has no task record")
    ap.add_argument("--sens-formats", default="int8fused")
    ap.add_argument("--sens-layers", type=int, default=0, help="sensitivity: Linears timed (0 = all)")
    ap.add_argument("--sens-rounds", type=int, default=4, help="sensitivity: interleaved rounds per route")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    parts = args.part or list(PARTS[:3])  # sensitivity only when asked: it is a cost study, not a result
    torch.set_num_threads(args.threads)
    path = HERE / "results" / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "formats" not in old and "perplexity" in old:  # the file before parts: its one measurement is `formats`
        old = {"formats": {k: old[k] for k in ("command", "machine", "load_average_end", "linear_layers",
                                               "test_blocks", "seq_len", "data", "perplexity", "latency_ms")
                           if k in old}}
    res = {k: v for k, v in old.items() if k in PARTS}
    cmd = "PYTHONPATH=. python bench/quantize_lm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for p in PARTS:
        if p not in parts:
            continue
        start = machine()
        t = time.perf_counter()
        if p == "sensitivity":  # one entry per model, beside the targets
            out = part_sensitivity(args)
            res[p] = {**old.get(p, {}), args.sens_label: {
                "command": cmd, "machine": start, "load_average_end": list(os.getloadavg()),
                "part_wall_s": time.perf_counter() - t, **out}}
            save_result(NAME, res)
            print(p, json.dumps({k: out[k] for k in ("speedup_sampled_wall", "speedup_sampled_cpu",
                                                     "speedup_all_layers")}), flush=True)
            continue
        out = part_formats(args) if p == "formats" else part_search(args) if p == "search" else \
            part_speed(args, res["search"])
        res[p] = {"command": cmd, "machine": start, "load_average_end": list(os.getloadavg()),
                  "part_wall_s": time.perf_counter() - t, **out}
        res["targets"] = _targets(res)
        save_result(NAME, res)  # partial results as each part ends
        print(p, json.dumps(out.get("perplexity") or out.get("validation") or out.get("perplexity_test")),
              flush=True)
    return res


if __name__ == "__main__":
    main()
