"""Compression: ``make_plan`` (pure: scores + budget -> plan.json), then ``apply`` (a smaller copy).

Example::

    import json
    from lamina.compress import PlanConfig, make_plan, apply, save_plan
    plan = make_plan(json.load(open("run/scores.json")), PlanConfig(drop_blocks=0.25, ffn=0.5))
    save_plan(plan, "run")
    res = apply(model, plan, batches=[lm.batch(ds, range(32))])
    res.model.save_pretrained("run/model")   # Hugging Face models round-trip
    # what a standard config cannot express (a channel-pruned EfficientNet):
    # lamina.savefmt.save_loaded(res.model, "run/model"); lamina.savefmt.load("run/model")
"""

from .apply import Applied, apply, apply_, check_plan, choose_blocks
from .channels import channel_importance, channel_layout, prune_channels_
from .depth import drop_blocks_
from .heads import head_importance, heads_to_keep, prune_heads_
from .plan import METHODS, PlanConfig, is_empty, load_plan, make_plan, needs_model, save_plan
from .prune import PruneConfig, PruneResult, prune
from .select import choose_depth, target_count
from .width import ffn_importance, ffn_layout, prune_ffn_

__all__ = ["Applied", "METHODS", "PlanConfig", "apply", "apply_", "channel_importance", "channel_layout",
           "check_plan", "choose_blocks", "choose_depth", "drop_blocks_", "ffn_importance", "ffn_layout",
           "head_importance", "heads_to_keep", "is_empty", "load_plan", "make_plan", "needs_model",
           "prune_channels_", "prune_ffn_", "prune_heads_", "PruneConfig", "PruneResult", "prune", "save_plan",
           "target_count"]
