"""Joint depth choice: removal sets scored by what removing them together does.

Every one-at-a-time rule (skip nMSE, Block Influence, angular distance)
assumes the damage of removing several blocks adds up; it does not (blocks
interact: two neighbours may each be redundant but not both). This method
measures sets directly on the calibration batches:

    score(S) = sum (M_full - M_-S)^2 / sum M_full^2     objective 'nmse'
    score(S) = mean next-token cross-entropy of M_-S     objective 'loss' (causal LMs)
    score(S) = error rate of M_-S on the labels          objective 'accuracy' (classifiers given labels;
               ties broken by the mean label cross-entropy)

M the model output (logits), M_-S the output with every block of S bypassed
(its output replaced by its input, as skip importance does for one block),
sums over every non-padding position of every calibration batch.

Objectives follow the task's own metric where labels exist (perplexity is
exp of the token loss; a classifier is judged by accuracy): on MiniLM /
Rotten Tomatoes at 3 of 6 blocks, the set with the lowest logit nMSE and the
set with the lowest label cross-entropy both lost 0.08 test accuracy to the
evenly spaced set, while the error rate on the same labelled calibration rows
ranked the evenly spaced set first (BENCHMARKS.md, llm). A fine-tuned
classifier's confidence (what nMSE and cross-entropy weigh) says little about
which side of the decision boundary a row falls.

Search: greedy, or a beam of width K. Round r extends each of the K best sets
of r-1 blocks by one more candidate block, scores every extension, and keeps
the K best distinct sets (ties: the lexicographically smaller set). K=1 is
plain greedy; each round costs (K x remaining candidates) set evaluations.
With a fixed budget the result is then compared with two seed sets scored the
same way, the evenly spaced set and the set of the blocks that scored best
alone (round 1), and the best of the three is returned: the search can never
return a set it scored worse than those baselines.

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

from ..blocks import block_input, block_output, bypass, patched_forwards, with_output
from ..errors import UsageError

OBJECTIVES = ("nmse", "loss", "accuracy")


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
    """Every block's output on each calibration batch (and block 0's input), from one forward per batch.

    Only one batch's logits live at a time: the full model's logits are
    recomputed per batch when needed with every block returning its cached
    output (embeddings, final norm and head only), so memory stays at the
    cached hidden states plus one batch of logits, whatever the vocabulary.
    """

    def __init__(self, lm, batches, objective: str = "nmse", labels=None):
        self.lm, self.objective = lm, objective
        self.paths = lm.blocks.block_paths
        by_path = dict(lm.module.named_modules())
        self.mods = [by_path[p] for p in self.paths]
        self.batches = list(batches)
        self.labels = None if labels is None else [torch.as_tensor(y).reshape(-1).long() for y in labels]
        if self.labels is not None and (len(self.labels) != len(self.batches)):
            raise UsageError("one label tensor per calibration batch is needed", value=len(self.labels),
                             allowed=f"{len(self.batches)} (the batches)", fix="pass labels=[y of each batch]")
        self.n_lab = sum(y.numel() for y in self.labels) if self.labels is not None else 0
        self.outputs: list[list] = []
        self.inputs0: list[torch.Tensor] = []
        self.den = 0.0
        self.n_tok = 0
        self.full_loss = 0.0
        for b in self.batches:
            outs: list = [None] * len(self.mods)
            first: list = [None]
            handles = []
            try:
                def pre(_m, args, kwargs):
                    first[0] = block_input(args, kwargs).clone()
                handles.append(self.mods[0].register_forward_pre_hook(pre, with_kwargs=True))
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
            self.inputs0.append(first[0])
            z = _logits(out)
            self.den += _sq(z, None, b.get("attention_mask"))
            if "input_ids" in b and z.dim() == 3 and z.shape[:2] == b["input_ids"].shape:
                loss, n = _token_loss(z, b)
                self.full_loss += loss
                self.n_tok += n
            del out, z

    def _full(self, bi: int) -> torch.Tensor:
        outs = self.outputs[bi]
        with patched_forwards({m: _stub(outs[i]) for i, m in enumerate(self.mods)}):
            return _logits(self.lm.forward(self.batches[bi]))

    def _without(self, bi: int, remove: list[int]) -> torch.Tensor:
        outs, first = self.outputs[bi], min(remove)
        stubs = {self.mods[i]: _stub(outs[i]) for i in range(first - 1)}
        if first >= 1:  # the block feeding the first removed one: a fresh copy (later blocks may write in place)
            stubs[self.mods[first - 1]] = _stub(with_output(outs[first - 1], block_output(outs[first - 1]).clone()))
        like = {self.paths[j]: outs[j] for j in remove}  # structure only: removed blocks get their input live
        with patched_forwards(stubs), bypass(self.lm.module, remove, self.lm.blocks, like=like):
            return _logits(self.lm.forward(self.batches[bi]))

    def measure(self, sets: list[list[int]], nmse: bool = True, loss: bool = True, labels: bool = False) -> list[dict]:
        """For each removal set: {'nmse', 'loss': mean next-token CE (causal LMs), 'error' and
        'label_loss': error rate and mean cross-entropy on the labels (when given)}; batches outermost."""
        num = [0.0] * len(sets)
        ce = [0.0] * len(sets)
        wrong = [0.0] * len(sets)
        lce = [0.0] * len(sets)
        loss = loss and self.n_tok > 0
        labels = labels and self.labels is not None
        for bi, b in enumerate(self.batches):
            full = self._full(bi) if nmse else None
            for k, remove in enumerate(sets):
                z = self._without(bi, list(remove))
                if nmse:
                    num[k] += _sq(full, z, b.get("attention_mask"))
                if loss:
                    ce[k] += _token_loss(z, b)[0]
                if labels:
                    y, zz = self.labels[bi], z.float().reshape(-1, z.shape[-1])
                    wrong[k] += float((zz.argmax(-1) != y).sum())
                    lce[k] += float(F.cross_entropy(zz, y, reduction="sum"))
                del z
        return [{"nmse": num[k] / self.den if nmse and self.den > 0 else None,
                 "loss": ce[k] / self.n_tok if loss else None,
                 "error": wrong[k] / self.n_lab if labels else None,
                 "label_loss": lce[k] / self.n_lab if labels else None} for k in range(len(sets))]

    def score(self, remove: list[int]) -> float:
        """The objective with blocks ``remove`` bypassed together (see the module doc)."""
        return self.scores([remove])[0]

    def scores(self, sets: list[list[int]]) -> list[float]:
        return [k[0] for k in self.keys(sets)]

    def keys(self, sets: list[list[int]]) -> list[tuple[float, ...]]:
        """Ranking keys, lower is better: (score,) or, for 'accuracy', (error rate, label cross-entropy)."""
        if self.objective == "loss" and self.n_tok == 0:
            raise UsageError("the 'loss' objective needs a causal LM fed input_ids", value=self.lm.name,
                             allowed="a *ForCausalLM model", fix="use the 'nmse' objective")
        if self.objective == "accuracy" and self.labels is None:
            raise UsageError("the 'accuracy' objective needs the calibration rows' labels", value=None,
                             allowed="labels=[y of each batch]", fix="use the 'nmse' objective")
        res = self.measure(sets, nmse=self.objective == "nmse", loss=self.objective == "loss",
                           labels=self.objective == "accuracy")
        if self.objective == "accuracy":
            return [(r["error"], r["label_loss"]) for r in res]
        return [(r[self.objective],) for r in res]


def _record(k: tuple[int, ...], key: tuple[float, ...]) -> dict:
    rec = {"remove": [f"blocks.{i}" for i in k], "score": key[0]}
    if len(key) > 1:
        rec["label_loss"] = key[1]
    return rec


def joint_select(lm, batches, n_drop: int | None, candidates: list[int], *, beam: int = 1,
                 objective: str | None = None, fits=None, shortlist: int | None = None, labels=None,
                 seeds: bool = True) -> dict:
    """Choose blocks to remove by scoring sets jointly (greedy / beam; see the module doc).

    Args:
        lm: a LoadedModel (not modified).
        batches: calibration model inputs (a list of dicts).
        n_drop: blocks to remove; or None with ``fits`` (stop at the first set that fits).
        candidates: block indices that may go.
        beam: sets kept per round (1: greedy).
        objective: 'nmse', 'loss' or 'accuracy'; default 'loss' for a causal LM, else 'accuracy' when
            ``labels`` are given, else 'nmse'.
        shortlist: after round 1 (every candidate scored), extend sets only with the ``shortlist``
            blocks that scored best in the previous round (None: every candidate, every round).
        labels: class labels of the calibration rows, one tensor per batch (classifiers).
        seeds: with ``n_drop``, also score the evenly spaced set and the best-alone set, and return
            the best of them and the search's set.
    Returns {'remove': sorted indices, 'score', 'objective', 'beam', 'rounds': [{round, candidates:
    [{'remove': [...], 'score'}], 'kept': [...]}], 'seeded': [{'name', 'remove', 'score'}],
    'chosen_by': 'search' | a seed's name, 'set_evaluations', 'cost_forwards', 'seconds'}.
    """
    from ..task import is_causal_lm
    from .plan import even_pick
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise UsageError("--beam must be a positive integer", value=beam, allowed=">= 1 (1: greedy)", fix="--beam 1")
    objective = objective or ("loss" if is_causal_lm(lm) else "accuracy" if labels is not None else "nmse")
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
            cal = _Calib(lm, batches, objective, labels)
            kept: list[tuple[tuple[float, ...], tuple[int, ...]]] = [((float("nan"),), ())]
            while True:
                size = len(kept[0][1])
                if n_drop is not None and size >= n_drop:
                    break
                if fits is not None and fits(list(kept[0][1])):
                    break
                if size >= min(len(candidates), n - 1):
                    break
                sets: list[tuple[int, ...]] = []
                pool = candidates
                if shortlist and rounds:
                    # blocks in the order of the latest round that scored them (best first), so the list
                    # refills from earlier rankings as its blocks are taken
                    order: list[int] = []
                    for r in reversed(rounds):
                        for cand in r["candidates"]:
                            for blk in cand["remove"]:
                                i = int(blk.split(".")[1])
                                if i not in order and all(i not in k for _, k in kept):
                                    order.append(i)
                    pool = order[:shortlist]
                for _, s in kept:
                    for c in pool:
                        new = tuple(sorted(s + (c,)))
                        if c not in s and new not in sets:
                            sets.append(new)
                if not sets:
                    break
                seen = dict(zip(sets, cal.keys([list(t) for t in sets])))
                evals += len(sets)
                block_evals += sum(n - min(t) - len(t) for t in sets)
                ranked = sorted(seen.items(), key=lambda kv: (kv[1], kv[0]))
                kept = [(v, k) for k, v in ranked[:beam]]
                rounds.append({"round": len(rounds) + 1,
                               "candidates": [_record(k, v) for k, v in ranked],
                               "kept": [[f"blocks.{i}" for i in k] for _, k in kept]})
            best, chosen_by, seeded = kept[0], "search", []
            if seeds and n_drop and rounds and len(best[1]) == n_drop:
                alone = [int(c["remove"][0].split(".")[1]) for c in rounds[0]["candidates"]]
                named = {"even": tuple(even_pick(list(candidates), n_drop)),
                         "best_alone": tuple(sorted(alone[:n_drop]))}
                todo = sorted({t for t in named.values() if t != best[1] and len(t) == n_drop})
                got = dict(zip(todo, cal.keys([list(t) for t in todo]))) if todo else {}
                evals += len(todo)
                block_evals += sum(n - min(t) - len(t) for t in todo)
                got[best[1]] = best[0]
                for name, t in named.items():
                    if t not in got:  # fewer candidates than the budget's even spacing needs
                        continue
                    seeded.append({"name": name, **_record(t, got[t])})
                    if got[t] < best[0]:  # strictly better: ties keep the search's set (then 'even')
                        best, chosen_by = (got[t], t), name
    finally:
        for m, t in flags:
            m.training = t
    return {"remove": list(best[1]), "score": best[0][0] if best[1] else float("nan"), "objective": objective,
            "beam": beam, "shortlist": shortlist, "rounds": rounds, "seeded": seeded, "chosen_by": chosen_by,
            **({"label_loss": best[0][1]} if objective == "accuracy" and best[1] else {}),
            "set_evaluations": evals, "cost_forwards": 1 + block_evals / max(n, 1),
            "seconds": time.perf_counter() - t0}

