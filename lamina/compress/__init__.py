"""Compression: ``make_plan`` (pure: scores + budget -> plan.json), then ``apply`` (a smaller copy).

Example::

    import json
    from lamina.compress import PlanConfig, make_plan, apply, save_plan
    plan = make_plan(json.load(open("run/scores.json")), PlanConfig(drop_blocks=0.25, ffn=0.5))
    save_plan(plan, "run")
    res = apply(model, plan, batches=[lm.batch(ds, range(32))])
    res.model.save_pretrained("run/model")   # Hugging Face models round-trip
"""

from .apply import Applied, apply, apply_, check_plan
from .depth import drop_blocks_
from .heads import head_importance, heads_to_keep, prune_heads_
from .plan import METHODS, PlanConfig, is_empty, load_plan, make_plan, save_plan
from .prune import PruneConfig, PruneResult, prune
from .width import ffn_importance, ffn_layout, prune_ffn_

__all__ = ["Applied", "METHODS", "PlanConfig", "apply", "apply_", "check_plan", "drop_blocks_", "ffn_importance",
           "ffn_layout", "head_importance", "heads_to_keep", "is_empty", "load_plan", "make_plan", "prune_ffn_",
           "prune_heads_",
           "PruneConfig", "PruneResult", "prune", "save_plan"]
