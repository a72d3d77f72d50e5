"""Per-block importance of a decoder LM, from one cached forward per batch.

Measures (block j of N; x_j its input, y_j its output; sums over every
non-padding token of every calibration batch):

    block_influence     BI_j = 1 - mean cos(x_j, y_j)                          (ShortGPT)
    skip_nmse           sum (Z - Z_-j)^2 / sum Z^2, Z the next-token logits,
                        Z_-j with block j bypassed; summed in float64 over
                        vocabulary chunks so memory stays one chunk wide     (Nemotron Elastic)
    skip_perplexity     exp(mean next-token cross-entropy of Z_-j)
    perplexity_change   skip_perplexity - the full model's perplexity
    angular[n][l]       mean over tokens of arccos(cos(h_l, h_{l+n})) / pi, h_l the input of
                        block l and h_{l+n} the output of block l+n-1: the distance that
                        removing the n blocks l..l+n-1 bridges                 (Gromov et al. 2024)

Cost: one full forward per batch caches every block's output; skipping
block j then runs only blocks j+1.. (earlier blocks return their cached
outputs), so all N skips cost about (N+1)/2 forwards plus N heads; angular
distances are dot products of cached states. ``cost_forwards`` reports block
evaluations in units of one full forward over the calibration set.
"""

from __future__ import annotations

import math
import time

import torch

from ..blocks import block_output
from ..compress.joint import _Calib
from ..errors import UsageError


def _states(cal: _Calib, bi: int) -> list[torch.Tensor]:
    """h_0 (block 0's input) .. h_N (the last block's output) of batch ``bi``."""
    return [cal.inputs0[bi]] + [block_output(o) for o in cal.outputs[bi]]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return torch.linalg.vecdot(a, b, dim=-1) / (torch.linalg.vector_norm(a, dim=-1) *
                                                torch.linalg.vector_norm(b, dim=-1)).clamp_min(1e-8)


def lm_importance(lm, batches, *, spans=(1,), progress: bool = False) -> dict:
    """Block Influence, skip nMSE on logits, skip perplexity and angular distances (see the module doc).

    Args:
        lm: a LoadedModel of a causal LM (not modified).
        batches: calibration inputs, dicts with 'input_ids' (and 'attention_mask').
        spans: the n of the angular distance (blocks removed together), each 1..N.
    """
    spans = sorted({int(n) for n in spans})
    n_blocks = lm.blocks.n_blocks
    if not spans or spans[0] < 1 or spans[-1] > n_blocks:
        raise UsageError("angular-distance spans must be between 1 and the number of blocks", value=spans,
                         allowed=f"1..{n_blocks}", fix="e.g. spans=(1, 8)")
    t0 = time.perf_counter()
    flags = [(m, m.training) for m in lm.module.modules()]
    lm.module.eval()
    try:
        with torch.inference_mode():
            cal = _Calib(lm, batches, "loss")
            if cal.n_tok == 0:
                raise UsageError("LM importance needs a causal LM fed input_ids", value=lm.name,
                                 allowed="a *ForCausalLM model and text batches", fix="use block_importance")
            cos_sum = [0.0] * n_blocks
            ang = {n: [0.0] * (n_blocks - n + 1) for n in spans}
            n_pos = 0
            for bi, b in enumerate(cal.batches):
                h = _states(cal, bi)
                m = b.get("attention_mask")
                m = torch.ones(h[0].shape[:2], dtype=torch.float64) if m is None else m.to(torch.float64)
                n_pos += float(m.sum())
                for j in range(n_blocks):
                    cos_sum[j] += float((_cos(h[j], h[j + 1]) * m).sum())
                for n in spans:
                    for s in range(n_blocks - n + 1):
                        d = torch.arccos(_cos(h[s], h[s + n]).clamp(-1.0, 1.0)) / math.pi
                        ang[n][s] += float((d * m).sum())
            res = cal.measure([[j] for j in range(n_blocks)], nmse=True, loss=True)
    finally:
        for mod, t in flags:
            mod.training = t
    full_ppl = math.exp(cal.full_loss / cal.n_tok)
    skip_ppl = [math.exp(min(r["loss"], 700.0)) for r in res]
    block_evals = sum(n_blocks - j - 1 for j in range(n_blocks))
    return {"analysis": "lm_importance", "model": lm.name, "n_blocks": n_blocks,
            "blocks": [f"blocks.{j}" for j in range(n_blocks)],
            "tokens": int(n_pos), "predictions": cal.n_tok, "full_perplexity": full_ppl,
            "block_influence": [1.0 - c / n_pos for c in cos_sum],
            "skip_nmse": [r["nmse"] for r in res],
            "skip_perplexity": skip_ppl, "perplexity_change": [p - full_ppl for p in skip_ppl],
            "angular": {str(n): [a / n_pos for a in ang[n]] for n in spans},
            "seconds": time.perf_counter() - t0, "cost_forwards": 1 + block_evals / n_blocks}


def angular_pick(angular: list[float], n: int) -> list[int]:
    """Gromov et al.'s choice: the n consecutive blocks l..l+n-1 whose span has the smallest angular distance."""
    start = min(range(len(angular)), key=lambda s: (angular[s], s))
    return list(range(start, start + n))
