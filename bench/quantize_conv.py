"""EfficientNet-Lite0 (ImageNet weights) in float32 vs the whole model in bfloat16 (convs included): batch 8, 96 px,
one thread, 7 interleaved rounds after two warm-ups. Prints JSON.   PYTHONPATH=. python bench/quantize_conv.py
"""
import copy, statistics, time, warnings, os, json; warnings.simplefilter("ignore")
import torch, lamina
lm = lamina.load_model("efficientnet-lite0")
m = lm.module.eval(); b = copy.deepcopy(m).to(torch.bfloat16)
x = torch.randn(8, 3, 96, 96)
torch.set_num_threads(1)
res = {"fp32": [], "bf16": []}
with torch.inference_mode():
    ref = m(x); got = b(x.bfloat16()).float()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    for _ in range(2): m(x); b(x.bfloat16())
    for r in range(7):
        for k, f in (("fp32", lambda: m(x)), ("bf16", lambda: b(x.bfloat16()))):
            s = time.perf_counter(); f(); res[k].append(1000 * (time.perf_counter() - s))
med = {k: statistics.median(v) for k, v in res.items()}
print(json.dumps({"median_ms": med, "min_max": {k: [min(v), max(v)] for k, v in res.items()}, "speedup_bf16": med["fp32"] / med["bf16"], "cosine": cos, "load": os.getloadavg()[0]}))
