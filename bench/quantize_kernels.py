"""Why int8fused: one Linear's GEMM at MiniLM's shapes (batch 8 x 32 tokens = 256 rows; 384 <-> 1536), float32 vs
bf16 vs int8 kernels, one thread, interleaved medians, with each kernel's output error against a float64 GEMM.

    PYTHONPATH=. python bench/quantize_kernels.py [--repeats 30]

Kernels: ``linear_dynamic_<engine>`` = ``torch.ops.quantized.linear_dynamic`` on a weight packed for that engine
(activation quantization per tensor inside the kernel; what int8fused runs, on onednn); ``onednn_pointwise_u8`` /
``_s8`` = ``torch.ops.onednn.qlinear_pointwise`` (the op inductor lowers to, no deprecated dtype) with the
activation quantized per tensor by separate eager kernels; ``int_mm_per_token`` = ``torch._int_mm`` with per-token
activation scales (torchao int8dyn's scheme) written as plain eager ops. Input: Gaussian with one outlier channel x20
(as in BERT's hidden states). Writes bench/results/quantize_kernels.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save_result  # noqa: E402

SHAPES = ((256, 384, 1536), (256, 1536, 384), (256, 384, 384), (8, 384, 1536))


def _kernels(M: int, K: int, N: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.05
    b = torch.randn(N, generator=g) * 0.1
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 20
    ws = w.abs().amax(1) / 127
    iw = torch.clamp(torch.round(w / ws[:, None]), -127, 127).to(torch.int8)
    fns = {"fp32": lambda: torch.nn.functional.linear(x, w, b)}
    wb, bb = w.bfloat16(), b.bfloat16()
    fns["bf16"] = lambda: torch.nn.functional.linear(x.bfloat16(), wb, bb).float()
    prev = torch.backends.quantized.engine
    for eng in ("onednn", "fbgemm", "x86"):
        if eng not in torch.backends.quantized.supported_engines:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecated qint8 dtype the packing API still takes
            qw = torch._make_per_channel_quantized_tensor(iw, ws.double(), torch.zeros(N, dtype=torch.long), 0)
            torch.backends.quantized.engine = eng
            packed = torch.ops.quantized.linear_prepack(qw, b)
        torch.backends.quantized.engine = prev
        fns[f"linear_dynamic_{eng}"] = lambda p=packed: torch.ops.quantized.linear_dynamic(x, p, False)
    pw, wzp = torch.ops.onednn.qlinear_prepack(iw, [M, K]), torch.zeros(N, dtype=torch.long)

    def pointwise_u8():
        lo, hi = torch.aminmax(x)
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        s = (hi - lo) / 255 or 1.0
        zp = int(round(-lo / s))
        qx = torch.clamp(torch.round(x / s) + zp, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(qx, s, zp, pw, ws, wzp, b, 1.0, 0, torch.float32, "none", [], "")

    def pointwise_s8():
        s = float(x.abs().max()) / 127 or 1.0
        qx = torch.clamp(torch.round(x * (1 / s)), -127, 127).to(torch.int8)
        return torch.ops.onednn.qlinear_pointwise(qx, s, 0, pw, ws, wzp, b, 1.0, 0, torch.float32, "none", [], "")

    iwt = iw.t().contiguous()

    def int_mm_per_token():
        s = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        return torch._int_mm(torch.round(x / s).to(torch.int8), iwt).float().mul_(s).mul_(ws).add_(b)

    fns.update(onednn_pointwise_u8=pointwise_u8, onednn_pointwise_s8=pointwise_s8)
    if M > 16:  # torch._int_mm needs more than 16 rows
        fns["int_mm_per_token"] = int_mm_per_token
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    return fns, ref, x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {"machine": machine(), "threads": 1, "repeats": args.repeats, "shapes": {}}
    for M, K, N in SHAPES:
        fns, ref, _ = _kernels(M, K, N)
        err = {k: float(((f().double() - ref) ** 2).sum() / (ref ** 2).sum()) for k, f in fns.items()}
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(1000 * (time.perf_counter() - t))
        res["shapes"][f"{M}x{K}x{N}"] = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                                             "nmse_vs_float64": err[k]} for k, v in times.items()}
        print(f"{M}x{K}x{N}: " + ", ".join(f"{k} {statistics.median(v):.3f} ms ({err[k]:.1e})"
                                          for k, v in times.items()), flush=True)
    res["load_average_end"] = list(os.getloadavg())
    save_result("quantize_kernels", res)
    return res


if __name__ == "__main__":
    main()
