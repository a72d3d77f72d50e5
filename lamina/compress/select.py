"""Depth choices that need the model: iterative re-scoring, and a parameter target.

A plan is pure data made from scores.json, but two choices cannot be made
from it: the iterative method (its scores are measured on a model that
already lost blocks) and ``target_params`` (how many blocks go depends on
their parameter counts, after any width pruning). :func:`choose_depth` makes
them on the model that blocks will be removed from; ``apply`` calls it, and
``lamina prune`` calls :func:`choose_blocks` first so that plan.json records
the choice (and each round's scores) before anything is applied.

Iterative (Nemotron Elastic's normalized MSE, re-scored): round r runs
:func:`lamina.analyze.importance.block_importance` on the calibration batches
on a copy of the model with the r-1 blocks already chosen physically removed,
scoring only the remaining candidates, and removes the one with the lowest
skip nMSE ``sum (M - M_skip)^2 / sum M^2`` (M that copy's output; ties: the
earlier block).
"""

from __future__ import annotations

import copy
import math

import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from .depth import drop_blocks_
from .plan import even_pick


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def target_count(target: float, params_before: int) -> int:
    """The parameter limit of ``target_params``: >= 1 a count, in (0, 1) that fraction of ``params_before``."""
    return int(target) if target >= 1 else int(math.floor(target * params_before))


def _iterative(module: nn.Module, container: str, cands: list[int], n_drop: int | None, fits, batches,
               n: int) -> tuple[list[int], list[dict]]:
    from ..analyze.importance import block_importance
    from ..models import LoadedModel
    if batches is None:
        raise UsageError("the iterative method re-scores blocks on calibration batches, and none were given",
                         value=None, allowed="a list of model input dicts", fix="apply(model, plan, batches=[...])")
    batches = list(batches)
    work = copy.deepcopy(module)
    alive = list(range(n))  # original index of each block of `work`, in order
    removed: list[int] = []
    rounds: list[dict] = []
    while not (n_drop is not None and len(removed) >= n_drop) and not (fits is not None and fits(removed)):
        left = [c for c in cands if c not in removed]
        if not left or len(alive) <= 1:
            break
        lm = LoadedModel(work, "iterative", "python", "array", find_blocks(work, container))
        res = block_importance(lm, batches, progress=False, layers=[alive.index(c) for c in left])
        scores = {f"blocks.{c}": (b.skip_importance if b.skippable else None) for c, b in zip(left, res.blocks)}
        valid = [(s, c) for c in left if (s := scores[f"blocks.{c}"]) is not None and math.isfinite(s)]
        if not valid:
            break
        s, pick = min(valid)
        drop_blocks_(work, [alive.index(pick)], container)
        alive.remove(pick)
        removed.append(pick)
        rounds.append({"round": len(rounds) + 1, "removed": f"blocks.{pick}", "skip_nmse": s, "scores": scores,
                       "parameters_after": _n_params(work)})
    return sorted(removed), rounds


def choose_depth(module: nn.Module, depth: dict, batches=None, blocks: str | None = None,
                 params_before: int | None = None, labels=None) -> dict:
    """``depth`` (a plan's depth part) with ``remove`` chosen on ``module``; ``module`` is not modified.

    ``module`` is the model blocks will be removed from (width pruning already
    done); ``params_before`` the unpruned model's parameter count (the base
    of a fractional target; default: ``module``'s); ``labels`` the class
    labels of the calibration batches (one tensor per batch), which the joint
    method scores sets on when given (error rate) instead of the output change. Raises UsageError when a
    parameter target cannot be reached.
    """
    out = copy.deepcopy(depth)
    if depth.get("remove") is not None:
        return out
    bmap = find_blocks(module, blocks)
    n = bmap.n_blocks
    if depth.get("n_blocks") not in (None, n):
        raise UsageError("the plan was made for a model with another number of blocks", value=n,
                         allowed=depth["n_blocks"], fix="make the plan for this model")
    cands = [int(c.split(".")[1]) for c in depth["candidates"]]
    # a block that is one call of a shared layer (ALBERT) frees no parameters when it goes
    sizes = [0 if bmap.shared else _n_params(module.get_submodule(p)) for p in bmap.block_paths]
    total = _n_params(module)
    max_drop = min(len(cands), n - 1)
    fits, limit = None, None
    if depth.get("target_params") is not None:
        limit = target_count(depth["target_params"], total if params_before is None else params_before)
        best = total - sum(sorted((sizes[c] for c in cands), reverse=True)[:max_drop])
        if best > limit:
            raise UsageError("the parameter target cannot be reached by removing blocks", value=depth["target_params"],
                             allowed=f"a target of at least {best:,} parameters (every removable block gone; now "
                                     f"{total:,}"
                                     f"{' after width pruning' if params_before not in (None, total) else ''})",
                             fix="raise --target-params, or add width pruning (--ffn / --heads / --channels)")
        out["target_parameters"] = limit
        fits = lambda drop: total - sum(sizes[i] for i in drop) <= limit  # noqa: E731

    rounds = None
    method = depth["method"]
    if method == "joint":
        from ..models import LoadedModel
        from .joint import joint_select
        lm = LoadedModel(module, "joint", "python", "array", bmap)
        res = joint_select(lm, batches, None if fits else depth["n_removed"], cands, beam=depth.get("beam", 1),
                           fits=fits, labels=labels)
        drop, rounds = res["remove"], res["rounds"]
        out["joint"] = {k: res[k] for k in ("objective", "score", "chosen_by", "seeded", "set_evaluations",
                                            "cost_forwards", "seconds")}
    elif method == "iterative":
        drop, rounds = _iterative(module, bmap.container, cands, None if fits else depth["n_removed"], fits, batches, n)
        if fits is None and len(drop) < depth["n_removed"]:
            raise UsageError("the iterative method found fewer skippable blocks with a finite score than the budget "
                             "removes", value=len(drop), allowed=f"{depth['n_removed']} blocks",
                             fix="lower --drop-blocks, or use another --method")
    else:
        if method == "even":
            options = (even_pick(cands, m) for m in range(max_drop + 1))
        else:  # lowest score first, ties by position: the same order make_plan uses
            vals = depth["scores"]
            order = sorted(cands, key=lambda i: (vals[f"blocks.{i}"], i))
            options = (sorted(order[:m]) for m in range(max_drop + 1))
        drop = next((d for d in options if fits(d)), None)
    if fits is not None and (drop is None or not fits(drop)):
        got = total - sum(sizes[i] for i in (drop or []))
        raise UsageError(f"removing blocks in the order of '{method}' does not reach the parameter target",
                         value=depth["target_params"], allowed=f"a target of at least {got:,} parameters",
                         fix="raise --target-params, try another --method, or add width pruning")
    out.update({"n_removed": len(drop), "remove": [f"blocks.{i}" for i in drop],
                "remove_paths": [bmap.block_paths[i] for i in drop],
                "predicted_parameters": total - sum(sizes[i] for i in drop)})
    if rounds is not None:
        out["rounds"] = rounds
    return out
