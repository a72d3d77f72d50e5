"""The budget selector: score every member without training, time it on this machine, mark the Pareto front.

Nemotron Elastic trains a router that maps a budget to a configuration; on a
CPU-sized family the whole grid can simply be measured. Each member is
extracted (a real smaller model, not a masked parent: that is what would be
deployed, so that is what is timed), its BatchNorm statistics re-estimated on
calibration rows, scored on the validation rows, and timed:

- latency: ``latency_batch`` validation rows (the same rows for every member),
  ``threads`` torch threads, one warm-up round, then ``latency_repeats``
  rounds in which every member runs once (interleaved, so load on a shared
  machine hits all members alike); the median per member, and its spread.
- Pareto front: a member is on it when no other member is at least as good in
  both validation metric and latency and better in one.

``pick`` answers ``extract --params`` / ``--latency-ms`` from these records.
"""

from __future__ import annotations

import os
import statistics

import torch

from ..errors import UsageError
from ..models import recalibrate_bn
from .budget import Budget


def _time(lm, batch) -> float:
    from ..bench.bench import _time as time_forward
    with torch.inference_mode():
        return time_forward(lm, batch)


def measure_latency(models: list, batch_of, repeats: int, threads: int | None) -> list[dict]:
    """Per model: {'latency_ms' (median), 'latency_ms_min', 'latency_ms_max'}; interleaved rounds.

    ``batch_of(lm)`` gives each model its input batch (the same rows).
    """
    from ..threads import limit_threads
    batches = [batch_of(m) for m in models]
    times: list[list[float]] = [[] for _ in models]
    with limit_threads(threads):
        for r in range(repeats + 1):
            for i, (m, b) in enumerate(zip(models, batches)):
                t = _time(m, b)
                if r:  # round 0 warms up every member
                    times[i].append(t * 1000)
    return [{"latency_ms": statistics.median(t), "latency_ms_min": min(t), "latency_ms_max": max(t)}
            for t in times]


def pareto(members: list[dict], higher_is_better: bool, key: str = "latency_ms") -> list[bool]:
    """Whether each member is on the front of (val_metric, ``key``): no other is as good in both, better in one."""
    sign = 1 if higher_is_better else -1
    out = []
    for a in members:
        dominated = any(sign * b["val_metric"] >= sign * a["val_metric"] and b[key] <= a[key]
                        and (sign * b["val_metric"] > sign * a["val_metric"] or b[key] < a[key])
                        for b in members if b is not a)
        out.append(not dominated)
    return out


def score_members(fam, task, calib: list, val_rows, config) -> list[dict]:
    """One record per grid member (full first): budget, parameters, validation metric, latency, pareto."""
    members = fam.grid.members()
    models = []
    recs = []
    for b in members:
        m = fam.extract(b)
        recalibrate_bn(m, calib)
        ev = task.evaluate(m, val_rows)
        models.append(m)
        recs.append({**b.to_dict(), "parameters": sum(p.numel() for p in m.module.parameters()),
                     "metric": task.metric, "val_metric": ev[task.metric], "val_loss": ev.get("loss")})
    rows = list(val_rows)[: config.latency_batch] or list(task.split["train"])[: config.latency_batch]
    lat = measure_latency(models, lambda m: task.batch(m, rows), config.latency_repeats, config.threads)
    for r, t in zip(recs, lat):
        r.update(t, latency_batch=len(rows), latency_threads=config.threads)
    for r, p, q in zip(recs, pareto(recs, task.higher_is_better),
                       pareto(recs, task.higher_is_better, key="parameters")):
        r["pareto"], r["pareto_parameters"] = p, q
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    for r in recs:
        r["loadavg"] = list(load) if load else None
    return recs


def budget_of(rec: dict) -> Budget:
    return Budget(int(rec["depth"]), float(rec["ffn"]), float(rec["heads"]), float(rec["channels"]))


def pick(members: list[dict], higher_is_better: bool, *, params: float | None = None,
         latency_ms: float | None = None) -> dict:
    """The most accurate member within a parameter fraction of the full member's, or a measured latency.

    UsageError naming the best reachable value when no member meets the target.
    """
    sign = 1 if higher_is_better else -1
    full = members[0]
    if params is not None:
        limit = params * full["parameters"]
        ok = [m for m in members if m["parameters"] <= limit + 0.5]
        if not ok:
            least = min(m["parameters"] for m in members)
            raise UsageError("no member of the family is that small", value=params,
                             allowed=f">= {least / full['parameters']:.3f} (the smallest member: {least:,} "
                                     f"parameters of {full['parameters']:,})",
                             fix=f"--params {least / full['parameters']:.3f}, or train smaller budgets")
    else:
        ok = [m for m in members if m.get("latency_ms") is not None and m["latency_ms"] <= latency_ms]
        if not ok:
            fast = min(m["latency_ms"] for m in members)
            raise UsageError("no member of the family meets this latency on the machine that measured it",
                             value=f"{latency_ms} ms", allowed=f">= {fast:.3f} ms (the fastest member, measured "
                             f"at batch {members[0].get('latency_batch')})",
                             fix=f"--latency-ms {fast:.3f}, or train smaller budgets")
    # most accurate; ties: fewer parameters, then lower latency
    return max(ok, key=lambda m: (sign * m["val_metric"], -m["parameters"], -(m.get("latency_ms") or 0.0)))
