"""``finetune``: a task model (the teacher) from a backbone and labelled data.

``lamina finetune --model minilm --data rotten-tomatoes --out teacher/`` puts a
classification head on the backbone and trains it, the backbone frozen
(default) or fully fine-tuned (``--full``). It writes:

    OUT/model/           the classifier: save_pretrained (AutoModelFor*Classification
                         .from_pretrained loads it) or lamina's format (EfficientNet)
    OUT/finetune.json    the task (data, split seed and fractions, sizes), the
                         history (train loss, validation accuracy per epoch) and
                         the held-out test accuracy
    OUT/checkpoint.*     the last finished epoch, for --resume (deleted when done)

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

from .._cliargs import as_config
from ..errors import UsageError
from ..runtime import describe, oom_message, resolve_device
from ..models import load_model, place, save_json
from ..resume import RESUME, check_resume, rows_hash, same_path
from ..runfolder import check_out, claim, plan_writes, record
from ..verify import save_checked
from ..lm_task import LMTaskSpec
from ..task import TASK_FILE, ClassificationTask, TaskSpec, is_causal_lm, make_task
from ..train import CHECKPOINT, Loop, TrainConfig, fit, init_distributed, loop_field, remove_checkpoint, world
from .heads import attach_head, head_parameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Settings of ``lamina finetune`` (the training loop's: :class:`lamina.train.TrainConfig`)."""

    out: str = field(metadata={"help": "output folder: OUT/model, OUT/finetune.json"})
    full: bool = field(default=False, metadata={
        "help": "fine-tune every weight; default trains only the head (what runs after the last block)"})
    # the training loop's settings are TrainConfig's; these four differ from its defaults or help
    epochs: int = loop_field(6, "passes over the training rows (at most: --patience stops earlier; the best "
                                "epoch is kept)")
    lr: float | None = loop_field(None, "peak learning rate of AdamW (linear warm-up and decay); default 1e-4 "
                                        "with --full, 1e-3 head only")
    seed: int = loop_field(0, "seed of the subsample, the split, the head and the order")
    progress: bool = loop_field(True, "show a progress bar")
    limit: int | None = field(default=None, metadata={
        "help": "use a stratified subsample of this many rows; 0 or unset: all rows"})
    val: float = field(default=0.1, metadata={"help": "fraction of rows held out for validation (early stopping)"})
    test: float = field(default=0.2, metadata={"help": "fraction of rows held out for the test accuracy"})
    max_length: int = field(default=128, metadata={"help": "tokens per text (longer texts are truncated)"})
    seq_len: int = field(default=128, metadata={
        "help": "tokens per packed block when the model is a causal LM (it learns next tokens of the text)"})
    image_size: int | None = field(default=None, metadata={
        "help": "resize images to this side (default: the model's own, 224 for EfficientNet)"})
    text_column: str | None = field(default=None, metadata={"help": "text column of a table"})
    label_column: str | None = field(default=None, metadata={"help": "label column of a table"})
    skip_bad_files: bool = field(default=False, metadata={
        "help": "image folders: leave out files that cannot be decoded (each image is decoded once up front; "
                "the count is shown and recorded) instead of refusing the folder"})
    probe_scores: str | None = field(default=None, metadata={
        "help": "scores.json of `lamina analyze` on the base model and the same data (--limit, --seed): warn when "
                "the fine-tuned test accuracy is below its best frozen linear probe"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a folder", fix="pass --out teacher/")
        super().__post_init__()  # the training loop's settings
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
        # small data (issue 12: MiniLM, 2,400 sentences): 3 epochs at 5e-5 gave 0.555, 6 at 1e-4 0.647;
        # bench/finetune_defaults.py compares the two
        lr = self.lr if self.lr is not None else (1e-4 if self.full else 1e-3)
        return dataclasses.replace(super().loop(), lr=lr)


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
    record: dict = field(repr=False)  # all of finetune.json: printed in full it buries the numbers above

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model, data: str, config: FinetuneConfig) -> FinetuneResult:
    """Train a classifier on ``data`` from ``model`` (anything ``load_model`` takes); see the module doc."""
    config = as_config(FinetuneConfig, config, "finetune")
    rt = config.runtime()
    init_distributed(resolve_device(rt.device))
    rank, size = world()
    out = Path(config.out)
    plan_writes(out, "finetune", writes(), config.overwrite, resume=config.resume, resumable=True)
    check_out(out, config.overwrite, config.resume, CHECKPOINT)
    with claim(out, "finetune", writes(), config.overwrite, resume=config.resume,
               resumable=True, rank=rank):
        return _finetune(model, data, config, out, rank, size)


def writes() -> list[str]:
    """What ``finetune`` (and ``distill``, with distill.json) writes in OUT."""
    return ["model", TASK_FILE, *checkpoint_files(), RESUME]


def checkpoint_files() -> list[str]:
    """The files of the training checkpoint (lamina.train), recorded as lamina's before training writes them."""
    from .. import train
    return list(getattr(train, "CHECKPOINT_FILES", (CHECKPOINT, str(Path(CHECKPOINT).with_suffix(".tmp")))))


def _finetune(model, data: str, config: FinetuneConfig, out: Path, rank: int, size: int) -> FinetuneResult:
    t0, c0 = time.perf_counter(), time.process_time()  # CPU time: far less sensitive than wall to other jobs
    rt = config.runtime()
    base = load_model(model, runtime=rt, for_training=True)  # float32 weights; the forward autocasts
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
                        label_column=config.label_column, skip_bad_files=config.skip_bad_files)
        ds, split = spec.load()
        lm = place(attach_head(base, list(ds.classes)), rt, for_training=True)  # the new head joins the backbone
        if spec.image_size is None and lm.image_size:
            spec = TaskSpec(**{**spec.to_dict(), "image_size": lm.image_size})
        task = ClassificationTask(spec, ds, split)
    split, ds = task.split, task.ds
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
    settings = {**asdict(config), "model": same_path(model), "model_fingerprint": base.fingerprint(),
                "data": same_path(data), "rows": rows_hash(ds, getattr(task, "doc_split", None) or split)}
    check_resume(out, "finetune", settings, config.resume, rank, config)  # before training writes anything
    if rank == 0:
        record(out, "finetune", checkpoint_files())

    def step(rows, gbs):
        for m in frozen:  # a frozen backbone also keeps its dropout off
            m.eval()
        with oom_message(len(rows), "--batch-size", lm.device):
            out_ = lm.forward(task.batch(lm, rows))
        return task.loss_sum(out_, rows) / (gbs * task.units_per_row), {}

    def validate(rows):
        return task.counts(lm, rows)

    loop = dataclasses.replace(config.loop(), best="accuracy" if task.higher_is_better else "loss")
    hist = fit({"model": lm.module}, params, step, split["train"], split["val"], validate, loop,
               out, resume=config.resume, desc="finetune", device=lm.device, dtype=base.compute_dtype)
    for p in lm.module.parameters():
        p.requires_grad_(True)
    test = task.evaluate(lm, split["test"])
    n_params = sum(p.numel() for p in lm.module.parameters())
    warnings, probe = _warnings(hist, test, base, ds, config.probe_scores) if task.kind == "classification" \
        else ([], {"compared": False, "why": "a language-modelling task has no linear probe to compare with"})
    for w in warnings:
        log.warning("finetune: %s", w)
    rec = {"lamina_finetune": 1, "model": base.describe() | {"source": base.source}, "task": task.record(),
           "classes": list(ds.classes) if task.kind == "classification" else None, "metric": task.metric,
           "data": ds.describe(),
           "split_sizes": {k: int(len(v)) for k, v in split.items()},
           "config": asdict(config), "runtime": describe(lm.device, base.compute_dtype),
           "mode": "full" if config.full else "head",
           "parameters": n_params, "trainable_parameters": sum(p.numel() for p in params),
           "history": hist, "test": test, "model_path": str(out / "model"), "warnings": warnings,
           "probe_comparison": probe,
           "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    if rank == 0:
        check = task.batch(lm, (list(split["test"]) or list(split["train"]))[:8])
        fmt, rec["reload_check"] = save_checked(lm, out / "model", base, check, stage="finetune")
        rec["format"] = fmt
        record(out, "finetune", [TASK_FILE, TASK_FILE + ".tmp"])
        save_json(out / TASK_FILE, rec, nulls=("history",))  # null in the history: a loss that was not finite
        remove_checkpoint(out)
        (out / RESUME).unlink(missing_ok=True)
        log.info("finetune: test accuracy %.4f (best val %.4f at epoch %s)", test["accuracy"],
                 hist["best_val_accuracy"], hist["best_epoch"])
    if size > 1:
        torch.distributed.barrier()
    best = hist["best_val_accuracy"]
    return FinetuneResult(str(out), str(out / "model"), test["accuracy"],
                          best if best is not None and not math.isnan(best) else float("nan"),
                          n_params, rec["trainable_parameters"], rec["seconds"], rec)


def _warnings(hist: dict, test: dict, base, ds, probe_scores) -> tuple[list[str], dict]:
    """What a user should know about the result: still improving at the end, or worse than a frozen probe."""
    out = []
    ep = hist.get("epochs") or []
    if len(ep) >= 2 and not hist.get("stopped_early") and hist.get("best_epoch") == ep[-1]["epoch"] \
            and ep[-1]["val_accuracy"] > max(e["val_accuracy"] for e in ep[:-1]):
        out.append(f"validation accuracy was still rising at the last epoch ({ep[-2]['val_accuracy']:.4f} -> "
                   f"{ep[-1]['val_accuracy']:.4f}): more --epochs (or a higher --lr) may give a better model")
    probe = _probe(test, base, ds, probe_scores)
    if probe.get("below"):
        out.append(f"the test accuracy {test['accuracy']:.4f} is below the best frozen linear probe "
                   f"({probe['best_probe']:.4f} at {probe['layer']}) on the same data: train longer, raise --lr, "
                   f"or put the head on {probe['layer']}")
    return out, probe


def _probe(test: dict, base, ds, path) -> dict:
    """The comparison with the base model's best frozen probe, or why it was skipped."""
    import json
    if not path:
        return {"compared": False, "why": "no scores.json given (--probe-scores RUN/scores.json compares)"}
    p = Path(path)
    p = p / "scores.json" if p.is_dir() else p
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError("--probe-scores is not a readable scores.json", value=str(p),
                         allowed="RUN/scores.json from `lamina analyze`", fix="point at RUN/scores.json") from e
    same_model = (s.get("model") or {}).get("fingerprint") == base.fingerprint()
    d = s.get("data") or {}
    same_rows = d.get("name") == ds.name and d.get("n") == len(ds)
    if not (same_model and same_rows):
        return {"compared": False, "why": "the scores are of another model or other rows "
                                          f"(model {'same' if same_model else 'differs'}, "
                                          f"rows {'same' if same_rows else 'differ'})"}
    accs = (s.get("metrics") or {}).get("probe_acc") or []
    vals = [(v, i) for i, v in enumerate(accs) if isinstance(v, (int, float))]
    if not vals:
        return {"compared": False, "why": "the scores have no probe accuracy"}
    best, i = max(vals)
    return {"compared": True, "best_probe": best, "layer": s["layers"][i], "below": test["accuracy"] < best,
            "note": "the probe's test split is the analysis split of the same rows, not the fine-tuning split"}
