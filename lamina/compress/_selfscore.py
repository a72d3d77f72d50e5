"""Block importance for ``prune`` when no ``--scores`` is given.

A fine-tuned model (``lamina finetune``'s OUT) records its task in
``finetune.json``: the data, the limit and seed of the subsample, and the
split. ``prune teacher/`` rebuilds that task's *training* rows (never the test
rows the later stages report on), takes a stratified ``calibration_samples``
of them (seed: the task's), and scores every block on them with the same
:func:`lamina.analyze.block_importance` ``lamina analyze`` runs, so the result
is the ``importance`` section analyze would write for those rows.

The rows are exactly what ``capture`` + ``analyze`` see when given the same
samples, which is what the equivalence test checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..task import TaskSpec, read_task

log = logging.getLogger(__name__)

BATCH_SIZE = 32  # capture's default batch size, so the sums run in the same order as analyze's


def calibration_rows(spec: TaskSpec, n: int):
    """The task's training rows, stratified subsample of ``n`` (seed: the task's): a Dataset."""
    from ..data import subsample
    ds, split = spec.load()
    train = ds.take(split["train"])
    return subsample(train, n, spec.seed) if n < len(train) else train


def task_of(model) -> TaskSpec | None:
    """The task record of a model folder (``teacher/`` or ``teacher/model``), or None."""
    if not isinstance(model, (str, Path)) or not Path(str(model)).is_dir():
        return None
    return read_task(model)


def no_task_error(model, out: str, budget: str) -> UsageError:
    return UsageError(
        "prune needs block importance: --scores, or a fine-tuned model whose task record (finetune.json) says "
        "which rows to score it on", value=str(model),
        allowed="a `lamina finetune` OUT folder (prune scores it on its own training rows), or --scores "
                "RUN/scores.json of this very model",
        fix=f"lamina capture --model {model} --data DATA --out run && lamina analyze run && "
            f"lamina prune {model} --scores run/scores.json {budget} --out {out}")


def self_scores(lm, spec: TaskSpec, samples: int, progress: bool = False) -> tuple[dict, list, list | None]:
    """(a scores dict with ``importance`` measured on the task's calibration rows, those rows' batches,
    their labels per batch (None for a task without class labels))."""
    from ..analyze.analyze import _importance_dict, _imp_def
    from ..analyze.importance import block_importance
    rows = calibration_rows(spec, samples)
    log.info("prune: scoring %d blocks on %d training rows of %s", lm.blocks.n_blocks, len(rows), spec.data)
    batches = [lm.batch(rows, range(s, min(len(rows), s + BATCH_SIZE)), spec.max_length, spec.image_size)
               for s in range(0, len(rows), BATCH_SIZE)]
    imp = block_importance(lm, batches, progress=progress)
    scores = {"model": lm.describe(), "data": rows.describe(),
              "importance": _importance_dict(imp),
              "definitions": {"block_influence": _imp_def("block_influence"), "skip_nmse": _imp_def("skip_importance")},
              "computed_by": "prune", "rows": {"task": spec.to_dict(), "split": "train", "n": len(rows),
                                               "seed": spec.seed}}
    from ..task import is_causal_lm
    y = getattr(rows, "labels", None)
    labels = None if y is None or is_causal_lm(lm) else [
        torch.as_tensor(np.asarray(y[s:s + BATCH_SIZE])) for s in range(0, len(rows), BATCH_SIZE)]
    return scores, batches, labels
