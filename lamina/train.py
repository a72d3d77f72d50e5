"""The training loop ``finetune``, ``distill`` and ``elastic`` share, and their common settings.

One loop, so both get the same guarantees:
- **Same curve on 1 or N ranks.** Every epoch shuffles the training rows with
  (seed, epoch) alone; each global batch is split round-robin across ranks;
  a step returns its rows' loss *summed and divided by the global batch size*,
  and gradients are summed across ranks (gloo all-reduce), so N ranks take the
  step one process would take on the whole batch (up to dropout noise, which
  is seeded per rank). This is what DistributedDataParallel computes; doing it
  by hand keeps teacher, adapters and centres out of DDP's wrapper.
- **Checkpoints every epoch, resume, early stopping.** After each epoch rank 0
  writes OUT/checkpoint.json + a safetensors file atomically (modules,
  optimizer, schedule, history, best state; tensors and plain data only, see
  ``lamina.checkpoint``); ``resume`` continues after the last finished epoch.
  Validation accuracy decides the best epoch; ``patience`` epochs in a row
  without a gain stop the run (``stopped_early`` is true only when requested
  epochs were skipped), and the best epoch's weights are what the caller saves.
- A progress bar per epoch shows the running losses (rank 0 only).
- **One set of flags.** :class:`TrainConfig` declares the loop's settings (epochs, lr, batch size, ...)
  once; every training stage's config inherits it, as every model-running config inherits ``Runtime``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from .checkpoint import CHECKPOINT, CHECKPOINT_FILES, load_checkpoint, remove_checkpoint, save_checkpoint
from .errors import UsageError
from .runtime import Runtime

__all__ = ["CHECKPOINT", "CHECKPOINT_FILES", "Loop", "TrainConfig", "check_loop_args", "fit", "init_distributed",
           "loop_field", "remove_checkpoint", "trained", "world"]


@dataclass(frozen=True)
class Loop:
    """How to train (the fields every training stage exposes)."""

    epochs: int
    lr: float
    batch_size: int
    max_steps: int | None = None  # optimizer steps in all, overriding epochs (the last epoch may be partial)
    weight_decay: float = 0.01
    warmup: float = 0.06
    patience: int | None = 2
    seed: int = 0
    progress: bool = True
    max_grad_norm: float = 1.0
    best: str = "accuracy"  # what picks the best epoch: highest validation 'accuracy', or lowest 'loss' (perplexity)


def check_loop_args(epochs, lr, batch_size, patience, max_steps=None) -> None:
    """The same refusal for every stage's training flags."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UsageError("--epochs must be a positive integer", value=epochs, allowed="an integer >= 1",
                         fix="e.g. --epochs 3")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise UsageError("--lr must be a positive number", value=lr, allowed="a float > 0", fix="e.g. --lr 5e-5")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError("--batch-size must be a positive integer", value=batch_size, allowed="an integer >= 1",
                         fix="e.g. --batch-size 32")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise UsageError("--max-steps must be a positive integer", value=max_steps,
                         allowed="an integer >= 1 (optimizer steps in all), or leave it out to train --epochs",
                         fix="e.g. --max-steps 77")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 0):
        raise UsageError("--patience must be a non-negative integer", value=patience,
                         allowed="an integer >= 0 (epochs without a validation gain before stopping)",
                         fix="e.g. --patience 2")


def loop_field(default, help_: str):
    """A training-loop setting: keyword-only (as ``Runtime``'s are), so a stage's own required fields such
    as ``out`` keep their place. A stage whose default or help differs redeclares the field with this, under
    the same name: dataclasses keep a redeclared field where the base put it."""
    return field(default=default, kw_only=True, metadata={"help": help_})


@dataclass(frozen=True)
class TrainConfig(Runtime):
    """The settings of :func:`fit` that every training stage (finetune, distill, elastic) exposes, with one
    help text each; the stage configs inherit them (``lamina <stage> --help`` shows them right after the
    runtime flags). Defaults here are distill's and elastic's; finetune redeclares ``epochs``, ``lr``,
    ``seed`` and ``progress``, elastic ``seed`` and ``patience``, distill ``seed``."""

    epochs: int = loop_field(3, "passes over the training rows")
    max_steps: int | None = loop_field(None, "optimizer steps in all, overriding --epochs (as transformers' "
                                             "max_steps does): the schedule is laid over them and the last epoch "
                                             "may stop part-way (it is validated like the others); for training "
                                             "to a compute budget")
    lr: float = loop_field(1e-4, "peak AdamW learning rate (linear warm-up and decay)")
    batch_size: int = loop_field(32, "rows per optimizer step (over all ranks)")
    weight_decay: float = loop_field(0.01, "AdamW weight decay (not on biases and norms)")
    patience: int | None = loop_field(2, "stop after this many epochs without a validation gain; the best epoch "
                                         "is kept")
    seed: int = loop_field(0, "seed of the row order")
    resume: bool = loop_field(False, "continue an interrupted run from its checkpoint in OUT")
    overwrite: bool = loop_field(False, "replace what lamina wrote in OUT (a file it did not write is never "
                                        "touched)")
    progress: bool = loop_field(True, "show a progress bar with the current losses")

    def __post_init__(self):
        check_loop_args(self.epochs, self.lr, self.batch_size, self.patience, self.max_steps)

    def loop(self) -> Loop:
        return Loop(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_steps=self.max_steps,
                    weight_decay=self.weight_decay,
                    patience=self.patience, seed=self.seed, progress=self.progress)


def stop_now(epoch: int, best_epoch: int, patience: int | None, epochs: int) -> bool:
    """True when training stops after (1-based) ``epoch``: ``patience`` epochs in a row without a gain.

    ``patience=2`` with the best epoch at 3 runs epochs 4 and 5 and stops, so 6 never runs.
    Nothing is "stopped early" at the last requested epoch: no epoch was skipped.
    """
    return patience is not None and epoch < epochs and epoch - best_epoch >= patience


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device | None = None) -> None:
    """Join the torchrun group when launched by torchrun (NCCL on CUDA, each rank on its LOCAL_RANK GPU;
    gloo otherwise); no-op otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 \
            and not tdist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            tdist.init_process_group("nccl")
        else:
            tdist.init_process_group("gloo")


def _barrier() -> None:
    if world()[1] > 1:
        tdist.barrier()


def _param_groups(params: list, weight_decay: float) -> list:
    # biases and norm scales are not decayed (1-d tensors), as in BERT's recipe
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def warmup_linear_decay(opt, total: int, warm: int):
    """Linear warm-up over ``warm`` steps to the optimizer's lr, then linear decay to 0 at step ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))


def fit(modules: dict, params: list, step, train_idx, val_idx, validate, loop: Loop, out: Path | None,
        resume: bool = False, desc: str = "train", device: torch.device | None = None,
        dtype: torch.dtype = torch.float32) -> dict:
    """Train ``params`` with AdamW and a linear warm-up/decay schedule.

    Args:
        modules: name -> nn.Module whose state is checkpointed and restored to
            the best epoch (the student, adapters, ...).
        params: the trainable parameters (the rest stays as it is).
        step: ``step(rows, global_batch_size) -> (loss, parts)``: the loss of
            ``rows`` summed over rows and divided by ``global_batch_size``;
            ``parts`` maps loss names to float tensors on the same scale.
        train_idx, val_idx: training and validation row indices.
        validate: ``validate(rows) -> (correct, n, loss_sum)`` on the given
            validation rows (each rank gets its share).
        out: folder for the checkpoint (None: no checkpoints).
        resume: continue from the checkpoint in ``out``.
        device, dtype: where the step runs and its autocast dtype (float32: no
            autocast; float16 also scales the loss so its gradients do not underflow).

    Returns the history: per-epoch train losses, validation accuracy and
    loss, seconds; best_epoch; stopped_early; resumed_from.
    """
    from .runtime import autocast, grad_scaler
    rank, size = world()
    device = device or torch.device("cpu")
    scaler = grad_scaler(device, dtype)
    train_idx = np.asarray(train_idx)
    steps_per_epoch = math.ceil(len(train_idx) / loop.batch_size)
    total = loop.max_steps or steps_per_epoch * loop.epochs
    epochs = math.ceil(total / steps_per_epoch)  # loop.epochs unless max_steps overrides it
    warm = max(1, int(loop.warmup * total))
    opt = torch.optim.AdamW(_param_groups(params, loop.weight_decay), lr=loop.lr)
    sched = warmup_linear_decay(opt, total, warm)
    hist = {"epochs": [], "best_epoch": None, "best_val_accuracy": None, "stopped_early": False,
            "resumed_from": None, "world_size": size, "steps_per_epoch": steps_per_epoch, "total_steps": total}
    best_state = None
    start = 0
    ckpt = out / CHECKPOINT if out is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise UsageError("nothing to resume: no checkpoint in the output folder", value=str(ckpt),
                             allowed="an OUT folder of an interrupted run", fix="run without --resume")
        hist, best_state, last = load_checkpoint(out, modules, opt, sched, scaler)
        start = last + 1
        hist["resumed_from"] = last
    val_rows = np.asarray(val_idx)[rank::size]
    for epoch in range(start, epochs):
        if hist["stopped_early"]:
            break
        t0 = time.perf_counter()
        torch.manual_seed(loop.seed * 1000 + epoch * 10 + rank)  # dropout: per rank, reproducible
        order = train_idx[np.random.default_rng([loop.seed, epoch]).permutation(len(train_idx))]
        for m in modules.values():
            m.train()
        sums: dict = {}
        n_steps = min(steps_per_epoch, total - epoch * steps_per_epoch)  # < steps_per_epoch: a partial last epoch
        bar = _bar(loop, rank, n_steps, f"{desc} {epoch + 1}/{epochs}")
        for s in range(n_steps):
            glob = order[s * loop.batch_size:(s + 1) * loop.batch_size]
            rows = glob[rank::size]
            opt.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss, parts = step(rows, len(glob)) if len(rows) else _zero(params)
            scaler.scale(loss).backward()
            if size > 1:
                _allreduce_grads(params)
            if loop.max_grad_norm:
                scaler.unscale_(opt)  # clip the true gradients (a no-op without float16)
                torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            vals = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
            if size > 1:
                packed = torch.stack([vals[k].float() for k in sorted(vals)])
                tdist.all_reduce(packed)
                vals = dict(zip(sorted(vals), packed))
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v / (s + 1):.4f}" for k, v in sums.items()}, refresh=False)
        if bar is not None:
            bar.close()
        val = _validate(validate, val_rows, modules, device)
        rec = {"epoch": epoch + 1, "train": {k: v / n_steps for k, v in sums.items()},
               # every rank's rows: the first n_steps global batches of this epoch's order
               "steps": n_steps, "rows": len(order[:n_steps * loop.batch_size]),
               "val_accuracy": val[0], "val_loss": val[1], "lr": sched.get_last_lr()[0],
               "seconds": time.perf_counter() - t0}
        hist["epochs"].append(rec)
        if hist["best_epoch"] is None or (val[1] < hist.get("best_val_loss", math.inf) if loop.best == "loss"
                                          else val[0] > hist["best_val_accuracy"]):
            hist["best_val_accuracy"], hist["best_val_loss"], hist["best_epoch"] = val[0], val[1], epoch + 1
            best_state = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
        elif stop_now(epoch + 1, hist["best_epoch"], loop.patience, epochs):
            hist["stopped_early"] = True
        if ckpt is not None and rank == 0:
            save_checkpoint(out, epoch, modules, opt, sched, hist, best_state,
                            {"loop": asdict(loop), "train_rows": len(train_idx), "val_rows": len(val_idx)}, scaler)
        _barrier()
    if best_state is not None:
        for k, m in modules.items():
            m.load_state_dict(best_state[k])
    for m in modules.values():
        m.eval()
    return hist


def trained(hist: dict, train_rows: int) -> tuple[int, int]:
    """(optimizer steps, rows) a history trained, epoch by epoch as run (``--max-steps`` can stop the last
    part-way); an epoch recorded by an older lamina, without the counts, was whole."""
    eps = hist["epochs"]
    return (sum(e.get("steps", hist["steps_per_epoch"]) for e in eps), sum(e.get("rows", train_rows) for e in eps))


def _zero(params):
    z = sum((p.sum() * 0.0 for p in params), torch.zeros(()))
    return z, {}


def _allreduce_grads(params) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tdist.all_reduce(p.grad)


def _validate(validate, rows, modules, device=None) -> tuple[float, float]:
    for m in modules.values():
        m.eval()
    correct, n, loss = validate(rows)
    if world()[1] > 1:
        t = torch.tensor([correct, n, loss], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        correct, n, loss = t.tolist()
    return correct / max(n, 1), loss / max(n, 1)


def _bar(loop: Loop, rank: int, total: int, desc: str):
    if not loop.progress or rank != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False)
