"""What the compression and distillation benchmarks share: teachers, score runs, BENCHMARKS.md sections.

Teachers and score runs are cached in a work folder (``--work``) and reused
when their recorded settings match, so ``bench/prune.py`` and
``bench/distill.py`` measure the same teacher on the same test rows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEACHERS = {
    # name: (model, data, finetune settings)
    "minilm": ("minilm", "rotten-tomatoes", dict(full=True, epochs=3, lr=1e-4, limit=2500, max_length=64)),
    "efficientnet": ("efficientnet-lite0", "fashion-mnist",
                     dict(full=True, epochs=3, lr=5e-4, limit=3000, image_size=96)),
}


def teacher(work: Path, name: str) -> Path:
    """The fine-tuned teacher ``name`` in ``work``: trained once, reused while its settings match."""
    from lamina.finetune import FinetuneConfig, finetune
    model, data, kw = TEACHERS[name]
    out = work / f"{name}-teacher"
    rec = out / "finetune.json"
    if rec.exists():
        cfg = json.loads(rec.read_text())["config"]
        if all(cfg.get(k) == v for k, v in kw.items()) and json.loads(rec.read_text())["task"]["data"] == data:
            return out
    if out.exists():
        shutil.rmtree(out)
    finetune(model, data, FinetuneConfig(out=str(out), **kw))
    return out


def scores(work: Path, name: str, teacher_dir: Path, limit: int, importance_samples: int) -> Path:
    """capture + analyze of the teacher (block importance for pruning); cached like the teacher."""
    from lamina import CaptureConfig, capture
    from lamina.analyze import AnalyzeConfig, analyze
    _, data, kw = TEACHERS[name]
    run = work / f"{name}-scores"
    path = run / "scores.json"
    want = {"limit": limit, "importance_samples": importance_samples, "teacher": str(teacher_dir)}
    stamp = run / "bench-settings.json"
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    cap = dict(out=str(run), limit=limit, overwrite=True, seed=1)  # seed 1: not the teacher's subsample draw
    if kw.get("max_length"):
        cap["max_length"] = kw["max_length"]
    if kw.get("image_size"):
        cap["image_size"] = kw["image_size"]
    capture(str(teacher_dir), data, CaptureConfig(**cap))
    analyze(run, AnalyzeConfig(control=False, importance_samples=importance_samples, overwrite=True))
    stamp.write_text(json.dumps(want))
    return path


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg())}


def write_section(name: str, lines: list[str]) -> None:
    """Replace (or append) the ``## name`` section of BENCHMARKS.md."""
    path = HERE.parent / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "\n".join([f"## {name}", ""] + lines)
    marker = f"## {name}\n"
    if marker in text:
        head, _, rest = text.partition(marker)
        nxt = rest.find("\n## ")
        text = head + section + ("\n" + rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def merge_previous(name: str, result: dict, parts=("minilm", "efficientnet")) -> dict:
    """Each part records the command that measured it; a part this run skipped is kept from the last
    results/NAME.json (with its own command), so a partial re-run never drops measurements."""
    p = HERE / "results" / f"{name}.json"
    old = json.loads(p.read_text()) if p.exists() else {}
    for k in parts:
        if k in result:
            result[k]["command"] = result["command"]
        elif k in old:
            result[k] = {"command": old[k].get("command", old.get("command")), **old[k]}
    return result


def save_result(name: str, result: dict) -> Path:
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    return path


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t
