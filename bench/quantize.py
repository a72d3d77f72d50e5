"""Layer-wise mixed int8 on a fine-tuned MiniLM: fp32 vs all-int8 vs importance-mixed vs random (equal count).

    PYTHONPATH=. python bench/quantize.py --teacher TEACHER --fraction 0.5 --out-work /tmp/qbench

TEACHER: a `lamina finetune` OUT of MiniLM on Rotten Tomatoes (e.g. `lamina finetune --model minilm --data
rotten-tomatoes --limit 600 --epochs 2 --full --out teacher/`). ``lamina quantize`` ranks the Linear layers on
the teacher's training rows; the importance-mixed model is what it saved (reloaded with ``lamina.load_model``),
the random models quantize the same count of layers chosen by seeds 0-2. Accuracy on the teacher's test rows;
latency = median of interleaved repeats of one forward at batch 1 and 8 (64 tokens), one and two threads.
Writes bench/results/quantize.json (top-level ``targets``) and the BENCHMARKS.md "quantize" section.
The pruned + distilled + int8 composition is not measured by this script (its targets say so).
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
from _common import machine, save_result, write_section  # noqa: E402


def _latency(models: dict, batch: dict, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for lm in models.values():
            lm.forward(batch)  # warm-up
        for _ in range(repeats):  # interleaved, so load changes on the shared machine hit every model alike
            for k, lm in models.items():
                t = time.perf_counter()
                lm.forward(batch)
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--out-work", default="/tmp/qbench")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    import lamina
    from lamina.quantize import QuantizeConfig, quantize
    from lamina.quantize.formats import linear_names
    from lamina.quantize.quantize import quantized_copy
    from lamina.task import evaluate, read_task

    load0 = machine()
    q = Path(args.out_work) / "q"
    t0 = time.perf_counter()
    res = quantize(args.teacher, QuantizeConfig(out=str(q), fraction=args.fraction, overwrite=True))
    quantize_s = time.perf_counter() - t0
    fp = lamina.load_model(args.teacher)
    names = linear_names(fp.module)
    k = len(res.quantized)
    models = {"fp32": fp, "all_int8": quantized_copy(fp, {n: "int8dyn" for n in names}),
              "mixed": lamina.load_model(str(q))}
    for s in range(args.seeds):
        pick = random.Random(s).sample(names, k)
        models[f"random_{s}"] = quantized_copy(fp, {n: "int8dyn" for n in pick})
    spec = read_task(args.teacher)
    ds, split = spec.load()
    acc = {name: evaluate(lm, ds, split["test"], spec)["accuracy"] for name, lm in models.items()}
    from lamina.quantize.quantize import _run, nmse
    test_batches = [fp.batch(ds, split["test"][i:i + 32], spec.max_length) for i in range(0, len(split["test"]), 32)]
    ref = _run(fp, test_batches)
    # a finer lens than accuracy on a small test set: how far each model's test logits moved from float32
    logit_nmse = {name: nmse(ref, _run(lm, test_batches)) for name, lm in models.items()}
    agree = {name: float(sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, _run(lm, test_batches)))
                         / len(split["test"])) for name, lm in models.items()}
    timed = {n: models[n] for n in ("fp32", "all_int8", "mixed")}
    lat = {}
    for bs in (1, 8):
        batch = fp.batch(ds, split["test"][:bs], spec.max_length)
        for th in (1, 2):
            lat[f"b{bs}_t{th}"] = _latency(timed, batch, th, args.repeats)
    rand = [acc[f"random_{s}"] for s in range(args.seeds)]
    rnmse = [logit_nmse[f"random_{s}"] for s in range(args.seeds)]
    rmean, rstd = statistics.mean(rand), (statistics.stdev(rand) if len(rand) > 1 else 0.0)
    speed_b8 = {th: lat[f"b8_t{th}"]["fp32"] / lat[f"b8_t{th}"]["mixed"] for th in (1, 2)}
    drop = acc["fp32"] - acc["mixed"]
    imp = acc["mixed"] - rmean
    targets = {
        "minilm_mixed_speedup_b8": {"value": round(speed_b8[1], 3), "goal": ">= 2.5 (batch 8, one thread)",
                                    "met": speed_b8[1] >= 2.5},
        "minilm_mixed_drop": {"value": round(drop, 4), "goal": "<= 0.01", "met": drop <= 0.01},
        "minilm_composed_speedup_b8": {"value": None, "goal": ">= 5 (pruned + distilled + int8): not measured "
                                       "by this run", "met": False},
        "minilm_composed_drop": {"value": None, "goal": "<= 0.02: not measured by this run", "met": False},
        "importance_minus_random": {"value": round(imp, 4), "seed_std": round(rstd, 4),
                                    "goal": "> 0, beyond the seed spread", "met": imp > 0 and imp > rstd},
        "mixed_vs_random_logit_nmse": {"value": round(statistics.mean(rnmse) / max(logit_nmse["mixed"], 1e-30), 3),
                                       "goal": "> 1 (random choices move test logits more than importance-mixed; "
                                               "not an issue target, reported beside importance_minus_random)",
                                       "met": logit_nmse["mixed"] < min(rnmse)},
    }
    result = {"command": "PYTHONPATH=. python bench/quantize.py " + " ".join(argv or sys.argv[1:]),
              "targets": targets, "machine": load0, "load_average_end": list(os.getloadavg()),
              "teacher": str(args.teacher), "task": spec.to_dict(), "test_rows": int(len(split["test"])),
              "linear_layers": len(names), "quantized_layers": k, "quantize_seconds": round(quantize_s, 1),
              "accuracy": acc, "test_logit_nmse": logit_nmse, "prediction_agreement": agree, "latency_ms": lat, "speedup_b8": speed_b8,
              "random_mean": rmean, "random_std": rstd, "mixed_layers": res.quantized}
    save_result("quantize", result)
    _write(result)
    return result


def _write(r: dict) -> None:
    t = r["targets"]
    lines = [f"Command: `{r['command']}` (teacher: MiniLM fine-tuned on {r['task']['limit']} Rotten Tomatoes rows; "
             f"{r['test_rows']} test rows; {r['quantized_layers']} of {r['linear_layers']} Linear layers int8 "
             f"(int8dyn, torchao 0.18) in the mixed and random models; shared 2-core CPU, load "
             f"{r['machine']['load_average_start'][0]:.1f} at start).", "",
             "| model | test accuracy | test logit nMSE vs fp32 | agreement with fp32 | b1 1t ms | b8 1t ms | "
             "b8 2t ms |", "|---|---|---|---|---|---|---|"]
    for m, a in r["accuracy"].items():
        lat = r["latency_ms"]
        row = [f"{lat[k][m]:.1f}" if m in lat[k] else "-" for k in ("b1_t1", "b8_t1", "b8_t2")]
        lines.append(f"| {m} | {a:.4f} | {r['test_logit_nmse'][m]:.2e} | {r['prediction_agreement'][m]:.3f} | "
                     + " | ".join(row) + " |")
    lines += ["", "Targets (bench/results/quantize.json):", ""]
    for k, v in t.items():
        lines.append(f"- `{k}`: {v['value']} (goal {v['goal']}; met: {v['met']})"
                     + (f", seed std {v['seed_std']}" if "seed_std" in v else ""))
    lines += ["", "On this CPU torchao's int8 dynamic kernels are not faster than float32 on MiniLM's small "
                  "matrices (see lamina/quantize/formats.py), so the speed targets are not met; the accuracy "
                  "budget is what quantize delivers here. On this small, weak teacher (600 rows, 2 epochs) no int8 model changes a "
                  "single test prediction, so accuracy cannot separate importance from random choice; the test-logit "
                  "nMSE column does (importance-mixed moves the logits several times less than a random choice of "
                  "the same count). The pruned + distilled + int8 composition was not run."]
    write_section("quantize", lines)


if __name__ == "__main__":
    print(json.dumps(main()["targets"], indent=2))
