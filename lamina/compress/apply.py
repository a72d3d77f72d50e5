"""``apply``: perform a plan on a copy of the model; ``apply_`` does it in place.

Order: FFN channels, attention heads, then EfficientNet expanded channels are
scored and pruned first (on every block, so importance is measured on the
full-depth model), then blocks are removed. A depth choice that needs the model
(iterative method, parameter target) is made at that point, on the
width-pruned model (:func:`lamina.compress.select.choose_depth`). The returned
plan is the input plan with what was done filled in (``applied: true``, the
kept/removed block indices, the channels removed per block and their scores).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from ..models import LoadedModel, model_fingerprint
from .depth import drop_blocks_
from .channels import channel_importance, prune_channels_
from .heads import head_importance, heads_to_keep, prune_heads_
from .plan import n_removed
from .select import choose_depth
from .width import ffn_importance, ffn_keep_per_layer, prune_ffn_

log = logging.getLogger(__name__)


@dataclass
class Applied:
    """A pruned model and the plan as it was carried out.

    Attributes:
        model: the pruned copy (a LoadedModel when one was given, else the nn.Module).
        plan: the plan with ``applied`` True and the chosen indices filled in.
        parameters_before, parameters_after: parameter counts.
    """

    model: object
    plan: dict
    parameters_before: int
    parameters_after: int

    def to_dict(self) -> dict:
        return {"plan": self.plan, "parameters_before": self.parameters_before,
                "parameters_after": self.parameters_after}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def check_plan(module: nn.Module, plan: dict) -> None:
    """UsageError unless ``plan`` was made for ``module`` (same fingerprint)."""
    if not isinstance(plan, dict) or "lamina_plan" not in plan:
        raise UsageError("not a lamina plan", value=type(plan).__name__, allowed="a dict from make_plan/load_plan",
                         fix="plan = lamina.compress.make_plan(scores, PlanConfig(...))")
    want = (plan.get("model") or {}).get("fingerprint")
    if plan.get("applied"):
        raise UsageError("this plan was already applied (it describes the pruned model's origin, not this one)",
                         value="applied: true", allowed="a plan from make_plan", fix="apply the original plan.json")
    if want is None:
        log.warning("the plan has no model fingerprint; cannot check it was made for this model")
        return
    got = model_fingerprint(module)
    if got != want:
        raise UsageError("the plan was made for another model (fingerprints differ)", value=got,
                         allowed=f"the model with fingerprint {want} ({(plan.get('model') or {}).get('name')})",
                         fix="make the plan from this model's scores.json, or apply it to the model it was made for")


def _complement(size: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def _needs_batches(batches, what: str) -> None:
    if batches is None:
        raise UsageError(f"the plan prunes {what}, which needs calibration batches", value=None,
                         allowed="a list of model input dicts", fix="apply(model, plan, batches=[...])")


def _apply_width_(module: nn.Module, plan: dict, done: dict, batches, blocks: str | None) -> None:
    """FFN channels, heads, expanded channels of ``plan`` on ``module`` in place; fills ``done``."""
    ffn = plan.get("ffn")
    if ffn:
        _needs_batches(batches, "FFN channels")
        scores = ffn_importance(module, batches, blocks)
        if ffn.get("per_layer"):
            keep = ffn_keep_per_layer(scores, ffn["fraction"])
        else:
            size = len(scores[0])
            k = size - n_removed(ffn["fraction"], size)
            if k < 1:
                raise UsageError("the plan would remove every FFN channel", value=ffn["fraction"],
                                 allowed=f"a fraction that keeps at least 1 of {size}", fix="lower --ffn")
            # Highest score first; stable sort so equal scores keep the lower index.
            keep = [torch.sort(-s, stable=True).indices[:k].sort().values for s in scores]
        res = prune_ffn_(module, keep, blocks, uniform=not ffn.get("per_layer"))
        names = [f"blocks.{j}" for j in range(len(scores))]
        gone = [_complement(len(s), kp) for s, kp in zip(scores, keep)]
        done["ffn"].update(res)
        done["ffn"]["remove"] = {n: g.tolist() for n, g in zip(names, gone)}
        done["ffn"]["removed_scores"] = {n: s[g].tolist() for n, s, g in zip(names, scores, gone)}
    heads = plan.get("heads")
    if heads:
        _needs_batches(batches, "attention heads")
        scores = head_importance(module, batches, blocks)
        keep = heads_to_keep(scores, module.config.num_key_value_heads, heads["fraction"])
        res = prune_heads_(module, keep, blocks)
        names = [f"blocks.{j}" for j in range(len(scores))]
        gone = [sorted(set(range(len(s))) - set(k.tolist())) for s, k in zip(scores, keep)]
        done["heads"].update(res)
        done["heads"]["remove"] = dict(zip(names, gone))
        done["heads"]["removed_scores"] = {n: s[g].tolist() for n, s, g in zip(names, scores, gone)}
    chans = plan.get("channels")
    if chans:
        _needs_batches(batches, "CNN channels")
        scores = channel_importance(module, batches, blocks)
        keep, gone = {}, {}
        for j, s in scores.items():
            k = len(s) - n_removed(chans["fraction"], len(s))
            if k < 1:
                raise UsageError("the plan would remove every expanded channel of a block", value=chans["fraction"],
                                 allowed=f"a fraction that keeps at least 1 of {len(s)}", fix="lower --channels")
            order = torch.sort(-s, stable=True).indices  # highest first; equal scores keep the lower index
            keep[j], gone[j] = order[:k].sort().values, order[k:].sort().values
        done["channels"].update(prune_channels_(module, keep, blocks))
        done["channels"]["remove"] = {f"blocks.{j}": g.tolist() for j, g in gone.items()}
        done["channels"]["removed_scores"] = {f"blocks.{j}": scores[j][g].tolist() for j, g in gone.items()}


def apply_(module: nn.Module, plan: dict, batches=None, blocks: str | None = None) -> dict:
    """Perform ``plan`` on ``module`` in place; returns the plan as carried out.

    ``batches`` (model input dicts) are needed when the plan prunes FFN
    channels, heads or CNN channels (their activations decide which go), or
    chooses blocks iteratively.
    """
    check_plan(module, plan)
    done = copy.deepcopy(plan)
    params_before = _n_params(module)
    _apply_width_(module, plan, done, batches, blocks)
    depth = plan.get("depth")
    if depth and depth.get("remove") is None:  # iterative / parameter target: chosen on the width-pruned model
        done["depth"] = depth = choose_depth(module, depth, batches, blocks, params_before)
    if depth and depth.get("remove"):
        idx = [int(name.split(".")[1]) for name in depth["remove"]]
        bmap = find_blocks(module, blocks)
        if depth.get("n_blocks") not in (None, bmap.n_blocks):
            raise UsageError("the plan was made for a model with another number of blocks",
                             value=bmap.n_blocks, allowed=depth["n_blocks"], fix="make the plan for this model")
        done["depth"].update(drop_blocks_(module, idx, blocks))
    done["applied"] = True
    return done


def choose_blocks(model, plan: dict, batches=None, blocks: str | None = None, labels=None) -> dict:
    """``plan`` with a depth choice that needs the model made (iterative rounds, parameter target).

    The plan's width parts are carried out on a copy first, so blocks are
    scored and counted on the model they will be removed from; ``model`` is
    untouched and the returned plan is still pure (``applied`` false): apply
    it with :func:`apply`. Plans whose blocks are already chosen come back as they are.
    ``labels`` (one tensor per batch, classifiers): the joint method scores sets by their error rate.
    """
    module = model.module if isinstance(model, LoadedModel) else model
    if blocks is None and isinstance(model, LoadedModel) and model.blocks.container:
        blocks = model.blocks.container
    check_plan(module, plan)
    out = copy.deepcopy(plan)
    if not plan.get("depth") or plan["depth"].get("remove") is not None:
        return out
    params_before = _n_params(module)
    work = copy.deepcopy(module)
    if plan.get("ffn") or plan.get("heads") or plan.get("channels"):
        _apply_width_(work, plan, copy.deepcopy(plan), batches, blocks)
    out["depth"] = choose_depth(work, plan["depth"], batches, blocks, params_before, labels=labels)
    return out


def apply(model, plan: dict, batches=None, blocks: str | None = None) -> Applied:
    """Perform ``plan`` on a deep copy of ``model`` (a LoadedModel or nn.Module); the caller's is untouched.

    Returns :class:`Applied`; ``Applied.model`` is the same kind as ``model``.
    """
    module = model.module if isinstance(model, LoadedModel) else model
    if not isinstance(module, nn.Module):
        raise UsageError("apply needs a model", value=type(model).__name__, allowed="nn.Module or LoadedModel",
                         fix="load it with lamina.load_model(...)")
    if blocks is None and isinstance(model, LoadedModel) and model.blocks.container:
        blocks = model.blocks.container
    check_plan(module, plan)  # before the copy: a wrong model costs nothing
    new = copy.deepcopy(module)
    done = apply_(new, plan, batches, blocks)
    new.eval()
    out = new
    if isinstance(model, LoadedModel):
        out = copy.copy(model)
        out.module, out.blocks = new, find_blocks(new, blocks)
    return Applied(out, done, _n_params(module), _n_params(new))
