"""``make_plan``: what compression removes, and why, as pure data (``plan.json``).

A plan is made from ``scores.json`` (written by ``lamina analyze``) and a
:class:`PlanConfig`; it never needs the model. It records:

    model        the fingerprint (and name) of the model the scores came from;
                 :func:`lamina.compress.apply` refuses any other model
    depth        the blocks that go (canonical names and module paths), the
                 method that chose them, and the scores that decided it
    ffn, heads   the fraction of FFN channels (attention heads) removed in
                 every block; the indices are filled in by ``apply``, which
                 measures activation importance on calibration batches

Design decisions:
- Only blocks marked ``skippable`` in the scores can go: a block that changes
  the shape of what it is fed cannot be bypassed.
- The number of blocks removed is ``round(drop_blocks * N)``, N all blocks
  (skippable or not), so a fraction means the same thing on every model.
- ``method="even"`` (Unified Layer Skipping) spaces the removed blocks evenly
  inside the skippable ones (candidate ``(k+1) * C // (n+1)`` for k < n, so the
  first and last blocks stay whenever the budget allows); it reads no importance, so it is the baseline the
  importance-driven methods must beat.
- Width is uniform across blocks, so the Hugging Face config
  (``intermediate_size``) still describes the pruned model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError, suggest

PLAN_VERSION = 1
METHODS = ("skip_nmse", "block_influence", "even")

DEFINITIONS = {
    "skip_nmse": "removes the skippable blocks with the lowest normalized output change when skipped "
                 "(Nemotron Elastic): sum (M_full - M_skip)^2 / sum M_full^2",
    "block_influence": "removes the skippable blocks with the lowest Block Influence, 1 - cos(input, output) "
                       "(ShortGPT)",
    "even": "removes evenly spaced skippable blocks, reading no importance (Unified Layer Skipping baseline)",
    "ffn_activation": "FFN channel i of a block scores sum |x W1_i^T| over the calibration tokens (padding "
                      "excluded), W1 the first FFN linear (the one whose output goes through the activation); "
                      "each block keeps its highest-scoring channels (Nemotron Elastic)",
    "head_activation": "query head h of a block scores the sum over calibration tokens (padding excluded) of the "
                       "L2 norm of its attention output (its slice of o_proj's input); every KV group keeps its "
                       "highest-scoring heads (Minitron / Nemotron Elastic)",
}


def n_removed(fraction: float, n: int) -> int:
    """How many of ``n`` units a fraction removes: rounded half up, the same rule for blocks, channels, heads."""
    return int(math.floor(fraction * n + 0.5))


def _fraction(name: str, v, flag: str) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
        raise UsageError(f"{flag} must be a fraction in [0, 1)", value=v,
                         allowed="0 <= fraction < 1 (1 would remove everything)", fix=f"e.g. {flag} 0.25")


@dataclass(frozen=True)
class PlanConfig:
    """Settings of ``lamina prune``'s plan (what to remove; nothing about how to measure it)."""

    drop_blocks: float | None = field(default=None, metadata={
        "help": "fraction of all blocks to remove (rounded to a whole number of blocks); None keeps every block"})
    method: str = field(default="skip_nmse", metadata={
        "help": "how blocks are chosen: 'skip_nmse' (lowest skip importance), 'block_influence' (lowest BI), "
                "or 'even' (evenly spaced, the Unified Layer Skipping baseline)"})
    ffn: float | None = field(default=None, metadata={
        "help": "fraction of FFN channels to remove in every block, chosen by activation importance; None keeps "
                "them all"})
    heads: float | None = field(default=None, metadata={
        "help": "fraction of query heads to remove in every block (every KV group loses the same number), chosen "
                "by activation importance; Llama/Qwen2/Mistral only; None keeps them all"})

    def __post_init__(self):
        _fraction("drop_blocks", self.drop_blocks, "--drop-blocks")
        _fraction("ffn", self.ffn, "--ffn")
        _fraction("heads", self.heads, "--heads")
        if self.method not in METHODS:
            raise UsageError("unknown block-selection method", value=self.method, allowed=", ".join(METHODS),
                             fix=suggest(self.method, METHODS) or "--method skip_nmse")


def _importance(scores: dict) -> dict:
    imp = scores.get("importance")
    if not imp or not imp.get("blocks"):
        raise UsageError("the scores have no block importance, so no block can be chosen",
                         value="scores.json: importance = null", allowed="scores from `lamina analyze` with importance",
                         fix="run `lamina analyze RUN --overwrite` with importance on (the default), or use "
                             "--method even")
    return imp


def _choose_blocks(scores: dict, cfg: PlanConfig) -> dict:
    imp = _importance(scores)
    names, paths = list(imp["blocks"]), list(imp.get("paths") or [None] * len(imp["blocks"]))
    n = len(names)
    skippable = list(imp.get("skippable") or [False] * n)
    n_drop = n_removed(cfg.drop_blocks, n)
    if n_drop >= n:
        raise UsageError("the budget would remove every block", value=cfg.drop_blocks,
                         allowed=f"a fraction below {(n - 0.5) / n:.3f} for this {n}-block model",
                         fix="keep at least one block: lower --drop-blocks")
    key = {"skip_nmse": "skip_nmse", "block_influence": "block_influence"}.get(cfg.method)
    values = list(imp.get(key) or [None] * n) if key else [None] * n
    cands = [i for i in range(n) if skippable[i] and (key is None or values[i] is not None)]
    if n_drop > len(cands):
        why = "skippable" if key is None else f"skippable with a {key} score"
        raise UsageError(f"the budget removes more blocks than there are {why}", value=cfg.drop_blocks,
                         allowed=f"at most {len(cands)} of {n} blocks ({len(cands) / n:.3f})",
                         fix="lower --drop-blocks; blocks that change their input's shape can never go")
    if n_drop == 0:
        drop = []
    elif key is None:  # evenly spaced inside the candidates: the first and last stay while they can
        drop = sorted({cands[(k + 1) * len(cands) // (n_drop + 1)] for k in range(n_drop)})
    else:  # lowest score first; ties broken by position (earlier first) so plans are deterministic
        drop = sorted(sorted(cands, key=lambda i: (values[i], i))[:n_drop])
    return {"method": cfg.method, "definition": DEFINITIONS[cfg.method], "fraction": cfg.drop_blocks,
            "n_blocks": n, "n_removed": len(drop),
            "remove": [names[i] for i in drop], "remove_paths": [paths[i] for i in drop],
            "candidates": [names[i] for i in cands],
            "scores": {names[i]: values[i] for i in range(n)} if key else None,
            "skippable": {names[i]: bool(skippable[i]) for i in range(n)}}


def make_plan(scores: dict, config: PlanConfig = PlanConfig()) -> dict:
    """The compression plan for the model that ``scores`` (a loaded scores.json) describes.

    Raises UsageError when the budget would remove every block, or more blocks
    than are skippable. The result is plain JSON-able data; save it with
    :func:`save_plan`.
    """
    if not isinstance(scores, dict):
        raise UsageError("make_plan needs the scores as a dict (json.load of scores.json)",
                         value=type(scores).__name__, allowed="dict", fix="scores = json.load(open('RUN/scores.json'))")
    model = scores.get("model") or {}
    plan = {"lamina_plan": PLAN_VERSION, "config": asdict(config),
            "model": {"fingerprint": model.get("fingerprint"), "name": model.get("name"),
                      "parameters": model.get("parameters")},
            "depth": None, "ffn": None, "heads": None, "applied": False}
    if config.drop_blocks:
        plan["depth"] = _choose_blocks(scores, config)
    if config.ffn:
        plan["ffn"] = {"fraction": config.ffn, "importance": "ffn_activation",
                       "definition": DEFINITIONS["ffn_activation"], "remove": None}
    if config.heads:
        plan["heads"] = {"fraction": config.heads, "importance": "head_activation",
                         "definition": DEFINITIONS["head_activation"], "remove": None}
    return plan


def is_empty(plan: dict) -> bool:
    """True when the plan removes nothing."""
    return not (plan.get("depth") or {}).get("remove") and not plan.get("ffn") and not plan.get("heads")


def save_plan(plan: dict, path) -> Path:
    """Write ``plan`` as JSON (atomically); ``path`` is a file or a run folder (-> RUN/plan.json)."""
    from ..models import save_json
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    save_json(path, plan)
    return path


def load_plan(path) -> dict:
    """Read a plan written by :func:`save_plan` (a file or a run folder holding plan.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    if not path.exists():
        raise UsageError("no plan file there", value=str(path), allowed="a plan.json written by make_plan/save_plan",
                         fix="make one with `lamina prune RUN --drop-blocks 0.25`")
    plan = json.loads(path.read_text())
    if not isinstance(plan, dict) or "lamina_plan" not in plan:
        raise UsageError("the file is not a lamina plan", value=str(path), allowed="a plan.json from save_plan",
                         fix="point at the plan.json of a run")
    return plan
