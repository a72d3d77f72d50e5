"""finetune's defaults on small data: the previous defaults (3 epochs, lr 5e-5 with --full) against the current
ones (FinetuneConfig's), MiniLM fully fine-tuned on a stratified subsample of Rotten Tomatoes.

    PYTHONPATH=. python bench/finetune_defaults.py --limit 1500

Both runs see the same rows and split (seed 0); the test accuracy is on the held-out 20%. Target: the
current defaults reach a higher test accuracy than the previous ones, and their validation curve is no longer
rising at the last epoch (or early stopping ended the run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save_result, write_section  # noqa: E402

from lamina.finetune import FinetuneConfig, finetune  # noqa: E402

OLD = {"epochs": 3, "lr": 5e-5}


def _run(work: Path, name: str, limit: int, max_length: int, **kw) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = finetune("minilm", "rotten-tomatoes", FinetuneConfig(out=str(out), full=True, limit=limit,
                                                               max_length=max_length, progress=False, **kw))
    h = res.record["history"]
    return {"settings": {"epochs": res.record["config"]["epochs"], "lr": kw.get("lr") or 
                         FinetuneConfig(out="x", full=True).loop().lr, "patience": res.record["config"]["patience"]},
            "test_accuracy": res.test_accuracy, "val_accuracy": [e["val_accuracy"] for e in h["epochs"]],
            "best_epoch": h["best_epoch"], "stopped_early": h["stopped_early"], "warnings": res.record["warnings"],
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench-work/finetune-defaults")
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--max-length", type=int, default=64)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.name in ("epochs", "lr", "patience")}
    old = _run(work, "old", a.limit, a.max_length, **OLD)
    new = _run(work, "new", a.limit, a.max_length)
    rising = bool(new["warnings"]) and any("still rising" in w for w in new["warnings"])
    result = {"command": f"PYTHONPATH=. python bench/finetune_defaults.py --limit {a.limit} --max-length {a.max_length}",
              "data": f"rotten-tomatoes, stratified {a.limit} rows, split 70/10/20 (seed 0)", "model": "minilm --full",
              "defaults": defaults, "old": old, "new": new, "machine": machine(),
              "targets": {
                  "gain_over_old_defaults": {"value": new["test_accuracy"] - old["test_accuracy"], "goal": "> 0",
                                             "met": new["test_accuracy"] > old["test_accuracy"]},
                  "not_rising_at_the_end": {"value": not rising, "goal": True, "met": not rising}}}
    save_result("finetune_defaults", result)
    write_section("Fine-tuning defaults on small data", [
        f"`{result['command']}`", "",
        f"MiniLM, `--full`, {result['data']}.", "",
        "| settings | epochs run | best epoch | validation accuracy per epoch | test accuracy |",
        "|---|---|---|---|---|",
        *[f"| {n}: {r['settings']['epochs']} epochs, lr {r['settings']['lr']:g} | {len(r['val_accuracy'])} | "
          f"{r['best_epoch']} | {' '.join(f'{v:.3f}' for v in r['val_accuracy'])} | {r['test_accuracy']:.3f} |"
          for n, r in (("previous defaults", old), ("current defaults", new))], "",
        f"Targets: gain over the previous defaults {result['targets']['gain_over_old_defaults']['value']:+.3f} "
        f"(met: {result['targets']['gain_over_old_defaults']['met']}); validation no longer rising at the end: "
        f"{result['targets']['not_rising_at_the_end']['met']}."])
    print(json.dumps({k: result[k] for k in ("old", "new", "targets")}, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
