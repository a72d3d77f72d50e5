"""``make_plan``: what compression removes, and why, as pure data (``plan.json``).

A plan is made from ``scores.json`` (written by ``lamina analyze``) and a
:class:`PlanConfig`; it never needs the model. It records:

    model        the fingerprint (and name) of the model the scores came from;
                 :func:`lamina.compress.apply` refuses any other model
    depth        the blocks that go (canonical names and module paths), the
                 method that chose them, and the scores that decided it.
                 ``remove`` is None while the choice needs the model: the
                 iterative method (re-scored after each removal) and a
                 parameter target (counted on the model); ``choose_blocks`` /
                 ``apply`` fill it in, with each round's scores
    ffn, heads,  the fraction of FFN channels (attention heads, expanded
    channels     channels of EfficientNet's MBConv blocks) removed in every
                 block; the indices are filled in by ``apply``, which
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
- ``method="iterative"`` removes one block at a time, each time the skippable
  block with the lowest skip nMSE measured on the model with the blocks
  already removed (Nemotron Elastic's normalized MSE, re-scored), on the
  calibration batches.
- ``target_params``: a value >= 1 is an absolute parameter count; a value in
  (0, 1) is that fraction of the unpruned model's parameters. Blocks go, in
  the method's order, until the pruned model (width pruning included) has at
  most that many parameters; refused when removing every removable block is
  not enough. One depth budget at a time: ``drop_blocks`` or ``target_params``.
- Width is uniform across blocks, so the Hugging Face config
  (``intermediate_size``) still describes the pruned model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError, suggest
from ..files import read_json

PLAN_VERSION = 1
METHODS = ("skip_nmse", "block_influence", "iterative", "even", "joint", "perplexity", "angular")

DEFINITIONS = {
    "skip_nmse": "removes the skippable blocks with the lowest normalized output change when skipped "
                 "(Nemotron Elastic): sum (M_full - M_skip)^2 / sum M_full^2",
    "block_influence": "removes the skippable blocks with the lowest Block Influence, 1 - cos(input, output) "
                       "(ShortGPT)",
    "iterative": "removes one skippable block at a time: the one with the lowest skip nMSE, sum (M - M_skip)^2 / "
                 "sum M^2, measured on the calibration batches on the model with the blocks already removed "
                 "(M its output); every round's scores are recorded",
    "even": "removes evenly spaced skippable blocks, reading no importance (Unified Layer Skipping baseline)",
    "perplexity": "removes the skippable blocks whose removal alone raises the perplexity least on the "
                  "calibration text (perplexity_change of a causal LM's scores)",
    "angular": "removes the n consecutive skippable blocks l..l+n-1 with the smallest angular distance "
               "arccos(cos(input of block l, output of block l+n-1)) / pi (Gromov et al. 2024; a causal LM's "
               "scores, measured for that n)",
    "joint": "removes the set of skippable blocks whose removal together changes the output least on the "
             "calibration batches: sum (M_full - M_-S)^2 / sum M_full^2 (M the logits), or for a causal LM the "
             "mean next-token cross-entropy of M_-S; sets grown one block per round, greedily or by a beam of "
             "--beam sets; every candidate set's score is recorded",
    "channel_activation": "expanded channel c of an MBConv block scores the sum over calibration images and pixels "
                          "of |input of _project_conv at c| (what the channel sends to the block output); each "
                          "block keeps its highest-scoring channels (activation importance, as Nemotron Elastic)",
    "target_params": "a value >= 1 is an absolute parameter count; 0 < value < 1 a fraction of the unpruned model's "
                     "parameters; blocks go in the method's order until the pruned model (width pruning included) "
                     "has at most that many parameters",
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
                "'iterative' (one at a time, skip importance re-scored on the calibration samples after each "
                "removal), 'even' (evenly spaced, the Unified Layer Skipping baseline), 'joint' (sets scored by "
                "the output change of removing them together on the calibration samples, greedy or --beam); a "
                "causal LM's scores also allow 'perplexity' (lowest perplexity change when skipped) and 'angular' "
                "(the consecutive blocks with the smallest angular distance, Gromov et al.)"})
    beam: int = field(default=1, metadata={
        "help": "--method joint: removal sets kept per round (1: greedy; K: beam search, K times the cost)"})
    ffn: float | None = field(default=None, metadata={
        "help": "fraction of FFN channels to remove in every block, chosen by activation importance; None keeps "
                "them all"})
    ffn_per_layer: bool = field(default=False, metadata={
        "help": "remove the --ffn fraction from all blocks ranked together (scores divided by their block's mean), "
                "so blocks lose different numbers; saved in lamina's format (the config has one intermediate_size)"})
    heads: float | None = field(default=None, metadata={
        "help": "fraction of query heads to remove in every block (every KV group loses the same number), chosen "
                "by activation importance; Llama/Qwen2/Mistral only; None keeps them all"})
    channels: float | None = field(default=None, metadata={
        "help": "fraction of the expanded channels to remove in every EfficientNet MBConv block (input/output "
                "widths stay), chosen by activation importance; None keeps them all"})
    target_params: float | None = field(default=None, metadata={
        "help": "remove blocks (by --method) until the model has at most this many parameters: a value >= 1 is a "
                "count, 0 < value < 1 a fraction of the unpruned model's parameters; instead of --drop-blocks"})

    def __post_init__(self):
        _fraction("drop_blocks", self.drop_blocks, "--drop-blocks")
        _fraction("ffn", self.ffn, "--ffn")
        _fraction("heads", self.heads, "--heads")
        _fraction("channels", self.channels, "--channels")
        if not isinstance(self.ffn_per_layer, bool):
            raise UsageError("--ffn-per-layer must be true or false", value=self.ffn_per_layer, allowed="bool",
                             fix="--ffn-per-layer")
        if self.ffn_per_layer and not self.ffn:
            raise UsageError("--ffn-per-layer needs --ffn (the fraction of all FFN channels to remove)",
                             value=self.ffn, allowed="a fraction in (0, 1)", fix="e.g. --ffn 0.5 --ffn-per-layer")
        t = self.target_params
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0 \
                    or (t >= 1 and float(t) != int(t)):
                raise UsageError("--target-params must be a parameter count (a whole number >= 1) or a fraction "
                                 "in (0, 1) of the model's parameters", value=t,
                                 allowed="e.g. 5000000, or 0.5 for half the parameters",
                                 fix="--target-params 0.5")
            if self.drop_blocks is not None:
                raise UsageError("give one depth budget: --drop-blocks or --target-params, not both",
                                 value={"drop_blocks": self.drop_blocks, "target_params": t},
                                 allowed="one of them", fix="drop --drop-blocks")
        if isinstance(self.beam, bool) or not isinstance(self.beam, int) or self.beam < 1:
            raise UsageError("--beam must be a positive integer", value=self.beam, allowed=">= 1 (1: greedy)",
                             fix="--beam 1")
        if self.method not in METHODS:
            raise UsageError("unknown block-selection method", value=self.method, allowed=", ".join(METHODS),
                             fix=suggest(self.method, METHODS) or "--method skip_nmse")


def _nonfinite(obj, where: str = ""):
    """The path of the first number in ``obj`` that is not finite (NaN, inf), else None."""
    if isinstance(obj, dict):
        return next((p for k, v in obj.items() if (p := _nonfinite(v, f"{where}.{k}" if where else str(k)))), None)
    if isinstance(obj, list):
        return next((p for i, v in enumerate(obj) if (p := _nonfinite(v, f"{where}[{i}]"))), None)
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    return None


def check_scores(scores: dict) -> None:
    """Refuse scores holding a non-finite number (a bare NaN is not JSON, and it would reorder the plan),
    naming the key and, for block importance, the block."""
    imp = scores.get("importance") if isinstance(scores.get("importance"), dict) else {}
    names = imp.get("blocks") or []
    for key in ("skip_nmse", "block_influence"):
        for i, v in enumerate(imp.get(key) or []):
            bad = isinstance(v, bool) or (v is not None and not isinstance(v, (int, float))) or \
                (isinstance(v, float) and not math.isfinite(v))
            if bad:
                block = names[i] if i < len(names) else f"#{i}"
                raise UsageError(f"the scores hold an invalid {key} for block {block}", value=f"{key}[{i}] = {v!r}",
                                 allowed="a finite number, or null where analyze could not compute it",
                                 fix="analyze the run again (lamina analyze RUN --overwrite); never edit scores.json")
    where = _nonfinite(scores)
    if where:
        raise UsageError("the scores hold a non-finite number", value=where, allowed="finite numbers or null",
                         fix="analyze the run again (lamina analyze RUN --overwrite); never edit scores.json")


def _importance(scores: dict) -> dict:
    imp = scores.get("importance")
    if not imp or not imp.get("blocks"):
        raise UsageError("the scores have no block importance, so no block can be chosen",
                         value="scores.json: importance = null", allowed="scores from `lamina analyze` with importance",
                         fix="run `lamina analyze RUN --overwrite` with importance on (the default), or use "
                             "--method even")
    return imp


def even_pick(cands: list[int], m: int) -> list[int]:
    """``m`` evenly spaced entries of ``cands`` (``cands[(k+1) * C // (m+1)]``): first and last stay while they can."""
    return sorted({cands[(k + 1) * len(cands) // (m + 1)] for k in range(m)})


def _choose_blocks(scores: dict, cfg: PlanConfig) -> dict:
    imp = _importance(scores)
    names, paths = list(imp["blocks"]), list(imp.get("paths") or [None] * len(imp["blocks"]))
    n = len(names)
    skippable = list(imp.get("skippable") or [False] * n)
    key = {"skip_nmse": "skip_nmse", "block_influence": "block_influence",
           "perplexity": "perplexity_change"}.get(cfg.method)
    if cfg.method in ("perplexity", "angular") and imp.get("kind") != "lm":
        raise UsageError(f"--method {cfg.method} needs the scores of a causal LM analyzed on packed text",
                         value=cfg.method, allowed="scores.json whose importance has kind 'lm'",
                         fix="capture the LM on text without labels (--data FILE.txt or debates) and analyze it, "
                             "or use --method skip_nmse")
    values = list(imp.get(key) or [None] * n) if key else [None] * n
    cands = [i for i in range(n) if skippable[i] and (key is None or values[i] is not None)]
    why = "skippable" if key is None else f"skippable with a {key} score"
    base = {"method": cfg.method, "definition": DEFINITIONS[cfg.method], "fraction": cfg.drop_blocks,
            "target_params": cfg.target_params, "n_blocks": n,
            "candidates": [names[i] for i in cands],
            "scores": {names[i]: values[i] for i in range(n)} if key else None,
            "skippable": {names[i]: bool(skippable[i]) for i in range(n)}}
    if cfg.target_params is not None and cfg.method == "angular":
        raise UsageError("--method angular removes one span of consecutive blocks: give its size with --drop-blocks",
                         value=cfg.target_params, allowed="--drop-blocks FRACTION", fix="--drop-blocks 0.25")
    if cfg.target_params is not None:
        if not cands:
            raise UsageError(f"--target-params needs blocks that can go, and no block is {why}",
                             value=cfg.target_params, allowed="a model with skippable blocks",
                             fix="prune width instead (--ffn / --heads / --channels)")
        # how many blocks go depends on parameter counts: chosen with the model (choose_blocks / apply)
        return {**base, "target_rule": DEFINITIONS["target_params"], "n_removed": None, "remove": None,
                "remove_paths": None}
    n_drop = n_removed(cfg.drop_blocks, n)
    if n_drop >= n:
        raise UsageError("the budget would remove every block", value=cfg.drop_blocks,
                         allowed=f"a fraction below {(n - 0.5) / n:.3f} for this {n}-block model",
                         fix="keep at least one block: lower --drop-blocks")
    if n_drop > len(cands):
        raise UsageError(f"the budget removes more blocks than there are {why}", value=cfg.drop_blocks,
                         allowed=f"at most {len(cands)} of {n} blocks ({len(cands) / n:.3f})",
                         fix="lower --drop-blocks; blocks that change their input's shape can never go")
    if cfg.method in ("iterative", "joint") and n_drop:  # chosen on the model, with calibration batches
        extra = {"beam": cfg.beam} if cfg.method == "joint" else {}
        return {**base, **extra, "n_removed": n_drop, "remove": None, "remove_paths": None, "rounds": None}
    if cfg.method == "angular" and n_drop:
        drop = _angular_span(imp, cands, n_drop)
        base["scores"] = {f"{names[s]}..{names[s + n_drop - 1]}": v  # the distance of each span, by its blocks
                          for s, v in enumerate(imp["angular"][str(n_drop)])}
    elif n_drop == 0:
        drop = []
    elif key is None:  # evenly spaced inside the candidates: the first and last stay while they can
        drop = even_pick(cands, n_drop)
    else:  # lowest score first; ties broken by position (earlier first) so plans are deterministic
        drop = sorted(sorted(cands, key=lambda i: (values[i], i))[:n_drop])
    return {**base, "n_removed": len(drop), "remove": [names[i] for i in drop],
            "remove_paths": [paths[i] for i in drop]}


def _angular_span(imp: dict, cands: list[int], m: int) -> list[int]:
    """The ``m`` consecutive candidate blocks with the smallest angular distance for span ``m`` (earliest on ties)."""
    dist = (imp.get("angular") or {}).get(str(m))
    if not dist:
        have = sorted(int(k) for k in (imp.get("angular") or {}))
        raise UsageError(f"the scores have no angular distance for removing {m} consecutive blocks",
                         value=f"measured spans: {have}", allowed=f"scores analyzed with span {m}",
                         fix=f"lamina analyze RUN --overwrite --spans {' '.join(map(str, sorted(set(have) | {m})))}")
    ok = set(cands)
    starts = [s for s in range(len(dist)) if dist[s] is not None and all(s + i in ok for i in range(m))]
    if not starts:
        raise UsageError(f"no {m} consecutive blocks can all be removed", value=m,
                         allowed="a span of skippable blocks", fix="lower --drop-blocks")
    start = min(starts, key=lambda s: (dist[s], s))
    return list(range(start, start + m))


def make_plan(scores: dict, config: PlanConfig = PlanConfig()) -> dict:
    """The compression plan for the model that ``scores`` (a loaded scores.json) describes.

    Raises UsageError when the budget would remove every block, or more blocks
    than are skippable. The result is plain JSON-able data; save it with
    :func:`save_plan`.
    """
    if not isinstance(scores, dict):
        raise UsageError("make_plan needs the scores as a dict (json.load of scores.json)",
                         value=type(scores).__name__, allowed="dict", fix="scores = json.load(open('RUN/scores.json'))")
    check_scores(scores)
    model = scores.get("model") or {}
    plan = {"lamina_plan": PLAN_VERSION, "config": asdict(config),
            "model": {"fingerprint": model.get("fingerprint"), "name": model.get("name"),
                      "parameters": model.get("parameters")},
            "depth": None, "ffn": None, "heads": None, "channels": None, "applied": False}
    if config.drop_blocks or config.target_params is not None:
        plan["depth"] = _choose_blocks(scores, config)
    if config.ffn:
        plan["ffn"] = {"fraction": config.ffn, "importance": "ffn_activation",
                       "definition": DEFINITIONS["ffn_activation"], "per_layer": config.ffn_per_layer,
                       "remove": None}
        if config.ffn_per_layer:
            plan["ffn"]["definition"] += ("; per layer: all blocks' channels ranked together by score / their "
                                          "block's mean score, the fraction removed from the whole model")
    if config.heads:
        plan["heads"] = {"fraction": config.heads, "importance": "head_activation",
                         "definition": DEFINITIONS["head_activation"], "remove": None}
    if config.channels:
        plan["channels"] = {"fraction": config.channels, "importance": "channel_activation",
                            "definition": DEFINITIONS["channel_activation"], "remove": None}
    return plan


def is_empty(plan: dict) -> bool:
    """True when the plan removes nothing (a depth choice still to be made counts as removing something)."""
    depth = plan.get("depth") or {}
    deep = bool(depth.get("remove")) or (bool(depth) and depth.get("remove") is None)
    return not deep and not plan.get("ffn") and not plan.get("heads") and not plan.get("channels")


def needs_model(plan: dict) -> bool:
    """True when the depth choice is still to be made on the model (iterative method, parameter target)."""
    depth = plan.get("depth")
    return bool(depth) and depth.get("remove") is None


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
    plan = read_json(path, "a pruning plan", fix="make the plan again with `lamina prune`")
    if not isinstance(plan, dict) or "lamina_plan" not in plan:
        raise UsageError("the file is not a lamina plan", value=str(path), allowed="a plan.json from save_plan",
                         fix="point at the plan.json of a run")
    return plan
