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

PARTS = ("formats", "search", "speed")
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
    ap.add_argument("--part", action="append", choices=PARTS, help="parts to run (default: all)")
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
    args = ap.parse_args(argv)
    parts = args.part or list(PARTS)
    torch.set_num_threads(1)
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
