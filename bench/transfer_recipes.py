"""MiniLM on Rotten Tomatoes: which linear-probe recipe a frozen MiniLM supports on 420 training sentences.

best_head_retained_minilm is missed on the 2,000 held-out rows (bench/transfer.py): the best head keeps 0.93 of full
fine-tuning. This script tries the recipes left untried there, each chosen without the held-out or test rows, and
scores every one on the held-out rows:

- scikit-learn's LogisticRegressionCV (L2, 13 strengths 1e-4..1e2, 5-fold stratified CV on the training rows; one
  fold draw per seed) on pooled features: pooling (mean, max, first token and their joins), layer sets, feature
  standardization or L2 normalization: the independent reference for what a tuned linear probe on these
  features reaches;
- lamina's own heads with other settings (`lamina transfer` on a copy of the capture; weight decay, epochs,
  `--l2-cv 5`, `mix --hidden`, `select` with three poolings), chosen on validation as lamina chooses.

Features: one pass of the frozen backbone over the teacher's 600 rows and the 2,000 held-out rows (bench/transfer.py
_Heldout), pooled per layer; their mean pooling is checked against the capture (the store). Each lamina head is
applied to these features too, and its test accuracy from them must equal the one `lamina transfer` measured on
the store. The recipe with the best mean CV accuracy is the one chosen; the held-out rows only score.

Writes WORK/minilm-recipes.json and adds it to bench/results/transfer.json (minilm.recipes, the target's goal text)
and BENCHMARKS.md "transfer".
Usage: python bench/transfer_recipes.py --work DIR (bench/transfer.py's --work, with the MiniLM capture)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer as T  # noqa: E402
from _common import save_result  # noqa: E402

from lamina.transfer._l2cv import C_GRID  # noqa: E402  the same strengths as --l2-cv searches

CS = np.asarray(C_GRID)
# name: (layers: "last" | "last2" | "last3" | "blocks.4" | "all", poolings, average the layers, preprocessing)
PROBES = {
    "last mean": ("last", ["mean"], False, "std"),
    "last max": ("last", ["max"], False, "std"),
    "last first token": ("last", ["cls"], False, "std"),
    "last mean+max": ("last", ["mean", "max"], False, "std"),
    "last mean+max+first": ("last", ["mean", "max", "cls"], False, "std"),
    "last mean, not standardized": ("last", ["mean"], False, "none"),
    "last mean, L2-normalized": ("last", ["mean"], False, "l2"),
    "last mean, L2-normalized + standardized": ("last", ["mean"], False, "l2std"),
    "blocks.4 mean": ("blocks.4", ["mean"], False, "std"),
    "blocks.4-5 mean": ("last2", ["mean"], False, "std"),
    "blocks.4-5 mean+max": ("last2", ["mean", "max"], False, "std"),
    "blocks.3-5 mean": ("last3", ["mean"], False, "std"),
    "average of blocks.4-5 mean": ("last2", ["mean"], True, "std"),
    "average of every layer's mean": ("all", ["mean"], True, "std"),
    "every layer mean": ("all", ["mean"], False, "std"),
    "every layer mean+max": ("all", ["mean", "max"], False, "std"),
    "every layer mean+max+first": ("all", ["mean", "max", "cls"], False, "std"),
}
# lamina transfer settings (the store's mean pooling unless --pooling); chosen on validation as lamina chooses
HEADS = {
    "last": {"head": "last"},
    "last, weight decay 0.1": {"head": "last", "weight_decay": 0.1},
    "last, weight decay 1": {"head": "last", "weight_decay": 1.0},
    "last, weight decay 10": {"head": "last", "weight_decay": 10.0},
    "last, 100 epochs, no early stop": {"head": "last", "epochs": 100, "patience": None},
    "last --l2-cv 5": {"head": "last", "l2_cv": 5},
    "best --l2-cv 5": {"head": "best", "l2_cv": 5},
    "mix": {"head": "mix"},
    "mix, weight decay 1": {"head": "mix", "weight_decay": 1.0},
    "mix --hidden 64": {"head": "mix", "hidden": 64},
    "mix --hidden 256": {"head": "mix", "hidden": 256},
    "select --pooling mean,max,cls": {"head": "select", "pooling": "mean,max,cls", "store": "none"},
}


def _features(work: Path, path: Path) -> dict:
    """Pooled features of every captured layer (mean, max, first token) for the teacher's rows and the held-out
    rows (cached in ``path``)."""
    if path.exists():
        return dict(np.load(path))
    from lamina.transfer._pools import pool_many
    from lamina.store import FeatureStore
    from lamina.transfer._rows import reload_model_and_data, split_rows
    run, t = work / "minilm-transfer-run", _task(work)
    held = T._Heldout(run, t, T.HELDOUT["minilm"])
    store = FeatureStore.open(run)
    split, _ = split_rows(store, str(t), (0.8, 0.1, 0.1), 0)  # --task: the fractions are not used
    _, sub = reload_model_and_data(store, None, None, False)
    out = {"y_sub": np.asarray(store.labels), "y_held": np.asarray(held.ds.labels), "names": np.array(held.names),
           **{"split_" + p: r for p, r in split.items()}}
    for tag, ds in (("sub", sub), ("held", held.ds)):
        acc: dict = {}
        with torch.inference_mode():
            for i in range(0, len(ds), 50):
                b = held.dep.batch(ds, list(range(i, min(i + 50, len(ds)))), held.max_length)
                mask = b["attention_mask"]
                for n, x in zip(held.names, held.dep.module.features(**b)):
                    for w in ("mean", "max", "cls"):  # lamina's own poolings, as `--pooling` computes them
                        acc.setdefault(f"{tag}|{n}|{w}", []).append(pool_many(x.float(), [w], mask))
        out.update({k: torch.cat(v).numpy() for k, v in acc.items()})
    diff = max(float(np.abs(np.asarray(store.load(n, mmap=False), np.float32) - out[f"sub|{n}|mean"]).max())
               for n in held.names)
    if diff > 1e-4:
        raise SystemExit(f"pooled features differ from the capture's by {diff:.2g} (allowed 1e-4)")
    out["check_mean_vs_store"] = np.array(diff)
    np.savez(path, **out)
    return out


def _task(work: Path) -> Path:
    """The teacher's task record (any finetune folder of the run holds the same split)."""
    for c in (work / "minilm-full-lr3e-05", work / "minilm-full", work / "minilm-headft"):
        if (c / "finetune.json").exists():
            return c
    raise SystemExit(f"no MiniLM finetune.json in {work}: run bench/transfer.py first")


def _layers(names: list[str], which: str) -> list[str]:
    return {"last": names[-1:], "last2": names[-2:], "last3": names[-3:], "all": names}.get(which, [which])


def _probes(f: dict, seeds, only=None) -> list[dict]:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    pre = {"none": list, "std": lambda: [StandardScaler()], "l2": lambda: [Normalizer()],
           "l2std": lambda: [Normalizer(), StandardScaler()]}
    names = [str(n) for n in f["names"]]
    tr, va, te, ys, yh = f["split_train"], f["split_val"], f["split_test"], f["y_sub"], f["y_held"]
    rows = []
    for name, (which, ways, avg, pp) in PROBES.items():
        if only is not None and name not in only:
            continue
        layers = _layers(names, which)

        def x(tag):
            if avg:
                return np.mean([f[f"{tag}|{n}|{ways[0]}"] for n in layers], 0)
            return np.concatenate([f[f"{tag}|{n}|{w}"] for n in layers for w in ways], 1)
        a, h = x("sub"), x("held")
        for seed in seeds:
            t0 = time.process_time()
            m = make_pipeline(*pre[pp](), LogisticRegressionCV(
                Cs=CS, cv=StratifiedKFold(5, shuffle=True, random_state=seed), max_iter=5000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-learn's notices of future defaults
                m.fit(a[tr], ys[tr])
            lr = m[-1]
            rows.append({"recipe": name, "kind": "scikit-learn LogisticRegressionCV", "seed": seed,
                         "C": float(lr.C_[0]), "cv_accuracy": float(np.mean(lr.scores_[1], 0).max()),
                         "val_accuracy": float(m.score(a[va], ys[va])), "test_accuracy": float(m.score(a[te], ys[te])),
                         "heldout_accuracy": float(m.score(h, yh)), "cpu_seconds": time.process_time() - t0,
                         "features": int(a.shape[1])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _heads(work: Path, f: dict, seeds, only=None) -> list[dict]:
    from lamina.transfer import TransferConfig, transfer
    from lamina.transfer._pools import parse
    from lamina.transfer.deploy import load_transfer
    t, rows = _task(work), []
    yh, ys = torch.as_tensor(f["y_held"]), torch.as_tensor(f["y_sub"])
    for name, kw in HEADS.items():
        if only is not None and name not in only:
            continue
        kw = dict(kw)
        src = work / ("minilm-transfer-none" if kw.pop("store", None) == "none" else "minilm-transfer-run")
        run = work / f"recipes-{src.name}"  # a copy: the benchmark's own heads stay as they are
        if not run.exists():
            shutil.copytree(src, run, ignore=shutil.ignore_patterns("transfer"))
            (run / "transfer.json").unlink(missing_ok=True)
        for seed in seeds:
            r = transfer(str(run), TransferConfig(task=str(t), seed=seed, overwrite=True, **kw))
            m = load_transfer(r.model_path).module
            ways = parse(m.pooling)

            def logits(tag):
                feats = [torch.as_tensor(np.concatenate([f[f"{tag}|{n}|{w}"] for w in ways], 1))
                         for n in m.tap_names]
                with torch.no_grad():
                    return m.head.eval()(feats, None).float()
            te = f["split_test"]
            mine = float((logits("sub")[te].argmax(-1) == ys[te]).float().mean())
            if abs(mine - r.test_accuracy) > 1.5 / len(te):  # one row may flip on float16/float32 rounding
                raise SystemExit(f"{name}: test accuracy from the pooled features {mine:.4f} differs from "
                                 f"lamina's {r.test_accuracy:.4f}: the pooling here is not the head's")
            rows.append({"recipe": name, "kind": "lamina transfer", "config": kw, "seed": seed,
                         "val_accuracy": r.record["history"]["best_val_accuracy"], "test_accuracy": r.test_accuracy,
                         "test_accuracy_from_features": mine,
                         "heldout_accuracy": float((logits("held").argmax(-1) == yh).float().mean()),
                         "seconds": r.seconds, "cpu_seconds": r.record["cpu_seconds"],
                         "trainable_parameters": r.trainable_parameters})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summarize(rows: list[dict], full_heldout: float) -> dict:
    """Per recipe: mean and std over seeds of every accuracy; the recipe chosen by CV (probes) and by validation
    (lamina heads); the best held-out one, named as such (not a choice)."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["recipe"], {"kind": r["kind"], "seeds": []})["seeds"].append(r)
    for v in out.values():
        s = v.pop("seeds")
        for k in ("cv_accuracy", "val_accuracy", "test_accuracy", "heldout_accuracy"):
            xs = [x[k] for x in s if k in x]
            if xs:
                v[k] = {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        v["retained_heldout"] = v["heldout_accuracy"]["mean"] / full_heldout
        v["cpu_seconds"] = statistics.mean(x["cpu_seconds"] for x in s)
        if "C" in s[0]:
            v["C"] = [x["C"] for x in s]
            v["features"] = s[0].get("features")
    probes = [k for k, v in out.items() if "cv_accuracy" in v]
    heads = [k for k, v in out.items() if "cv_accuracy" not in v]
    top = max((out[k]["cv_accuracy"]["mean"] for k in probes), default=None)
    ties = [k for k in probes if out[k]["cv_accuracy"]["mean"] > top - 1e-12] if probes else []
    return {"recipes": out, "full_finetune_heldout": full_heldout,
            # a tie in CV accuracy goes to the recipe with fewer features (the simpler probe)
            "chosen_by_cv": min(ties, key=lambda k: out[k].get("features") or 0) if ties else None,
            "cv_ties": ties,
            "chosen_by_validation": max(heads, key=lambda k: out[k]["val_accuracy"]["mean"]) if heads else None,
            "best_heldout": max(out, key=lambda k: out[k]["heldout_accuracy"]["mean"])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="bench/transfer.py's --work (with the MiniLM capture)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--reuse", action="store_true", help="only assemble WORK/minilm-recipes.json")
    ap.add_argument("--only", nargs="+", choices=[*PROBES, *HEADS], help=(
        "measure only these recipes again; the others' rows are kept from WORK/minilm-recipes.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    res_path = work / "minilm-recipes.json"
    ho = json.loads((work / "minilm-heldout.json").read_text())
    base = ho["full_finetune"][ho["teacher"]]
    if args.reuse:  # the rows as measured, summarized again (the summary is cheap and may have changed)
        res = json.loads(res_path.read_text())
        res.update(summarize(res["rows"], base))
        res_path.write_text(json.dumps(res, indent=2, default=float))
    else:
        t0 = time.time()
        f = _features(work, work / "minilm-recipes-features.npz")
        only = set(args.only) if args.only else None
        kept = [r for r in json.loads(res_path.read_text())["rows"] if r["recipe"] not in only] if only else []
        rows = _probes(f, args.seeds, only) + _heads(work, f, args.seeds, only)
        rows = sorted(kept + rows, key=lambda r: [*PROBES, *HEADS].index(r["recipe"]))  # the tables' order
        cmd = "python bench/transfer_recipes.py " + shlex.join(argv or sys.argv[1:])
        res = {"command": cmd if not only else json.loads(res_path.read_text())["command"] + "; then " + cmd,
               "rows": rows, "seconds": time.time() - t0,
               "check_mean_vs_store": float(f["check_mean_vs_store"]), **summarize(rows, base)}
        res_path.write_text(json.dumps(res, indent=2, default=float))
    result = json.loads(T.HERE_RESULTS.read_text())
    result["minilm"]["recipes"] = {k: v for k, v in res.items() if k != "rows"}
    result["targets"] = T._targets(result)
    save_result("transfer", result)
    T._write(result)
    return res


if __name__ == "__main__":
    main()
