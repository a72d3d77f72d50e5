"""What the default ``--method auto`` (joint on a fine-tuned model's own rows) costs over ``skip_nmse`` in
the README's prune step: ``lamina prune teacher/ --drop-blocks 0.5 --out small/`` on MiniLM.

The teacher is MiniLM fine-tuned on Rotten Tomatoes with a reduced budget (``--limit 400``, one epoch: enough
training rows for the default 256 calibration samples; the prune cost depends on the model, the budget and the
calibration rows, not on how well the teacher learned). Both prune calls run the whole stage (own-row scoring,
the depth choice, apply, save, reload check), interleaved A, B, A, B in one process after a warm-up of each.

Usage: python bench/prune_auto.py [--work DIR] [--repeats 5] [--threads 1] [--part teacher|timing]
Writes bench/results/prune_auto.json after every repeat (partial results survive an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import machine, save_result  # noqa: E402

from lamina.runfolder import discard  # noqa: E402

NAME = "prune_auto"
TEACHER = dict(full=True, epochs=1, limit=400)


def teacher(work: Path) -> Path:
    """MiniLM fine-tuned with TEACHER's settings in ``work`` (reused while they match)."""
    from lamina.finetune import FinetuneConfig, finetune
    out = work / "minilm-teacher-400"
    rec = out / "finetune.json"
    if rec.exists() and all(json.loads(rec.read_text())["config"].get(k) == v for k, v in TEACHER.items()):
        return out
    discard(out)  # only the files lamina recorded there (a stranger's files stay, and the stage then refuses)
    finetune("minilm", "rotten-tomatoes", FinetuneConfig(out=str(out), progress=False, **TEACHER))
    return out


def _one(teacher_dir: Path, out: Path, method: str) -> tuple[float, dict]:
    from lamina.compress import PruneConfig, prune
    discard(out)  # only the files lamina recorded there (a stranger's files stay, and the stage then refuses)
    t = time.perf_counter()
    res = prune(str(teacher_dir), None, PruneConfig(out=str(out), drop_blocks=0.5, method=method))
    return time.perf_counter() - t, res.plan["depth"]


def _stats(xs: list[float]) -> dict:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "runs_s": xs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench-work")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("teacher", "timing"), default=None, help="run one part only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tdir = teacher(work)
    if args.part == "teacher":
        return {}
    result = {"command": "python bench/prune_auto.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "teacher": {"model": "minilm", "data": "rotten-tomatoes", **TEACHER},
              "budget": "--drop-blocks 0.5 (3 of 6 blocks), --calibration-samples 256 (default)"}
    times = {"skip_nmse": [], "auto": []}
    for m in times:  # warm-up: first loads, caches
        _, depth = _one(tdir, work / f"small-{m}", m)
        result[m] = {"method": depth["method"], "removed": depth["remove"], "reason": depth["method_reason"]}
        if m == "auto":
            result[m]["joint"] = depth["joint"]
    for _ in range(args.repeats):
        for m in times:
            s, _ = _one(tdir, work / f"small-{m}", m)
            times[m].append(s)
        for m in times:
            result[m]["time"] = _stats(times[m])
        ratio = result["auto"]["time"]["median_s"] / result["skip_nmse"]["time"]["median_s"]
        result["auto_over_skip_nmse"] = ratio
        result["load_average_end"] = list(os.getloadavg())
        save_result(NAME, result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=float))
