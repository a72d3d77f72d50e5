"""How many calibration blocks LM importance needs: rank stability of SmolLM2's per-block scores by sample size.

`lamina analyze` scores a causal LM's blocks on `--importance-samples` packed
blocks; the cost grows linearly with them (about 26 plain forwards' worth of
work over those blocks). This measures what more blocks buy.

Method. A pool of P training blocks of the `debates` LM task (seed 0, drawn
at random from the training split, `--seq-len` tokens) is scored in units of
`--unit` blocks; each unit runs `lm_importance` on its own and keeps the raw
sums behind every score (cosine sums, squared logit differences and the full
model's squared logits, next-token cross-entropy sums, angular sums, token
counts). Summing units gives the exact scores of any union of units, so one
pass over the pool yields the scores of every sample size without rerunning.

For each sample size n (a multiple of the unit) and each score:
- split-half reliability: `--draws` times, two DISJOINT random sets of n/unit
  units; Spearman rank correlation of the 30 per-block scores between them
  (independent samples, so no shared-data inflation), and how many of the
  blocks a quarter-of-the-blocks plan would remove (the lowest-scoring 8 of 30
  skippable ones) the two draws agree on;
- against the whole pool: Spearman of the n-block scores with the P-block
  scores (overlapping data: an upper bound, reported beside).

Writes bench/results/llm_importance_samples.json (no targets: the issue names
none; it informs `--importance-samples`'s default). Units are cached in
`--work` so an interrupted run resumes.
Usage: python bench/llm_importance_samples.py [--pool 256] [--unit 8] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine, save_result  # noqa: E402

from lamina.analyze.lm_importance import lm_importance  # noqa: E402
from lamina.compress.joint import _logits, _sq  # noqa: E402
from lamina.lm_task import LMTaskSpec  # noqa: E402
from lamina.models import load_model  # noqa: E402

SCORES = ("perplexity_change", "skip_nmse", "block_influence", "angular_1")
QUARTER = 0.25


def _unit_sums(lm, batch) -> dict:
    """The raw sums of one unit (see the module doc); lm_importance's ratios times their denominators."""
    r = lm_importance(lm, [batch], spans=(1,))
    with torch.inference_mode():
        den = _sq(_logits(lm.forward(batch)), None, batch.get("attention_mask"))
    tok, pred = r["tokens"], r["predictions"]
    return {"tokens": tok, "predictions": pred, "den": den,
            "cos": [(1.0 - v) * tok for v in r["block_influence"]],
            "nmse_num": [v * den for v in r["skip_nmse"]],
            "skip_loss": [math.log(p) * pred for p in r["skip_perplexity"]],
            "full_loss": math.log(r["full_perplexity"]) * pred,
            "ang1": [v * tok for v in r["angular"]["1"]],
            "seconds": r["seconds"]}


def scores_of(units: list[dict]) -> dict[str, np.ndarray]:
    """The per-block scores of the union of ``units`` (exactly what lm_importance gives on their blocks together)."""
    s = lambda k: sum(np.asarray(u[k], dtype=np.float64) for u in units)  # noqa: E731
    tok, pred, den = s("tokens"), s("predictions"), s("den")
    return {"block_influence": 1.0 - s("cos") / tok, "skip_nmse": s("nmse_num") / den,
            "perplexity_change": np.exp(s("skip_loss") / pred) - math.exp(s("full_loss") / pred),
            "angular_1": s("ang1") / tok}


def _lowest(v: np.ndarray, k: int, skip: set[int]) -> set[int]:
    order = [i for i in np.argsort(v, kind="stable") if i not in skip]
    return set(order[:k])


def analyse(units: list[dict], sizes: list[int], unit: int, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pool = scores_of(units)
    n_blocks = len(pool["skip_nmse"])
    k = round(QUARTER * n_blocks)
    fixed = {0}  # block 0 is never a removal candidate worth counting (perplexity x1000 without it)
    out = {"pool_blocks": len(units) * unit, "remove_k": k, "sizes": {},
           "pool_scores": {key: [float(x) for x in v] for key, v in pool.items()}}
    for n in sizes:
        m = n // unit
        row = {}
        for key in SCORES:
            half, agree, vs_pool = [], [], []
            for _ in range(draws):
                perm = rng.permutation(len(units))
                a = scores_of([units[i] for i in perm[:m]])[key]
                vs_pool.append(spearmanr(a, pool[key]).statistic)
                if 2 * m <= len(units):
                    b = scores_of([units[i] for i in perm[m:2 * m]])[key]
                    half.append(spearmanr(a, b).statistic)
                    agree.append(len(_lowest(a, k, fixed) & _lowest(b, k, fixed)))
            q = lambda xs: [float(np.percentile(xs, p)) for p in (25, 50, 75)] if xs else None  # noqa: E731
            row[key] = {"split_half_spearman_q": q(half), "quarter_set_agree_q": q(agree),
                        "vs_pool_spearman_q": q(vs_pool)}
        out["sizes"][str(n)] = row
    return out


NAMES = {"perplexity_change": "perplexity change", "skip_nmse": "skip nMSE", "block_influence": "Block Influence",
         "angular_1": "angular n=1"}


def units_of(r: dict) -> list[dict]:
    """Each unit's seconds and 1-minute load (recorded in the result)."""
    return r.get("unit_timing") or []


def lines(r: dict) -> list[str]:
    """The BENCHMARKS.md paragraph (inside the "llm" section, written by bench/llm.py)."""
    st = r["stability"]
    seq = r["task"]["seq_len"] if "task" in r else 64
    out = [f"How many blocks LM importance needs (`{r['command']}`, results `bench/results/llm_importance_samples.json`):"
           f" a pool of {st['pool_blocks']} random training blocks of {seq} tokens scored in units of "
           f"{st['pool_blocks'] // r['units']} blocks, whose raw sums add up to the exact scores of any union "
           f"(tests/test_lm_importance.py checks this against `lm_importance` on the union); {r['draws']} random draws "
           "per size. *Split-half*: Spearman rank correlation of the 30 per-block scores between two disjoint draws of n "
           "blocks (independent data); *quarter set*: how many of the 8 lowest-scoring blocks (block 0 left out), "
           "what a quarter-of-the-blocks plan removes, the two draws share; *vs pool*: Spearman of n blocks against "
           f"all {st['pool_blocks']} (overlapping data, an upper bound). Median (quartiles)."
           + (f" Note: {r['note']}." if r.get("note") else ""), "",
           "| blocks (tokens) | " + " | ".join(f"{NAMES[k]}: split-half / quarter set / vs pool" for k in SCORES)
           + " |", "|---|" + "---|" * len(SCORES)]
    f = lambda q, d=3: "–" if q is None else (f"{q[1]:.{d}f}" + (f" ({q[0]:.{d}f}–{q[2]:.{d}f})" if d else ""))  # noqa: E731
    for n, row in st["sizes"].items():
        out.append(f"| {n} ({int(n) * seq:,}) | " + " | ".join(
            f"{f(row[k]['split_half_spearman_q'])} / {f(row[k]['quarter_set_agree_q'], 0)} / "
            f"{f(row[k]['vs_pool_spearman_q'])}" for k in SCORES) + " |")
    lo, hi = r["unit_load_range"]
    out += ["", f"Cost: one unit of {st['pool_blocks'] // r['units']} blocks took {r['unit_seconds_median']:.0f} s "
            f"(median over the {r['units']} units; LM importance alone, 1 thread, 1-minute load {lo:.1f}–{hi:.1f} "
            "from other sessions while they ran), so the cost is linear in the blocks: at the old default of 512 blocks "
            f"about {512 / (st['pool_blocks'] // r['units']) * r['unit_seconds_median'] / 3600:.1f} hours at this "
            "load and block length.", ""]
    big = max((n for n, row in st["sizes"].items() if row["perplexity_change"]["split_half_spearman_q"]), key=int)
    row = st["sizes"][big]
    from lamina.analyze._lm import LM_IMPORTANCE_SAMPLES
    unit_s = r["unit_seconds_median"] / (st["pool_blocks"] // r["units"])  # seconds per block of `seq` tokens
    others = [row[k]["split_half_spearman_q"][1] for k in SCORES if k != "perplexity_change"]
    pc = st["pool_scores"]["perplexity_change"]
    (v8, b8), (v9, b9) = sorted((v, i) for i, v in enumerate(pc) if i != 0)[st["remove_k"] - 1:st["remove_k"] + 1]
    first = min(units_of(r), key=lambda u: u["load"]) if units_of(r) else None
    out += [f"The default this sets: `lamina analyze` scores a causal LM on {LM_IMPORTANCE_SAMPLES} packed blocks "
            "unless `--importance-samples` says otherwise (`LM_IMPORTANCE_SAMPLES` in `lamina/analyze/_lm.py`; a "
            f"classifier keeps 512 samples). At the capture's default block of 128 tokens that is "
            f"{LM_IMPORTANCE_SAMPLES * 128:,} tokens, more than the largest split-half size measured here "
            f"({int(big) * seq:,} tokens), where the noisiest score, the perplexity change, already has a split-half "
            f"Spearman of {row['perplexity_change']['split_half_spearman_q'][1]:.3f} and two independent draws share "
            f"{row['perplexity_change']['quarter_set_agree_q'][1]:.0f} of the 8 blocks a quarter plan removes (on "
            f"the whole pool the 8th and 9th lowest perplexity changes, blocks {b8} and {b9}, differ by "
            f"{100 * (v9 - v8) / v8:.0f}%: the margin where draws disagree), and the other three scores are "
            f"at {min(others):.3f} or above. More blocks cost linearly and change the ranking little: "
            f"{LM_IMPORTANCE_SAMPLES} blocks of 128 tokens take about "
            f"{LM_IMPORTANCE_SAMPLES * 2 * unit_s / 60:.0f} minutes at this load, the old default of 512 about "
            f"{512 * 2 * unit_s / 3600:.1f} hours"
            + (f" (on a quiet machine, as the unit measured at load {first['load']:.1f} took {first['seconds']:.0f} s: "
               f"about {LM_IMPORTANCE_SAMPLES * 2 * first['seconds'] / (st['pool_blocks'] // r['units']) / 60:.0f} "
               f"minutes for {LM_IMPORTANCE_SAMPLES} blocks of 128 tokens)" if first else "")
            + "; a user who wants more passes `--importance-samples N` (0: all).", ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=256)
    ap.add_argument("--unit", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--work", default="/tmp/lm13/impsamples")
    ap.add_argument("--analyse-only", action="store_true", help="use the cached units, run nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / f"units-s{args.seq_len}-u{args.unit}.json"
    units = json.loads(cache.read_text()) if cache.exists() else []
    res = {"machine": machine(), "command": "python bench/llm_importance_samples.py " + " ".join(sys.argv[1:]),
           "model": "smollm2", "data": "debates"}
    if not args.analyse_only:
        lm = load_model("smollm2")
        task = LMTaskSpec(data="debates", seq_len=args.seq_len, seed=0).prepare(lm)
        train = task.split["train"]
        pool = np.random.default_rng(0).permutation(train)[: args.pool]
        t = time.perf_counter()
        with torch.inference_mode():
            lm.forward(task.batch(lm, pool[: args.unit]))
        res["unit_forward_seconds"] = time.perf_counter() - t
        for i in range(len(units), len(pool) // args.unit):
            rows = pool[i * args.unit:(i + 1) * args.unit]
            units.append(_unit_sums(lm, task.batch(lm, rows)) | {"rows": [int(r) for r in rows],
                                                                  "load": os.getloadavg()[0]})
            cache.write_text(json.dumps(units))
            print(f"unit {i + 1}/{len(pool) // args.unit}: {units[-1]['seconds']:.1f} s, load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
        res["task"] = task.record()
    res["units"] = len(units)
    res["unit_seconds_median"] = float(np.median([u["seconds"] for u in units])) if units else None
    loads = [u["load"] for u in units if "load" in u]
    res["unit_load_range"] = [min(loads), max(loads)] if loads else None
    res["draws"] = args.draws
    res["unit_timing"] = [{"seconds": u["seconds"], "load": u["load"]} for u in units if "load" in u]
    half = len(units) // 2 * args.unit  # the largest size two disjoint draws can both have
    sizes = sorted({n for n in (8, 16, 32, 64, 128, 256, 512) if n < len(units) * args.unit and n % args.unit == 0}
                   | ({half} if half else set()))  # the pool itself is the reference, not a row
    res["stability"] = analyse(units, sizes, args.unit, args.draws, seed=1)
    res["machine"]["load_average_end"] = list(os.getloadavg())
    old = HERE / "results" / "llm_importance_samples.json"
    if args.analyse_only and old.exists():  # keep what the measuring run recorded (its machine, timing, task)
        prev = json.loads(old.read_text())
        res = prev | {k: res[k] for k in ("units", "unit_seconds_median", "unit_load_range", "draws", "unit_timing",
                                    "stability")}
        res["analysed"] = "python bench/llm_importance_samples.py " + " ".join(sys.argv[1:])
    save_result("llm_importance_samples", res)
    print("\n".join(lines(res)))


if __name__ == "__main__":
    main()
