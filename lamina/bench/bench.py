"""``bench``: measured latency, parameters, FLOPs and accuracy of models side by side.

``lamina bench teacher/ small/ --data rotten-tomatoes`` answers "how much
faster and how much worse is the small model", on the same inputs:

- **Latency** per batch size (1, 8, 32 by default): the same real test rows
  for every model; ``warmup`` untimed calls, then ``repeats`` rounds in which
  every model runs once, interleaved, so a slow spell of a shared machine hits
  all models alike; the median and the quartiles are reported, never a mean.
- **Layout**: a model with 2-D convolutions runs in channels_last (NHWC) by
  default (``--memory-format auto``), as a conv net should be deployed on a
  CPU: oneDNN's NHWC kernels are faster for both sides of a comparison
  (BENCHMARKS.md "transfer"); ``contiguous`` keeps the loaded NCHW layout.
- **BatchNorm folding** (``--fold-batchnorm``, off by default): every inference BatchNorm that reads a
  convolution's output is folded into it (:mod:`lamina.bench.fold`), in every model alike; each model's
  outputs are checked against its unfolded ones and the result is recorded per model
  (``batchnorm_folded``: pairs folded, largest difference).
- **FLOPs** per sample from ``torch.utils.flop_counter`` on the batch of the
  largest size (matmuls and convolutions, what dominates); the ideal speed-up
  is the FLOP ratio, and ``speedup_efficiency`` = measured / ideal.
- **Causal LMs**: prefill latency at more sequence lengths (``--prefill-lens``, :mod:`lamina.bench.prefill`)
  beside the ``--seq-len`` one kept in ``latency``; decode tokens/s with the KV cache.
- **Peak memory** (``--memory``): each model loaded and run once at the largest timed shape in a fresh child
  process (:mod:`lamina.bench.memory`).
- **Accuracy** on the held-out test rows of the first model's task
  (``finetune.json``), so a teacher and its pruned copies share one test set.

Everything goes to ``OUT/bench.json`` (OUT defaults to the last model's folder),
ratios relative to the first model.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._cliargs import as_config
from ..errors import UsageError
from ..runtime import Runtime, describe, oom_message
from ..models import load_model, save_json
from ..runfolder import claim, plan_writes, record
from ..task import TaskSpec, default_spec, is_causal_lm, make_task, read_task
from ..threads import limit_threads


MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def use_channels_last(module: torch.nn.Module, memory_format: str = "auto") -> bool:
    """Whether ``module`` runs in channels_last under ``memory_format``: auto, only a net with 2-D convolutions
    (a transformer gains nothing from it)."""
    if memory_format == "auto":
        return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    return memory_format == "channels_last"


def to_memory_format_(lm, memory_format: str = "auto") -> str:
    """Put a LoadedModel's conv weights in channels_last (in place) when :func:`use_channels_last`; returns the
    layout used. Outputs equal the NCHW ones within float rounding (tests/test_bench_layout.py)."""
    if not use_channels_last(lm.module, memory_format):
        return "contiguous"
    try:
        lm.module.to(memory_format=torch.channels_last)  # 4-D weights only; other tensors are left as they are
    except (RuntimeError, TypeError, NotImplementedError):  # a weight type without NHWC (a quantized tensor
        return "contiguous"  # subclass): layout changes no value, so the loaded one is timed; recorded as such
    return "channels_last"


def _layout_batch(batch: dict, layout: str) -> dict:
    """The images of ``batch`` in ``layout`` (done before timing: a deployed model gets its input this way)."""
    if layout != "channels_last":
        return batch
    return {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
            for k, v in batch.items()}


@dataclass(frozen=True)
class BenchConfig(Runtime):
    """Settings of ``lamina bench``."""

    data: str | None = field(default=None, metadata={
        "help": "labelled data for accuracy and inputs; default: the data the first model was fine-tuned on"})
    out: str | None = field(default=None, metadata={
        "help": "folder for bench.json (default: the last model's folder)"})
    batch_sizes: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "batch sizes to time"})
    warmup: int = field(default=3, metadata={"help": "untimed calls per model and batch size"})
    repeats: int = field(default=15, metadata={"help": "timed rounds per batch size (median reported)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch intra-op (and BLAS/OpenMP) threads while timing (default: torch's own setting)"})
    accuracy: bool = field(default=True, metadata={"help": "measure test accuracy"})
    accuracy_limit: int | None = field(default=None, metadata={
        "help": "at most this many test rows for accuracy (default: all)"})
    seq_len: int = field(default=128, metadata={
        "help": "tokens per packed block when a causal LM is measured on --data text (perplexity)"})
    decode_tokens: int = field(default=32, metadata={
        "help": "causal LMs: tokens generated greedily (KV cache, batch 1, the first test block as prompt) per "
                "decode timing, reported as tokens/s; 0 skips decode"})
    prefill_lens: tuple[int, ...] = field(default=(), metadata={
        "help": "causal LMs: also time a prefill at these sequence lengths, each at every batch size, on the test "
                "text cut into windows of that length (default: only --seq-len, recorded in latency)"})
    memory: bool = field(default=False, metadata={
        "help": "measure each model's peak memory (weights + activations) at the largest timed shape, in a fresh "
                "child process per model (a few seconds each)"})
    memory_format: str = field(default="auto", metadata={
        "choices": MEMORY_FORMATS,
        "help": "layout of 2-D conv nets while timing: auto = channels_last for a model with Conv2d layers (NHWC, "
                "oneDNN's faster path on CPUs: how such a model should be deployed), contiguous = as loaded (NCHW)"})
    fold_batchnorm: bool = field(default=False, metadata={
        "help": "fold every inference BatchNorm into the convolution that feeds it before timing, in every model "
                "alike (lamina.bench.fold: exact up to float rounding, checked on a batch; a conv net is deployed "
                "this way: one memory pass less per BatchNorm)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing OUT/bench.json"})
    progress: bool = field(default=True, metadata={"help": "show progress"})

    def __post_init__(self):
        bs = self.batch_sizes
        if not bs or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bs):
            raise UsageError("--batch-sizes must be positive integers", value=bs, allowed="e.g. 1 8 32",
                             fix="--batch-sizes 1 8 32")
        pl = self.prefill_lens
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in pl):
            raise UsageError("--prefill-lens must be positive integers (tokens)", value=pl,
                             allowed="integers >= 1, at most the model's context", fix="--prefill-lens 32 128 512")
        for name, lo in (("warmup", 0), ("repeats", 1), ("decode_tokens", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(f"--{name} must be an integer >= {lo}", value=v, allowed=f">= {lo}",
                                 fix=f"e.g. --{name} {max(lo, 3)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise UsageError("unknown --memory-format", value=self.memory_format, allowed=", ".join(MEMORY_FORMATS),
                             fix="--memory-format auto (channels_last for conv nets)")
        if self.threads is not None and self.threads < 1:
            raise UsageError("--threads must be >= 1", value=self.threads, allowed="an integer >= 1",
                             fix="drop --threads to keep torch's default")


def _task_for(models, data: str | None, first=None, seq_len: int = 128):
    import dataclasses
    for m in models:
        spec = read_task(m) if isinstance(m, (str, Path)) else None
        if spec is not None:
            if data and data != spec.data:
                return dataclasses.replace(spec, data=data, limit=None)
            return spec
    if not data:
        raise UsageError("no data to measure on", value=None,
                         allowed="--data, or a model folder written by `lamina finetune` (it records its data)",
                         fix="pass --data rotten-tomatoes (or the data the models were trained on)")
    return default_spec(first, data, seq_len=seq_len) if first is not None else TaskSpec(data=data)


def flops_per_sample(lm, batch: dict) -> float:
    """Forward FLOPs of ``batch`` counted by torch's FlopCounterMode, divided by its rows."""
    from torch.utils.flop_counter import FlopCounterMode
    n = next(iter(batch.values())).shape[0]
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        lm.forward(batch)
    return fc.get_total_flops() / n


def _time(lm, batch) -> float:
    cuda = lm.device.type == "cuda"  # kernels run asynchronously: time to their end, not their launch
    if cuda:
        torch.cuda.synchronize(lm.device)
    t = time.perf_counter()
    lm.forward(batch)
    if cuda:
        torch.cuda.synchronize(lm.device)
    return time.perf_counter() - t


def _generate(lm, prompt: dict, new: int, cache: bool) -> torch.Tensor:
    tok = lm.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    pad = getattr(tok, "eos_token_id", None) if pad is None else pad
    # min_new_tokens = max_new_tokens: every model generates exactly ``new`` tokens (an early EOS would
    # make a faster-looking model); greedy, so the tokens are a function of the weights alone
    return lm.module.generate(input_ids=prompt["input_ids"], attention_mask=prompt.get("attention_mask"),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=cache,
                              pad_token_id=0 if pad is None else pad)


def _interleaved(lms, inputs, bs: int, config: BenchConfig, bar=None) -> list[list[float]]:
    """Seconds per timed call, per model: ``warmup`` + ``repeats`` rounds, the models' order reversed every other
    round (no model always runs first or last); the warm-up rounds are not kept."""
    times: list[list[float]] = [[] for _ in lms]
    for r in range(config.warmup + config.repeats):
        order = range(len(lms)) if r % 2 == 0 else reversed(range(len(lms)))  # no fixed position
        for i in order:
            with oom_message(bs, "--batch-sizes", lms[i].device):  # outside the timed call
                t = _time(lms[i], inputs[i])
            if r >= config.warmup:
                times[i].append(t)
        if bar is not None:
            bar.update(1)
    return times


def _summary(ts: list[float], **per_s: float) -> dict:
    """Median, quartiles and range in ms of timed calls, plus ``name`` = amount per second for each ``name=amount``
    (samples or tokens per call)."""
    q = np.percentile(ts, [0, 25, 50, 75, 100]) * 1000
    return {"median_ms": q[2], "p25_ms": q[1], "p75_ms": q[3], "min_ms": q[0], "max_ms": q[4],
            **{k: v / (q[2] / 1000) for k, v in per_s.items()}, "repeats": len(ts)}


def _speedups(ref: dict, rec: dict) -> dict:
    """Speed-up over ``ref`` per batch (its median latency over ``rec``'s), the FLOP-ideal speed-up, and their
    ratio (efficiency); ``ref`` and ``rec`` each hold ``flops_per_sample`` and ``latency[batch]``."""
    ideal = ref["flops_per_sample"] / rec["flops_per_sample"] if rec["flops_per_sample"] else None
    speed = {b: ref["latency"][b]["median_ms"] / rec["latency"][b]["median_ms"] for b in rec["latency"]}
    return {"ideal_speedup": ideal, "speedup": speed,
            "speedup_efficiency": {b: s / ideal for b, s in speed.items()} if ideal else None}


def _decode(lms, prompt: dict, config: BenchConfig) -> list[dict]:
    """Greedy decode tokens/s per model (KV cache on), timed in interleaved rounds like the latency.

    Each model's cached tokens are also compared once with a no-cache run (untimed): a pruned model
    whose cache is wrong would otherwise look fast and be useless.
    """
    new = config.decode_tokens
    times: list[list[float]] = [[] for _ in lms]
    outs = [None] * len(lms)
    for r in range(config.warmup + config.repeats):
        order = range(len(lms)) if r % 2 == 0 else reversed(range(len(lms)))
        for i in order:
            lm = lms[i]
            cuda = lm.device.type == "cuda"
            p = {k: v.to(lm.device) for k, v in prompt.items()}
            if cuda:
                torch.cuda.synchronize(lm.device)
            t = time.perf_counter()
            outs[i] = _generate(lm, p, new, cache=True)
            if cuda:
                torch.cuda.synchronize(lm.device)
            if r >= config.warmup:
                times[i].append(time.perf_counter() - t)
    res = []
    n_prompt = int(prompt["input_ids"].shape[1])
    for lm, ts, out in zip(lms, times, outs):
        plain = _generate(lm, {k: v.to(lm.device) for k, v in prompt.items()}, new, cache=False)
        q = np.percentile(ts, [25, 50, 75])
        res.append({"prompt_tokens": n_prompt, "new_tokens": int(out.shape[1]) - n_prompt, "batch": 1,
                    "tokens_per_s": (int(out.shape[1]) - n_prompt) / q[1], "median_ms": q[1] * 1000,
                    "p25_ms": q[0] * 1000, "p75_ms": q[2] * 1000, "repeats": len(ts),
                    "same_tokens_without_cache": bool(torch.equal(out.cpu(), plain.cpu()))})
    return res


def bench(models, config: BenchConfig = BenchConfig()) -> dict:
    """Measure ``models`` (paths or anything ``load_model`` takes); the first is the reference.

    Returns the bench.json record (also written to OUT/bench.json).
    """
    config = as_config(BenchConfig, config, "bench")
    models = list(models)
    if not models:
        raise UsageError("bench needs at least one model", value=models, allowed="one or more model folders",
                         fix="lamina bench teacher/ small/ --data rotten-tomatoes")
    last = models[-1]
    out = Path(config.out) if config.out else (
        Path(str(last)) if isinstance(last, (str, Path)) and Path(str(last)).is_dir() else Path("."))
    dest = out / "bench.json"
    if dest.exists() and not config.overwrite:
        raise UsageError("bench.json already exists there", value=str(dest), allowed="a folder without bench.json",
                         fix="pass --overwrite to replace it, or --out another folder")
    plan_writes(out, "bench", [dest.name], config.overwrite)  # decided before the work
    lms = [load_model(m, runtime=config.runtime()) for m in models]  # first: a missing model folder is named
    spec = _task_for(models, config.data, lms[0], config.seq_len)
    task = make_task(spec, lms[0])
    labels = [str(m) if isinstance(m, (str, Path)) else lm.name for m, lm in zip(models, lms)]
    test = task.split["test"]
    need = max(config.batch_sizes)
    rows = np.resize(test, need)  # repeated when the test split is smaller than the largest batch
    params = [int(sum(p.numel() for p in lm.module.parameters())) for lm in lms]  # before any fold: as saved
    folds = [None] * len(lms)
    if config.fold_batchnorm:  # before the layout change: the folded weights are then laid out like any other
        from .fold import fold_batchnorm
        for lm in lms:
            lm.module.eval()
        folds = [fold_batchnorm(lm, task.batch(lm, rows[:2])) for lm in lms]
    layouts = [to_memory_format_(lm, config.memory_format) for lm in lms]
    prefill_lens = _prefill_lengths(config, lms, spec)
    recs = [{"model": lab, "class": type(lm.module).__name__, "blocks": lm.blocks.n_blocks,
             "parameters": n, "memory_format": lay, "batchnorm_folded": fold,
             "latency": {}} for lab, lm, lay, n, fold in zip(labels, lms, layouts, params, folds)]
    with limit_threads(config.threads or None):
        for lm in lms:
            lm.module.eval()
        with torch.inference_mode():
            big = [task.batch(lm, rows[:need]) for lm in lms]
            for rec, lm, b in zip(recs, lms, big):
                rec["flops_per_sample"] = flops_per_sample(lm, b)
            bar = None
            if config.progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(config.batch_sizes) * (config.warmup + config.repeats), desc="bench",
                           unit="round", leave=False)
            for bs in config.batch_sizes:
                inputs = [_layout_batch(task.batch(lm, rows[:bs]), lay) for lm, lay in zip(lms, layouts)]
                for rec, ts in zip(recs, _interleaved(lms, inputs, bs, config, bar)):
                    rec["latency"][str(bs)] = _summary(ts, samples_per_s=bs)
            if bar is not None:
                bar.close()
            if prefill_lens:
                _prefill(lms, recs, task, prefill_lens, config)
            if config.decode_tokens and all(is_causal_lm(lm) for lm in lms):
                prompt = task.batch(lms[0], test[:1])
                for rec, d in zip(recs, _decode(lms, prompt, config)):
                    rec["decode"] = d
    if config.memory:
        _memory(models, lms, recs, task, rows[:need], prefill_lens, config)
    if config.accuracy:
        acc_rows = test if not config.accuracy_limit else test[: config.accuracy_limit]
        for rec, lm in zip(recs, lms):
            ev = task.evaluate(lm, acc_rows)
            rec["accuracy"] = ev["accuracy"]  # next-token accuracy for an LM
            rec["metric"] = task.metric
            if task.metric != "accuracy":
                rec[task.metric] = ev[task.metric]
    ref = recs[0]
    for rec in recs:
        rec["vs_first"] = {
            "parameter_ratio": rec["parameters"] / ref["parameters"],
            "flop_ratio": rec["flops_per_sample"] / ref["flops_per_sample"] if ref["flops_per_sample"] else None,
            **_speedups(ref, rec),
            "accuracy_retained": (rec["accuracy"] / ref["accuracy"] if config.accuracy and ref["accuracy"]
                                  else None)}
        if "decode" in rec and "decode" in ref:
            rec["vs_first"]["decode_speedup"] = rec["decode"]["tokens_per_s"] / ref["decode"]["tokens_per_s"]
        if "prefill" in rec:
            rec["vs_first"]["prefill"] = _prefill_vs(ref["prefill"], rec["prefill"])
        if config.accuracy and task.metric != "accuracy":
            rec["vs_first"][f"{task.metric}_ratio"] = rec[task.metric] / ref[task.metric]
    result = {"lamina_bench": 1, "task": task.record(), "test_rows": int(len(test)),
              "settings": asdict(config), "machine": _machine(config),
              "runtime": describe(lms[0].device, lms[0].dtype), "models": recs}
    if prefill_lens:
        result["prefill_inputs"] = _prefill_inputs(task, prefill_lens, config.batch_sizes)
    with claim(out, "bench", [dest.name], config.overwrite):  # the folder's lock, the check again, the write
        record(out, "bench", [dest.name, dest.name + ".tmp"])
        save_json(dest, result)
    result["path"] = str(dest)
    return result


def _machine(config: BenchConfig) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": config.threads or torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------- causal LMs: prefill lengths, memory ----
def _prefill_lengths(config: BenchConfig, lms, spec) -> tuple[int, ...]:
    """The extra prefill lengths to time (``--seq-len`` is already ``latency``); checked against each context."""
    if not config.prefill_lens:
        return ()
    if not all(is_causal_lm(lm) for lm in lms):
        raise UsageError("--prefill-lens times causal language models only", value=config.prefill_lens,
                         allowed="causal LM folders (a classifier's inputs have no free length)",
                         fix="drop --prefill-lens")
    from .prefill import check_lengths
    check_lengths(config.prefill_lens, lms)
    return tuple(dict.fromkeys(config.prefill_lens))  # order kept, duplicates once


def _test_stream(task) -> torch.Tensor:
    return task.blocks[torch.as_tensor(task.split["test"], dtype=torch.long)].reshape(-1)


def _prefill_inputs(task, lengths, batch_sizes) -> dict:
    from .prefill import prefill_batch
    stream = _test_stream(task)
    return {"source": "the test blocks as one token stream, cut into windows of each length; repeated from its "
                      "start when shorter than batch x length (the --seq-len entry is the test blocks themselves)",
            "test_tokens": int(stream.numel()),
            "repeated": {str(n): [b for b in batch_sizes if prefill_batch(stream, n, b)[1]] for n in lengths}}


def _prefill(lms, recs, task, lengths, config: BenchConfig) -> None:
    """``rec["prefill"][length][batch]``: latency of every length x batch, models interleaved per round as in
    ``latency``; the ``--seq-len`` entry reuses ``latency`` (the same inputs); FLOPs per length for the ideal."""
    from .prefill import prefill_batch
    stream = _test_stream(task)
    seq = task.spec.seq_len
    for rec in recs:
        rec["prefill"] = {}
    for n in lengths:
        for rec, lm in zip(recs, lms):
            one = prefill_batch(stream, n, 1)[0]
            rec["prefill"][str(n)] = {"flops_per_sample": flops_per_sample(lm, one), "latency": {}}
            if n == seq:
                rec["prefill"][str(n)]["latency"] = rec["latency"]
        if n == seq:
            continue
        for bs in config.batch_sizes:
            batch = prefill_batch(stream, n, bs)[0]
            inputs = [{k: v.to(lm.device) for k, v in batch.items()} for lm in lms]
            for rec, ts in zip(recs, _interleaved(lms, inputs, bs, config)):
                rec["prefill"][str(n)]["latency"][str(bs)] = _summary(ts, tokens_per_s=bs * n)


def _prefill_vs(ref: dict, rec: dict) -> dict:
    """Speed-up and efficiency (measured / FLOP-ideal) per length and batch, relative to the first model."""
    return {n: _speedups(ref[n], r) for n, r in rec.items()}


def _memory(models, lms, recs, task, rows, lengths, config: BenchConfig) -> None:
    """``rec["memory"]`` per model at the largest timed shape (largest batch x longest length)."""
    from .memory import measure_memory
    longest = max(lengths) if lengths and max(lengths) > task.spec.seq_len else None
    for m, lm, rec in zip(models, lms, recs):
        if not isinstance(m, (str, Path)):  # an object cannot be reloaded in another process without pickling
            rec["memory"] = None
            continue
        if longest:
            from .prefill import prefill_batch
            batch = prefill_batch(_test_stream(task), longest, len(rows))[0]
        else:  # each model's own batch (classifiers may tokenize differently)
            batch = task.batch(lm, rows)
        batch = {k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)}
        rec["memory"] = measure_memory(str(m), batch, device=config.device, torch_dtype=config.torch_dtype,
                                       trust_remote_code=config.trust_remote_code,
                                       memory_format=config.memory_format, threads=config.threads)
