"""``finetune``: a task model (the teacher) from a backbone and labelled data.

``lamina finetune --model minilm --data rotten-tomatoes --out teacher/`` puts a
classification head on the backbone and trains it, the backbone frozen
(default) or fully fine-tuned (``--full``). It writes:

    OUT/model/           the classifier: save_pretrained (AutoModelFor*Classification
                         .from_pretrained loads it) or lamina's format (EfficientNet)
    OUT/finetune.json    the task (data, split seed and fractions, sizes), the
                         history (train loss, validation accuracy per epoch) and
                         the held-out test accuracy
    OUT/checkpoint.pt    the last finished epoch, for --resume (deleted when done)

Later stages (``bench``, ``distill``) read the task back from finetune.json,
so every accuracy in lamina is measured on the same test rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..models import load_model, save_json
from ..runfolder import check_out
from ..savefmt import save
from ..lm_task import LMTaskSpec
from ..task import TASK_FILE, ClassificationTask, TaskSpec, is_causal_lm, make_task
from ..train import CHECKPOINT, Loop, check_loop_args, fit, init_distributed, world
from .heads import attach_head, head_parameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``lamina finetune``."""

    out: str = field(metadata={"help": "output folder: OUT/model, OUT/finetune.json"})
    full: bool = field(default=False, metadata={
        "help": "fine-tune every weight; default trains only the head (what runs after the last block)"})
    epochs: int = field(default=3, metadata={"help": "passes over the training rows"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate of AdamW (linear warm-up and decay); default 5e-5 with --full, 1e-3 head only"})
    batch_size: int = field(default=32, metadata={"help": "rows per optimizer step (over all ranks)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    patience: int | None = field(default=2, metadata={
        "help": "stop after this many epochs without a validation gain; the best epoch is kept"})
    limit: int | None = field(default=None, metadata={"help": "use a stratified subsample of this many rows"})
    seed: int = field(default=0, metadata={"help": "seed of the subsample, the split, the head and the order"})
    val: float = field(default=0.1, metadata={"help": "fraction of rows held out for validation (early stopping)"})
    test: float = field(default=0.2, metadata={"help": "fraction of rows held out for the test accuracy"})
    max_length: int = field(default=128, metadata={"help": "tokens per text (longer texts are truncated)"})
    seq_len: int = field(default=128, metadata={
        "help": "tokens per packed block when the model is a causal LM (it learns next tokens of the text)"})
    image_size: int | None = field(default=None, metadata={
        "help": "resize images to this side (default: the model's own, 224 for EfficientNet)"})
    text_column: str | None = field(default=None, metadata={"help": "text column of a table"})
    label_column: str | None = field(default=None, metadata={"help": "label column of a table"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from OUT/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace what OUT already holds"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a folder", fix="pass --out teacher/")
        check_loop_args(self.epochs, self.lr, self.batch_size, self.patience)
        for name in ("val", "test"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 0.5:
                raise UsageError(f"--{name} must be a fraction in (0, 0.5)", value=v, allowed="0 < f < 0.5",
                                 fix=f"e.g. --{name} 0.2")
        if self.max_length < 1 or (self.image_size is not None and self.image_size < 8):
            raise UsageError("--max-length must be >= 1 and --image-size >= 8",
                             value=(self.max_length, self.image_size), allowed="positive sizes",
                             fix="e.g. --max-length 128 --image-size 64")

    def loop(self) -> Loop:
        lr = self.lr if self.lr is not None else (5e-5 if self.full else 1e-3)
        return Loop(epochs=self.epochs, lr=lr, batch_size=self.batch_size, weight_decay=self.weight_decay,
                    patience=self.patience, seed=self.seed, progress=self.progress)


@dataclass
class FinetuneResult:
    """What ``finetune`` wrote: paths, accuracies and sizes (``finetune.json`` holds all of it)."""

    out: str
    model_path: str
    test_accuracy: float
    best_val_accuracy: float
    parameters: int
    trainable_parameters: int
    seconds: float
    record: dict

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model, data: str, config: FinetuneConfig) -> FinetuneResult:
    """Train a classifier on ``data`` from ``model`` (anything ``load_model`` takes); see the module doc."""
    init_distributed()
    rank, size = world()
    t0 = time.perf_counter()
    out = Path(config.out)
    check_out(out, config.overwrite, config.resume, CHECKPOINT)
    base = load_model(model)
    if is_causal_lm(base):  # a decoder LM learns next tokens of the text: no head to attach
        if not config.full:
            raise UsageError("fine-tuning a causal language model trains every weight", value=base.name,
                             allowed="--full with a causal LM", fix="pass --full")
        if config.label_column:
            raise UsageError("a language model learns from text alone; --label-column does not apply",
                             value=config.label_column, allowed="--text-column", fix="drop --label-column")
        spec = LMTaskSpec(data=str(data), limit=config.limit, seed=config.seed, val=config.val, test=config.test,
                          seq_len=config.seq_len, text_column=config.text_column)
        task, lm = make_task(spec, base), base
    else:
        spec = TaskSpec(data=str(data), limit=config.limit, seed=config.seed, val=config.val, test=config.test,
                        max_length=config.max_length, image_size=config.image_size, text_column=config.text_column,
                        label_column=config.label_column)
        ds, split = spec.load()
        lm = attach_head(base, list(ds.classes))
        if spec.image_size is None and lm.image_size:
            spec = TaskSpec(**{**spec.to_dict(), "image_size": lm.image_size})
        task = ClassificationTask(spec, ds, split)
    split = task.split
    names = None
    if not config.full:
        probe_batch = task.batch(lm, split["train"][:2])
        names = set(head_parameters(lm, probe_batch))
        if not names:
            raise UsageError("found no parameters after the last block to train as the head",
                             value=type(lm.module).__name__, allowed="a model with a head after its blocks",
                             fix="pass --full to fine-tune every weight")
    params = []
    for n, p in lm.module.named_parameters():
        p.requires_grad_(names is None or n in names)
        if p.requires_grad:
            params.append(p)
    frozen = [lm.module.get_submodule(p) for p in lm.blocks.block_paths] if names is not None else []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    def step(rows, gbs):
        for m in frozen:  # a frozen backbone also keeps its dropout off
            m.eval()
        out_ = lm.forward(task.batch(lm, rows))
        return task.loss_sum(out_, rows) / (gbs * task.units_per_row), {}

    def validate(rows):
        return task.counts(lm, rows)

    loop = dataclasses.replace(config.loop(), best="accuracy" if task.higher_is_better else "loss")
    hist = fit({"model": lm.module}, params, step, split["train"], split["val"], validate, loop,
               out, resume=config.resume, desc="finetune")
    for p in lm.module.parameters():
        p.requires_grad_(True)
    test = task.evaluate(lm, split["test"])
    n_params = sum(p.numel() for p in lm.module.parameters())
    rec = {"lamina_finetune": 1, "model": base.describe() | {"source": base.source}, "task": task.record(),
           "classes": list(task.ds.classes) if task.kind == "classification" else None, "metric": task.metric,
           "split_sizes": {k: int(len(v)) for k, v in split.items()},
           "config": asdict(config), "mode": "full" if config.full else "head",
           "parameters": n_params, "trainable_parameters": sum(p.numel() for p in params),
           "history": hist, "test": test, "model_path": str(out / "model"),
           "seconds": time.perf_counter() - t0}
    if rank == 0:
        fmt = save(lm, out / "model", base)
        rec["format"] = fmt
        save_json(out / TASK_FILE, rec)
        ck = out / CHECKPOINT
        if ck.exists():
            ck.unlink()
        log.info("finetune: test accuracy %.4f (best val %.4f at epoch %s)", test["accuracy"],
                 hist["best_val_accuracy"], hist["best_epoch"])
    if size > 1:
        torch.distributed.barrier()
    best = hist["best_val_accuracy"]
    return FinetuneResult(str(out), str(out / "model"), test["accuracy"],
                          best if best is not None and not math.isnan(best) else float("nan"),
                          n_params, rec["trainable_parameters"], rec["seconds"], rec)
