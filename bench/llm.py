"""Decoder LM depth pruning without recovery: which blocks of SmolLM2-135M to drop, by each method.

SmolLM2-135M-Instruct (bundled `smollm2`, 30 Llama blocks) on the 2016
presidential-debate statements (bundled text `debates`): documents split
train / validation / test by `lamina.lm_task` (seed 0), packed into blocks of
`--seq-len` tokens. Calibration = the first `--calib-blocks` training blocks;
held-out = the first `--eval-blocks` test blocks (documents never seen in
calibration).

- Teacher perplexity on the held-out blocks.
- 30 -> 22 and 30 -> 15 blocks by each depth method, no recovery: Block
  Influence, skip nMSE on logits, perplexity change, angular distance (Gromov:
  the n consecutive blocks with the smallest angular distance), evenly spaced,
  and joint (greedy on the calibration next-token loss; the greedy path to 15
  contains the set for 22). Perplexity of each on the held-out blocks.
- Cost: LM importance of all 30 blocks and the joint choice, in wall time and
  as a multiple of one forward over the calibration blocks (measured).
- Optional `--speed`: `lamina.bench` prefill latency of the teacher and the
  22-block joint model at batch 1 and 8.

Writes bench/results/llm.json (with a top-level `targets`) and the "## llm"
section of BENCHMARKS.md. Results are saved after each part.
Usage: python bench/llm.py [--seq-len 64] [--calib-blocks 4] [--eval-blocks 16] [--speed]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine, save_result, write_section  # noqa: E402

from lamina.analyze.lm_importance import angular_pick, lm_importance  # noqa: E402
from lamina.compress.depth import drop_blocks_  # noqa: E402
from lamina.compress.joint import joint_select  # noqa: E402
from lamina.compress.plan import even_pick  # noqa: E402
from lamina.lm_task import LMTaskSpec  # noqa: E402
from lamina.blocks import find_blocks  # noqa: E402
from lamina.models import load_model  # noqa: E402

BUDGETS = (22, 15)
METHODS = ("block_influence", "skip_nmse", "perplexity_change", "angular", "even", "joint")


def _lowest(values: list[float], m: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:m])


def _ppl(lm, task, rows) -> dict:
    return task.evaluate(lm, rows, batch_size=8)


def _pruned(lm, remove: list[int]):
    m = copy.deepcopy(lm.module)
    drop_blocks_(m, remove)
    out = copy.copy(lm)
    out.module, out.blocks = m, find_blocks(m)
    return out


def run(args) -> dict:
    torch.manual_seed(0)
    t_all = time.time()
    res = {"machine": machine(), "command": "python bench/llm.py " + " ".join(sys.argv[1:]),
           "model": "smollm2", "data": "debates"}
    lm = load_model("smollm2")
    spec = LMTaskSpec(data="debates", seq_len=args.seq_len, seed=0)
    task = spec.prepare(lm)
    calib_rows = task.split["train"][: args.calib_blocks]
    eval_rows = task.split["test"][: args.eval_blocks]
    calib = [task.batch(lm, calib_rows[s:s + 4]) for s in range(0, len(calib_rows), 4)]
    res["task"] = task.record() | {"calibration_blocks": len(calib_rows), "eval_blocks": len(eval_rows),
                                   "eval_tokens_predicted": len(eval_rows) * (args.seq_len - 1)}
    n = lm.blocks.n_blocks
    with torch.inference_mode():
        t = time.perf_counter()
        for b in calib:
            lm.forward(b)
        fwd = time.perf_counter() - t
    res["calibration_forward_seconds"] = fwd
    res["teacher"] = _ppl(lm, task, eval_rows)
    print(f"teacher perplexity {res['teacher']['perplexity']:.3f} on {len(eval_rows)} blocks; one calibration "
          f"forward {fwd:.1f} s", flush=True)
    _save(res)

    drops = [n - b for b in BUDGETS]
    imp = lm_importance(lm, calib, spans=drops)
    res["importance"] = imp | {"seconds_as_forwards": imp["seconds"] / fwd}
    print(f"importance: {imp['seconds']:.0f} s ({imp['seconds'] / fwd:.1f} calibration forwards)", flush=True)
    _save(res)
    joint = joint_select(lm, calib, max(drops), list(range(n)), objective="loss")
    path = [r["kept"][0] for r in joint["rounds"]]
    res["joint"] = {k: joint[k] for k in ("objective", "score", "set_evaluations", "cost_forwards", "seconds")}
    res["joint"]["seconds_as_forwards"] = joint["seconds"] / fwd
    res["joint"]["greedy_path"] = path
    res["joint"]["rounds"] = joint["rounds"]
    print(f"joint: {joint['seconds']:.0f} s ({joint['seconds'] / fwd:.1f} calibration forwards), "
          f"{joint['set_evaluations']} sets", flush=True)
    _save(res)

    table: dict = {}
    for keep, m in zip(BUDGETS, drops):
        choice = {"block_influence": _lowest(imp["block_influence"], m),
                  "skip_nmse": _lowest(imp["skip_nmse"], m),
                  "perplexity_change": _lowest(imp["perplexity_change"], m),
                  "angular": angular_pick(imp["angular"][str(m)], m),
                  "even": even_pick(list(range(n)), m),
                  "joint": sorted(int(b.split(".")[1]) for b in path[m - 1])}
        table[str(keep)] = {}
        for meth in METHODS:
            ev = _ppl(_pruned(lm, choice[meth]), task, eval_rows)
            table[str(keep)][meth] = {"remove": choice[meth], "perplexity": ev["perplexity"],
                                      "loss": ev["loss"], "next_token_accuracy": ev["next_token_accuracy"]}
            print(f"{n} -> {keep}: {meth:<18} ppl {ev['perplexity']:9.2f}  remove {choice[meth]}", flush=True)
            res["depth"] = table
            _save(res)
    targets = {}
    for keep in BUDGETS:
        row = table[str(keep)]
        best_other = min(v["perplexity"] for k, v in row.items() if k != "joint")
        ratio = row["joint"]["perplexity"] / best_other
        targets[f"joint_vs_best_other_ppl_{keep}"] = {"value": ratio, "goal": "<= 1.02", "met": ratio <= 1.02}
    res["targets"] = targets

    if args.speed:
        from lamina.bench import BenchConfig, bench
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        small = _pruned(lm, sorted(int(b.split(".")[1]) for b in path[drops[0] - 1]))
        small.module.save_pretrained(work / "smollm2-joint-22")
        lm.tokenizer.save_pretrained(work / "smollm2-joint-22")
        sp = bench([lm, str(work / "smollm2-joint-22")],
                   BenchConfig(data="debates", seq_len=args.seq_len, batch_sizes=(1, 8), warmup=1,
                               repeats=args.repeats, threads=args.threads, accuracy=False, progress=False,
                               out=str(work), overwrite=True))
        v = sp["models"][1]["vs_first"]
        res["speed"] = {"seq_len": args.seq_len, "threads": sp["machine"]["threads"],
                        "teacher_latency_ms": {b: x["median_ms"] for b, x in sp["models"][0]["latency"].items()},
                        "pruned_latency_ms": {b: x["median_ms"] for b, x in sp["models"][1]["latency"].items()},
                        "ideal_speedup": v["ideal_speedup"], "speedup": v["speedup"],
                        "speedup_efficiency": v["speedup_efficiency"]}
        for b in ("1", "8"):
            e = v["speedup_efficiency"][b]
            targets[f"prefill_speedup_efficiency_b{b}"] = {"value": e, "goal": ">= 0.9", "met": e >= 0.9}
    res["seconds"] = time.time() - t_all
    _save(res)
    _write(res)
    return res


def _save(res: dict) -> None:
    save_result("llm", res)


def _write(r: dict) -> None:
    t = r["task"]
    lines = [f"Results: `bench/results/llm.json` ({r['machine']['cpus']} shared CPUs, torch {r['machine']['torch']}), "
             f"`{r['command']}`. SmolLM2-135M-Instruct (30 blocks) on the 2016 debate statements: documents split "
             f"{t['documents']['train']}/{t['documents']['val']}/{t['documents']['test']} (train/val/test), packed "
             f"into blocks of {t['seq_len']} tokens; calibration = {t['calibration_blocks']} training blocks, "
             f"held-out = {t['eval_blocks']} test blocks ({t['eval_tokens_predicted']} predicted tokens, documents "
             "never seen in calibration). No recovery training.", "",
             f"Teacher perplexity {r['teacher']['perplexity']:.2f} (next-token accuracy "
             f"{r['teacher']['next_token_accuracy']:.3f}).", "",
             "| method | 22 blocks: perplexity | removed | 15 blocks: perplexity | removed |", "|---|---|---|---|---|"]
    d = r["depth"]
    for meth in METHODS:
        a, b = d["22"][meth], d["15"][meth]
        lines.append(f"| {meth} | {a['perplexity']:.2f} | {', '.join(map(str, a['remove']))} | "
                     f"{b['perplexity']:.2f} | {', '.join(map(str, b['remove']))} |")
    imp, j = r["importance"], r["joint"]
    lines += ["", f"Cost on the calibration blocks (one forward over them: {r['calibration_forward_seconds']:.1f} s "
              "on this shared machine): LM importance of all 30 blocks (BI, skip nMSE on logits, perplexity "
              f"change, angular distances) {imp['seconds']:.0f} s = {imp['seconds_as_forwards']:.1f} forwards "
              f"(block evaluations: {imp['cost_forwards']:.1f} forwards); joint greedy to 15 removed blocks "
              f"({j['set_evaluations']} sets scored) {j['seconds']:.0f} s = {j['seconds_as_forwards']:.1f} forwards "
              f"(block evaluations: {j['cost_forwards']:.1f} forwards).", ""]
    if "speed" in r:
        s = r["speed"]
        lines += [f"Prefill speed (`lamina.bench`, {s['threads']} thread(s), blocks of {s['seq_len']} tokens): teacher "
                  + ", ".join(f"{v:.0f} ms @ batch {k}" for k, v in s["teacher_latency_ms"].items())
                  + "; joint 22-block model " + ", ".join(f"{v:.0f} ms @ batch {k}" for k, v in
                                                          s["pruned_latency_ms"].items())
                  + f"; ideal speed-up {s['ideal_speedup']:.2f}, measured "
                  + ", ".join(f"{v:.2f} @ {k}" for k, v in s["speedup"].items()) + ".", ""]
    lines += ["Targets: " + "; ".join(f"`{k}` {v['value']:.3f} (goal {v['goal']}: {'met' if v['met'] else 'NOT met'})"
                                      for k, v in r["targets"].items()) + ".", ""]
    write_section("llm", lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--calib-blocks", type=int, default=4)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--speed", action="store_true", help="also time prefill of the teacher and the 22-block model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="bench-work/llm")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
