"""What every task-model stage shares: the split, batches, logits and accuracy.

``finetune`` writes a teacher, ``bench`` and ``distill`` read it back; they
must all see the same train / validation / test rows. The split is a pure
function of (data, limit, seed, fractions), recorded in the teacher's
``finetune.json`` as its ``task`` section, so a later stage rebuilds the same
rows from that record instead of storing indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .errors import UsageError
from .files import read_json

TASK_FILE = "finetune.json"


@dataclass(frozen=True)
class TaskSpec:
    """Which rows a task model is trained and tested on (all of it is recorded).

    Attributes:
        data: the data spec (bundled name or path).
        limit: stratified subsample size before splitting (None: all rows).
        seed: seed of the subsample and of the split.
        val, test: fractions of the rows held out for validation and test.
        max_length: tokens per text (text models).
        image_size: side images are resized to (None: the model's default).
        text_column, label_column: columns of a table.
        skip_bad_files: leave out image files that cannot be decoded.
    """

    data: str
    limit: int | None = None
    seed: int = 0
    val: float = 0.1
    test: float = 0.2
    max_length: int = 128
    image_size: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    skip_bad_files: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def load(self):
        """(dataset, {'train','val','test'} -> int64 row indices)."""
        from .analyze.metrics.split import stratified_split
        from .data import check_labels, load_data, subsample
        ds = subsample(load_data(self.data, self.text_column, self.label_column, self.skip_bad_files), self.limit,
                       self.seed, min_per_class=3)
        check_labels(ds, min_per_class=3)
        return ds, stratified_split(ds.labels, (1 - self.val - self.test, self.val, self.test), self.seed)


class Task(Protocol):
    """What every training and scoring stage needs of a task, whatever its kind.

    Two implementations: :class:`ClassificationTask` (labelled rows, accuracy)
    and :class:`lamina.lm_task.LMTask` (packed text blocks, perplexity). A
    "row" is what the training loop shuffles: a sample, or a block of tokens.

    Attributes:
        kind: 'classification' or 'lm'.
        metric: the headline metric's name ('accuracy', 'perplexity').
        higher_is_better: whether a larger metric is better.
        split: {'train','val','test'} -> row indices.
        units_per_row: predictions per row (1, or seq_len - 1 next tokens):
            a loss summed over a batch, divided by rows * this, is a mean.
    """

    kind: str
    metric: str
    higher_is_better: bool
    split: dict
    units_per_row: int

    def record(self) -> dict: ...
    def batch(self, lm, rows) -> dict: ...
    def batches(self, lm, rows, batch_size: int): ...
    def loss_sum(self, out, rows) -> torch.Tensor: ...
    def align(self, logits: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]: ...
    def train_rows(self, limit: int | None, seed: int) -> np.ndarray: ...
    def counts(self, lm, rows, batch_size: int = ...) -> tuple[int, int, float]: ...
    def summarize(self, correct: int, n: int, loss: float) -> dict: ...
    def evaluate(self, lm, rows, batch_size: int = ...) -> dict: ...


class ClassificationTask:
    """Labelled rows, cross-entropy and accuracy (the functions below, behind the Task interface)."""

    kind = "classification"
    metric = "accuracy"
    higher_is_better = True
    units_per_row = 1

    def __init__(self, spec: TaskSpec, ds=None, split=None):
        self.spec = spec
        self.ds, self.split = (ds, split) if ds is not None else spec.load()
        self._labels = torch.as_tensor(self.ds.labels)

    def record(self) -> dict:
        return self.spec.to_dict()

    def batch(self, lm, rows) -> dict:
        return lm.batch(self.ds, rows, self.spec.max_length, self.spec.image_size)

    def batches(self, lm, rows, batch_size: int):
        rows = np.asarray(rows)
        for s in range(0, len(rows), batch_size):
            yield self.batch(lm, rows[s:s + batch_size])

    def loss_sum(self, out, rows) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits_of(out).float(), self._labels[np.asarray(rows)],
                                                 reduction="sum")

    def train_rows(self, limit: int | None, seed: int) -> np.ndarray:
        """The training rows, or a stratified subsample of ``limit`` of them (chosen by ``seed``)."""
        rows = np.asarray(self.split["train"])
        if not limit or limit >= len(rows):
            return rows
        from .data import subsample
        keep = set(subsample(self.ds.take(rows), limit, seed).ids.tolist())
        return np.array([r for r in rows if self.ds.ids[r] in keep])

    def align(self, logits: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, their targets): the class scores (B, K) and the rows' labels (B,)."""
        return logits, self._labels[np.asarray(rows)]

    def counts(self, lm, rows, batch_size: int = 64) -> tuple[int, int, float]:
        return counts(lm, self.ds, rows, self.spec, batch_size)

    def summarize(self, correct: int, n: int, loss: float) -> dict:
        return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n, "metric": self.metric}

    def evaluate(self, lm, rows, batch_size: int = 64) -> dict:
        return evaluate(lm, self.ds, rows, self.spec, batch_size) | {"metric": self.metric}


def spec_from_record(rec: dict):
    """A TaskSpec or LMTaskSpec from a recorded task section (extra recorded keys ignored)."""
    from .lm_task import LMTaskSpec
    cls = LMTaskSpec if rec.get("kind") == "lm" else TaskSpec
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in rec.items() if k in names})


def is_causal_lm(lm) -> bool:
    """Whether ``lm`` predicts next tokens (a ``*ForCausalLM``): its task is language modelling."""
    archs = getattr(getattr(lm.module, "config", None), "architectures", None) or []
    return any(str(a).endswith("ForCausalLM") or str(a).endswith("LMHeadModel") for a in archs) or \
        type(lm.module).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def default_spec(lm, data: str, seq_len: int = 128, **kw):
    """The task a model is measured on when no record names one: LM for a causal LM, else classification."""
    from .lm_task import LMTaskSpec
    if is_causal_lm(lm):
        return LMTaskSpec(data=str(data), seq_len=seq_len, **kw)
    return TaskSpec(data=str(data), **kw)


def teacher_spec(teacher_src, teacher, data=None, seq_len: int = 128):
    """The task a teacher (distill, elastic) is trained against: its own record, with ``data`` replacing the
    record's data where given; without a record, ``data`` read as an LM task for a causal LM, else as labelled
    classification. Refuses a teacher that is neither a classifier nor a causal LM, and fills an image model's
    input size from the model."""
    import dataclasses
    from pathlib import Path as _P
    spec = read_task(teacher_src) if isinstance(teacher_src, (str, _P)) else None
    if spec is None:
        if not data:
            raise UsageError("the teacher has no task record, so the data is unknown", value=str(teacher_src),
                             allowed="a `lamina finetune` folder, or --data", fix="pass --data DATA")
        spec = default_spec(teacher, data, seq_len=seq_len)
    elif data and data != spec.data:
        spec = dataclasses.replace(spec, data=data, limit=None)
    lm_task = getattr(spec, "kind", "classification") == "lm"
    if not lm_task and num_classes(teacher) is None:
        raise UsageError("the teacher is neither a classifier nor a causal language model lamina knows",
                         value=str(teacher_src),
                         allowed="a `lamina finetune` output, a *ForSequenceClassification/ImageClassification "
                                 "folder, or a causal LM with --data text",
                         fix="fine-tune it first: lamina finetune --model M --data D --out T")
    if not lm_task and spec.image_size is None and teacher.image_size:
        spec = dataclasses.replace(spec, image_size=teacher.image_size)
    return spec


def make_task(spec, lm) -> Task:
    """The Task of ``spec`` prepared for ``lm`` (an LM task tokenizes and packs with its tokenizer)."""
    from .lm_task import LMTaskSpec
    return spec.prepare(lm) if isinstance(spec, LMTaskSpec) else ClassificationTask(spec)


def read_task(model_dir, _depth: int = 0) -> TaskSpec | None:
    """The TaskSpec a model folder was trained on, or None.

    A ``lamina finetune`` folder records it in finetune.json; a ``lamina prune``
    output points at its source model (plan.json), a ``lamina distill`` output
    at its teacher (distill.json), a ``lamina quantize`` output records its
    calibration task or its source model (quant_plan.json); all are followed.
    """
    p = Path(str(model_dir))
    if _depth > 4 or not p.is_dir():
        return None
    for cand in (p / TASK_FILE, p.parent / TASK_FILE):  # OUT, or the OUT of an OUT/model path
        if cand.exists():
            rec = read_json(cand, "the task record of a fine-tuned model").get("task")
            if rec:
                return spec_from_record(rec)
    for fname, key in (("plan.json", ("result", "source")), ("distill.json", ("task",)), ("elastic.json", ("task",)),
                       ("extract.json", ("task",)), ("quant_plan.json", ("task",)), ("quant_plan.json", ("source",))):
        # OUT/model is what a user points at after distill or elastic extract; the stage file sits in OUT
        f = next((c for c in (p / fname, p.parent / fname if p.name == "model" else None) if c and c.exists()), None)
        if f is not None:
            rec = read_json(f)
            for k in key:
                rec = (rec or {}).get(k) if isinstance(rec, dict) else None
            if isinstance(rec, dict):
                return spec_from_record(rec)
            if isinstance(rec, str):
                return read_task(rec, _depth + 1)
    return None


def batches(lm, ds, idx, batch_size: int, spec: TaskSpec):
    """Model inputs for rows ``idx`` in order, ``batch_size`` at a time: yields (batch, labels)."""
    idx = np.asarray(idx)
    for s in range(0, len(idx), batch_size):
        rows = idx[s:s + batch_size]
        yield lm.batch(ds, rows, spec.max_length, spec.image_size), torch.as_tensor(ds.labels[rows])


def logits_of(out) -> torch.Tensor:
    """The class scores in a model's output (HF ``.logits``, a tuple's first item, or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UsageError("the model's output holds no class scores", value=type(out).__name__,
                     allowed="a classifier: a tensor (B, classes) or an output with .logits",
                     fix="fine-tune a head first: `lamina finetune --model M --data D --out teacher/`")


def num_classes(lm) -> int | None:
    """How many classes the model predicts (None when it is not a classifier lamina knows)."""
    cfg = getattr(lm.module, "config", None)
    if cfg is not None and getattr(cfg, "architectures", None) and any(
            a.endswith("Classification") for a in cfg.architectures):
        return int(cfg.num_labels)
    fc = getattr(lm.module, "_fc", None)
    if fc is not None and hasattr(fc, "out_features"):
        return int(fc.out_features)
    return None


@torch.no_grad()
def counts(lm, ds, idx, spec: TaskSpec, batch_size: int = 64) -> tuple[int, int, float]:
    """(correct, rows, summed cross-entropy) of ``lm`` on rows ``idx``, in its current mode."""
    correct, loss, n = 0, 0.0, 0
    for b, y in batches(lm, ds, idx, batch_size, spec):
        z = logits_of(lm.forward(b)).float()
        y = y.to(z.device)
        check_classes(z.shape[-1], ds)
        correct += int((z.argmax(-1) == y).sum())
        loss += float(torch.nn.functional.cross_entropy(z, y, reduction="sum"))
        n += len(y)
    return correct, n, loss


def evaluate(lm, ds, idx, spec: TaskSpec, batch_size: int = 64) -> dict:
    """Accuracy and mean cross-entropy of ``lm`` on rows ``idx`` (eval mode)."""
    was = lm.module.training
    lm.module.eval()
    try:
        correct, n, loss = counts(lm, ds, idx, spec, batch_size)
    finally:
        lm.module.train(was)
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


def check_classes(n_out: int, ds) -> None:
    if n_out != len(ds.classes):
        raise UsageError("the model predicts another number of classes than the data has", value=n_out,
                         allowed=f"{len(ds.classes)} ({', '.join(ds.classes[:6])}{'...' if len(ds.classes) > 6 else ''})",
                         fix="use the data the model was fine-tuned on, or fine-tune it on this data")
