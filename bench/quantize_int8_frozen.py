"""torchao int8 dynamic on every Linear of the fine-tuned MiniLM, compiled with inductor freezing and torchao's x86
lowering passes (int8 GEMM -> oneDNN qlinear with prepacked weights), against fp32 and bf16 eager (batch 8, 64 tokens,
one thread, 7 interleaved rounds). MODE: no_grad or inference_mode (the grad mode the forward runs under).

    PYTHONPATH=. python bench/quantize_int8_frozen.py MODE [TEACHER]

Appends to bench/results/quantize_formats.json.
"""
import json
import torch, warnings, time, statistics, copy, sys, os; warnings.simplefilter("ignore")
from pathlib import Path
import torchao.quantization as tq
import torch._inductor.config as ic
from torch._dynamo.utils import counters
import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  registers x86 passes
import lamina
from lamina.task import read_task
ic.freezing = True
torch.set_num_threads(1)
TEACHER = sys.argv[2] if len(sys.argv) > 2 else "/tmp/qw/teacher"
lm = lamina.load_model(TEACHER); fp = lm.module.eval()
spec = read_task(TEACHER); ds, split = spec.load()
b = lm.batch(ds, split["test"][:8], 64)
b = {k: torch.nn.functional.pad(v, (0, 64 - v.shape[1])) for k, v in b.items()}
q = copy.deepcopy(fp); tq.quantize_(q, tq.Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, n: isinstance(m, torch.nn.Linear))
bf = copy.deepcopy(fp).to(torch.bfloat16)
mode = sys.argv[1]
ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
with ctx():
    t0 = time.perf_counter()
    c = torch.compile(q); out = c(**b).logits
    compile_s = time.perf_counter() - t0
    matched = {k: v for k, v in counters["inductor"].items() if "qlinear" in k}
    print("compile s", round(compile_s), matched, flush=True)
    ref = fp(**b).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    print("cos", torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item())
    fs = {"fp32": lambda: fp(**b), "int8dyn_frozen": lambda: c(**b), "bf16": lambda: bf(**b)}
    ts = {k: [] for k in fs}
    for f in fs.values(): f()
    for r in range(7):
        for k, f in fs.items():
            s = time.perf_counter(); f(); ts[k].append(1000 * (time.perf_counter() - s))
    med = {k: statistics.median(v) for k, v in ts.items()}
    print(mode, {k: (round(v, 1), round(med["fp32"] / v, 2), round(min(ts[k])), round(max(ts[k]))) for k, v in med.items()}, "load", os.getloadavg()[0])
out_path = Path(__file__).resolve().parent / "results" / "quantize_formats.json"
runs = json.loads(out_path.read_text()) if out_path.exists() else []
runs.append({"command": "PYTHONPATH=. python bench/quantize_int8_frozen.py " + " ".join(sys.argv[1:]), "mode": mode,
             "teacher": TEACHER, "compile_s": compile_s, "inductor_counters": matched, "logits_cosine_b8": cos,
             "b8_t1": {k: {"median_ms": med[k], "min_ms": min(ts[k]), "max_ms": max(ts[k]),
                           "speedup": med["fp32"] / med[k]} for k in med}, "load_average": list(os.getloadavg())})
out_path.write_text(json.dumps(runs, indent=1))
