"""Peak memory and time of loading a ~1B-parameter model: lamina vs a plain ``from_pretrained``.

    python bench/load.py                 # ~1.0B Llama config, 5 repeats (about 5 minutes, ~8 GB of RAM)
    python bench/load.py --part bfloat16 # one dtype only (bfloat16: about a minute); the other is kept
    python bench/load.py --small         # a 60M model, for a quick look

A random-init Llama-architecture model (hidden 2048, 18 layers, MLP 5632,
vocabulary 32000, tied embeddings: 0.99B parameters) is saved once, in
bfloat16 safetensors as Hub checkpoints ship, to ``--work``. Each load runs in
a fresh child process (so peak RSS is the load's own), after one untimed read
that puts the file in the page cache, alternating lamina and plain:

- plain:  ``AutoModelForCausalLM.from_pretrained(path, dtype=D)``
- lamina: ``lamina.load_model(path, runtime=Runtime(device="cpu", torch_dtype=D))``
- plain+tokenizer (bfloat16 only): plain, then ``AutoTokenizer.from_pretrained(path)``, the same
  work as lamina's load (which reads the tokenizer of a text model too)

for D in float32 and bfloat16. For bfloat16 three more children time lamina's own
steps alone after a plain load (folder checks, tokenizer, block discovery). Figures are medians (and min-max) over the
repeats, the 1-minute load average recorded before and after each repeat. Peak RSS
is the child's ``ru_maxrss`` after every weight was touched once (it counts the
checkpoint pages mapped from the page cache too; transformers may map bfloat16
weights from the file without reading them, so the peak of the load call alone,
``load_peak_rss``, can be far below the model's size); the "over weights" ratio divides it by the size of the
bfloat16 weights, 2 bytes per parameter.

Targets (results/load.json): lamina's bfloat16 peak RSS <= 1.3 x the bfloat16
weights; lamina's peak RSS and load time <= 1.05 x the plain load's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SIZES = {  # hidden, layers, mlp, heads, vocab
    "1b": (2048, 18, 5632, 16, 32000),
    "small": (512, 8, 1408, 8, 32000),
}


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(kind: str, dtype: str, path: str) -> None:
    """One load in this (fresh) process; prints its figures as JSON."""
    import torch
    # Imports are not the load: both children import the same modules before the clock starts (torch,
    # transformers' Llama and tokenizer classes, lamina), so the figures are reading and building the model.
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
    from lamina.models import load_model
    from lamina.runtime import Runtime
    if kind == "pieces":
        return _pieces(dtype, path)
    base = _rss_now()
    cpu = time.process_time()
    t = time.perf_counter()
    if kind.startswith("plain"):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        if kind == "plain+tokenizer":  # the same work as lamina's load, which also reads the tokenizer
            AutoTokenizer.from_pretrained(path)
    else:
        m = load_model(path, runtime=Runtime(device="cpu", torch_dtype=dtype)).module
    sec = time.perf_counter() - t
    cpu = time.process_time() - cpu
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = _rss_now()
    # transformers may leave bfloat16 weights mapped from the file, not yet read: touching one element per
    # 4 KiB page makes them resident, so the peak below is the model's in use, not an unread mapping.
    with torch.no_grad():
        for p in m.parameters():
            p.detach().reshape(-1)[::1024].float().sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dts = sorted({str(p.dtype) for p in m.parameters()})
    n = sum(p.numel() for p in m.parameters())
    print(json.dumps({"seconds": sec, "cpu_seconds": cpu, "peak_rss": peak, "load_peak_rss": load_peak,
                      "rss_before": base, "rss_after": after, "param_dtypes": dts, "parameters": n}))


def _pieces(dtype: str, path: str) -> None:
    """What lamina's load adds to from_pretrained, each step timed alone (first call in this process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from lamina.blocks import find_blocks
    from lamina.files import check_model_folder
    from lamina.trust import check_folder

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t
    cfg = AutoConfig.from_pretrained(path)
    m, load = timed(lambda: AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=getattr(torch, dtype)))
    res = {"from_pretrained": load,
           "check_folder": timed(lambda: check_folder(Path(path)))[1],
           "check_model_folder": timed(lambda: check_model_folder(Path(path)))[1],
           "tokenizer": timed(lambda: AutoTokenizer.from_pretrained(path, config=cfg))[1],
           "find_blocks": timed(lambda: find_blocks(m))[1]}
    print(json.dumps(res))


def make_model(path: Path, size: str) -> int:
    """Save the random-init model once (bfloat16 safetensors + a tokenizer); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lamina import testing as lt
    h, layers, mlp, heads, vocab = SIZES[size]
    stamp = path / "bench-load.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("size") == size and json.loads(stamp.read_text()).get("tied"):
        return json.loads(stamp.read_text())["parameters"]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=mlp, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # random values: loading cost does not see them
    model.tie_weights()  # to_empty allocated the tied embedding twice
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    lt.tiny_tokenizer().save_pretrained(path)  # lamina reads text models with their tokenizer
    n = sum(p.numel() for p in model.parameters())
    stamp.write_text(json.dumps({"size": size, "parameters": n, "tied": True}))
    return n


def _warm(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_child(kind: str, dtype: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", kind, dtype, str(path)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(v: list[dict]) -> dict:
    sec = [x["seconds"] for x in v]
    cpu = [x["cpu_seconds"] for x in v]
    return {"seconds": statistics.median(sec), "seconds_min_max": [min(sec), max(sec)],
            "cpu_seconds": statistics.median(cpu), "cpu_seconds_min_max": [min(cpu), max(cpu)],
            "peak_rss": statistics.median(x["peak_rss"] for x in v),
            "load_peak_rss": statistics.median(x.get("load_peak_rss", x["peak_rss"]) for x in v),
            "rss_before": statistics.median(x["rss_before"] for x in v),
            "param_dtypes": v[0]["param_dtypes"], "runs": v}


def run_part(dtype: str, path: Path, repeats: int) -> dict:
    """Alternate plain / lamina (/ plain + tokenizer for bfloat16) children, the order turning each repeat."""
    kinds = ["plain", "lamina"] + (["plain+tokenizer"] if dtype == "bfloat16" else [])
    runs: dict = {k: [] for k in kinds}
    load = [list(os.getloadavg())]
    for r in range(repeats):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # no fixed order
            res = run_child(kind, dtype, path)
            runs[kind].append(res)
            print(f"{kind:<15} {dtype:<8} {res['seconds']:6.2f} s  cpu {res['cpu_seconds']:5.2f} s  "
                  f"peak {res['peak_rss'] / 2**30:5.2f} GiB  {res['param_dtypes']}", flush=True)
        load.append(list(os.getloadavg()))
    out = {"medians": {k: _summary(v) for k, v in runs.items()}, "load_average": load, "repeats": repeats}
    if dtype == "bfloat16":
        pieces = [run_child("pieces", dtype, path) for _ in range(3)]
        out["lamina_steps_seconds"] = {k: statistics.median(p[k] for p in pieces) for k in pieces[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "lamina-bench-load"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--part", choices=("bfloat16", "float32", "all", "report"), default="all",
                    help="re-run one dtype only (the other's figures are kept from results/load.json); report: "
                         "only rewrite the summary and BENCHMARKS.md from the saved parts")
    ap.add_argument("--small", action="store_true", help="a 60M model (quick look; not the recorded figure)")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "DTYPE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from _common import machine, save_result, write_section
    size = "small" if args.small else "1b"
    path = Path(args.work) / size
    path.mkdir(parents=True, exist_ok=True)
    n = make_model(path, size)
    if args.part != "report":
        _warm(path)
    prev = HERE / "results" / "load.json"
    parts = json.loads(prev.read_text()).get("parts", {}) if prev.exists() and not args.small else {}
    for dtype in {"all": ("bfloat16", "float32"), "report": ()}.get(args.part, (args.part,)):
        parts[dtype] = run_part(dtype, path, args.repeats)
        parts[dtype]["command"] = "python bench/load.py" + (" --small" if args.small else "") + \
            f" --part {dtype} --repeats {args.repeats}"
        if not args.small:
            save_result("load", {"parts": parts, "partial": True, "machine": machine()})  # kept if a later part dies
    if "bfloat16" not in parts or "float32" not in parts:
        print("ran one part; run the other (--part) for the full result")
        return
    bf, f32m = parts["bfloat16"]["medians"], parts["float32"]["medians"]
    bf16_bytes = 2 * n
    lam, pl, pltok = bf["lamina"], bf["plain"], bf["plain+tokenizer"]
    over = lam["peak_rss"] / bf16_bytes
    rss_ratio = lam["peak_rss"] / pl["peak_rss"]
    time_ratio = lam["seconds"] / pl["seconds"]
    cpu_ratio = lam["cpu_seconds"] / pl["cpu_seconds"]
    # each repeat's lamina / plain (run one after the other): less exposed to load drifting over the run
    paired = sorted(a["seconds"] / b["seconds"] for a, b in zip(lam["runs"], pl["runs"]))
    extra_vs_plain = pltok["seconds"] / pl["seconds"]  # strictly more work than plain: < 1 means noise
    targets = {
        "bf16_peak_rss_over_weights": {"value": over, "goal": "<= 1.3", "met": over <= 1.3},
        "bf16_load_rss_vs_plain": {"value": rss_ratio, "goal": "<= 1.05", "met": rss_ratio <= 1.05},
        "bf16_load_time_vs_plain": {"value": time_ratio, "goal": "<= 1.05", "met": time_ratio <= 1.05},
    }
    f32 = {"cpu_time_vs_plain": f32m["lamina"]["cpu_seconds"] / f32m["plain"]["cpu_seconds"],
           "rss_vs_plain": f32m["lamina"]["peak_rss"] / f32m["plain"]["peak_rss"],
           "time_vs_plain": f32m["lamina"]["seconds"] / f32m["plain"]["seconds"],
           "peak_rss_over_float32_weights": f32m["lamina"]["peak_rss"] / (4 * n)}
    command = (f"python bench/load.py --repeats {args.repeats}" if args.part == "all" else
               " && ".join(parts[d]["command"] for d in ("bfloat16", "float32")))
    result = {"command": command, "targets": targets, "parameters": n, "bf16_weight_bytes": bf16_bytes,
              "checkpoint": "bfloat16 safetensors (random init, Llama config)",
              "bf16_cpu_time_vs_plain": cpu_ratio,
              "bf16_time_vs_plain_with_tokenizer": lam["seconds"] / pltok["seconds"],
              "bf16_time_vs_plain_paired": {"median": statistics.median(paired), "min": paired[0],
                                            "max": paired[-1]},
              "bf16_plain_with_tokenizer_vs_plain": extra_vs_plain,
              "float32": f32, "parts": parts, "machine": machine()}
    if args.small:
        print(json.dumps(targets, indent=2))
        return  # the recorded figures are the 1B model's
    out = save_result("load", result)
    gib = 2 ** 30
    steps = parts["bfloat16"]["lamina_steps_seconds"]
    reps = {d: parts[d]["repeats"] for d in parts}
    loads = [x for d in parts for x in parts[d]["load_average"]]
    lines = [f"`{command}` (`--part report` rewrites this from results/load.json): a random-init Llama-config "
             f"model of {n / 1e9:.2f}B parameters saved once in bfloat16 safetensors, each load in a fresh child "
             "process after a warm-up read (page cache), the kinds alternated in a turning order, medians "
             f"(min-max) of {reps['bfloat16']} (bfloat16) and "
             f"{reps['float32']} (float32) repeats; {os.cpu_count()} CPUs shared with other jobs (1-minute load "
             f"average {min(x[0] for x in loads):.1f}-{max(x[0] for x in loads):.1f} during the runs).", "",
             "| load | dtype | seconds | CPU seconds | peak RSS (GiB) |", "|---|---|---|---|---|"]
    for dt, med in (("bfloat16", bf), ("float32", f32m)):
        for kind, v in med.items():
            lines.append(f"| {kind} | {dt} | {v['seconds']:.2f} ({v['seconds_min_max'][0]:.2f}-"
                         f"{v['seconds_min_max'][1]:.2f}) | {v['cpu_seconds']:.2f} ({v['cpu_seconds_min_max'][0]:.2f}-"
                         f"{v['cpu_seconds_min_max'][1]:.2f}) | {v['peak_rss'] / gib:.2f} |")
    (l_lo, l_hi), (p_lo, p_hi) = lam["seconds_min_max"], pl["seconds_min_max"]
    overlap = l_lo <= p_hi and p_lo <= l_hi
    lines += ["", f"- bfloat16 peak RSS / bfloat16 weights ({bf16_bytes / gib:.2f} GiB): **{over:.2f}** "
              f"(goal <= 1.3, {'met' if over <= 1.3 else 'NOT met'}); the process's RSS before loading "
              f"(Python, torch, transformers) was {lam['rss_before'] / gib:.2f} GiB of it. Peak RSS is measured after "
              "touching every weight once: the load call alone peaked at "
              f"{lam['load_peak_rss'] / gib:.2f} GiB, the bfloat16 weights being mapped from the file, not read.",
              f"- lamina vs plain `from_pretrained(dtype=bfloat16)`: peak RSS {rss_ratio:.3f}x, time "
              f"**{time_ratio:.3f}x** (goal <= 1.05 each: {'met' if rss_ratio <= 1.05 else 'NOT met'}, "
              f"{'met' if time_ratio <= 1.05 else 'NOT met'}); CPU time {cpu_ratio:.3f}x (less disturbed by "
              "other jobs). " + ("The two time ranges overlap: the difference is within this machine's noise. "
                                 if overlap else "") +
              "lamina's load also reads the tokenizer (a text model is fed through it); against plain "
              f"`from_pretrained` + `AutoTokenizer.from_pretrained` its time is "
              f"{lam['seconds'] / pltok['seconds']:.3f}x. Per repeat (lamina / the plain load next to it): median "
              f"{statistics.median(paired):.3f}x, {paired[0]:.3f}-{paired[-1]:.3f}x.",
              *([f"- Noise check: plain + tokenizer, strictly more work than plain, took {extra_vs_plain:.3f}x plain's "
                 "time: at this load the wall-clock ratios measure the machine's other jobs more than the loads. "
                 "CPU time is the steadier figure."] if extra_vs_plain < 1 else []),
              f"- float32 (upcast from the bfloat16 file): lamina vs plain peak RSS {f32['rss_vs_plain']:.3f}x, "
              f"time {f32['time_vs_plain']:.3f}x, CPU time {f32['cpu_time_vs_plain']:.3f}x.",
              "- What lamina adds to `from_pretrained`, each step timed alone in a fresh process after the load "
              "(medians of 3): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in steps.items()
                                             if k != "from_pretrained") +
              f"; {sum(v for k, v in steps.items() if k != 'from_pretrained') * 1e3:.1f} ms in all against "
              f"{steps['from_pretrained']:.2f} s for `from_pretrained` itself.", ""]
    write_section("load", lines)
    print(f"wrote {out}")
    print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()
