"""``quantize``: a model + a budget -> OUT/quant_plan.json and OUT/model (layer-wise mixed int8).

``lamina quantize teacher/ --fraction 0.8 --out q/`` (Python: ``lamina.quantize("teacher/", QuantizeConfig(...))``).

1. Sensitivity: every nn.Linear is quantized alone (a quantized copy swapped
   in, then the float one put back) in each of ``--formats``, and the change of
   the model's main output (logits, else last hidden state) on calibration
   batches is measured as nMSE = sum (q - f)^2 / sum f^2 over all batches, the
   way skip importance measures a removed block. A causal LM: the nMSE of its
   next-token logits at every position, with the float model's final hidden
   states kept instead of its logits and the logits recomputed in chunks
   (:mod:`lamina.quantize.lm`), so memory stays bounded at any vocabulary.
   Each block's output on the calibration batches is cached once, and a layer
   first called in block k is scored by running only blocks k..N-1 and what
   follows them (:mod:`lamina.quantize._cached`): the same numbers as a whole
   forward, fewer block evaluations; when the cache would exceed its bound,
   whole forwards run. quant_plan.json ``cost.sensitivity`` records the route.
2. Budget: (layer, format) steps are taken least sensitive first; a layer
   taken in several formats runs in the one listed first in ``--formats``
   (``int8fused,bf16``: every layer goes to bf16 early, on its tiny bf16
   score, and to int8 only where its int8 score is low). ``--fraction F``:
   round(F x steps) of them (with one format: of the layers). ``--max-drop D``: the largest count whose
   validation metric loses at most D against float (a classifier: accuracy
   as a fraction, 0.01 = one point; a causal LM: perplexity's relative
   increase, 0.01 = +1%, see :mod:`lamina.quantize.lm` for why relative), found by bisection on the count (each tried count is
   measured and recorded; the chosen one was measured, so the budget holds
   after the fact even when the loss is not monotone in the count).
   ``--latency-ms X``: the smallest count whose measured latency (median wall
   time of one forward of ``--latency-batch-size`` calibration rows) is at
   most X, by bisection with every tried count timed and recorded; when even
   every layer quantized misses X, a UsageError names the best reachable.
3. Save: the float model (:func:`lamina.verify.save_checked`) plus
   quant_plan.json; ``lamina.load_model(OUT)`` reloads the float model and
   re-applies the plan (int8 quantization is a pure function of the float
   weights: torchao's quantized tensors do not round-trip through safetensors
   on torchao 0.18). Before returning, OUT is reloaded that way and compared
   with the in-memory quantized model on a calibration batch; a mismatch
   removes what was written and exits 1.

Calibration rows: a fine-tuned / pruned / distilled folder's task record
(its training rows; validation rows for ``--max-drop``), else ``--data``
(+ ``--limit``). A causal LM given ``--data`` text gets the LM task
``lamina distill`` gives it (:class:`lamina.lm_task.LMTaskSpec`: documents
split train / val / test, packed ``--seq-len`` blocks): calibration on training
blocks, ``--max-drop`` on validation blocks, and the task goes into
quant_plan.json so ``lamina bench OUT`` reports perplexity on its test blocks.
An LM's validation perplexity before and after is recorded in any case. See :mod:`lamina.quantize.formats` for what runs fast here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._cliargs import as_config
from ..errors import LaminaError, UsageError
from ..lm_task import LMTaskSpec
from ..models import LoadedModel, load_model, save_json
from ..runfolder import check_out, claim, discard, plan_writes, record
from ..runtime import Runtime, describe
from ..task import is_causal_lm
from ..verify import _main_output, save_checked
from . import _cached
from .formats import FORMATS, apply_layers, bf16_blocks, linear_names, parse_formats, quantized_linear, swap
from .lm import LogitChange, eval_batch_size, head_name, relative_increase

WRITES = ["quant_plan.json", "model"]
PLAN_FILE = "quant_plan.json"
RTOL = 1e-5  # reload check: the same float weights + the same plan give the same kernels' outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeConfig(Runtime):
    """Settings of ``lamina quantize``."""

    out: str = field(metadata={"help": "output folder: OUT/quant_plan.json (every layer's score and choice) and "
                                       "OUT/model (the float model the plan is applied to on loading)"})
    fraction: float | None = field(default=None, metadata={
        "help": "share of the Linear layers to quantize, least sensitive first (0 to 1); with several --formats, "
                "the share of (layer, format) steps"})
    max_drop: float | None = field(default=None, metadata={
        "help": "largest loss allowed against float on the validation rows: a classifier's accuracy, as a "
                "fraction (0.01 = one point; needs a model with a task record, a `lamina finetune` / prune / "
                "distill OUT); a causal LM's perplexity, as a relative increase (0.01 = perplexity +1 percent; "
                "its task record or --data text)"})
    latency_ms: float | None = field(default=None, metadata={
        "help": "latency goal in milliseconds for one forward of --latency-batch-size calibration rows: the least "
                "sensitive layers are quantized until the measured latency meets it (each tried count measured)"})
    latency_batch_size: int = field(default=8, metadata={"help": "rows per forward timed for --latency-ms"})
    latency_repeats: int = field(default=7, metadata={
        "help": "timed forwards per tried count for --latency-ms (after one warm-up; the median is compared)"})
    formats: str = field(default="bf16", metadata={
        "help": f"comma-separated formats a layer may take, preferred first ({', '.join(FORMATS)}): int8fused = "
                f"int8 weights + int8 activations quantized inside oneDNN's kernel (fastest here, lossier), "
                f"bf16 = bfloat16 weights and GEMM (fast on CPUs with AMX / AVX512-BF16, nearly lossless), "
                f"int8dyn = torchao int8 weights + per-token int8 activations, int8wo = torchao int8 weights only "
                f"(both smaller, not faster on this CPU); e.g. int8fused,bf16: int8 where a layer tolerates it, "
                f"bf16 elsewhere"})
    data: str | None = field(default=None, metadata={
        "help": "calibration data when the model has no task record (bundled name, table, folder)"})
    limit: int | None = field(default=None, metadata={
        "help": "rows of --data to read before calibration (documents for a causal LM, split train / validation "
                "/ test as `lamina finetune` splits them)"})
    calibration_samples: int = field(default=64, metadata={
        "help": "rows on which each layer's sensitivity is measured (a few batches keep it cheap)"})
    batch_size: int = field(default=32, metadata={"help": "rows per forward pass"})
    max_length: int = field(default=128, metadata={"help": "tokens per text of --data (a task record has its own)"})
    seq_len: int = field(default=128, metadata={
        "help": "tokens per packed block when a causal LM is quantized on --data text (a task record has its own)"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration subsample of --data"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the OUT/quant_plan.json and OUT/model lamina wrote (a file it did not write is never "
                "touched)"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a path", fix="pass --out PATH")
        budgets = {"fraction": self.fraction, "max_drop": self.max_drop, "latency_ms": self.latency_ms}
        if sum(v is not None for v in budgets.values()) != 1:
            raise UsageError("quantize needs exactly one budget", value=budgets,
                             allowed="--fraction F, --max-drop D or --latency-ms X", fix="e.g. --fraction 0.8")
        if self.latency_ms is not None and not (isinstance(self.latency_ms, (int, float)) and self.latency_ms > 0):
            raise UsageError("--latency-ms must be > 0", value=self.latency_ms, allowed="milliseconds > 0",
                             fix="e.g. --latency-ms 50")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 1):
            raise UsageError("--fraction must be between 0 and 1", value=self.fraction, allowed="0 <= F <= 1",
                             fix="e.g. --fraction 0.8")
        if self.max_drop is not None and not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise UsageError("--max-drop must be >= 0", value=self.max_drop, allowed="a number >= 0",
                             fix="e.g. --max-drop 0.01 (one accuracy point)")
        for name in ("calibration_samples", "batch_size", "max_length", "seq_len", "latency_batch_size",
                     "latency_repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer", value=v,
                                 allowed="an integer >= 1", fix=f"e.g. --{name.replace('_', '-')} 32")
        parse_formats(self.formats)


@dataclass
class QuantizeResult:
    """What ``quantize`` wrote.

    Attributes:
        out: the output folder; ``lamina.load_model(out)`` gives the quantized model.
        plan_path: OUT/quant_plan.json.
        model_path: OUT/model (the float weights the plan is applied to).
        plan: the whole quant_plan.json.
        quantized: names of the quantized Linear layers; layers: how many Linear layers the model has.
        metric_drop: measured validation loss of the metric (``--max-drop``; None with ``--fraction``).
    """

    out: str
    plan_path: str
    model_path: str
    plan: dict = field(repr=False)
    quantized: list
    layers: int
    metric_drop: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _run(lm: LoadedModel, batches, around=None) -> list[torch.Tensor]:
    """The main output on each batch; ``around(i)``, when given, is a context the i-th forward runs in."""
    around = around or (lambda i: contextlib.nullcontext())
    out = []
    with torch.inference_mode():
        for i, b in enumerate(batches):
            with around(i):
                out.append(_main_output(lm.forward(b)).detach().float())
    return out


def nmse(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """sum (got - ref)^2 / sum ref^2 over all batches (0 when nothing changed)."""
    num = sum(float(((g - r) ** 2).sum()) for r, g in zip(ref, got))
    den = sum(float((r ** 2).sum()) for r in ref)
    return num / den if den > 0 else num


def output_change(lm: LoadedModel, batches):
    """A callable (head_format=None, around=None) -> nMSE of ``lm``'s main output now against its output at this
    call, on ``batches`` (``around(i)``: a context the i-th forward runs in, e.g. cached blocks' stubs).

    A causal LM with a Linear output head: the next-token logits, in bounded memory
    (:class:`lamina.quantize.lm.LogitChange`); anything else: the main output kept whole."""
    head = head_name(lm)
    if head is not None:
        return LogitChange(lm, batches, head)
    ref = _run(lm, batches)
    return lambda head_format=None, around=None: nmse(ref, _run(lm, batches, around))


ROUTES = ("auto", "cached", "naive")


def sensitivity(lm: LoadedModel, batches, formats=("int8dyn",), route: str = "auto",
                cost: dict | None = None, layers: list[str] | None = None) -> dict[str, dict[str, float]]:
    """{layer name: {format: nMSE of the main output with only that layer quantized}} on ``batches``.

    Each layer is swapped for a quantized copy and put back, so ``lm`` is unchanged afterwards.
    ``route``: "cached" runs, for a Linear first called in block k, only blocks k..N-1 and what follows them
    from the float model's cached block outputs (:mod:`lamina.quantize._cached`: the same numbers, fewer block
    evaluations); "naive" runs the whole model per (layer, format); "auto" caches when the cache fits
    ``_cached.CACHE_BYTES`` and the blocks run once each per forward, else runs naive. ``cost``, when given,
    is filled with the route that ran and what it cost (quant_plan.json's ``cost``). ``layers``: score only
    these Linears (default: every one; a benchmark times a sample)."""
    if route not in ROUTES:
        raise UsageError("unknown sensitivity route", value=route, allowed=", ".join(ROUTES), fix="route='auto'")
    lm.module.eval()
    names = linear_names(lm.module)
    if layers is not None:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise UsageError("not a Linear layer of the model", value=unknown[:3], allowed="names from "
                             "lamina.quantize.formats.linear_names", fix="pass Linear layer names, or None for all")
        names = [n for n in names if n in set(layers)]
    t0 = time.perf_counter()
    blocks, why = _cached.cache_blocks(lm, batches, names) if route != "naive" else (None, "route='naive' asked")
    if blocks is None and route == "cached":
        raise LaminaError("sensitivity cannot run from cached block outputs", value=why, allowed="route='auto'",
                          fix="use route='auto' (falls back to full forwards)")
    cache_s = time.perf_counter() - t0
    change = output_change(lm, batches)
    setup_s = time.perf_counter() - t0  # the cache (cached route) and the float reference output (both)
    head = head_name(lm)
    scores: dict[str, dict[str, float]] = {}
    n_blocks = len(_block_paths(lm))
    runs = 0
    for name in names:
        orig = lm.module.get_submodule(name)
        around = blocks.around(name) if blocks is not None else None
        runs += len(formats) * len(batches) * (blocks.block_runs(name) if blocks is not None else n_blocks)
        scores[name] = {}
        for fmt in formats:
            if name == head:  # an LM's head: its logits are the measured output, quantized chunk by chunk there
                scores[name][fmt] = change(head_format=fmt, around=around)
                change.forget(fmt)
                continue
            swap(lm.module, name, quantized_linear(orig, fmt))
            try:
                scores[name][fmt] = change(around=around)
            finally:
                swap(lm.module, name, orig)
    if cost is not None:
        naive = len(names) * len(formats) * len(batches) * n_blocks
        cost.update({
            "route": "cached block outputs" if blocks is not None else "full forwards",
            "route_why": "" if blocks is not None else why,
            "block_evaluations": runs, "block_evaluations_naive": naive, "blocks": n_blocks,
            "batches": len(batches), "scored": len(names) * len(formats),
            "cache_bytes": blocks.nbytes if blocks is not None else 0,
            "cache_bound_bytes": _cached.CACHE_BYTES, "cache_s": cache_s if blocks is not None else 0.0,
            "setup_s": setup_s, "layers_s": time.perf_counter() - t0 - setup_s,
            "first_block": ({n: blocks.start.get(n, n_blocks) for n in names} if blocks is not None else None)})
    return scores


def order(scores: dict[str, dict[str, float]], formats=None) -> list[tuple[str, str, float]]:
    """Every (layer, format, score) step, least sensitive first (ties: module order, then ``formats`` order).

    With one format this is the layers' ranking; with several, a layer appears once per format, so the cheap
    steps (a bf16 layer) come before the lossy ones (the same layer in int8) and a budget takes a layer to the
    lossy format only where its score is low enough."""
    names = list(scores)
    formats = list(formats or next(iter(scores.values()), {}))
    steps = [(n, f, s) for n in names for f, s in scores[n].items()]
    return sorted(steps, key=lambda t: (t[2], names.index(t[0]), formats.index(t[1]) if t[1] in formats else 0))


def assign(steps, formats) -> dict[str, str]:
    """{layer: format} for the taken ``steps``: a layer taken in several formats runs in the one listed first
    in ``formats`` (the faster one: --formats int8fused,bf16 puts a layer in int8 once its int8 step is taken,
    in bf16 while only its bf16 step is)."""
    pos = {f: i for i, f in enumerate(formats)}
    chosen: dict[str, str] = {}
    for n, f, _ in steps:
        if n not in chosen or pos.get(f, 0) < pos.get(chosen[n], 0):
            chosen[n] = f
    return chosen


def _block_paths(lm: LoadedModel) -> tuple:
    return tuple(getattr(lm.blocks, "block_paths", ()) or ())


def quantized_copy(lm: LoadedModel, layers: dict[str, str]) -> LoadedModel:
    out = copy.copy(lm)
    out.module = apply_layers(copy.deepcopy(lm.module), layers, _block_paths(lm)).eval()
    return out


def _spec(lm: LoadedModel, model, config: QuantizeConfig):
    """The task the model is calibrated and validated on: its record, else --data text for a causal LM, else None."""
    from ..compress._selfscore import task_of
    spec = task_of(model)
    if spec is None and config.data and is_causal_lm(lm):
        spec = LMTaskSpec(data=str(config.data), limit=config.limit, seed=config.seed, seq_len=config.seq_len)
    return spec


def _batch_size(lm: LoadedModel, task, requested: int) -> int:
    """``requested``, or fewer blocks for an LM task so one batch's full logits stay bounded."""
    if task is None or getattr(task, "kind", None) != "lm":
        return requested
    vocab = int(getattr(getattr(lm.module, "config", None), "vocab_size", 0) or 1)
    return eval_batch_size(requested, task.spec.seq_len, vocab)


def _calibration(lm: LoadedModel, model, config: QuantizeConfig):
    """(calibration batches, (the task spec, the task) or None)."""
    spec = _spec(lm, model, config)
    if spec is not None:
        from ..task import make_task
        task = make_task(spec, lm)
        rows = task.train_rows(config.calibration_samples, spec.seed)
        return list(task.batches(lm, rows, _batch_size(lm, task, config.batch_size))), (spec, task)
    if not config.data:
        raise UsageError("quantize needs calibration data: the model has no task record", value=str(model),
                         allowed="a `lamina finetune` / prune / distill OUT folder, or --data DATA",
                         fix=f"lamina quantize {model} --data rotten-tomatoes --limit 256 --fraction 0.8 --out Q")
    from ..data import load_data, subsample
    ds = subsample(load_data(config.data), config.limit, config.seed)
    if config.calibration_samples < len(ds):
        ds = subsample(ds, config.calibration_samples, config.seed, min_per_class=0)
    n = len(ds)
    return [lm.batch(ds, range(s, min(n, s + config.batch_size)), config.max_length)
            for s in range(0, n, config.batch_size)], None


def _metric(lm: LoadedModel, task) -> float:
    spec, t = task
    res = t.evaluate(lm, t.split["val"], _batch_size(lm, t, 64))
    return float(res[t.metric])


def _is_lm(task) -> bool:
    return task is not None and getattr(task[1], "kind", None) == "lm"


def _drop(base: float, v: float, task) -> float:
    """The --max-drop unit: accuracy lost (a fraction); for an LM, perplexity's relative increase."""
    if _is_lm(task):
        return relative_increase(base, v)
    return base - v if task[1].higher_is_better else v - base


def _drop_text(d: float, task) -> str:
    if _is_lm(task):
        return f"raises validation perplexity by {100 * d:.3g}% ({d:.4g})"
    return f"loses {d:.4g} {task[1].metric} on validation"


def _validation(lm: LoadedModel, qlm: LoadedModel, task, drop_from_search) -> dict:
    """Validation metric before and after, measured on the saved plan's model (recorded in quant_plan.json)."""
    base, after = _metric(lm, task), _metric(qlm, task)
    d = _drop(base, after, task)
    # batch_size matters for int8fused: its one activation scale per call is taken over the whole batch
    return {"metric": task[1].metric, "rows": int(len(task[1].split["val"])), "batch_size": _batch_size(lm, task[1], 64),
            "float": base, "quantized": after,
            "drop": d, "drop_unit": ("relative perplexity increase (quantized / float - 1)" if _is_lm(task)
                                     else f"{task[1].metric} lost (float - quantized)")}


def _by_max_drop(lm, ranked, formats, task, max_drop: float) -> tuple[int, float, list]:
    """The largest count (bisection) whose measured validation drop is <= max_drop: (count, drop, tried)."""
    base = _metric(lm, task)
    tried: dict[int, float] = {}

    def drop_at(k: int) -> float:
        if k not in tried:
            tried[k] = _drop(base, _metric(quantized_copy(lm, assign(ranked[:k], formats)), task), task)
        return tried[k]

    lo, hi = 0, len(ranked)  # drop_at(lo) <= max_drop holds for lo = 0 by definition
    if drop_at(hi) <= max_drop:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if drop_at(mid) <= max_drop:
            lo = mid
        else:
            hi = mid
    log_ = [{"count": k, "drop": d} for k, d in sorted(tried.items())]
    if lo == 0:
        best = min(((k, d) for k, d in tried.items() if k > 0), key=lambda kv: kv[1])
        raise UsageError(f"no layer can be quantized within --max-drop {max_drop}: the least sensitive layer alone "
                         f"{_drop_text(drop_at(1), task)} (best reachable: {best[1]:.4g} with {best[0]} "
                         f"layer(s))", value=max_drop,
                         allowed=f"--max-drop >= {drop_at(1):.4g}",
                         fix=f"raise --max-drop to {drop_at(1):.4g} or more, or use --fraction")
    return lo, tried[lo], log_ + [{"baseline": base}]


def latency_ms(lm: LoadedModel, batch: dict, repeats: int) -> float:
    """Median wall time in ms of ``repeats`` forwards of ``batch`` after one untimed warm-up."""
    import statistics
    import time
    times = []
    with torch.inference_mode():
        lm.forward(batch)
        for _ in range(repeats):
            t = time.perf_counter()
            lm.forward(batch)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _by_latency(lm, ranked, formats, batch, goal: float, repeats: int) -> tuple[int, float, list]:
    """The smallest count (least sensitive first) whose measured latency meets ``goal``: (count, ms, tried).

    Bisection on the count, every tried count measured and recorded; the returned count was itself measured to
    meet the goal (latency need not be monotone in the count on a loaded machine)."""
    tried: dict[int, float] = {}

    def ms_at(k: int) -> float:
        if k not in tried:
            tried[k] = latency_ms(quantized_copy(lm, assign(ranked[:k], formats)), batch, repeats)
        return tried[k]

    lo, hi = 0, len(ranked)
    if ms_at(0) <= goal:
        hi = 0
    elif ms_at(hi) > goal:
        k, best = min(tried.items(), key=lambda kv: kv[1])
        raise UsageError(f"no count of quantized layers meets --latency-ms {goal:g}: float {tried[0]:.4g} ms, all "
                         f"{len(ranked)} steps {tried[len(ranked)]:.4g} ms (best reachable: {best:.4g} ms with {k} "
                         f"layer(s), batch {_rows(batch)}, {torch.get_num_threads()} thread(s))", value=goal,
                         allowed=f"--latency-ms >= {best:.4g} on this machine now",
                         fix=f"raise --latency-ms to {best:.4g} or more, prune the model first, or lower "
                             f"--latency-batch-size")
    while hi - lo > 1:  # ms_at(lo) > goal >= ms_at(hi)
        mid = (lo + hi) // 2
        if ms_at(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return hi, tried[hi], [{"count": k, "latency_ms": v} for k, v in sorted(tried.items())]


def _rows(batch: dict) -> int:
    return int(next(iter(batch.values())).shape[0])


def quantize(model, config: QuantizeConfig | None = None) -> QuantizeResult:
    """Measure every Linear's sensitivity, quantize the least sensitive within the budget, save under config.out.

    Args:
        model: anything :func:`lamina.load_model` accepts; it is never modified.
        config: a :class:`QuantizeConfig` (or a dict of its fields).

    Raises UsageError before anything is written: OUT not empty (without ``overwrite``), no calibration data,
    a format the CPU backend cannot run, a model with no Linear layer, a ``--max-drop`` no layer meets.
    LaminaError (exit 1) when the reloaded model does not reproduce the quantized one.
    """
    if config is None:
        raise UsageError("quantize needs a QuantizeConfig", value=None, allowed="QuantizeConfig(out=..., ...)",
                         fix="quantize('teacher/', QuantizeConfig(out='q', fraction=0.8))")
    config = as_config(QuantizeConfig, config, "quantize")
    formats = parse_formats(config.formats)
    out = Path(config.out)
    plan_writes(out, "quantize", WRITES, config.overwrite)
    check_out(out, config.overwrite)
    lm = load_model(model, runtime=config.runtime())
    names = linear_names(lm.module)
    if not names:
        raise UsageError("the model has no nn.Linear layer to quantize", value=lm.name,
                         allowed="a model with Linear layers (transformers, classifier heads)",
                         fix="quantize a transformer or a model with a Linear head")
    if config.max_drop is not None and _spec(lm, model, config) is None:
        raise UsageError("--max-drop needs validation rows: the model has no task record (and is not a causal LM "
                         "given --data text)", value=str(model),
                         allowed="a `lamina finetune` / prune / distill OUT folder, or a causal LM with --data TEXT",
                         fix="use --fraction instead")
    batches, task = _calibration(lm, model, config)
    t0 = time.perf_counter()
    route_cost: dict = {}
    scores = sensitivity(lm, batches, formats, cost=route_cost)
    cost = {"sensitivity_s": time.perf_counter() - t0, "sensitivity_forwards": len(names) * len(formats),
            "threads": torch.get_num_threads(), "sensitivity": route_cost}
    t0 = time.perf_counter()
    ranked = order(scores, formats)
    search, drop, latency = None, None, None
    if config.fraction is not None:
        count = int(round(config.fraction * len(ranked)))
    elif config.max_drop is not None:
        count, drop, search = _by_max_drop(lm, ranked, formats, task, config.max_drop)
    else:
        timed = {k: v[:config.latency_batch_size] for k, v in batches[0].items()}  # calibration rows
        count, ms, search = _by_latency(lm, ranked, formats, timed, config.latency_ms,
                                        config.latency_repeats)
        latency = {"goal_ms": config.latency_ms, "measured_ms": ms, "float_ms": search[0]["latency_ms"],
                   "batch": {k: list(v.shape) for k, v in timed.items()}, "threads": torch.get_num_threads(),
                   "repeats": config.latency_repeats, "statistic": "median after one warm-up, wall time"}
    cost["budget_s"] = time.perf_counter() - t0  # the --max-drop / --latency-ms search (0 for --fraction)
    chosen = assign(ranked[:count], formats)
    first = {}
    for i, (n, _, _) in enumerate(ranked):
        first.setdefault(n, i)
    qlm = quantized_copy(lm, chosen)
    # an LM's perplexity before / after is always recorded; a classifier's accuracy when --max-drop asked for it
    validation = _validation(lm, qlm, task, drop) if task and (config.max_drop is not None or _is_lm(task)) else None
    plan = {"formats": list(formats), "budget": {"fraction": config.fraction, "max_drop": config.max_drop,
                                                 "latency_ms": config.latency_ms},
            "score": ("nMSE of the next-token logits (every position of the calibration blocks) with only this "
                      "layer quantized" if head_name(lm) else
                      "nMSE of the model's main output (logits, else last hidden state) with only this layer "
                      "quantized, on the calibration rows"),
            "max_drop_unit": ("relative increase of validation perplexity (0.01 = +1 percent)" if _is_lm(task) else
                              "validation accuracy lost, as a fraction (0.01 = one point)"),
            "calibration": {"rows": sum(int(next(iter(b.values())).shape[0]) for b in batches),
                            "from": _calibration_source(model, task, config)},
            "task": task[0].to_dict() if task else None,
            "layers": [{"name": n, "scores": scores[n], "quantized": n in chosen, "format": chosen.get(n),
                        "rank": r} for r, n in enumerate(sorted(first, key=first.get))],
            "steps": [{"name": n, "format": f, "score": v, "taken": i < count} for i, (n, f, v) in enumerate(ranked)],
            "bf16_blocks": bf16_blocks(names, {n for n, f in chosen.items() if f == "bf16"}, _block_paths(lm)),
            "count": count, "of": len(ranked), "by_format": {f: sum(v == f for v in chosen.values()) for f in formats},
            "validation_drop": drop, "validation": validation, "latency": latency, "search": search, "cost": cost,
            "model": lm.describe(), "source": str(model) if isinstance(model, (str, Path)) else lm.source,
            "runtime": describe(lm.device, lm.dtype)}
    plan_path, model_path = out / PLAN_FILE, out / "model"
    with claim(out, "quantize", WRITES, config.overwrite):
        fmt, plan["float_reload_check"] = save_checked(lm, model_path, lm, batches[0], stage="quantize")
        plan["float_format"] = fmt
        record(out, "quantize", [PLAN_FILE, PLAN_FILE + ".tmp"])
        save_json(plan_path, plan)
        try:
            plan["reload_check"] = _reload_check(qlm, out, batches[0])
        except BaseException:
            plan_path.unlink(missing_ok=True)
            discard(model_path)  # only what lamina just wrote there
            raise
        save_json(plan_path, plan)
    log.info("quantize: %d of %d Linear layers quantized", len(chosen), len(names))
    return QuantizeResult(str(out), str(plan_path), str(model_path), plan, list(chosen), len(names), drop)


def _calibration_source(model, task, config: QuantizeConfig) -> str:
    from ..compress._selfscore import task_of
    if task is None:
        return f"--data {config.data}"
    what = "training blocks" if _is_lm(task) else "training rows"
    return f"task record ({what})" if task_of(model) is not None else f"--data {config.data} ({what})"


def _reload_check(qlm: LoadedModel, out: Path, batch: dict) -> dict:
    """Reload OUT the user's way (``lamina.load_model``) and compare with the in-memory quantized model."""
    ref = _run(qlm, [batch])[0]
    got = _run(load_model(out), [batch])[0]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((got - ref).abs().max()) if ref.numel() and got.shape == ref.shape else float("inf")
    if not diff <= RTOL * scale + 1e-30:
        raise LaminaError(f"the quantized model reloaded from {out} does not reproduce the in-memory one (max abs "
                          f"difference {diff:.3g})", value=str(out), allowed=f"<= {RTOL * scale:.3g}",
                          fix="report this to lamina with the model; nothing was kept")
    return {"reloaded_with": "lamina.load_model", "max_abs_diff": diff, "max_abs_output": scale, "ok": True}


def load_quantized(path, runtime: Runtime | None = None) -> LoadedModel:
    """A quantize OUT folder: the float model in OUT/model with the plan in quant_plan.json re-applied.

    The plan is untrusted input: every layer it names must be a Linear of the model and every format known."""
    from ..files import read_json
    from ..trust import check_folder
    path = Path(path)
    check_folder(path, [PLAN_FILE, "model"])
    plan = read_json(path / PLAN_FILE, "the quantization plan", "quantize the model again")
    layers = plan.get("layers") if isinstance(plan, dict) else None
    if not isinstance(layers, list):
        raise LaminaError("quant_plan.json has no layer list", value=str(path / PLAN_FILE),
                          allowed="a quant_plan.json written by `lamina quantize`", fix="quantize the model again")
    lm = load_model(path / "model", runtime=runtime)
    lm.name = path.name
    have = set(linear_names(lm.module))
    chosen = {}
    for e in layers:
        if not isinstance(e, dict) or not e.get("quantized"):
            continue
        if e.get("name") not in have or e.get("format") not in FORMATS:
            raise LaminaError("quant_plan.json names a layer the model does not have, or an unknown format",
                              value=json.dumps(e)[:200], allowed=f"Linear layers of the model; formats {FORMATS}",
                              fix="quantize the model again")
        chosen[e["name"]] = e["format"]
    want = (plan.get("model") or {}).get("fingerprint")
    if want and lm.fingerprint() != want:
        raise LaminaError("the float model in this folder is not the one the plan was made for (fingerprints "
                          "differ)", value=str(path), allowed=want, fix="quantize the model again")
    apply_layers(lm.module, chosen, _block_paths(lm))
    lm.module.eval()
    return lm
