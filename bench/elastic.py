"""One elastic run against separately pruned + distilled models at the same budgets (issue 15).

For MiniLM on Rotten Tomatoes and EfficientNet-Lite0 on Fashion-MNIST (teachers
fine-tuned here with the recipe of ``bench/_common.py``, at reduced sizes: see
REDUCED), three budgets: the full model, about 2/3 and about 1/2 of the
parameters (MiniLM: 4 and 3 of 6 blocks = 2/3 and 1/2 of the encoder's
parameters; the 11.7 M embedding parameters stay in every budget.
EfficientNet-Lite0: 62% and 43% of every MBConv block's expanded channels =
2/3 and 1/2 of all parameters).

Parts (``--part``; each writes bench/results/elastic.json as it finishes):

- ``profile``: one elastic training step against its members' forward + backward as standalone models and
  against one distill step (CE + KD) per separate budget, interleaved rounds (``--repeats``).
- ``separate``: ``lamina prune`` of the teacher (skip-nMSE blocks / activation
  channels, from one capture + analyze of the teacher) and ``lamina distill``
  (CE + logit KD + SKT cosine + FSP: distill's defaults, the recipe of
  BENCHMARKS.md "distill") per budget and seed. The full budget's separate
  counterpart is the teacher itself.
- ``elastic``: one ``elastic`` run per seed (Python API, this process) over a grid holding the three
  budgets (``--sampled``, ``--teacher-kd``, ``--hidden``, ``--elastic-epochs``), the three members cut out
  with ``elastic_extract``.
- ``selector``: ``lamina elastic extract --latency-ms X`` with X between two
  members' recorded latencies, the chosen model's latency measured again with
  ``lamina bench`` at the elastic run's batch size and thread count.

With ``separate`` and ``elastic`` both asked, each seed runs both routes back to back in this process
(the same ``--threads``, about the same load). Every model is scored on the teacher's test rows and on
HOLDOUT rows of the same data that the teacher's subsample never drew; gaps get a paired standard error.

Training cost of a route, per seed: the training loops' wall seconds (elastic.json ``training.wall_s``;
the sum of each distill's epoch seconds; both include their per-epoch validation) and FLOPs = trained rows
x (3 x student forward FLOPs + teacher forward FLOPs) per sample for distill (forward + backward ~ 3
forwards; the teacher only runs forward), elastic.json ``training.flops`` for the elastic run. One-time
work (the scores run and prunes; the elastic ordering and selector) is reported apart. The teacher's own
fine-tuning is shared by both routes and counted in neither. ``cost_ratio`` = elastic cost / summed
separate cost of the 2/3 and 1/2 budgets; met when both the wall-time and the FLOP ratio are <= 0.5.

Usage: python bench/elastic.py [--work DIR] [--part profile|separate|elastic|selector ...]
       [--model minilm|efficientnet ...] [--seeds 0 1 2] [--epochs 2 (distill)] [--patience N] [--elastic-epochs 1]
       [--sampled 0] [--teacher-kd 0] [--hidden 0] [--target full|teacher] [--full-fraction 1]
       [--no-train-full] [--best-on auto|full|members] [--elastic-lr LR] [--elastic-batch-size N]
       [--elastic-max-steps N] [--repeats N]
A distill seed recorded in the results with this recipe, or an elastic run finished in --work with the
same config, is kept, not re-run, so an interrupted invocation can be started again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, TEACHERS, machine, save_result, scores, teacher, write_section  # noqa: E402

from lamina.bench import BenchConfig, bench, flops_per_sample  # noqa: E402
from lamina.compress import PruneConfig, prune  # noqa: E402
from lamina.distill import DistillConfig, distill  # noqa: E402
from lamina.train import trained  # noqa: E402
from lamina.models import load_model  # noqa: E402
from lamina.elastic import ElasticConfig, ExtractConfig, elastic, elastic_extract  # noqa: E402
from lamina.task import batches, evaluate, logits_of, make_task, read_task  # noqa: E402

# Reduced sizes: the recipe of bench/_common.py on fewer rows and shorter inputs, so that 2 models x
# (2 budgets x 3 seeds of distill + 3 elastic runs) fit in about an hour of two shared CPU cores.
REDUCED = {
    "minilm": ("minilm", "rotten-tomatoes", dict(full=True, epochs=2, lr=1e-4, limit=1000, max_length=32)),
    "efficientnet": ("efficientnet-lite0", "fashion-mnist",
                     dict(full=True, epochs=2, lr=5e-4, limit=1000, image_size=64)),
}
# budget -> prune settings (separate route) and the `lamina elastic extract` axes of the same budget
BUDGETS = {
    # skip_nmse pinned: the recorded results were measured with it, before prune's default became 'auto'
    "minilm": {"2/3": (dict(drop_blocks=2 / 6, method="skip_nmse"), ["--depth", "4"]),
               "1/2": (dict(drop_blocks=3 / 6, method="skip_nmse"), ["--depth", "3"])},
    "efficientnet": {"2/3": (dict(channels=0.38), ["--channels", "0.62"]),
                     "1/2": (dict(channels=0.57), ["--channels", "0.43"])},
}
GRID = {"minilm": ["--depths", "6,4,3"], "efficientnet": ["--channels", "1,0.62,0.43"]}
SCORES = {"minilm": dict(limit=400, importance_samples=256), "efficientnet": dict(limit=300, importance_samples=128)}
RECIPE = {"minilm": dict(lr=1e-4), "efficientnet": dict(lr=2e-3, taps="stages")}
# the elastic route: the same learning rates; the recipe of the cost arithmetic (BENCHMARKS.md "elastic")
ELASTIC = {"minilm": dict(depths="6,4,3", lr=1e-4), "efficientnet": dict(channels="1,0.62,0.43", lr=2e-3)}
HOLDOUT = 1000  # rows of the same data the teacher's subsample never drew, scored beside its 200 test rows
RESULT = HERE / "results" / "elastic.json"


def _name(model: str) -> str:
    return f"elastic-{model}"  # its own teacher folder: the full-size teachers of _common keep their settings


def _stats(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "values": xs, "n": len(xs)}


def _commit(model: str, key: str, value) -> dict:
    """Write ``value`` as results[model][key] (re-reading the file under a lock: parts may run in parallel
    processes), recompute the targets, rewrite BENCHMARKS.md's section."""
    from filelock import FileLock
    RESULT.parent.mkdir(exist_ok=True)
    import tempfile
    with FileLock(str(Path(tempfile.gettempdir()) / "lamina-bench-elastic.lock")):  # not a file in the repo
        result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
        old = result.setdefault(model, {}).get(key)
        if key == "elastic" and old and old.get("config") == value.get("config"):
            value = {**value, "seeds": {**old["seeds"], **value["seeds"]}}  # seeds run by parallel processes
        if key == "separate" and old and _same_recipe(old, value):
            value = {**value, "budgets": {b: {**v, "seeds": {**((old.get("budgets") or {}).get(b) or {}).get(
                "seeds", {}), **v["seeds"]}} for b, v in value["budgets"].items()}}
        result[model][key] = value
        result["machine"] = {**machine(), "load_average_now": list(os.getloadavg())}
        result["targets"] = targets(result)
        save_result("elastic", result)
        _write(result)
    return result


def _same_recipe(a: dict, b: dict) -> bool:
    """Whether two separate-route records distilled the same way (their seeds can be pooled)."""
    return all(a.get(k) == b.get(k) for k in ("epochs", "patience", "recipe"))


def _flops(model_dir, spec, rows) -> float:
    lm = load_model(str(model_dir))
    lm.module.eval()
    return flops_per_sample(lm, make_task(spec, lm).batch(lm, rows))


def _test_accuracy(model_dir, ds, split, spec) -> float:
    return evaluate(load_model(str(model_dir)), ds, split["test"], spec)["accuracy"]


def _holdout(spec, ds):
    """HOLDOUT rows of the data that the teacher's subsample (train, val and test) never drew: stratified,
    seed 1. With the teacher's test rows they give 1200 rows, a binomial SE near 0.012 instead of 0.03."""
    from lamina.data import load_data, subsample
    full = load_data(spec.data, spec.text_column, spec.label_column, spec.skip_bad_files)
    seen = set(ds.ids.tolist())
    rest = full.take([i for i, x in enumerate(full.ids) if x not in seen])
    return subsample(rest, min(HOLDOUT, len(rest)), seed=1)


@torch.no_grad()
def _correct(lm, ds, idx, spec) -> np.ndarray:
    lm.module.eval()
    out = [(logits_of(lm.forward(b)).argmax(-1).cpu() == y).numpy() for b, y in batches(lm, ds, idx, 64, spec)]
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _score(model_dir, ds, split, hold, spec, save: Path) -> dict:
    """Accuracy of a saved model on the teacher's test rows, on the holdout rows and on both; the per-row
    correctness is kept in ``save`` (.npy) so that two models' gap gets a paired standard error."""
    lm = load_model(str(model_dir))
    a, b = _correct(lm, ds, split["test"], spec), _correct(lm, hold, np.arange(len(hold)), spec)
    both = np.concatenate([a, b])
    np.save(save, both)
    return {"test_accuracy": float(a.mean()), "holdout_accuracy": float(b.mean()),
            "all_accuracy": float(both.mean()), "all_rows": int(len(both)), "correct": str(save),
            "parameters": sum(p.numel() for p in lm.module.parameters())}


def _paired(sep_file: str, el_file: str) -> dict | None:
    """Gap (separate - elastic) on the same rows and its standard error from the per-row differences."""
    if not (Path(sep_file).exists() and Path(el_file).exists()):
        return None
    d = np.load(sep_file).astype(float) - np.load(el_file).astype(float)
    return {"gap": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))), "rows": int(len(d))}


def _teacher(work: Path, model: str):
    TEACHERS[_name(model)] = REDUCED[model]
    t0 = time.perf_counter()
    t = teacher(work, _name(model))
    rec = json.loads((t / "finetune.json").read_text())
    spec = read_task(t)
    ds, split = spec.load()
    return t, rec, spec, ds, split, time.perf_counter() - t0


def run_separate(work: Path, model: str, args) -> None:
    t, t_rec, spec, ds, split, _ = _teacher(work, model)
    hold = _holdout(spec, ds)
    sample = list(split["train"][:32])
    f_teacher = _flops(t, spec, sample)
    prev = (_load().get(model) or {}).get("teacher") or {}
    scored = prev if prev.get("path") == str(t) and Path(prev.get("correct", "")).exists() else \
        _score(t, ds, split, hold, spec, work / f"{_name(model)}-teacher.correct.npy")
    _commit(model, "teacher", {**scored, "path": str(t), "test_accuracy": t_rec["test"]["accuracy"],
                               "test_rows": len(split["test"]), "holdout_rows": len(hold),
                               "train_rows": len(split["train"]), "settings": REDUCED[model][2],
                               "flops_per_sample": f_teacher})
    # the scores run (capture + analyze) is made once and serves both budgets: timed when made, its time kept
    stamp = work / f"{_name(model)}-scores-seconds.json"
    t0 = time.perf_counter()
    sc = scores(work, _name(model), t, **SCORES[model])
    if not stamp.exists() or time.perf_counter() - t0 > 5:
        stamp.write_text(json.dumps({"seconds": time.perf_counter() - t0, "load": list(os.getloadavg())}))
    old = (_load().get(model) or {}).get("separate") or {}
    sep = {"scores_seconds": json.loads(stamp.read_text())["seconds"], "budgets": {}, "epochs": args.epochs,
           "patience": args.patience, "recipe": RECIPE[model]}
    same = _same_recipe(old, sep)
    pruned, prune_s, f_student = {}, {}, {}
    for budget, (pcfg, _) in BUDGETS[model].items():
        tag = budget.replace("/", "of")
        pruned[budget] = work / f"{_name(model)}-pruned-{tag}"
        t0 = time.perf_counter()
        prune(str(t), str(sc), PruneConfig(out=str(pruned[budget]), overwrite=True, **pcfg))
        prune_s[budget] = time.perf_counter() - t0
        f_student[budget] = _flops(pruned[budget], spec, sample)
        removed = (json.loads((pruned[budget] / "plan.json").read_text()).get("depth") or {}).get("remove")
        nr = _score(pruned[budget], ds, split, hold, spec, work / f"{_name(model)}-pruned-{tag}.correct.npy")
        kept = {k: v for k, v in old["budgets"][budget]["seeds"].items() if "train_s" in v} if same else {}
        sep["budgets"][budget] = {"seeds": kept,  # seeds of an earlier invocation, measured the same way
                                  "prune": pcfg, "prune_seconds": prune_s[budget],
                                  "flops_per_sample": f_student[budget], "removed": removed,
                                  "no_recovery_accuracy": nr["test_accuracy"], "no_recovery": nr}
    for seed in args.seeds:
        for budget in BUDGETS[model]:
            b = sep["budgets"][budget]
            out = work / f"{_name(model)}-distill-{budget.replace('/', 'of')}-s{seed}"
            cfg = DistillConfig(out=str(out), epochs=args.epochs, seed=seed, patience=args.patience,
                                overwrite=True, progress=False, **RECIPE[model])
            prev_seed = b["seeds"].get(str(seed))
            if prev_seed and Path(prev_seed.get("correct", "")).exists():
                continue  # measured by an earlier invocation of this recipe: kept
            load0 = list(os.getloadavg())
            cpu0 = time.process_time()  # this process's CPU seconds: far less sensitive to other processes
            rec = distill(str(t), str(pruned[budget]), cfg).record
            cpu = time.process_time() - cpu0
            hist = rec["history"]
            steps, rows = trained(hist, rec["train_rows"])
            b["parameters"] = rec["parameters"]["student"]
            sc_ = _score(out / "model", ds, split, hold, spec, out.with_suffix(".correct.npy"))
            b["seeds"][str(seed)] = {
                **sc_, "path": str(out), "test_accuracy": rec["test"]["accuracy"], "distill_seconds": rec["seconds"],
                # the training loop (steps + each epoch's validation), like the elastic run's training.wall_s
                "train_s": sum(e["seconds"] for e in hist["epochs"]),
                "wall_s": rec["seconds"] + prune_s[budget], "steps": steps,
                "trained_rows": rows, "flops": rows * (3 * f_student[budget] + f_teacher),
                "val_accuracy": [e["val_accuracy"] for e in hist["epochs"]], "cpu_s": cpu,
                "load_average": [load0, list(os.getloadavg())]}
            print(f"{model} separate {budget} seed {seed}: test acc {rec['test']['accuracy']:.4f}, all "
                  f"{sc_['all_accuracy']:.4f} ({rec['seconds']:.0f} s)", flush=True)
            b["summary"] = _stats([s["test_accuracy"] for s in b["seeds"].values()])
            b["summary_all"] = _stats([s["all_accuracy"] for s in b["seeds"].values()])
            sep["command"] = _command()
            _commit(model, "separate", sep)


def _elastic_config(model: str, args) -> dict:
    kw = {**ELASTIC[model], "epochs": args.elastic_epochs, "sampled": args.sampled, "teacher_kd": args.teacher_kd,
          "hidden": args.hidden}
    # the flags added later appear only when set, so a run recorded before them keeps its config
    if getattr(args, "target", "full") != "full":
        kw["target"] = args.target
    if getattr(args, "full_fraction", 1.0) != 1.0:
        kw["full_fraction"] = args.full_fraction
    if getattr(args, "no_train_full", False):
        kw["train_full"] = False
    if getattr(args, "elastic_lr", None):
        kw["lr"] = args.elastic_lr
    if getattr(args, "best_on", "auto") != "auto":
        kw["best_on"] = args.best_on
    if getattr(args, "elastic_batch_size", None):
        kw["batch_size"] = args.elastic_batch_size
    if getattr(args, "elastic_max_steps", None):
        kw["max_steps"] = args.elastic_max_steps
    return kw


def _argv(t: Path, e: Path, kw: dict) -> list[str]:
    """The `lamina elastic` command line of the run made here through the Python API (same config)."""
    def flag(k, v):
        name = k.replace("_", "-")
        if isinstance(v, bool):
            return [f"--{name}" if v else f"--no-{name}"]
        return [f"--{name}", f"{v:g}" if isinstance(v, float) else str(v)]
    return ["elastic", "--teacher", str(t), "--out", str(e), *[x for k, v in kw.items() if k != "seed"
                                                               for x in flag(k, v)],
            "--seed", str(kw.get("seed", 0))]


def run_elastic(work: Path, model: str, args) -> None:
    """One elastic run per seed in this process (the same torch threads as the distill runs), its three members
    cut out by elastic_extract and scored on the same rows as the separate models."""
    t, t_rec, spec, ds, split, _ = _teacher(work, model)
    hold = _holdout(spec, ds)
    kw = _elastic_config(model, args)
    old = (_load().get(model) or {}).get("elastic") or {}
    el = {"seeds": dict(old.get("seeds", {})) if old.get("config") == kw else {}, "config": kw,
          "epochs": args.elastic_epochs, "sampled": args.sampled}
    sep = (_load().get(model) or {}).get("separate") or {}
    for seed in args.seeds:
        e = work / f"{_name(model)}-elastic-s{seed}"
        load0 = list(os.getloadavg())
        t0 = time.perf_counter()
        done = json.loads((e / "elastic.json").read_text()) if (e / "elastic.json").exists() else {}
        if done.get("config") and all(done["config"].get(k) == v for k, v in {**kw, "seed": seed}.items()) \
                and done["training"].get("select_s") is not None:
            rec, wall = done, done["seconds"]  # finished by an earlier invocation (its own timing kept)
            load0 = (rec.get("members") or [{}])[0].get("loadavg") or list(os.getloadavg())  # at its selector
        else:
            cpu0 = time.process_time()
            rec = elastic(str(t), ElasticConfig(out=str(e), seed=seed, overwrite=True, progress=False, **kw)).record
            wall = time.perf_counter() - t0
            rec["cpu_s"] = time.process_time() - cpu0  # the whole call: ordering, training, selector
        members, pairs = {}, {}
        points = {"full": {}} | {b: axes for b, (_, axes) in BUDGETS[model].items()}
        for budget, axes in points.items():
            out = work / f"{_name(model)}-elastic-s{seed}-{budget.replace('/', 'of')}"
            cut = {axes[i].lstrip("-"): (int if axes[i] == "--depth" else float)(axes[i + 1])
                   for i in range(0, len(axes), 2)}  # the CLI axes of BUDGETS as ExtractConfig fields
            elastic_extract(str(e), ExtractConfig(out=str(out), overwrite=True, **cut))
            members[budget] = {**_score(out / "model", ds, split, hold, spec, out.with_suffix(".correct.npy")),
                               "path": str(out)}
            s_seed = ((sep.get("budgets") or {}).get(budget) or {}).get("seeds", {}).get(str(seed))
            ref = s_seed["correct"] if s_seed else ((_load().get(model) or {}).get("teacher") or {}).get("correct") \
                if budget == "full" else None
            if ref:
                pairs[budget] = _paired(ref, members[budget]["correct"])
            print(f"{model} elastic seed {seed} {budget}: test acc {members[budget]['test_accuracy']:.4f}, all "
                  f"{members[budget]['all_accuracy']:.4f}", flush=True)
        tr = rec.get("training", {})
        el["seeds"][str(seed)] = {"path": str(e), "wall_s": wall, "train_s": tr.get("wall_s"), "cpu_s": rec.get("cpu_s"),
                                  "one_time_s": (tr.get("order_s") or 0) + (tr.get("select_s") or 0),
                                  "training": tr, "flops": tr.get("flops"), "members": members, "pairs": pairs,
                                  "grid": rec.get("grid"), "runtime": rec.get("runtime"), "family": rec.get("members"),
                                  "load_average": [load0, list(os.getloadavg())]}
        el["command"] = _command()
        el["argv"] = _argv(t, work / f"{_name(model)}-elastic-s{{seed}}", {**kw, "seed": "{seed}"})
        _commit(model, "elastic", el)


def run_profile(work: Path, model: str, args) -> None:
    """One elastic training step (the benchmark's recipe, forward + backward, 32 rows) against what its parts
    cost alone: each trained member's forward + backward as a standalone extracted model, and the teacher's
    forward when it is run; and one distill step (teacher forward, student forward + backward on CE + KD) of
    each separate budget. Interleaved rounds, one warm-up, the median of ``args.repeats``."""
    import copy

    from lamina.distill.losses import LossWeights, total_loss
    from lamina.elastic import Family, sandwich_loss
    from lamina.elastic.train import _grid
    t, _, spec, ds, split, _ = _teacher(work, model)
    teacher = load_model(str(t), for_training=True)
    task = make_task(spec, teacher)
    kw = _elastic_config(model, args)
    cfg = ElasticConfig(out=str(work / "unused"), **kw)
    grid = _grid(teacher, cfg)
    parent = copy.copy(teacher)
    parent.module = copy.deepcopy(teacher.module)
    n = parent.blocks.n_blocks
    fam = Family(parent, list(range(n))[1:n - 1], grid)  # a middle-blocks order, as the skip ranking gives
    teacher.module.eval()
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    rows = list(split["train"][:32])
    batch = task.batch(parent, rows)
    subs = [grid.smallest] + [b for b in grid.members() if b not in (grid.full, grid.smallest)][:args.sampled]
    trained = [grid.full, *subs]
    ext = {b: fam.extract(b) for b in grid.members()}
    for m in ext.values():
        m.module.train()
        for p in m.module.parameters():
            p.requires_grad_(True)
    parent.module.train()

    def t_logits():
        with torch.no_grad():
            return logits_of(teacher.forward(batch)).float()

    from lamina.distill.taps import record
    to_teacher = cfg.target == "teacher"

    def elastic_step():  # the step's draw of the full member: trained (the costlier case)
        if to_teacher or cfg.teacher_kd > 0:
            with torch.no_grad(), record(teacher.module, teacher.blocks.block_paths if to_teacher and cfg.hidden
                                         else []) as feats:
                tl = logits_of(teacher.forward(batch)).float()
        else:
            tl, feats = None, None
        loss, _ = sandwich_loss(fam, task, batch, rows, subs, cfg, tl, cfg.train_full, feats and dict(feats))
        loss.backward()
        parent.module.zero_grad(set_to_none=True)

    def plain(b):
        def f():
            pred, labels = task.align(logits_of(ext[b].forward(batch)).float(), rows)
            torch.nn.functional.cross_entropy(pred, labels).backward()
            ext[b].module.zero_grad(set_to_none=True)
        return f

    def distill_step(b):
        w = LossWeights(ce=1.0, kd=1.0, temperature=2.0, cosine=0, fsp=0)

        def f():
            tl = t_logits()
            pred, labels = task.align(logits_of(ext[b].forward(batch)).float(), rows)
            total_loss(w, student_logits=pred, teacher_logits=task.align(tl, rows)[0], labels=labels)[0].backward()
            ext[b].module.zero_grad(set_to_none=True)
        return f

    fns = {"elastic_step": elastic_step, "teacher_forward": t_logits,
           **{f"member_{b.label()}": plain(b) for b in trained},
           **{f"distill_step_{b.label()}": distill_step(b) for b in grid.members() if b != grid.full}}
    times: dict = {k: [] for k in fns}
    load0 = list(os.getloadavg())
    for r in range(args.repeats + 1):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = sum(med[f"member_{b.label()}"] for b in trained) + \
        (med["teacher_forward"] if cfg.teacher_kd > 0 or to_teacher else 0)
    dist = sum(med[k] for k in med if k.startswith("distill_step_"))
    _commit(model, "profile", {
        "seconds": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in times.items()},
        "elastic_over_its_members": med["elastic_step"] / parts, "elastic_over_distill_steps": med["elastic_step"] / dist,
        "members_trained": [b.label() for b in trained], "teacher_forward_counted": cfg.teacher_kd > 0 or to_teacher,
        "rows": len(rows), "repeats": args.repeats, "threads": torch.get_num_threads(), "config": kw,
        "load_average": [load0, list(os.getloadavg())], "command": _command()})
    print(f"{model} profile: elastic step {med['elastic_step'] * 1000:.0f} ms, its members alone "
          f"{parts * 1000:.0f} ms, distill steps {dist * 1000:.0f} ms", flush=True)


def _cli(*argv: str) -> float:
    """Run ``lamina ARGV`` as a user would; its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "lamina", *argv], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"lamina {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def _load() -> dict:
    return json.loads(RESULT.read_text()) if RESULT.exists() else {}


def run_selector(work: Path, model: str, args) -> None:
    el = (_load().get(model) or {}).get("elastic", {}).get("seeds", {})
    if not el:
        raise SystemExit(f"--part selector needs --part elastic of {model} first")
    seed, rec = sorted(el.items())[0]
    e = Path(rec["path"])
    fam = json.loads((e / "elastic.json").read_text())
    lats = sorted({m["latency_ms"] for m in fam["members"]})
    # a target between the fastest member and the next: the selector must give up accuracy to meet it
    target = (lats[0] + lats[1]) / 2 if len(lats) > 1 else lats[0] * 1.1
    out = work / f"{_name(model)}-selected"
    _cli("elastic", "extract", str(e), "--out", str(out), "--latency-ms", f"{target:.4f}", "--overwrite")
    bs = int(fam["members"][0].get("latency_batch") or 1)
    threads = fam["members"][0].get("latency_threads")
    # the extract folder: its extract.json names the task and the test rows
    res = bench([str(out)], BenchConfig(out=str(work / f"{_name(model)}-selected-bench"), batch_sizes=(bs,),
                                    repeats=args.repeats, threads=threads, accuracy=False, overwrite=True,
                                    progress=False))
    lat = res["models"][0]["latency"][str(bs)]
    chosen = json.loads((out / "extract.json").read_text())
    _commit(model, "selector", {
        "chosen": chosen["budget"], "chosen_recorded_ms": (chosen.get("measured_in_family") or {}).get("latency_ms"),
        "elastic_run": str(e), "target_ms": target, "batch": bs, "threads": threads, "measured_ms": lat["median_ms"],
        "measured_iqr_ms": [lat["p25_ms"], lat["p75_ms"]], "met": bool(lat["median_ms"] <= target),
        "member_latencies_ms": lats, "command": _command(), "load_average": list(os.getloadavg())})


def targets(r: dict) -> dict:
    out = {}
    for model in ("minilm", "efficientnet"):
        m = r.get(model) or {}
        sep, el, t = m.get("separate"), m.get("elastic"), m.get("teacher")
        if sep and el and el.get("seeds"):
            # per budget: the mean over seeds of (separate - elastic) on the same 1200 rows (the teacher's test
            # rows + the holdout), with the standard error of that mean from the paired per-row differences
            per, se = {}, {}
            for budget in sep["budgets"]:
                pairs = [e["pairs"][budget] for e in el["seeds"].values() if (e.get("pairs") or {}).get(budget)]
                if pairs:
                    per[budget] = statistics.mean(p["gap"] for p in pairs)
                    se[budget] = float(np.sqrt(sum(p["se"] ** 2 for p in pairs)) / len(pairs))
            if per:
                gap = max(per.values())
                out[f"max_gap_vs_separate_{model}"] = {
                    "value": gap, "goal": "<= 0.01 (mean over seeds, 1200 rows)", "met": gap <= 0.01,
                    "per_budget": per, "se_per_budget": se, "seeds": len(el["seeds"])}
            ratios = []
            for seed, e in el["seeds"].items():  # a seed counts when both routes finished every budget
                if not all(seed in b["seeds"] for b in sep["budgets"].values()) or e.get("train_s") is None:
                    continue
                s_train = sum(b["seeds"][seed]["train_s"] for b in sep["budgets"].values())
                s_flops = sum(b["seeds"][seed]["flops"] for b in sep["budgets"].values())
                s_once = sep["scores_seconds"] + sum(b["prune_seconds"] for b in sep["budgets"].values())
                ratios.append((e["train_s"] / s_train, e["flops"] / s_flops, e["one_time_s"] / s_once))
            if ratios:
                w = statistics.mean(x[0] for x in ratios)
                f = statistics.mean(x[1] for x in ratios)
                out[f"cost_ratio_{model}"] = {
                    "value": max(w, f), "goal": "<= 0.5 (training cost: the larger of the training-loop wall-time "
                    "and FLOP ratios, mean over seeds)", "met": max(w, f) <= 0.5, "wall_ratio": w, "flop_ratio": f,
                    "one_time_ratio": statistics.mean(x[2] for x in ratios), "seeds": len(ratios)}
        if el and el.get("seeds") and t:
            full = [e["members"]["full"]["all_accuracy"] for e in el["seeds"].values() if "full" in e["members"]]
            if full and t.get("all_accuracy"):
                v = statistics.mean(full) / t["all_accuracy"]
                out[f"full_member_retained_{model}"] = {"value": v, "goal": ">= 0.99 (1200 rows)", "met": v >= 0.99}
        s = m.get("selector")
        if s:
            out[f"selector_latency_met_{model}"] = {"value": int(s["met"]), "goal": "1 (re-measured <= target)",
                                                    "met": bool(s["met"])}
    return out


def _command() -> str:
    return "python bench/elastic.py " + " ".join(sys.argv[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench-work", help="folder for teachers, students and elastic runs")
    ap.add_argument("--part", nargs="+", choices=("profile", "separate", "elastic", "selector"),
                    default=["separate", "elastic", "selector"])
    ap.add_argument("--model", nargs="+", choices=tuple(REDUCED), default=list(REDUCED))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2, help="epochs of every distill run (at most, with --patience)")
    ap.add_argument("--patience", type=int, default=None,
                    help="distill's early stopping for the separate route (None: every epoch runs; the cost counts "
                         "the epochs run, the best epoch's weights are kept either way)")
    ap.add_argument("--elastic-epochs", type=int, default=1, help="epochs of every elastic run")
    ap.add_argument("--sampled", type=int, default=0, help="random sub-models per elastic step (--sampled)")
    ap.add_argument("--teacher-kd", type=float, default=0.0, help="elastic --teacher-kd")
    ap.add_argument("--hidden", type=float, default=0.0, help="elastic --hidden")
    ap.add_argument("--target", choices=("full", "teacher"), default="full", help="elastic --target")
    ap.add_argument("--full-fraction", type=float, default=1.0, help="elastic --full-fraction")
    ap.add_argument("--no-train-full", action="store_true", help="elastic --no-train-full")
    ap.add_argument("--best-on", choices=("auto", "full", "members"), default="auto", help="elastic --best-on")
    ap.add_argument("--elastic-lr", type=float, default=None, help="elastic --lr (default: the distill lr)")
    ap.add_argument("--elastic-max-steps", type=int, default=None,
                    help="elastic --max-steps: optimizer steps in all, overriding --elastic-epochs (a training "
                         "budget between whole epochs; the cost counts the rows trained)")
    ap.add_argument("--elastic-batch-size", type=int, default=None,
                    help="elastic --batch-size (default: distill's, 32); FLOPs count rows, so more steps cost no more")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds when the selector's choice is re-measured")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for model in args.model:
        if "profile" in args.part:
            run_profile(work, model, args)
        # seed-major: the two routes of a seed run back to back, at about the same load
        for seed in args.seeds:
            one = argparse.Namespace(**{**vars(args), "seeds": [seed]})
            if "separate" in args.part:
                run_separate(work, model, one)
            if "elastic" in args.part:
                run_elastic(work, model, one)
        if "selector" in args.part:
            run_selector(work, model, args)
    return _load()


def _fmt_stats(s: dict | None) -> str:
    return "–" if not s else f"{s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.4f}–{s['max']:.4f})"


def _settings(model: str) -> str:
    kw = REDUCED[model][2]
    size = f"max {kw['max_length']} tokens" if "max_length" in kw else f"{kw['image_size']} px"
    return f"{REDUCED[model][0]} on {REDUCED[model][1]}: {kw['limit']} rows (70/10/20 split), {size}"


def _acc(x: dict | None) -> str:
    return "–" if not x else f"{x['all_accuracy']:.4f}"


def _write(r: dict) -> None:
    mach = r.get("machine", {})
    lines = [f"Results: `bench/results/elastic.json` ({mach.get('cpus')} shared CPUs, torch {mach.get('torch')}, "
             f"1 torch thread, both routes in one process; load average at the last write "
             f"{', '.join(f'{x:.1f}' for x in mach.get('load_average_now', []))}). Reduced sizes for two shared "
             "cores, teachers fine-tuned here for 2 epochs (the full-size teachers of bench/_common.py take "
             "~30 min each on these cores): " + "; ".join(_settings(m) for m in REDUCED)
             + f". Accuracy on 1200 rows: the teacher's 200 test rows + {HOLDOUT} rows of the same data that the "
             "teacher's subsample never drew (stratified, seed 1); per seed, and the mean over seeds. Gap = "
             "separate - elastic on the same rows, ± its standard error from the paired per-row differences.", ""]
    for model in ("minilm", "efficientnet"):
        m = r.get(model)
        if not m:
            continue
        t = m.get("teacher", {})
        sep, el = m.get("separate") or {}, m.get("elastic") or {}
        tp = t.get("parameters")
        if t.get("all_accuracy") is not None:
            lines += [f"**{model}**: teacher {t['all_accuracy']:.4f} on {t.get('all_rows')} rows "
                      f"({t['test_accuracy']:.4f} on its {t.get('test_rows')} test rows), {tp:,} parameters.", ""]
        else:
            lines += [f"**{model}**:", ""]
        prof = m.get("profile")
        if prof:
            sec = prof["seconds"]
            lines += [f"Step profile (`{prof['command']}`, {prof['rows']} rows, {prof['threads']} thread, median of "
                      f"{prof['repeats']} interleaved rounds, load {prof['load_average'][0][0]:.1f}): one elastic step "
                      f"(forward + backward of {', '.join(prof['members_trained'])}) "
                      f"{sec['elastic_step']['median'] * 1000:.0f} ms (min–max {sec['elastic_step']['min'] * 1000:.0f}–"
                      f"{sec['elastic_step']['max'] * 1000:.0f}) = {prof['elastic_over_its_members']:.2f}x "
                      "the sum of its members' own forward + backward as standalone models"
                      + (" and the teacher's forward" if prof["teacher_forward_counted"] else "")
                      + f"; {prof['elastic_over_distill_steps']:.2f}x one distill step (CE + KD) of each separate "
                      "budget together.", ""]
        seeds = sorted(el.get("seeds", {}))
        lines += ["| budget | parameters (ratio) | separate: prune + distill, per seed | elastic member, per seed | "
                  "gap ± SE, per seed | mean gap | no recovery |", "|---|---|---|---|---|---|---|"]
        for b in ["full"] + list(BUDGETS[model]):
            sb = sep.get("budgets", {}).get(b, {})
            es = [el["seeds"][k] for k in seeds]
            sacc = ", ".join(_acc(sb.get("seeds", {}).get(k)) for k in seeds) if b != "full" else \
                f"{t.get('all_accuracy', float('nan')):.4f} (the teacher)"
            eacc = ", ".join(_acc(e["members"].get(b)) for e in es)
            pr = [(e.get("pairs") or {}).get(b) for e in es]
            gaps = ", ".join(f"{p['gap']:+.4f} ± {p['se']:.4f}" for p in pr if p) or "–"
            mg = f"{statistics.mean(p['gap'] for p in pr if p):+.4f}" if any(pr) else "–"
            ep = es[0]["members"][b]["parameters"] if es and b in es[0]["members"] else None
            params = f"{ep:,} ({ep / tp:.3f})" if ep and tp else "–"
            nr = _acc(sb.get("no_recovery")) if sb.get("no_recovery") else "–"
            lines.append(f"| {b} | {params} | {sacc} | {eacc} | {gaps} | {mg} | {nr} |")
        lines.append("")
        if sep and el.get("seeds"):
            rows = []
            for k in seeds:
                e = el["seeds"][k]
                if not all(k in bb["seeds"] for bb in sep["budgets"].values()):
                    continue
                st = [sep["budgets"][bb]["seeds"][k] for bb in BUDGETS[model]]
                once = sep["scores_seconds"] + sum(bb["prune_seconds"] for bb in sep["budgets"].values())
                sl = [x for x in [y for bb in st for y in bb.get("load_average", [])] + e.get("load_average", [])
                      if x]
                parts = " + ".join(f"{x['train_s']:.0f}" for x in st)
                rows.append(f"| {k} | {parts} = "
                            f"{sum(x['train_s'] for x in st):.0f} s | {e['train_s']:.0f} s | "
                            f"{e['train_s'] / sum(x['train_s'] for x in st):.3f} | "
                            f"{sum(x['flops'] for x in st):.3g} / {e['flops']:.3g} = "
                            f"{e['flops'] / sum(x['flops'] for x in st):.3f} | {once:.0f} s | "
                            f"{e['training']['order_s']:.0f} + {e['training']['select_s']:.0f} s | "
                            f"{min(x[0] for x in sl):.1f}–{max(x[0] for x in sl):.1f} | "
                            + (f"{sum(x['cpu_s'] for x in st):.0f} / {e['cpu_s']:.0f} s = "
                               f"{e['cpu_s'] / sum(x['cpu_s'] for x in st):.3f} |"
                               if e.get("cpu_s") and all(x.get("cpu_s") for x in st) else "– |"))
            lines += ["Training cost per seed, the two routes run back to back in one process (training = the "
                      "training loop: optimizer steps and each epoch's validation; one-time = the separate route's "
                      "scores run + prunes against the elastic run's ordering + selector, not in the ratio):", "",
                      "| seed | separate training (2/3 + 1/2) | elastic training | wall ratio | FLOPs separate / "
                      "elastic | separate one-time | elastic one-time (order + select) | 1-min load | process CPU, separate / "
                      "elastic (whole calls; elastic's holds its ordering and selector) |",
                      "|---|---|---|---|---|---|---|---|---|", *rows, ""]
            ran = "; ".join(f"{bb} " + ", ".join(str(len(v.get("val_accuracy", []))) for _, v in
                                              sorted(sep["budgets"][bb]["seeds"].items()))
                            for bb in BUDGETS[model])
            how = (f"at most {sep.get('epochs')} distill epochs, early stopping on the validation accuracy "
                   f"(patience {sep['patience']}; epochs run per seed: {ran}; the best epoch kept)"
                   if sep.get("patience") is not None else f"{sep.get('epochs')} distill epochs")
            lines += [f"Separate route: {how}, {sep.get('recipe')} (distill's "
                      "defaults otherwise: CE + KD + cosine + FSP). Elastic route: `lamina "
                      f"{' '.join(el.get('argv', []))}`, then `lamina elastic extract` per budget (run through the "
                      f"Python API, same config). Command: `{el.get('command')}`.", ""]
        s = m.get("selector")
        if s:
            lines += [f"Selector: `lamina elastic extract --latency-ms {s['target_ms']:.2f}` (members' latencies in "
                      "elastic.json " + ", ".join(f"{x:.2f}" for x in s["member_latencies_ms"])
                      + f" ms at batch {s['batch']}, {s['threads']} thread(s)); chose {s.get('chosen')} (recorded "
                      f"{s.get('chosen_recorded_ms') or float('nan'):.2f} ms); the chosen model re-measured by "
                      f"`lamina bench`: median {s['measured_ms']:.2f} ms (IQR {s['measured_iqr_ms'][0]:.2f}–"
                      f"{s['measured_iqr_ms'][1]:.2f}) -> {'met' if s['met'] else 'NOT met'}.", ""]
    tg = r.get("targets") or {}
    if tg:
        lines += ["| target | value | goal | met |", "|---|---|---|---|"]
        for k, v in tg.items():
            extra = (f" (wall {v['wall_ratio']:.3f}, FLOPs {v['flop_ratio']:.3f})" if "wall_ratio" in v
                     and v.get("flop_ratio") is not None else "")
            if "se_per_budget" in v:
                extra = " (" + ", ".join(f"{b} {g:+.4f} ± {v['se_per_budget'][b]:.4f}" for b, g in
                                         v["per_budget"].items()) + f"; {v.get('seeds')} seed(s))"
            lines.append(f"| {k} | {v['value']:.4f}{extra} | {v['goal']} | {'yes' if v['met'] else 'NO'} |")
        lines.append("")
    lines += NOTES
    write_section("elastic", lines)


NOTES = [  # written by hand from the numbers of the runs recorded above (kept here so a re-run keeps them)
    "Notes on these numbers (read them with the targets):",
    "",
    "- **Where the step's time goes.** One elastic step costs what its members cost as standalone models: "
    "1.07x (MiniLM: full + 4-block + 3-block members + teacher forward, 1623 ms against 1510 ms) and 1.03x "
    "(EfficientNet, 1845 against 1799 ms), measured with /tmp scripts at a load near 1, 32 rows, 1 thread, "
    "5 interleaved rounds; the step profile above re-measures it for this recipe (1.10x and 1.03x at a load near "
    "10). `functional_call` on prefix views, re-slicing and drawing members are not the cost; a whole kept tensor "
    "is now passed as the parent's own Parameter (no slice, so no scatter of its gradient into zeros). The last "
    "session's wall ratios (1.29, 0.87) came from what was counted and how: the elastic wall time held the "
    "one-time ordering (141 s of MiniLM seed 1's 394 s under load) and the selector's scoring and timing of every "
    "member; the routes ran in separate processes at loads between 1 and 22; and `lamina elastic` ran as a "
    "subprocess at torch's default 2 threads against 1 for the distills. Now both routes of a seed run back to "
    "back in one process at 1 thread, the training loops are compared (elastic.json `training.wall_s` against the "
    "distills' epoch seconds, each including its per-epoch validation), and the one-time work is reported beside "
    "it: the separate route's scores run (capture + analyze) and prunes against the elastic run's ordering "
    "(`order_s`) and selector (`select_s`).",
    "- **MiniLM in the regime where the separate route has converged (session 4).** Last session's control showed "
    "the 2-epoch gap is what one epoch less of training costs while distillation is still improving. So the "
    "question was settled on seed 0 and TUNE rows (the 1000 rows above, never the 1200 scored rows), choosing on "
    "them and on distill's validation split only: (1) the separate distills run up to 6 epochs with distill's "
    "early stopping (patience 2, the best validation epoch kept) to find where they plateau; (2) elastic runs at <= "
    "0.5 of that converged cost, counted as the bench counts it (epochs run x rows x (3 x student + teacher "
    "forward FLOPs)); (3) gaps on TUNE rows, ± paired SE. `/tmp` scripts calling `distill` / `elastic` with these "
    "configs; 1 thread, nice 19, load 4-7.",
    "",
    "  | separate route (seed 0) | 2/3 on TUNE | 1/2 on TUNE | distill epochs run (2/3 + 1/2) | FLOPs |",
    "  |---|---|---|---|---|",
    "  | 1 epoch | 0.702 | 0.645 | 1 + 1 | 2.62e12 |",
    "  | 2 epochs (the bench until now) | 0.722 | 0.695 | 2 + 2 | 5.24e12 |",
    "  | 4 epochs, no early stop (1/2 only) | – | 0.723 (best epoch 4) | – + 4 | – |",
    "  | up to 6, patience 2 (converged) | 0.732 (best epoch 6; validation 0.71, 0.74, 0.75, 0.77, 0.77, "
    "0.78) | 0.713 (best epoch 2; 0.66, 0.73, 0.71, 0.73, stopped) | 6 + 4 | 1.33e13 |",
    "  | 6 epochs, no early stop (1/2 only) | – | 0.713 (best epoch 2; epochs 5, 6: 0.72, 0.73) | – + 6 | – |",
    "",
    "  | elastic run (seed 0, lr 1e-4) | full | 2/3 (gap) | 1/2 (gap) | FLOPs / converged separate |",
    "  |---|---|---|---|---|",
    "  | `--sampled 0 --hidden 0`, 2 epochs (last session's recipe) | 0.776 | 0.688 (+0.044 ± 0.015) | 0.702 "
    "(+0.011 ± 0.012) | 0.32 |",
    "  | the same, 3 epochs | 0.780 | 0.702 (+0.030 ± 0.014) | 0.716 (-0.003 ± 0.011) | 0.48 |",
    "  | `--sampled 1`, 2 epochs (full member's validation kept epoch 1) | 0.731 | 0.688 (+0.044 ± 0.015) | 0.684 "
    "(+0.029 ± 0.011) | 0.46 |",
    "  | `--target teacher --hidden 1 --sampled 1 --full-fraction 0.5`, 2 epochs | 0.772 | 0.730 (+0.002 ± 0.008) "
    "| 0.689 (+0.024 ± 0.013) | 0.43 |",
    "  | the same at lr 2e-4, `--best-on members` | 0.750 | 0.718 (+0.014 ± 0.009) | 0.692 (+0.021 ± 0.014) | 0.43 |",
    "  | **`--target teacher --hidden 1 --sampled 1 --no-train-full --best-on members`, 3 epochs** (chosen) | 0.754 "
    "| 0.738 (-0.006 ± 0.008) | 0.707 (+0.006 ± 0.012) | 0.48 |",
    "",
    "  The teacher scores 0.741 on TUNE rows. With `--sampled 0` the 2/3 member (4 blocks) is never trained "
    "directly and trails; with the full member trained as well, each sub-member gets too few epochs for the "
    "budget. The chosen recipe (EfficientNet's of last session, 3 epochs) trains both sub-members every step on "
    "distill's targets (CE + KD to the frozen teacher + cosine to its block outputs), the full member only "
    "through the weights it shares: per row F_T + 3 (F_4 + F_3) against 2 F_T + 3 (F_4 + F_3) for the two "
    "distills' epoch, so 3 elastic epochs against 6 + 4 distill epochs is 0.48. New: `--best-on members` "
    "(ElasticConfig, test, README): the epoch kept is the best on validation accuracy pooled over every member; "
    "with the full member's alone (the default, unchanged) an elastic run can restore an epoch before its "
    "sub-members' training, as `--sampled 1` above did. Caveats: the 2/3 distill's validation still rose by one "
    "row of 100 from epoch 5 to 6, so it is near, not provably at, its plateau; the 1/2 distill's best "
    "epoch depends on the schedule length (epoch 2 of 6: 0.713; epoch 4 of 4: 0.723), which is 1 point of noise "
    "in the reference itself.",
    "- **Recipes (issue 15's accuracy gap, this session).** MiniLM keeps last session's recipe and its 3-seed "
    "rows above (`--sampled 0 --teacher-kd 0 --hidden 0`, 1 epoch: the full member on the task loss, the smallest on "
    "task loss + KD to the full member; 27 block forwards per row against 66 for the two distills: 0.41). "
    "EfficientNet's rows above are this session's recipe: `--target teacher --hidden 1 --no-train-full --sampled 1 "
    "--lr 4e-3`, 1 epoch: both sub-members trained every step on CE + KD to the frozen teacher's logits + cosine to "
    "the teacher's output of each block they keep (one teacher forward per row, shared), the full member not trained "
    "(it only moves through the shared weights; EfficientNet's reduced teacher is so weak that it stays far above "
    "it): cost F + 3 x (F_0.62 + F_0.43) per row against 4 F + 6 x (F_0.62 + F_0.43) for the two distills, 0.41 "
    "(the step profile above is last session's, of its recipe: not re-run). Chosen on seed 0 and "
    "TUNE rows only: 1000 rows of the same data that neither the teacher's subsample nor the 1000 scored holdout "
    "rows drew (stratified, seed 2), never the 1200 scored rows. Gap = separate (2 distill epochs, seed 0) - "
    "elastic on those rows, ± paired SE, 2/3 and 1/2; full member's accuracy; FLOP ratio. EfficientNet (teacher "
    "0.521 on them): `--target teacher --hidden 1 --no-train-full --sampled 1` at lr 2e-3 +0.048 ± 0.012, "
    "+0.023 ± 0.013 (full 0.701; 0.41); the same at lr 4e-3 +0.022 ± 0.011, +0.024 ± 0.012 (full 0.725; 0.41; "
    "chosen); at lr 4e-3 and batch 16 (twice the steps for the same FLOPs) +0.065 ± 0.011, +0.034 ± 0.011. MiniLM "
    "(teacher 0.741): last session's recipe +0.027 ± 0.014, +0.042 ± 0.012 (full 0.766; 0.41; kept); `--target "
    "teacher --hidden 1 --sampled 1 --full-fraction 0.25` (both sub-members trained every step toward the teacher's "
    "logits and block outputs, the full member on a quarter of the steps) +0.038 ± 0.009, +0.045 ± 0.013 (full 0.755; "
    "0.48). Last session's seed-0 trials (on the scored rows): lr 2e-4 / 3e-4, `--hidden 1` toward the full member, "
    "`--no-train-full --sampled 1` toward the full member: none within 1 point; `--sampled 1` with the full member "
    "trained costs 0.59. New flags: `--target teacher` and `--full-fraction` (ElasticConfig, tests, README); their "
    "defaults (`full`, 1) are unchanged: neither was better on TUNE rows for both models.",
    "- **Result, MiniLM (session 4).** The chosen recipe against the converged separate route (`--epochs 6 "
    "--patience 2`: the issue's \"existing recipe\" is a converged distill, and distill's own default patience is "
    "2), 3 seeds, 1200 scored rows: max gap 0.008 (2/3 +0.007, 1/2 +0.008; per seed +0.003 to +0.014) at 0.45 "
    "of the FLOPs (wall 0.22), full member 0.998 of the teacher: every MiniLM target met. Seeds 0, 1 ran in one "
    "process and seed 2 in a second (separate --work with a copy of the teacher), both at nice 19 beside other "
    "engineers' runs, so the wall ratio is noisy; the FLOP ratio is the one to read. MiniLM's selector row is "
    "last session's (re-run in session 5, below).",
    "- **EfficientNet in the converged regime (session 5).** The same protocol as MiniLM's: seed 0, TUNE rows "
    "(teacher 0.521 on them), `/tmp` scripts calling `distill` / `elastic`, 1 thread, load 1-4 (one engineer "
    "this session). Separate route first:",
    "",
    "  | separate route (seed 0) | 2/3 on TUNE | 1/2 on TUNE | distill epochs run (2/3 + 1/2) |",
    "  |---|---|---|---|",
    "  | 3 epochs | 0.814 | 0.789 | 3 + 3 |",
    "  | up to 6, patience 2 (MiniLM's protocol) | 0.823 (best epoch 5; validation 0.82, 0.85, 0.83, 0.88, 0.89, "
    "0.88) | 0.739 (best epoch 2; 0.74, 0.86, 0.84, 0.86: stopped at epoch 4 on a tie) | 6 + 4 |",
    "  | **6 epochs, no early stop** (the reference chosen) | 0.823 | 0.813 (best epoch 5; 0.86, 0.84, 0.86, 0.88, "
    "0.87 from epoch 2) | 6 + 6 |",
    "  | 8 epochs, no early stop | 0.830 (best epoch 8) | 0.803 (best epoch 4) | 8 + 8 |",
    "",
    "  Distill's patience 2 stopped the 1/2 distill on a tie of its 100 validation rows, 7 points below where "
    "it ends when it runs on; a reference stopped by a tie has not converged, so EfficientNet's separate route "
    "runs all 6 epochs (and its cost counts all 12). 8 epochs move the two by +0.007 and -0.010, inside one SE "
    "(0.009): 6 is the plateau. Elastic runs (`--target teacher --hidden 1 --sampled 1 --no-train-full "
    "--best-on members`, the recipe of sessions 3-4), gap = separate (6 epochs) - elastic on TUNE rows, ± paired SE:",
    "",
    "  | elastic run (seed 0) | full | 2/3 (gap) | 1/2 (gap) | FLOPs / separate |",
    "  |---|---|---|---|---|",
    "  | 3 epochs, lr 4e-3 | 0.795 | 0.813 (+0.010 ± 0.009) | 0.804 (+0.009 ± 0.010) | 0.41 |",
    "  | 3 epochs, lr 2e-3 | 0.772 | 0.808 (+0.015 ± 0.009) | 0.809 (+0.004 ± 0.010) | 0.41 |",
    "  | 3 epochs, lr 3e-3 | 0.781 | 0.803 (+0.020 ± 0.010) | 0.799 (+0.014 ± 0.010) | 0.41 |",
    "  | 3 epochs, lr 2e-3, batch 16 | 0.768 | 0.791 (+0.032 ± 0.010) | 0.780 (+0.033 ± 0.010) | 0.41 |",
    "  | 3 epochs, lr 4e-3, `--hidden 0.5` | 0.784 | 0.806 (+0.017 ± 0.010) | 0.809 (+0.004 ± 0.010) | 0.41 |",
    "  | 3 epochs, lr 4e-3, `--hidden 0` | 0.787 | 0.815 (+0.008 ± 0.010) | 0.799 (+0.014 ± 0.011) | 0.41 |",
    "  | 4 epochs, lr 4e-3 (over the budget) | 0.824 | 0.836 (-0.013 ± 0.009) | 0.824 (-0.011 ± 0.009) | 0.54 |",
    "  | **`--max-steps 77` (3.5 epochs), lr 4e-3** (chosen) | 0.789 | 0.819 (+0.004 ± 0.009) | 0.816 (-0.003 ± "
    "0.009) | 0.48 |",
    "",
    "  First 3-seed run on the scored rows, at 3 elastic epochs (0.41 of the FLOPs; commit a6501ce): max gap "
    "0.014 (2/3 +0.014 ± 0.005, per seed +0.023, +0.008, +0.012; 1/2 +0.004 ± 0.005), not met. The control, "
    "on the same 1200 rows and seeds: the separate route cut to 3 distill epochs (`/tmp` script, same pruned "
    "students and recipe) is *below* those 3-epoch elastic members (2/3 -0.005, 1/2 -0.011, mean over seeds), and "
    "its own 3 -> 6 epoch gain is +0.019 and +0.016. So nesting costs nothing here (shared weights help the "
    "small member), and what the 3-epoch run missed is training length: the 0.5 budget allows 3.66 elastic "
    "epochs (per row F_T + 3 (F_0.62 + F_0.43) against 2 F_T + 3 (F_0.62 + F_0.43) for the two distills' "
    "epoch), and whole epochs left 0.09 of it unused. New: `--max-steps N` (every training stage; transformers' "
    "`max_steps`): N optimizer steps in all, the schedule laid over them, the last epoch part-way; each epoch "
    "records its steps and rows, and the elastic cost counts the rows trained. 77 steps = 3.5 epochs, 0.48 of the "
    "FLOPs, chosen on TUNE rows as above (the largest half epoch under 0.5; 3.66 epochs would leave no margin), "
    "then run once on the scored rows: the rows and targets above.",
    "- **Result, EfficientNet (session 5).** 77 elastic steps against the 6-epoch separate route, 3 seeds, 1200 "
    "scored rows: 2/3 +0.012 ± 0.005 (per seed +0.016, +0.010, +0.009), 1/2 -0.004 ± 0.005 (+0.010, +0.010, "
    "-0.032), at 0.48 of the FLOPs (wall 0.44); full member 1.51 of the (weak) teacher; selector met. The 2/3 "
    "member misses the 1-point goal by 0.2 points, less than one SE; on TUNE rows the same recipe was +0.004. "
    "Seeds 0, 1 ran in one process and seed 2 in a second (separate --work with a byte copy of the teacher and "
    "scores; its pruned students are byte-identical), load 1-2.5. Both scored runs of this session are reported "
    "(3 epochs: 0.014; 77 steps: 0.012); no recipe was chosen on the scored rows. What the evidence says: "
    "nesting costs these members nothing (the control above), and the 2/3 member trained for 3.5 epochs sits "
    "about one point below a 6-epoch distill on these rows, at the edge of the goal; the 1/2 member meets it. "
    "Closing the last 0.2 points would take more of the training budget than the goal allows, or more scored "
    "rows and seeds to tell 0.012 from 0.010 (the SE over 3 seeds is 0.005).",
    "- **Result (session 3).** EfficientNet with the chosen recipe, 3 seeds: max gap 0.026 (2/3 +0.026 ± 0.006, 1/2 +0.026 "
    "± 0.006; last session's recipe 0.057 and 0.024) at 0.41 of the FLOPs; per seed the gaps run from -0.012 to "
    "+0.046, so the seed spread is several goal points. MiniLM: 0.030 (not re-run). Both miss the 1-point goal; "
    "cost, retention and selector targets are met.",
    "- **Why no recipe meets 1 point at <= 0.5 here: the control.** At 0.5 of the two distills' training cost, "
    "each sub-member can get about one epoch of direct training against the separate route's two (a third budget "
    "shares nothing else: the grid has only two sub-budgets, and the full member's own training and the teacher "
    "forwards are overhead). So the question is what one epoch loses by itself. The separate route cut to 1 distill "
    "epoch (the same pruned students, recipe, seed 0; `/tmp` script, TUNE rows) is short of its own 2-epoch run by: "
    "MiniLM +0.020 ± 0.007, +0.050 ± 0.012; EfficientNet +0.049 ± 0.011, +0.067 ± 0.013. The elastic members' gaps "
    "are that size or smaller (MiniLM +0.027, +0.042; EfficientNet +0.022, +0.024): at this size an elastic member "
    "is as good as (MiniLM) or better than (EfficientNet: shared weights and the teacher's block outputs do carry "
    "over) a member distilled separately with the same training, and what remains is the halved training, which "
    "shared weights did not make up in 22 steps. The elastic route's saving grows with the number of budgets (n budgets: 2 epochs x n "
    "distills against one run), so a larger grid (hypothesis e) would let each member train longer at the same "
    "ratio; with the issue's three budgets it cannot. Not tried (time): progressive shrinking (c), warm-up length (d).",
    "- **EfficientNet's teacher and students changed between sessions.** The teacher rebuilt from the same command "
    "scored 0.5375 on the 1200 rows (last session 0.5867) and the separate 2/3, 1/2 students of seed 0 0.8092, "
    "0.7842 (last session 0.7917, 0.7475): EfficientNet fine-tuning on CPU is not reproducible run to run here, "
    "and the spread between sessions is larger than the 1-point goal. MiniLM's teacher and seed-0 students came "
    "back identical (0.7142, 0.7075). EfficientNet's seed-0 separate route ran in an earlier process of this "
    "session (kept by the final invocation, which ran both routes of seeds 1 and 2 back to back); this session's "
    "1-minute load was 12-21 throughout (five engineers on two cores), so its wall times are slow and noisy: the FLOP "
    "ratio is the cost figure to read.",
    "- **Defaults unchanged.** `ElasticConfig` keeps `--sampled 2 --teacher-kd 1 --epochs 3 --target full "
    "--full-fraction 1`: the cheaper recipes are what fits this benchmark's 0.5 cost goal on a 3-member grid; they "
    "are not shown to be better defaults for larger grids. README names the cheap flags and their cost. One "
    "default did change (session 5): `--best-on` is `auto`, the pooled grid under `--no-train-full` (the full "
    "member is not trained then, so its validation alone picks an epoch by accident) and the full member otherwise.",
    "- **Weak, reduced teachers.** The teachers (2 epochs on 700 rows) were still improving, so the full "
    "member, trained one more epoch, is above its teacher, and the EfficientNet students, trained at 4x the "
    "teacher's learning rate (bench/distill.py's CNN recipe), are far above theirs. Gaps and retention measure "
    "extra training as much as compression.",
    "- **Resolution.** 1200 scored rows: a binomial SE near 0.012 per accuracy; the gap's SE from the paired "
    "per-row differences is 0.009-0.014 per seed, about one goal point, and about 0.007 for a mean over 3 seeds.",
    "- **MiniLM's budgets are 2/3 and 1/2 of the encoder** (4 and 3 of 6 blocks); the 11.7 M embedding "
    "parameters stay in every budget, hence the total-parameter ratios 0.84 and 0.77. EfficientNet's are 2/3 and "
    "1/2 of all parameters: the elastic grid is the channel axis only (`--channels 1,0.62,0.43`, depth full), the "
    "kept fractions of `lamina prune --channels 0.38 / 0.57`.",
    "- **Selector (session 5).** Both selector rows re-run against the current families at a load near 0.8: "
    "MiniLM recorded 14.9 / 19.5 / 26.0 ms, target 17.2, chose depth 3, re-measured 8.3 ms; EfficientNet "
    "recorded 15.6 / 17.1 / 21.3 ms, target 16.4, chose channels 0.43, re-measured 7.2 ms. The recorded "
    "latencies were taken inside the elastic runs while a second bench process ran on the other core; the "
    "re-measurement ran alone, about 2x faster. Same order of members, so the same choice. Not the way elastic "
    "times members: a short EfficientNet elastic run alone (`--train-limit 64`, 1 epoch) recorded 12.6 / 10.8 / "
    "9.6 ms, and the same members timed the same way in a fresh process 11.4 / 10.0 / 8.7 ms (`/tmp` script).",
    "- **Selector.** The target is set halfway between the two fastest members' latencies recorded in "
    "elastic.json (batch 1, 1 thread), and the chosen model is re-measured by `lamina bench` (5 rounds). The "
    "members' latencies were recorded by the elastic run under a load near 9 and the re-measurement ran as the "
    "load fell (MiniLM: 43.6 ms recorded, 8.4 ms re-measured; EfficientNet: 40.5 ms and 16.6 ms; the load was 4.6 at both "
    "re-measurements), so \"met\" says the load "
    "fell as much as that the choice is right. A latency measured on a shared machine holds only while its load "
    "does; the members' order by latency is what carries over.",
    "",
]


if __name__ == "__main__":
    main()
