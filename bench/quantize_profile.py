"""Where a MiniLM forward's time goes, float32 against every Linear in int8fused (separate and with the fused QKV):
torch.profiler per op and input shape, batch 8 x 32 tokens, one thread.

    PYTHONPATH=. python bench/quantize_profile.py --teacher T [--iters 20]

T: the bench's fine-tuned MiniLM (a `lamina finetune` OUT). Besides the profiler's self time per op (wall clock,
so the machine's load inflates it), each variant's whole forward is timed interleaved in thread CPU time
(``time.thread_time``: excludes time the thread waits while other processes run, not the slow-down from sharing
caches and memory bandwidth). Writes bench/results/quantize_profile.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save_result  # noqa: E402


def _category(name: str, shapes) -> str:
    """An op's share of the model, by what it computes (the Linear GEMMs by their input width and output)."""
    if name in ("aten::addmm", "quantized::linear_dynamic", "aten::mm"):
        k = shapes[1][-1] if name == "aten::addmm" else (shapes[0][-1] if shapes and shapes[0] else None)
        return f"linear (in {k})" if k else "linear"
    if name == "aten::copy_" and shapes and shapes[0] and shapes[0][-1] == 1536:
        return "copy 1536-wide (addmm's bias broadcast into the output)"
    for key, cat in (("gelu", "gelu"), ("scaled_dot_product", "attention (sdpa)"), ("softmax", "attention"),
                     ("bmm", "attention"), ("layer_norm", "layernorm"), ("add", "residual add"),
                     ("index_select", "embeddings"), ("embedding", "embeddings"), ("copy_", "copies / casts"),
                     ("_to_copy", "copies / casts"), ("contiguous", "copies / casts")):
        if key in name:
            return cat
    return "other (views, reshapes, dispatch)"


def _profile(model, batch, iters: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        model.forward(batch)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(iters):
                model.forward(batch)
    by_op, by_cat = [], {}
    for e in p.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1000 / iters
        if ms < 0.005:
            continue
        by_op.append({"op": e.key, "shapes": str(e.input_shapes), "calls": e.count // iters, "self_ms": round(ms, 3)})
        cat = _category(e.key, e.input_shapes)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    total = sum(by_cat.values())
    return {"total_self_ms": round(total, 2),
            "by_category": {k: {"ms": round(v, 2), "share": round(v / total, 3)}
                            for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_ops": sorted(by_op, key=lambda r: -r["self_ms"])[:15]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args(argv)
    import copy

    import lamina
    from lamina.quantize.formats import apply_layers, linear_names
    from lamina.task import read_task
    torch.set_num_threads(1)
    fp = lamina.load_model(args.teacher)
    spec = read_task(args.teacher)
    ds, split = spec.load()
    batch = fp.batch(ds, split["test"][:8], min(spec.max_length, 64))
    plan = {n: "int8fused" for n in linear_names(fp.module)}
    models = {"fp32": fp}
    for key, fuse in (("int8fused", False), ("int8fused_fused_qkv", True)):
        m = copy.copy(fp)
        m.module = apply_layers(copy.deepcopy(fp.module), plan, fuse=fuse).eval()
        models[key] = m
    with torch.inference_mode():
        outs = {k: m.forward(batch).logits for k, m in models.items()}
    res = {"machine": machine(), "threads": 1, "batch": list(batch["input_ids"].shape),
           "attn_implementation": getattr(getattr(fp.module, "config", None), "_attn_implementation", None),
           "fused_equals_separate": bool(torch.equal(outs["int8fused"], outs["int8fused_fused_qkv"])),
           "profile": {}, "thread_time_ms": {}}
    for k, m in models.items():
        res["profile"][k] = _profile(m, batch, args.iters)
        print(k, res["profile"][k]["total_self_ms"], res["profile"][k]["by_category"], flush=True)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for r in range(args.repeats):
            for k in (list(models) if r % 2 == 0 else list(reversed(list(models)))):
                t = time.thread_time()
                models[k].forward(batch)
                times[k].append(1000 * (time.thread_time() - t))
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        res["thread_time_ms"][k] = {"median": round(q[1], 2), "q1": round(q[0], 2), "q3": round(q[2], 2)}
    res["load_average_end"] = list(os.getloadavg())
    print(res["thread_time_ms"], res["load_average_end"], flush=True)
    save_result("quantize_profile", res)
    return res


if __name__ == "__main__":
    main()
