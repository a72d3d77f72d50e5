"""Joint depth choice: removal sets scored by what removing them together does.

Every one-at-a-time rule (skip nMSE, Block Influence, angular distance)
assumes the damage of removing several blocks adds up; it does not (blocks
interact: two neighbours may each be redundant but not both). This method
measures sets directly on the calibration batches:

    score(S) = sum (M_full - M_-S)^2 / sum M_full^2     objective 'nmse'
    score(S) = mean next-token cross-entropy of M_-S     objective 'loss' (causal LMs)

M the model output (logits), M_-S the output with every block of S bypassed
(its output replaced by its input, as skip importance does for one block),
sums over every non-padding position of every calibration batch.

Search: greedy, or a beam of width K. Round r extends each of the K best sets
of r-1 blocks by one more candidate block, scores every extension, and keeps
the K best distinct sets (ties: the lexicographically smaller set). K=1 is
plain greedy; each round costs (K x remaining candidates) set evaluations.

Cost: one full forward per batch caches every block's input and output; a
set S whose earliest block is f then runs only blocks f+1.. (blocks before f
return their cached outputs, no compute), so a set evaluation costs on
average about half a forward. ``cost`` in the result counts block
evaluations in units of one full forward over the calibration set.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..blocks import block_output, bypass, patched_forwards, with_output
from ..errors import UsageError

OBJECTIVES = ("nmse", "loss")


def _stub(value):
    def stub(*_args, **_kwargs):  # a block before the earliest removed one: its cached output, no compute
        return value
    return stub


def _token_loss(logits: torch.Tensor, batch: dict) -> tuple[float, int]:
    """(summed next-token cross-entropy, predictions) of a causal LM's logits, padding excluded."""
    ids = batch["input_ids"]
    z = logits[:, :-1].float()
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").double()
    mask = batch.get("attention_mask")
    if mask is not None:
        keep = (mask[:, 1:] * mask[:, :-1]).reshape(-1).to(ce.dtype)
        return float((ce * keep).sum()), int(keep.sum())
    return float(ce.sum()), ce.numel()


def _sq(full: torch.Tensor, other: torch.Tensor | None, mask, chunk: int = 8192) -> float:
    """sum (full - other)^2 (or sum full^2), padding positions excluded, in float64 over last-dim chunks.

    Chunks of the last dimension keep memory bounded for large vocabularies:
    one (B, T, chunk) float64 slice at a time.
    """
    total = 0.0
    m = None
    if mask is not None and full.dim() >= 3 and tuple(mask.shape) == tuple(full.shape[:2]):
        m = mask.to(torch.float64).reshape(*mask.shape, *([1] * (full.dim() - 2)))
    for s in range(0, full.shape[-1], chunk):
        d = full[..., s:s + chunk].double()
        if other is not None:
            d = d - other[..., s:s + chunk].double()
        d = d.square()
        total += float((d * m).sum() if m is not None else d.sum())
    return total


def _logits(out) -> torch.Tensor:
    z = getattr(out, "logits", None)
    if isinstance(z, torch.Tensor):
        return z
    z = getattr(out, "last_hidden_state", None)
    return z if isinstance(z, torch.Tensor) else block_output(out)


class _Calib:
    """Per-batch cache of every block's output (and the full output) on the calibration batches."""

    def __init__(self, lm, batches, objective: str):
        self.lm, self.objective = lm, objective
        self.paths = lm.blocks.block_paths
        by_path = dict(lm.module.named_modules())
        self.mods = [by_path[p] for p in self.paths]
        self.batches = list(batches)
        self.outputs: list[list] = []
        self.full: list[torch.Tensor] = []
        self.den = 0.0
        self.n_tok = 0
        for b in self.batches:
            outs: list = [None] * len(self.mods)
            handles = []
            try:
                for i, m in enumerate(self.mods):
                    def post(_m, _a, out, _i=i):
                        y = block_output(out)
                        outs[_i] = with_output(out, y.clone()) if y is not None else out
                    handles.append(m.register_forward_hook(post))
                out = lm.forward(b)
            finally:
                for h in handles:
                    h.remove()
            if any(o is None for o in outs):
                raise UsageError("a block did not run in the calibration forward", value=self.paths,
                                 allowed="blocks that run once per forward", fix="check --blocks")
            self.outputs.append(outs)
            z = _logits(out)
            if objective == "nmse":
                self.full.append(z)
                self.den += _sq(z, None, b.get("attention_mask"))
            else:
                self.n_tok += _token_loss(z, b)[1]

    def score(self, remove: list[int]) -> float:
        """The objective with blocks ``remove`` bypassed together (see the module doc)."""
        first = min(remove)
        num = 0.0
        like = {self.paths[j]: self.outputs[0][j] for j in remove}  # structure only; inputs come live
        for bi, b in enumerate(self.batches):
            outs = self.outputs[bi]
            stubs = {self.mods[i]: _stub(outs[i]) for i in range(first - 1)}
            if first >= 1:  # the block feeding the first removed one: a fresh copy (later blocks may write in place)
                stubs[self.mods[first - 1]] = _stub(with_output(outs[first - 1], block_output(outs[first - 1]).clone()))
            with patched_forwards(stubs), bypass(self.lm.module, remove, self.lm.blocks, like=like):
                z = _logits(self.lm.forward(b))
            if self.objective == "nmse":
                num += _sq(self.full[bi], z, b.get("attention_mask"))
            else:
                num += _token_loss(z, b)[0]
        if self.objective == "nmse":
            return num / self.den if self.den > 0 else float("nan")
        return num / max(self.n_tok, 1)


def joint_select(lm, batches, n_drop: int | None, candidates: list[int], *, beam: int = 1,
                 objective: str | None = None, fits=None) -> dict:
    """Choose blocks to remove by scoring sets jointly (greedy / beam; see the module doc).

    Args:
        lm: a LoadedModel (not modified).
        batches: calibration model inputs (a list of dicts).
        n_drop: blocks to remove; or None with ``fits`` (stop at the first set that fits).
        candidates: block indices that may go.
        beam: sets kept per round (1: greedy).
        objective: 'nmse' or 'loss'; default 'loss' for a causal LM, else 'nmse'.
    Returns {'remove': sorted indices, 'score', 'objective', 'beam', 'rounds': [{round, candidates:
    [{'remove': [...], 'score'}], 'kept': [...]}], 'set_evaluations', 'cost_forwards', 'seconds'}.
    """
    from ..task import is_causal_lm
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise UsageError("--beam must be a positive integer", value=beam, allowed=">= 1 (1: greedy)", fix="--beam 1")
    objective = objective or ("loss" if is_causal_lm(lm) else "nmse")
    if objective not in OBJECTIVES:
        raise UsageError("unknown joint objective", value=objective, allowed=", ".join(OBJECTIVES), fix="nmse")
    batches = list(batches or [])
    if not batches:
        raise UsageError("the joint method scores removal sets on calibration batches, and none were given",
                         value=None, allowed="a list of model input dicts", fix="apply(model, plan, batches=[...])")
    t0 = time.perf_counter()
    n = lm.blocks.n_blocks
    flags = [(m, m.training) for m in lm.module.modules()]
    lm.module.eval()
    rounds: list[dict] = []
    evals, block_evals = 0, 0
    try:
        with torch.inference_mode():
            cal = _Calib(lm, batches, objective)
            kept: list[tuple[float, tuple[int, ...]]] = [(float("nan"), ())]
            while True:
                size = len(kept[0][1])
                if n_drop is not None and size >= n_drop:
                    break
                if fits is not None and fits(list(kept[0][1])):
                    break
                if size >= min(len(candidates), n - 1):
                    break
                seen: dict[tuple[int, ...], float] = {}
                for _, s in kept:
                    for c in candidates:
                        if c in s:
                            continue
                        new = tuple(sorted(s + (c,)))
                        if new in seen:
                            continue
                        seen[new] = cal.score(list(new))
                        evals += 1
                        block_evals += n - min(new) - len(new)
                ranked = sorted(seen.items(), key=lambda kv: (kv[1], kv[0]))
                kept = [(v, k) for k, v in ranked[:beam]]
                rounds.append({"round": len(rounds) + 1,
                               "candidates": [{"remove": [f"blocks.{i}" for i in k], "score": v} for k, v in ranked],
                               "kept": [[f"blocks.{i}" for i in k] for _, k in kept]})
    finally:
        for m, t in flags:
            m.training = t
    best = kept[0]
    return {"remove": list(best[1]), "score": best[0], "objective": objective, "beam": beam, "rounds": rounds,
            "set_evaluations": evals, "cost_forwards": 1 + block_evals / max(n, 1),
            "seconds": time.perf_counter() - t0}

