"""Distillation recovery: does SKT bring a pruned or narrow student back to its teacher's accuracy?

MiniLM teacher fine-tuned on Rotten Tomatoes (`bench/_common.py`); student =
3 of its 6 blocks (`lamina prune --drop-blocks 0.5`, skip-nMSE choice). Test
accuracy on the teacher's held-out rows of:
    (a) the student, no recovery
    (b) cross-entropy fine-tuning only
    (c) + logit KD (T = 2)
    (d) + SKT cosine (every kept block vs its original) + FSP between them
    (e) the same 3-block architecture from random init, CE, the same budget
for seeds 0, 1, 2 (mean and spread); target: (d) keeps >= 97% of the
teacher's accuracy and beats (a), (b) and (e).

EfficientNet-Lite0 teacher fine-tuned on Fashion-MNIST; SKT 1/4-width student
(`lamina distill --width 0.25`, every channel space keeps its most important
quarter) trained with the full recipe (taps at stage ends): parameter ratio,
measured CPU speed-up at batch 32 (`lamina.bench`), accuracy kept.
Target: >= 3x faster, >= 97% of the teacher's accuracy.

Writes bench/results/distill.json and the "## distill" section of BENCHMARKS.md.
Usage: python bench/distill.py [--work DIR] [--seeds 0 1 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, merge_previous, save_result, scores, teacher, write_section  # noqa: E402

from lamina.bench import BenchConfig, bench  # noqa: E402
from lamina.compress import PruneConfig, prune  # noqa: E402
from lamina.distill import DistillConfig, distill  # noqa: E402
from lamina.models import load_model  # noqa: E402
from lamina.task import evaluate, read_task  # noqa: E402

VARIANTS = {  # name: (loss weights, from scratch)
    "b_ce": (dict(ce=1.0, kd=0.0, cosine=0.0, fsp=0.0), False),
    "c_ce_kd": (dict(ce=1.0, kd=1.0, cosine=0.0, fsp=0.0), False),
    "d_ce_kd_skt": (dict(ce=1.0, kd=1.0, cosine=0.5, fsp=0.5), False),
    "e_scratch": (dict(ce=1.0, kd=0.0, cosine=0.0, fsp=0.0), True),
}


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "values": xs}


def run_minilm(work: Path, args) -> dict:
    t = teacher(work, "minilm")
    sc = scores(work, "minilm", t, limit=400, importance_samples=256)
    student = work / "minilm-student-3"
    # skip_nmse pinned: the recorded results were measured with it, before prune's default became 'auto'
    prune(str(t), str(sc), PruneConfig(out=str(student), drop_blocks=0.5, method="skip_nmse", overwrite=True))
    spec = read_task(t)
    ds, split = spec.load()
    t_acc = json.loads((t / "finetune.json").read_text())["test"]["accuracy"]
    a_acc = evaluate(load_model(str(student)), ds, split["test"], spec)["accuracy"]
    runs = {k: {} for k in VARIANTS}
    for seed in args.seeds:
        for name, (w, scratch) in VARIANTS.items():
            out = work / f"minilm-distill-{name}-s{seed}"
            rec_path = out / "distill.json"
            if not (rec_path.exists() and args.reuse):
                distill(str(t), str(student), DistillConfig(out=str(out), scratch=scratch, epochs=args.epochs,
                                                            lr=args.lr, seed=seed, patience=None, overwrite=True,
                                                            progress=False, **w))
            rec = json.loads(rec_path.read_text())
            runs[name][str(seed)] = {"accuracy": rec["test"]["accuracy"],
                                     "val_accuracy": [e["val_accuracy"] for e in rec["history"]["epochs"]],
                                     "train_loss": [e["train"] for e in rec["history"]["epochs"]],
                                     "seconds": rec["seconds"]}
            print(f"minilm {name:<12} seed {seed}: test acc {rec['test']['accuracy']:.4f}", flush=True)
    summary = {name: _stats([r["accuracy"] for r in v.values()]) for name, v in runs.items()}
    d = summary["d_ce_kd_skt"]["mean"]
    return {"teacher": str(t), "teacher_test_accuracy": t_acc, "test_rows": len(split["test"]),
            "train_rows": len(split["train"]), "student": str(student),
            "student_removed": json.loads((student / "plan.json").read_text())["depth"]["remove"],
            "a_no_recovery": a_acc, "runs": runs, "summary": summary, "epochs": args.epochs, "lr": args.lr,
            "seeds": args.seeds, "accuracy_retained": d / t_acc,
            "d_beats": {k: d > v for k, v in (("a", a_acc), ("b", summary["b_ce"]["mean"]),
                                              ("e", summary["e_scratch"]["mean"]))}}


def run_efficientnet(work: Path, args) -> dict:
    t = teacher(work, "efficientnet")
    spec = read_task(t)
    ds, split = spec.load()
    t_acc = json.loads((t / "finetune.json").read_text())["test"]["accuracy"]
    out = work / "effnet-narrow-0.25"
    if not ((out / "distill.json").exists() and args.reuse):
        distill(str(t), None, DistillConfig(out=str(out), width=0.25, taps="stages", epochs=args.cnn_epochs,
                                            lr=args.cnn_lr, seed=0, patience=None, overwrite=True, progress=False))
    rec = json.loads((out / "distill.json").read_text())
    speed = bench([str(t), str(out)], BenchConfig(out=str(work / "effnet-narrow-speed"), threads=args.threads,
                                                  repeats=args.repeats, overwrite=True, accuracy=False,
                                                  progress=False))
    v = speed["models"][1]["vs_first"]
    acc = rec["test"]["accuracy"]
    return {"teacher": str(t), "teacher_test_accuracy": t_acc, "test_rows": len(split["test"]),
            "image_size": spec.image_size, "student_test_accuracy": acc, "accuracy_retained": acc / t_acc,
            "parameter_ratio": v["parameter_ratio"], "flop_ratio": v["flop_ratio"], "speedup": v["speedup"],
            "speedup_bs32": v["speedup"].get("32"), "epochs": args.cnn_epochs, "lr": args.cnn_lr, "seed": 0,
            "val_accuracy": [e["val_accuracy"] for e in rec["history"]["epochs"]],
            "threads": speed["machine"]["threads"], "seconds": rec["seconds"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench-work", help="folder for teachers, students and runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2, help="MiniLM student epochs (every variant)")
    ap.add_argument("--lr", type=float, default=1e-4, help="MiniLM student learning rate (every variant)")
    ap.add_argument("--cnn-epochs", type=int, default=6)
    ap.add_argument("--cnn-lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --work (resume a long benchmark)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-efficientnet", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"machine": machine(), "command": "python bench/distill.py " + " ".join(argv or sys.argv[1:])}
    if not args.skip_minilm:
        result["minilm"] = run_minilm(work, args)
    if not args.skip_efficientnet:
        result["efficientnet"] = run_efficientnet(work, args)
    merge_previous("distill", result)
    result["seconds"] = time.time() - t0
    m, e = result.get("minilm"), result.get("efficientnet")
    result["accuracy_retained"] = {"minilm_d": m and m["accuracy_retained"],
                                   "efficientnet_skt_quarter": e and e["accuracy_retained"]}
    result["speedup"] = e and e["speedup_bs32"]
    result["targets_met"] = {
        "minilm_d_retains_97": bool(m and m["accuracy_retained"] >= 0.97),
        "minilm_d_beats_a_b_e": bool(m and all(m["d_beats"].values())),
        "efficientnet_speedup_3x": bool(e and e["speedup_bs32"] >= 3),
        "efficientnet_retains_97": bool(e and e["accuracy_retained"] >= 0.97)}
    save_result("distill", result)
    _write(result)
    return result


def _write(r: dict) -> None:
    lines = [f"Results: `bench/results/distill.json` ({r['machine']['cpus']} shared CPUs, torch "
             f"{r['machine']['torch']}); each part names the command that measured it.", ""]
    m = r.get("minilm")
    if m:
        s = m["summary"]
        lines += [f"`{m['command']}`:", "", f"**MiniLM, 3 of 6 blocks** (removed {', '.join(m['student_removed'])}): teacher "
                  f"{m['teacher_test_accuracy']:.4f} on {m['test_rows']} held-out sentences; every variant "
                  f"{m['epochs']} epochs over {m['train_rows']} training sentences, lr {m['lr']}, seeds "
                  f"{', '.join(map(str, m['seeds']))}.", "",
                  "| variant | test accuracy, mean ± std over seeds | per seed | retained (mean) |", "|---|---|---|---|",
                  f"| (a) no recovery | {m['a_no_recovery']:.4f} | - | "
                  f"{m['a_no_recovery'] / m['teacher_test_accuracy']:.3f} |"]
        names = {"b_ce": "(b) cross-entropy", "c_ce_kd": "(c) + logit KD", "d_ce_kd_skt": "(d) + SKT cosine + FSP",
                 "e_scratch": "(e) from scratch, CE"}
        for k, label in names.items():
            lines.append(f"| {label} | {s[k]['mean']:.4f} ± {s[k]['std']:.4f} | "
                         + ", ".join(f"{v:.4f}" for v in s[k]["values"])
                         + f" | {s[k]['mean'] / m['teacher_test_accuracy']:.3f} |")
        gap = s["d_ce_kd_skt"]["mean"] - s["b_ce"]["mean"]
        spread = max(s["d_ce_kd_skt"]["std"], s["b_ce"]["std"])
        lines += ["", f"(d) keeps {m['accuracy_retained']:.1%} of the teacher's accuracy (target 97%); beats "
                  + ", ".join(f"({k}) {'yes' if v else 'NO'}" for k, v in m["d_beats"].items())
                  + f". (d) − (b) = {gap:+.4f} against a seed std of up to {spread:.4f} and a binomial standard error "
                  f"of {(0.77 * 0.23 / m['test_rows']) ** 0.5:.4f} per run: "
                  + ("within noise." if abs(gap) < spread else "larger than the seed spread."), ""]
    e = r.get("efficientnet")
    if e:
        lines += [f"`{e['command']}`:", "", f"**EfficientNet-Lite0, SKT 1/4-width student** (Fashion-MNIST at {e['image_size']} px, "
                  f"{e['epochs']} epochs, full recipe, taps at stage ends, seed {e['seed']}): teacher "
                  f"{e['teacher_test_accuracy']:.4f}, student {e['student_test_accuracy']:.4f} on {e['test_rows']} "
                  f"images (retained {e['accuracy_retained']:.3f}); parameter ratio {e['parameter_ratio']:.3f}, "
                  f"FLOP ratio {e['flop_ratio']:.3f}; measured speed-up "
                  + ", ".join(f"{v:.2f}x @{b}" for b, v in e["speedup"].items())
                  + f" ({e['threads']} torch thread(s), interleaved repeats, medians).", ""]
    t = r["targets_met"]
    lines += ["Targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in t.items()) + ".", ""]
    write_section("distill", lines)


if __name__ == "__main__":
    main()
