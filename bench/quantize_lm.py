"""SmolLM2-135M: float32 vs every Linear in bf16 vs every Linear in torchao int8dyn (lamina's quantize formats):
test perplexity on a few blocks of the bundled debates text, and latency of one forward (batch 1 and 4 blocks of
128 tokens, one thread, interleaved medians after a warm-up). A small run, not a quantize search.

    PYTHONPATH=. python bench/quantize_lm.py [--blocks 16] [--repeats 5]

Writes bench/results/quantize_lm.json.
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
from _common import machine, save_result  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="debates")
    args = ap.parse_args(argv)
    import lamina
    from lamina.lm_task import LMTaskSpec
    from lamina.quantize.formats import linear_names
    from lamina.quantize.quantize import quantized_copy
    start = machine()
    torch.set_num_threads(1)
    fp = lamina.load_model("smollm2")
    task = LMTaskSpec(data=args.data, seq_len=128).prepare(fp)
    rows = task.split["test"][: args.blocks]
    names = linear_names(fp.module)
    models = {"fp32": fp, "all_bf16": quantized_copy(fp, {n: "bf16" for n in names}),
              "all_int8dyn": quantized_copy(fp, {n: "int8dyn" for n in names})}
    ppl = {k: task.evaluate(lm, rows, 4)["perplexity"] for k, lm in models.items()}
    print("perplexity", ppl, flush=True)
    lat = {}
    with torch.inference_mode():
        for bs in (1, 4):
            batch = task.batch(fp, rows[:bs])
            times = {k: [] for k in models}
            for lm in models.values():
                lm.forward(batch)
            for r in range(args.repeats):
                for k in (list(models) if r % 2 == 0 else list(reversed(list(models)))):
                    t = time.perf_counter()
                    models[k].forward(batch)
                    times[k].append(1000 * (time.perf_counter() - t))
            lat[f"b{bs}_t1"] = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                                    "speedup": statistics.median(times["fp32"]) / statistics.median(v)}
                                for k, v in times.items()}
            print(bs, {k: round(v["median_ms"], 1) for k, v in lat[f"b{bs}_t1"].items()}, flush=True)
    res = {"command": "PYTHONPATH=. python bench/quantize_lm.py " + " ".join(argv or sys.argv[1:]),
           "machine": start, "load_average_end": list(os.getloadavg()), "linear_layers": len(names),
           "test_blocks": int(len(rows)), "seq_len": 128, "data": args.data, "perplexity": ppl, "latency_ms": lat}
    save_result("quantize_lm", res)
    return res


if __name__ == "__main__":
    print(json.dumps(main()["perplexity"], indent=2))
