"""Layer-wise mixed precision on a fine-tuned MiniLM and its 3-of-6 distilled student, against the fp32 teacher.

    PYTHONPATH=. python bench/quantize.py --teacher T --student S --out-work /tmp/qbench [--part NAME ...]

T: a `lamina finetune` OUT of MiniLM on Rotten Tomatoes; S: a `lamina distill` OUT of T pruned to 3 of 6 blocks
(`lamina prune T --drop-blocks 0.5 --out small/`, `lamina distill --teacher T --student small/ --out S`).

Parts (each re-runnable alone with --part; results/quantize.json is rewritten after each, earlier parts kept):
- quantize: `lamina quantize T --max-drop D` (the "mixed" model, saved and reloaded the user's way) and
  `lamina quantize S --fraction 1` (the composed model: pruned + distilled + every Linear in --formats).
- accuracy: test accuracy on T's held-out rows of fp32, all layers in each format, mixed, composed, and at an equal
  count (--compare-count, default half the layers) importance-ranked vs 3 random choices (seeds 0-2); test-logit
  nMSE against fp32 beside it (a finer lens than accuracy on a few hundred rows).
- latency: median of interleaved repeats of one forward (batch 1 and 8, 64 tokens max, one and two threads),
  min-max spread, load average recorded; warm-up calls excluded.
Writes bench/results/quantize.json (top-level ``targets``) and the BENCHMARKS.md "quantize" section.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine, save_result, write_section  # noqa: E402

PARTS = ("quantize", "accuracy", "latency")


def _latency(models: dict, batch: dict, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for lm in models.values():
            lm.forward(batch)  # warm-up
        for r in range(repeats):  # interleaved, order flipped every round: load changes hit every model alike
            for k in (list(models) if r % 2 == 0 else list(reversed(list(models)))):
                t = time.perf_counter()
                models[k].forward(batch)
                times[k].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def _models(args, res: dict, which: str):
    import lamina
    from lamina.quantize.formats import linear_names
    from lamina.quantize.quantize import quantized_copy
    fp = lamina.load_model(args.teacher)
    names = linear_names(fp.module)
    fmt = args.formats.split(",")[0]
    out = {"fp32": fp, f"all_{fmt}": quantized_copy(fp, {n: fmt for n in names}),
           "mixed": lamina.load_model(res["mixed"]["out"])}
    if which == "latency":
        out["student_fp32"] = lamina.load_model(args.student)
        out["composed"] = lamina.load_model(res["composed"]["out"])
        return out
    if fmt != "int8dyn":
        out["all_int8dyn"] = quantized_copy(fp, {n: "int8dyn" for n in names})
    plan = json.loads((Path(res["mixed"]["out"]) / "quant_plan.json").read_text())
    ranked = [e["name"] for e in sorted(plan["layers"], key=lambda e: e["rank"])]
    k = args.compare_count or len(names) // 2
    out[f"importance_{k}"] = quantized_copy(fp, {n: fmt for n in ranked[:k]})
    for s in range(args.seeds):
        out[f"random_{k}_s{s}"] = quantized_copy(fp, {n: fmt for n in random.Random(s).sample(names, k)})
    out["student_fp32"] = lamina.load_model(args.student)
    out["composed"] = lamina.load_model(res["composed"]["out"])
    return out


def part_quantize(args, res):
    from lamina.quantize import QuantizeConfig, quantize
    work = Path(args.out_work)
    t0 = time.perf_counter()
    m = quantize(args.teacher, QuantizeConfig(out=str(work / "mixed"), max_drop=args.max_drop, formats=args.formats,
                                              overwrite=True))
    t1 = time.perf_counter()
    c = quantize(args.student, QuantizeConfig(out=str(work / "composed"), fraction=1.0, formats=args.formats,
                                              overwrite=True))
    res["mixed"] = {"out": m.out, "quantized_layers": len(m.quantized), "of": m.layers,
                    "validation_drop": m.metric_drop, "search": m.plan["search"], "seconds": t1 - t0}
    res["composed"] = {"out": c.out, "quantized_layers": len(c.quantized), "of": c.layers,
                       "seconds": time.perf_counter() - t1}


def part_accuracy(args, res):
    from lamina.quantize.quantize import _run, nmse
    from lamina.task import evaluate, read_task
    models = _models(args, res, "accuracy")
    spec = read_task(args.teacher)
    ds, split = spec.load()
    test = split["test"]
    fp = models["fp32"]
    batches = [fp.batch(ds, test[i:i + 32], spec.max_length) for i in range(0, len(test), 32)]
    ref = _run(fp, batches)
    acc, lnmse = {}, {}
    for name, lm in models.items():
        acc[name] = evaluate(lm, ds, test, spec)["accuracy"]
        if not name.startswith(("student", "composed")):  # a different network: its logits are not comparable
            lnmse[name] = nmse(ref, _run(lm, batches))
    res.update(accuracy=acc, test_logit_nmse=lnmse, test_rows=int(len(test)), task=spec.to_dict())


def part_latency(args, res):
    models = _models(args, res, "latency")
    from lamina.task import read_task
    spec = read_task(args.teacher)
    ds, split = spec.load()
    lat = {}
    for bs in (1, 8):
        rows = split["test"][:bs]
        batch = models["fp32"].batch(ds, rows, min(spec.max_length, 64))
        for th in (1, 2):
            lat[f"b{bs}_t{th}"] = _latency(models, batch, th, args.repeats)
            lat[f"b{bs}_t{th}"]["load_average"] = list(os.getloadavg())
            print(f"latency b{bs} t{th}: " + ", ".join(f"{k} {v['median_ms']:.1f}" for k, v in
                                                      lat[f'b{bs}_t{th}'].items() if k != "load_average"), flush=True)
    res["latency_ms"] = lat
    res["latency_settings"] = {"repeats": args.repeats, "warmup": 1,
                               "tokens": f"up to {min(spec.max_length, 64)} (the task's max length, at most 64; "
                                         f"padded to the longest row)",
                               "statistic": "median of interleaved repeats, min-max beside it"}


def _targets(res: dict, args) -> dict:
    t = {}
    acc, lat = res.get("accuracy"), res.get("latency_ms")
    if acc:
        drop = acc["fp32"] - acc["mixed"]
        cdrop = acc["fp32"] - acc["composed"]
        k = next(n for n in acc if n.startswith("importance_")).split("_")[1]
        rand = [v for n, v in acc.items() if n.startswith(f"random_{k}_")]
        rstd = statistics.stdev(rand) if len(rand) > 1 else 0.0
        imp = acc[f"importance_{k}"] - statistics.mean(rand)
        t["minilm_mixed_drop"] = {"value": round(drop, 4), "goal": "<= 0.01", "met": drop <= 0.01}
        t["minilm_composed_drop"] = {"value": round(cdrop, 4), "goal": "<= 0.02 (against the fp32 teacher)",
                                     "met": cdrop <= 0.02}
        t["importance_minus_random"] = {"value": round(imp, 4), "seed_std": round(rstd, 4),
                                        "goal": f"> 0, beyond the seed spread ({k} layers each)",
                                        "met": imp > 0 and imp > rstd}
        ln = res["test_logit_nmse"]
        rn = [v for n, v in ln.items() if n.startswith(f"random_{k}_")]
        t["importance_vs_random_logit_nmse"] = {
            "value": round(statistics.mean(rn) / max(ln[f"importance_{k}"], 1e-30), 3),
            "goal": "> 1 (mean random test-logit nMSE / importance's; not an issue target)",
            "met": ln[f"importance_{k}"] < min(rn)}
    if lat:
        sp = {th: lat[f"b8_t{th}"]["fp32"]["median_ms"] / lat[f"b8_t{th}"]["mixed"]["median_ms"] for th in (1, 2)}
        cp = {th: lat[f"b8_t{th}"]["fp32"]["median_ms"] / lat[f"b8_t{th}"]["composed"]["median_ms"] for th in (1, 2)}
        t["minilm_mixed_speedup_b8"] = {"value": round(sp[1], 3), "two_threads": round(sp[2], 3),
                                        "goal": ">= 2.5 (batch 8, one thread)", "met": sp[1] >= 2.5}
        t["minilm_composed_speedup_b8"] = {"value": round(cp[1], 3), "two_threads": round(cp[2], 3),
                                           "goal": ">= 5 (batch 8, one thread, against the fp32 teacher)",
                                           "met": cp[1] >= 5}
    return t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True, help="the 3-of-6 distilled student of --teacher")
    ap.add_argument("--formats", default="bf16")
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--compare-count", type=int, default=None)
    ap.add_argument("--out-work", default="/tmp/qbench")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    args = ap.parse_args(argv)
    path = HERE / "results" / "quantize.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    res = old if old.get("version") == 2 else {"version": 2}
    res.setdefault("commands", {})
    cmd = "PYTHONPATH=. python bench/quantize.py " + " ".join(argv or sys.argv[1:])
    for part in args.part:
        res.setdefault("machine", {})[part] = machine()
        t0 = time.perf_counter()
        {"quantize": part_quantize, "accuracy": part_accuracy, "latency": part_latency}[part](args, res)
        res["commands"][part] = cmd
        res.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        res["load_average_end"] = list(os.getloadavg())
        res["targets"] = _targets(res, args)
        res["teacher"], res["student"], res["formats"] = args.teacher, args.student, args.formats
        save_result("quantize", res)  # partial results survive a later part's failure
    _write(res)
    return res


def _write(r: dict) -> None:
    cmds = set(r["commands"].values())
    lines = [(f"Command (every part): `{cmds.pop()}`" if len(cmds) == 1 else
              "Commands: " + "; ".join(f"{p}: `{c}`" for p, c in r["commands"].items())), "",
             f"Teacher: MiniLM fine-tuned on {r.get('task', {}).get('limit')} Rotten Tomatoes rows "
             f"(max length {r.get('task', {}).get('max_length')}); student: its 3-of-6 block prune, distilled "
             f"(CE + KD + SKT, 2 epochs); {r.get('test_rows')} test rows. Format: {r['formats']} "
             f"(see lamina/quantize/formats.py for why). mixed = `lamina quantize teacher --max-drop 0.01` "
             f"({r['mixed']['quantized_layers']} of {r['mixed']['of']} Linear layers); composed = the student "
             f"with all {r['composed']['quantized_layers']} Linear layers in {r['formats']}.", "",
             "| model | test accuracy | test logit nMSE vs fp32 | b1 1t ms | b8 1t ms | b1 2t ms | b8 2t ms |",
             "|---|---|---|---|---|---|---|"]
    lat = r.get("latency_ms", {})
    for m, a in r.get("accuracy", {}).items():
        cells = [f"{lat[k][m]['median_ms']:.1f} ({lat[k][m]['min_ms']:.0f}-{lat[k][m]['max_ms']:.0f})"
                 if k in lat and m in lat[k] else "-" for k in ("b1_t1", "b8_t1", "b1_t2", "b8_t2")]
        ln = r["test_logit_nmse"].get(m)
        lines.append(f"| {m} | {a:.4f} | {'-' if ln is None else f'{ln:.2e}'} | " + " | ".join(cells) + " |")
    loads = {k: v.get("load_average", [None])[0] for k, v in lat.items()}
    ls = r.get("latency_settings", {})
    lines += ["", f"Latency: median (min-max) of {ls.get('repeats')} interleaved repeats after a warm-up, the first "
                  f"test rows, {ls.get('tokens', 'up to 32 tokens (the task max length)')} tokens; 1-minute load "
                  f"average during each setting: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in loads.items() if v is not None) + ".", "",
              "Targets (bench/results/quantize.json):", ""]
    for k, v in r["targets"].items():
        extra = "".join(f", {x} {v[x]}" for x in ("seed_std", "two_threads") if x in v)
        lines.append(f"- `{k}`: {v['value']} (goal {v['goal']}; met: {v['met']}){extra}")
    notes = Path(HERE / "results" / "quantize_notes.md")
    if notes.exists():
        lines += [""] + notes.read_text().rstrip().splitlines()
    write_section("quantize", lines)


if __name__ == "__main__":
    print(json.dumps(main()["targets"], indent=2))
