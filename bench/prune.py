"""Pruning without recovery: which blocks to drop, and does the smaller model run as fast as its FLOPs say.

MiniLM fine-tuned on Rotten Tomatoes (the teacher, `bench/_common.py`), then
`lamina.prune` from the teacher's own scores run (capture + analyze):

- accuracy kept on the teacher's test rows, no recovery, for every depth
  method (skip_nmse, block_influence, iterative, even) at 4 and 3 of 6 blocks;
- speed: `lamina.bench` of teacher vs 3 of 6 blocks vs half FFN width at batch
  1, 8, 32 (interleaved repeats, medians); speedup_efficiency = measured
  speed-up / ideal speed-up from FLOPs; target >= 0.9 at batch 32;
- EfficientNet-Lite0 fine-tuned on Fashion-MNIST: channel pruning of the
  expanded MBConv channels (25% and 50%), accuracy kept and speed.

Writes bench/results/prune.json and the "## prune" section of BENCHMARKS.md.
Usage: python bench/prune.py [--work DIR] [--threads 1] [--skip-efficientnet]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, merge_previous, save_result, scores, teacher, write_section  # noqa: E402

from lamina.bench import BenchConfig, bench  # noqa: E402
from lamina.compress import PruneConfig, prune  # noqa: E402
from lamina.models import load_model  # noqa: E402
from lamina.task import evaluate, read_task  # noqa: E402

METHODS = ("skip_nmse", "block_influence", "iterative", "even")


def _accuracy(model_dir, ds, split, spec) -> float:
    return evaluate(load_model(str(model_dir)), ds, split["test"], spec)["accuracy"]


def _prune(teacher_dir, scores_path, out: Path, **kw) -> Path:
    prune(str(teacher_dir), str(scores_path), PruneConfig(out=str(out), overwrite=True, **kw))
    return out


def run_minilm(work: Path, args) -> dict:
    t = teacher(work, "minilm")
    sc = scores(work, "minilm", t, limit=400, importance_samples=256)
    spec = read_task(t)
    ds, split = spec.load()
    base = _accuracy(t, ds, split, spec)
    table = {}
    for method in METHODS:
        table[method] = {}
        for kept, frac in ((4, 2 / 6), (3, 0.5)):
            out = _prune(t, sc, work / f"minilm-{method}-{kept}", drop_blocks=frac, method=method)
            acc = _accuracy(out, ds, split, spec)
            import json
            plan = json.loads((out / "plan.json").read_text())
            table[method][str(kept)] = {"accuracy": acc, "retained": acc / base,
                                        "removed": plan["depth"]["remove"]}
            print(f"minilm {method:<16} {kept} of 6 blocks: acc {acc:.4f} (retained {acc / base:.3f}) "
                  f"removed {plan['depth']['remove']}", flush=True)
    ffn = _prune(t, sc, work / "minilm-ffn-half", ffn=0.5)
    ffn_acc = _accuracy(ffn, ds, split, spec)
    speed = bench([str(t), str(work / "minilm-skip_nmse-3"), str(ffn)],
                  BenchConfig(out=str(work / "minilm-speed"), threads=args.threads, repeats=args.repeats,
                              overwrite=True, accuracy=False, progress=False))
    return {"teacher": str(t), "teacher_test_accuracy": base, "test_rows": len(split["test"]),
            "depth": table, "ffn_half": {"accuracy": ffn_acc, "retained": ffn_acc / base},
            "speed": _speed(speed, ["3 of 6 blocks", "half FFN"])}


def _speed(res: dict, names: list[str]) -> dict:
    out = {}
    for name, m in zip(names, res["models"][1:]):
        v = m["vs_first"]
        out[name] = {"parameter_ratio": v["parameter_ratio"], "flop_ratio": v["flop_ratio"],
                     "ideal_speedup": v["ideal_speedup"], "speedup": v["speedup"],
                     "speedup_efficiency": v["speedup_efficiency"],
                     "latency_ms": {bs: m["latency"][bs]["median_ms"] for bs in m["latency"]},
                     "latency_iqr_ms": {bs: [m["latency"][bs]["p25_ms"], m["latency"][bs]["p75_ms"]]
                                        for bs in m["latency"]}}
    out["teacher_latency_ms"] = {bs: v["median_ms"] for bs, v in res["models"][0]["latency"].items()}
    out["threads"] = res["machine"]["threads"]
    return out


def run_efficientnet(work: Path, args) -> dict:
    t = teacher(work, "efficientnet")
    sc = scores(work, "efficientnet", t, limit=300, importance_samples=128)
    spec = read_task(t)
    ds, split = spec.load()
    base = _accuracy(t, ds, split, spec)
    res, outs = {}, []
    for frac in (0.25, 0.5):
        out = _prune(t, sc, work / f"effnet-channels-{frac}", channels=frac)
        acc = _accuracy(out, ds, split, spec)
        # the same channels, then BatchNorm statistics re-estimated on the calibration rows (no training)
        rb = _prune(t, sc, work / f"effnet-channels-{frac}-bn", channels=frac, recalibrate_bn=True)
        acc_rb = _accuracy(rb, ds, split, spec)
        res[str(frac)] = {"accuracy": acc, "retained": acc / base, "accuracy_bn_recalibrated": acc_rb,
                          "retained_bn_recalibrated": acc_rb / base}
        outs.append(out)
        print(f"efficientnet channels -{frac:.0%}: acc {acc:.4f} (retained {acc / base:.3f}); BN recalibrated "
              f"{acc_rb:.4f}", flush=True)
    speed = bench([str(t)] + [str(o) for o in outs],
                  BenchConfig(out=str(work / "effnet-speed"), threads=args.threads, repeats=args.repeats,
                              overwrite=True, accuracy=False, progress=False))
    return {"teacher": str(t), "teacher_test_accuracy": base, "test_rows": len(split["test"]),
            "image_size": spec.image_size, "channels": res,
            "speed": _speed(speed, [f"channels -{f:.0%}" for f in (0.25, 0.5)])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench-work", help="folder for teachers, score runs and pruned models")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1: stable on "
                                                           "shared CPUs)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per batch size")
    ap.add_argument("--skip-efficientnet", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"machine": machine(), "command": "python bench/prune.py " + " ".join(argv or sys.argv[1:])}
    if not args.skip_minilm:
        result["minilm"] = run_minilm(work, args)
    if not args.skip_efficientnet:
        result["efficientnet"] = run_efficientnet(work, args)
    result["seconds"] = time.time() - t0
    merge_previous("prune", result)
    m = result.get("minilm")
    if m:
        eff = {k: m["speed"][k]["speedup_efficiency"]["32"] for k in ("3 of 6 blocks", "half FFN")}
        result["speedup_efficiency_bs32"] = eff
        result["target_met"] = all(v >= 0.9 for v in eff.values())
    save_result("prune", result)
    _write(result)
    return result


def _write(r: dict) -> None:
    lines = [f"Results: `bench/results/prune.json` ({r['machine']['cpus']} shared CPUs, torch "
             f"{r['machine']['torch']}); each part names the command that measured it. No recovery training "
             "anywhere in this section.", ""]
    m = r.get("minilm")
    if m:
        lines += [f"`{m.get('command', r['command'])}`:", "", f"**MiniLM on Rotten Tomatoes**: teacher test accuracy {m['teacher_test_accuracy']:.4f} on "
                  f"{m['test_rows']} held-out sentences. Accuracy kept by each depth method, no recovery:", "",
                  "| method | 4 of 6 blocks | retained | removed | 3 of 6 blocks | retained | removed |",
                  "|---|---|---|---|---|---|---|"]
        for meth, row in m["depth"].items():
            a, b = row["4"], row["3"]
            lines.append(f"| {meth} | {a['accuracy']:.4f} | {a['retained']:.3f} | {', '.join(a['removed'])} | "
                         f"{b['accuracy']:.4f} | {b['retained']:.3f} | {', '.join(b['removed'])} |")
        lines += ["", f"Half FFN width (every block, activation importance): accuracy {m['ffn_half']['accuracy']:.4f} "
                  f"(retained {m['ffn_half']['retained']:.3f}).", ""]
        lines += _speed_table(m["speed"], "MiniLM")
    e = r.get("efficientnet")
    if e:
        lines += [f"`{e.get('command', r['command'])}`:", "", f"**EfficientNet-Lite0 on Fashion-MNIST** at {e['image_size']} px: teacher test accuracy "
                  f"{e['teacher_test_accuracy']:.4f} on {e['test_rows']} images. Expanded MBConv channels removed "
                  "in every block by activation importance, no recovery:", "",
                  "| channels removed | accuracy | retained | with BN statistics re-estimated (`--recalibrate-bn`) "
                  "| retained |", "|---|---|---|---|---|"]
        for frac, row in e["channels"].items():
            lines.append(f"| {float(frac):.0%} | {row['accuracy']:.4f} | {row['retained']:.3f} | "
                         f"{row.get('accuracy_bn_recalibrated', float('nan')):.4f} | "
                         f"{row.get('retained_bn_recalibrated', float('nan')):.3f} |")
        lines += [""] + _speed_table(e["speed"], "EfficientNet-Lite0")
    if "speedup_efficiency_bs32" in r:
        eff = r["speedup_efficiency_bs32"]
        lines += ["Target speedup_efficiency >= 0.9 at batch 32: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in eff.items())
                  + f" -> {'met' if r['target_met'] else 'NOT met'}.", ""]
    write_section("prune", lines)


def _speed_table(s: dict, title: str) -> list[str]:
    names = [k for k in s if k not in ("teacher_latency_ms", "threads")]
    bss = list(s["teacher_latency_ms"])
    lines = [f"{title} speed ({s['threads']} torch thread(s), `lamina.bench`: interleaved repeats, medians; "
             "teacher latency " + ", ".join(f"{s['teacher_latency_ms'][b]:.1f} ms @ {b}" for b in bss) + "):", "",
             "| model | parameter ratio | FLOP ratio | ideal speed-up | " + " | ".join(f"speed-up @{b}" for b in bss)
             + " | speedup_efficiency @" + bss[-1] + " |", "|---|---|---|---|" + "---|" * len(bss) + "---|"]
    for n in names:
        v = s[n]
        lines.append(f"| {n} | {v['parameter_ratio']:.3f} | {v['flop_ratio']:.3f} | {v['ideal_speedup']:.2f} | "
                     + " | ".join(f"{v['speedup'][b]:.2f}" for b in bss)
                     + f" | {v['speedup_efficiency'][bss[-1]]:.2f} |")
    return lines + [""]


if __name__ == "__main__":
    main()
