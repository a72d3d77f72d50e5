"""Which int8 / bf16 path is fast on this CPU for the fine-tuned MiniLM: every Linear in one format, interleaved.

    PYTHONPATH=. python bench/quantize_formats.py VARIANTS [TEACHER]      (REP=5 for five timed rounds)

VARIANTS (comma-separated): ao_dyn / ao_wo (torchao Int8DynamicActivationInt8Weight / Int8WeightOnly on every
Linear), legacy (torch.ao.quantization.quantize_dynamic, deprecated), bf16 (the whole model in bfloat16);
suffix _c = torch.compile(dynamic=False), _f = torch.compile with inductor freezing and torchao's x86 int8 lowering
passes registered; fp32_c / fp32_f = the compiled float baselines. Batch 1 and 8 (the first test rows padded to 64
tokens), one and two threads, medians of REP interleaved rounds after two warm-ups (compile time excluded and
printed). Appends to bench/results/quantize_formats.json; BENCHMARKS.md "quantize" quotes it.
"""
import copy, json, os, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from torch import nn
import lamina
from lamina.task import read_task
import torchao.quantization as tq

which = sys.argv[1].split(",")
REP = int(os.environ.get("REP", 7))
TEACHER = sys.argv[2] if len(sys.argv) > 2 else "/tmp/qw/teacher"
lm = lamina.load_model(TEACHER)
spec = read_task(TEACHER); ds, split = spec.load()
fp = lm.module.eval()
batches = {bs: lm.batch(ds, split["test"][:bs], 64) for bs in (1, 8)}
print({bs: {k: tuple(v.shape) for k, v in b.items()} for bs, b in batches.items()}, flush=True)

def pad64(b):  # 64 tokens, the shape
    out = {}
    for k, v in b.items():
        if v.dim() == 2 and v.shape[1] < 64:
            v = torch.nn.functional.pad(v, (0, 64 - v.shape[1]), value=0)
        out[k] = v
    return out
batches = {bs: pad64(b) for bs, b in batches.items()}

def is_linear(m, fqn): return isinstance(m, nn.Linear)

def build(name):
    m = copy.deepcopy(fp)
    if name.startswith("ao_dyn"):
        tq.quantize_(m, tq.Int8DynamicActivationInt8WeightConfig(), filter_fn=is_linear)
    elif name.startswith("ao_wo"):
        tq.quantize_(m, tq.Int8WeightOnlyConfig(), filter_fn=is_linear)
    elif name.startswith("legacy"):
        m = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    elif name.startswith("bf16"):
        m = m.to(torch.bfloat16)
    if name.endswith("_f"):
        import torch._inductor.config as ic
        ic.freezing = True
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  registers the x86 int8 lowering passes
        m = torch.compile(m, dynamic=False)
    if name.endswith("_c"):
        m = torch.compile(m, dynamic=False)
    return m

def fwd(m, name, bs):
    b = batches[bs]
    if name.startswith("bf16_ac"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(**b).last_hidden_state if hasattr(m(**b), "last_hidden_state") else m(**b).logits
    return m(**b).logits

models, built = {}, {}
with torch.inference_mode():
    ref = {bs: fp(**batches[bs]).logits.float() for bs in (1, 8)}
    for n in which:
        t = time.perf_counter()
        models[n] = build(n)
        for bs in (1, 8):
            for _ in range(2):
                out = fwd(models[n], n, bs)
        cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref[8].flatten(), dim=0).item()
        built[n] = {"build_and_warmup_s": round(time.perf_counter() - t, 1), "logits_cosine_b8": cos}
        print(f"built {n} in {time.perf_counter()-t:.1f}s, logits cos {cos:.5f} maxdiff {(out.float()-ref[8]).abs().max():.4f}", flush=True)
    res = {}
    for th in (1, 2):
        torch.set_num_threads(th)
        for bs in (1, 8):
            times = {n: [] for n in ["fp32"] + which}
            allm = {"fp32": fp, **models}
            for n, m in allm.items(): fwd(m, n, bs)
            for r in range(REP):
                for n, m in allm.items():
                    s = time.perf_counter(); fwd(m, n, bs); times[n].append((time.perf_counter() - s) * 1000)
            med = {n: statistics.median(v) for n, v in times.items()}
            res[f"b{bs}_t{th}"] = {n: {"median_ms": round(med[n], 2), "min": round(min(times[n]), 2), "max": round(max(times[n]), 2), "speedup": round(med["fp32"] / med[n], 2)} for n in times}
            print(f"b{bs} t{th} load {os.getloadavg()[0]:.1f}: " + "  ".join(f"{n} {med[n]:.1f}ms x{med['fp32']/med[n]:.2f}" for n in times), flush=True)
from pathlib import Path
out = Path(__file__).resolve().parent / "results" / "quantize_formats.json"
runs = json.loads(out.read_text()) if out.exists() else []
runs.append({"command": "PYTHONPATH=. python bench/quantize_formats.py " + " ".join(sys.argv[1:]), "repeats": REP,
             "teacher": TEACHER, "built": built, "latency": res, "load_average_end": list(os.getloadavg())})
out.write_text(json.dumps(runs, indent=1))
