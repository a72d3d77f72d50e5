"""``analyze`` of a causal LM captured on packed text: the LM block importance of scores.json.

What it writes (``importance`` of scores.json, one value per block; see
``lm_importance`` for the formulas): ``block_influence``, ``skip_nmse`` (on the
next-token logits, ``target``), ``skip_perplexity`` and ``perplexity_change``,
``angular`` {n: distance of removing blocks l..l+n-1, per start l}, plus what it
cost: calibration blocks and tokens, wall seconds, and those seconds as a
multiple of one plain forward pass over the same batches (timed here, right
before), beside ``cost_forwards`` (block evaluations counted).

Memory: a batch's logits are B x seq_len x vocabulary floats (SmolLM2: 49,152
columns), held twice at most (the full model's and one skip's) plus one
cross-entropy temporary. The batch size is capped so one batch's logits stay
within ``LOGIT_ELEMENTS``, and squared differences are summed over vocabulary
chunks of ``compress.joint`` (8192 columns, float64), so peak memory follows the
cap, never the calibration set times the vocabulary.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..capture.packed import PackedRows, logits_batch_size
from ..compress.joint import _logits
from .lm_importance import lm_importance

LOGIT_ELEMENTS = 1 << 25  # 32M floats = 128 MiB per (B, T, V) logits tensor
# --importance-samples' default for a causal LM: packed blocks the importance runs over. Its cost is ~26 forwards
# over them (the N skips re-run the blocks after each one); on SmolLM2 / debates 64 blocks already rank the 30 blocks
# and pick a quarter-of-the-blocks set as a larger sample does (bench/llm_importance_samples.py, BENCHMARKS.md llm),
# where the classifier default of 512 cost hours on two CPU cores.
LM_IMPORTANCE_SAMPLES = 64
DEFAULT_SPANS = (1, 2, 4, 8)

DEFINITIONS = {
    "skip_nmse": "sum (Z - Z_skip)^2 / sum Z^2 over every calibration token, Z the next-token logits, Z_skip "
                 "with the block bypassed (Nemotron Elastic); summed in float64 over vocabulary chunks",
    "skip_perplexity": "exp(mean next-token cross-entropy) on the calibration blocks with the block bypassed",
    "perplexity_change": "skip_perplexity minus the full model's perplexity on the same blocks; lower = can go",
    "angular": "angular[n][l] = mean over tokens of arccos(cos(h_l, h_(l+n))) / pi, h_l the input of block l and "
               "h_(l+n) the output of block l+n-1: the distance that removing blocks l..l+n-1 bridges "
               "(Gromov et al. 2024); lower = can go",
    "lm_cost": "seconds: wall time of the importance pass; seconds_as_forwards: those seconds / the seconds of "
               "one plain forward pass over the same batches; cost_forwards: block evaluations / (blocks x batches)",
}


def importance_rows(rows: PackedRows, samples: int, seed: int) -> PackedRows:
    """``samples`` of the captured blocks (0: all), chosen by ``seed`` and kept in order."""
    if not samples or samples >= len(rows):
        return rows
    return rows.take(np.sort(np.random.default_rng(seed).choice(len(rows), size=samples, replace=False)))


def _vocab(lm) -> int:
    cfg = getattr(lm.module, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if isinstance(v, int) and v > 0 else 1


def lm_block_scores(lm, rows: PackedRows, spans, batch_size: int, budget: int = LOGIT_ELEMENTS) -> dict:
    """The ``importance`` section of scores.json for a causal LM on packed blocks (see the module doc)."""
    from .importance import _not_removable
    n_blocks = lm.blocks.n_blocks
    spans = sorted({int(n) for n in spans if 1 <= int(n) <= n_blocks}) or [1]
    bs = min(len(rows), logits_batch_size(batch_size, rows.seq_len, _vocab(lm), budget))
    batches = rows.batches(lm, bs)
    was = lm.module.training
    lm.module.eval()
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                _logits(lm.forward(b))
        forward_s = time.perf_counter() - t0
    finally:
        lm.module.train(was)
    res = lm_importance(lm, batches, spans=spans)
    fixed = _not_removable(lm, list(range(n_blocks)))
    skippable = [j not in fixed for j in range(n_blocks)]
    keep = lambda vals: [v if ok else None for v, ok in zip(vals, skippable)]  # noqa: E731
    return {"kind": "lm", "blocks": res["blocks"], "paths": list(lm.blocks.block_paths),
            "block_influence": res["block_influence"], "skip_nmse": keep(res["skip_nmse"]),
            "skip_perplexity": keep(res["skip_perplexity"]), "perplexity_change": keep(res["perplexity_change"]),
            "angular": res["angular"], "full_perplexity": res["full_perplexity"],
            "skippable": skippable, "notes": [fixed.get(j) for j in range(n_blocks)],
            "target": "next-token logits", "n_samples": len(rows), "seq_len": rows.seq_len,
            "tokens": res["tokens"], "predictions": res["predictions"], "spans": spans,
            "batch_size": bs, "logits_budget_elements": budget, "vocab_chunk": 8192,
            "seconds": res["seconds"], "forward_seconds": forward_s,
            "seconds_as_forwards": res["seconds"] / forward_s if forward_s > 0 else None,
            "cost_forwards": res["cost_forwards"]}
