"""``apply``: perform a plan on a copy of the model; ``apply_`` does it in place.

Order: FFN channels, then attention heads, are scored and pruned first (on
every block, so importance is measured on the full-depth model), then blocks
are removed. The returned plan is the input plan with what was done filled in
(``applied: true``, the kept/removed block indices, the FFN channels removed
per block and their scores).
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
from .heads import head_importance, heads_to_keep, prune_heads_
from .plan import n_removed
from .width import ffn_importance, prune_ffn_

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


def apply_(module: nn.Module, plan: dict, batches=None, blocks: str | None = None) -> dict:
    """Perform ``plan`` on ``module`` in place; returns the plan as carried out.

    ``batches`` (model input dicts) are needed when the plan prunes FFN channels
    or heads: their activations decide which go.
    """
    check_plan(module, plan)
    done = copy.deepcopy(plan)
    ffn = plan.get("ffn")
    if ffn:
        if batches is None:
            raise UsageError("the plan prunes FFN channels, which needs calibration batches", value=None,
                             allowed="a list of model input dicts", fix="apply(model, plan, batches=[...])")
        scores = ffn_importance(module, batches, blocks)
        size = len(scores[0])
        k = size - n_removed(ffn["fraction"], size)
        if k < 1:
            raise UsageError("the plan would remove every FFN channel", value=ffn["fraction"],
                             allowed=f"a fraction that keeps at least 1 of {size}", fix="lower --ffn")
        # Highest score first; stable sort so equal scores keep the lower index.
        order = [torch.sort(-s, stable=True).indices for s in scores]
        keep = [o[:k].sort().values for o in order]
        res = prune_ffn_(module, keep, blocks)
        names = [f"blocks.{j}" for j in range(len(scores))]
        done["ffn"].update(res)
        done["ffn"]["remove"] = {n: o[k:].sort().values.tolist() for n, o in zip(names, order)}
        done["ffn"]["removed_scores"] = {n: s[o[k:].sort().values].tolist() for n, s, o in zip(names, scores, order)}
    heads = plan.get("heads")
    if heads:
        if batches is None:
            raise UsageError("the plan prunes attention heads, which needs calibration batches", value=None,
                             allowed="a list of model input dicts", fix="apply(model, plan, batches=[...])")
        scores = head_importance(module, batches, blocks)
        keep = heads_to_keep(scores, module.config.num_key_value_heads, heads["fraction"])
        res = prune_heads_(module, keep, blocks)
        names = [f"blocks.{j}" for j in range(len(scores))]
        gone = [sorted(set(range(len(s))) - set(k.tolist())) for s, k in zip(scores, keep)]
        done["heads"].update(res)
        done["heads"]["remove"] = dict(zip(names, gone))
        done["heads"]["removed_scores"] = {n: s[g].tolist() for n, s, g in zip(names, scores, gone)}
    depth = plan.get("depth")
    if depth and depth.get("remove"):
        idx = [int(name.split(".")[1]) for name in depth["remove"]]
        bmap = find_blocks(module, blocks)
        if depth.get("n_blocks") not in (None, bmap.n_blocks):
            raise UsageError("the plan was made for a model with another number of blocks",
                             value=bmap.n_blocks, allowed=depth["n_blocks"], fix="make the plan for this model")
        done["depth"].update(drop_blocks_(module, idx, blocks))
    done["applied"] = True
    return done


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
