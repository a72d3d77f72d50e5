"""Benchmark of the analysis stage, lamina against the obvious alternative in one run.

    .venv/bin/python bench/analyze.py            # full run (~10-15 min on 2 cores)
    .venv/bin/python bench/analyze.py --quick    # smoke run

Writes bench/results/analyze.json and the "## analyze" section of BENCHMARKS.md:
- probe_speedup_vs_sklearn: all layers x the same C grid, lamina's batched
  probe vs one scikit-learn LogisticRegression (lbfgs) per layer per C, on
  MiniLM features of 4,000 Rotten Tomatoes sentences (target >= 10), with
  probe_max_acc_gap (target <= 0.01).
- skip_importance_cost_ratio: lamina's skip importance over all 6 MiniLM blocks
  vs one full forward per skipped block (target <= 0.65).
- cka_rss_growth_4x: peak RSS of `lamina.analyze.compare` (streaming CKA) on
  stores of N and 4N samples, each in a fresh process (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PARTS = ("probe", "importance", "cka")
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import merge_previous, save_result, write_section  # noqa: E402


def _minilm_features(n: int, work: Path):
    import lamina
    run = work / "probe-run"
    res = lamina.capture("minilm", "rotten-tomatoes", lamina.CaptureConfig(out=str(run), limit=n, overwrite=True,
                                                                           progress=False))
    store = lamina.FeatureStore.open(res.store)
    return [np.asarray(store.load(name)) for name in store.layers], store.labels, store.layers


def probe_part(n: int, work: Path, repeats: int) -> dict:
    """The probe against scikit-learn under each resource setting of ``probe_vs_sklearn.SETTINGS``:
    one core each (the fair, reproducible ratio: the headline), two single-threaded workers each,
    and both at their defaults (what a user gets; on a busy 2-core machine sklearn's threads collapse)."""
    from probe_vs_sklearn import SETTINGS, compare, thread_setting

    from lamina.analyze.metrics import stratified_split
    feats, labels, layers = _minilm_features(n, work)
    split = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    runs = {}
    for name, (threads, workers, jobs, meaning) in SETTINGS.items():
        with thread_setting(threads):
            runs[name] = {**compare(feats, labels, split, repeats=repeats, workers=workers, sklearn_jobs=jobs),
                          "meaning": meaning}
    out = runs.pop("one-core")
    out["two_workers"], out["default_threads"] = runs["two-workers"], runs["defaults"]
    out["layers"] = layers
    out["n"] = n
    return out


def importance_part(n: int, repeats: int) -> dict:
    from importance_cost import measure

    from lamina.data import load_data, subsample
    from lamina.models import load_model
    return measure(load_model("minilm"), subsample(load_data("rotten-tomatoes"), n, 0), repeats=repeats)


def _fake_run(root: Path, n: int, layers: int = 7, dim: int = 384, seed: int = 0) -> None:
    """A complete feature store of random features (what compare reads), written in chunks."""
    from lamina.store import StoreWriter
    rng = np.random.default_rng(seed)
    w = StoreWriter(root / "features")
    labels = np.arange(n) % 2
    w.create({"model": {"name": f"fake{seed}"}, "pooling": "mean"}, {f"blocks.{i}": (dim,) for i in range(layers)},
             "float32", labels, np.arange(n).astype(str))
    w.open()
    base = rng.standard_normal((dim, dim)).astype(np.float32)
    for b, start in enumerate(range(0, n, 1000)):
        rows = min(1000, n - start)
        z = rng.standard_normal((rows, dim)).astype(np.float32)
        w.write_batch(b, start, {f"blocks.{i}": z @ np.linalg.matrix_power(base / np.sqrt(dim), i + 1)
                                 for i in range(layers)})
    w.finish((n + 999) // 1000)


def _cka_child(n: int) -> None:
    """Run in a fresh process: build two stores of n samples, compare them, print peak RSS."""
    from lamina.analyze import CompareConfig, compare
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        _fake_run(a, n, seed=1)
        _fake_run(b, n, seed=2)
        # ru_maxrss of a spawned child starts at the parent's peak (Linux keeps it across exec),
        # so read this process's own high-water mark (VmHWM), reset just before compare().
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kb("VmRSS")
        t = time.perf_counter()
        compare(a, b, CompareConfig(out=str(Path(tmp) / "c.json"), n_perm=5))
        print(json.dumps({"n": n, "peak_rss_kb": _status_kb("VmHWM"), "rss_before_compare_kb": base,
                          "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "seconds": time.perf_counter() - t}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cka_part(n: int, repeats: int) -> dict:
    runs = {}
    for size in (n, 4 * n):
        vals = []
        for _ in range(repeats):
            r = subprocess.run([sys.executable, __file__, "--cka-child", str(size)], capture_output=True, text=True,
                               check=True)
            vals.append(json.loads(r.stdout.strip().splitlines()[-1]))
        runs[size] = vals
    peak = {s: float(np.median([v["peak_rss_kb"] for v in vals])) for s, vals in runs.items()}
    return {"n": n, "peak_rss_kb": {str(k): v for k, v in peak.items()}, "raw": {str(k): v for k, v in runs.items()},
            "cka_rss_growth_4x": peak[4 * n] / peak[n]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                    help="measure only these parts; the others are kept from the last results file")
    ap.add_argument("--cka-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cka_child:
        _cka_child(args.cka_child)
        return {}
    import torch
    n_probe, n_imp, n_cka, rep = (800, 96, 1000, 1) if args.quick else (4000, 500, 5000, 3)
    t0 = time.time()
    name = "analyze-quick" if args.quick else "analyze"
    parts = {}
    if "probe" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            parts["probe"] = probe_part(n_probe, Path(tmp), rep)
    if "importance" in args.parts:
        parts["importance"] = importance_part(n_imp, rep)
    if "cka" in args.parts:
        parts["cka"] = cka_part(n_cka, rep)
    command = "python bench/analyze.py" + (" --quick" if args.quick else "") + (
        "" if set(args.parts) == set(PARTS) else " --parts " + " ".join(args.parts))
    parts = merge_previous(name, {"command": command, **parts}, PARTS)
    probe, imp, cka = parts["probe"], parts["importance"], parts["cka"]
    result = {
        "command": command,
        "probe_speedup_vs_sklearn": probe["probe_speedup_vs_sklearn"],
        "probe_max_acc_gap": probe["probe_max_acc_gap"],
        "probe_speedup_vs_sklearn_two_workers": probe.get("two_workers", {}).get("probe_speedup_vs_sklearn"),
        "probe_speedup_vs_sklearn_default_threads": probe["default_threads"]["probe_speedup_vs_sklearn"],
        "skip_importance_cost_ratio": imp["skip_importance_cost_ratio"],
        "cka_rss_growth_4x": cka["cka_rss_growth_4x"],
        "targets": {"probe_speedup_vs_sklearn": ">= 10", "probe_max_acc_gap": "<= 0.01",
                    "skip_importance_cost_ratio": "<= 0.65", "cka_rss_growth_4x": "<= 1.10"},
        "probe": probe, "importance": imp, "cka": cka,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "seconds": time.time() - t0,
    }
    result["targets_met"] = {
        "probe_speedup_vs_sklearn": result["probe_speedup_vs_sklearn"] >= 10,
        "probe_max_acc_gap": result["probe_max_acc_gap"] <= 0.01,
        "skip_importance_cost_ratio": result["skip_importance_cost_ratio"] <= 0.65,
        "cka_rss_growth_4x": result["cka_rss_growth_4x"] <= 1.10,
    }
    save_result(name, result)
    if not args.quick:
        _write_section(result)
    print(json.dumps({k: result[k] for k in ("probe_speedup_vs_sklearn", "probe_max_acc_gap",
                                             "skip_importance_cost_ratio", "cka_rss_growth_4x", "targets_met",
                                             "seconds")}, indent=2, default=float))
    return result


def _write_section(r: dict) -> None:
    lines = [f"Command: `{r['command']}` (results: `bench/results/analyze.json`; "
             f"{r['machine']['cpus']} CPUs, torch {r['machine']['torch']}, medians).", "",
             "| measure | value | target | met |", "|---|---|---|---|"]
    for key in ("probe_speedup_vs_sklearn", "probe_max_acc_gap", "skip_importance_cost_ratio", "cka_rss_growth_4x"):
        lines.append(f"| {key} | {r[key]:.3f} | {r['targets'][key]} | {'yes' if r['targets_met'][key] else 'NO'} |")
    p = r["probe"]
    lines += ["", f"Probe ({p['command']}): {p['n']} MiniLM-pooled Rotten Tomatoes sentences, {len(p['layers'])} "
              f"layers x 7 C values. Both on one thread, one layer / one fit at a time (the headline): lamina "
              f"{p['lamina_s']:.3f} s vs scikit-learn {p['sklearn_s']:.3f} s (CPU-time ratio "
              f"{p['probe_speedup_cpu']:.1f}; load average {p['load_avg_before'][0]:.1f} before, "
              f"{p['load_avg_after'][0]:.1f} after)."]
    if "two_workers" in p:
        tw = p["two_workers"]
        lines.append(f"Two single-threaded workers each (lamina two layers at once, scikit-learn its fits over two "
                     f"joblib processes): lamina {tw['lamina_s']:.3f} s vs scikit-learn {tw['sklearn_s']:.3f} s, "
                     f"ratio {tw['probe_speedup_vs_sklearn']:.1f}.")
    dt = p["default_threads"]
    lines += [f"Both at their defaults (torch and BLAS default threads; lamina's probe pins itself to one thread "
              f"per layer worker): lamina {dt['lamina_s']:.3f} s vs scikit-learn {dt['sklearn_s']:.2f} s, ratio "
              f"{dt['probe_speedup_vs_sklearn']:.1f}; scikit-learn's BLAS threads stall on this shared machine, so "
              "this ratio says more about the machine than about either solver.",
              "Where the probe's time goes, and everything measured against the 10x target, is in the docstring of "
              "`lamina/analyze/metrics/logreg.py`: the Gram (3.9 ms), its eigendecomposition (7.5 ms) and the ~30 "
              "passes over the data (8 ms) of each layer already add to more than a tenth of scikit-learn's "
              f"{1000 * p['sklearn_s'] / len(p['layers']):.0f} ms per layer in this run, before any Python.",
              f"Skip importance ({r['importance']['command']}): {r['importance'].get('n_samples', '?')} sentences, "
              f"6 blocks. CKA ({r['cka']['command']}): two stores of 7 x 384 features, N = {r['cka']['n']} and "
              f"{4 * r['cka']['n']}, full `lamina.analyze.compare` including the permutation null; peak RSS is the "
              "process's own VmHWM, reset just before compare.", ""]
    write_section("analyze", lines)


if __name__ == "__main__":
    main()
