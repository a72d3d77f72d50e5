"""``distill``: train a small student to match its teacher (SKT recovery).

``lamina distill --teacher teacher/ --student small/ --out recovered/``
(``distill(teacher, student, config)`` in Python):

- **Teacher**: a ``lamina finetune`` folder (its task record gives the data,
  the split and the test rows) or any classifier with ``--data``.
- **Student**: a ``lamina prune`` output (depth or width), any classifier
  folder, or ``--width 0.5|0.25``: an SKT-style narrow copy of the teacher
  initialized from its most important channels. ``--scratch`` re-initializes
  the student's weights (the "same small model trained from scratch" baseline).
- **Layer map** (which teacher block each student block learns from): from
  the student's ``plan.json`` (a kept block learns from its own original);
  otherwise identity when the depths match, else evenly spaced (student block
  j <- teacher block round((j+1) * N_t / N_s) - 1); ``--layer-map 0:1,1:3``
  overrides it.
- **Losses** (``lamina.distill.losses``; each weight a flag): task CE, KD on
  temperature-softened logits, SKT cosine at every mapped block output (through
  a learned adapter: identity-initialized linear / 1x1 conv), SKT FSP between
  every pair of mapped taps, optional I2CL centre loss on the student's
  mean-pooled last block output. Parts with weight 0 are not computed, and the
  teacher is not run at all when no part needs it.
- **Teacher correction** (Minitron, causal LMs): ``--teacher-correction N``
  fine-tunes a copy of the teacher with next-token CE for N steps first and
  distills toward that copy (``._correct``: cached in OUT/corrected-teacher as
  safetensors + sha256; distill.json's ``teacher_used`` says which teacher).
- **Training**: ``lamina.train.fit`` (AdamW, warm-up/decay, checkpoints every
  epoch, ``--resume``, early stopping on validation accuracy, torchrun).

Writes OUT/model (a normal model: save_pretrained, or lamina's format) and
OUT/distill.json (loss curves per epoch, validation accuracy per epoch, test
accuracy of student and teacher, the map, the weights).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .._cliargs import as_config
from ..errors import UsageError
from ..files import read_json
from ..runtime import describe, oom_message, resolve_device
from ..models import LoadedModel, load_model, place, random_init, recalibrate_bn, save_json
from ..task import check_classes, logits_of, make_task, num_classes, teacher_spec
from ..resume import RESUME, check_resume, rows_hash, same_path
from ..runfolder import check_out, claim, plan_writes
from ..runfolder import record as record_files
from ..verify import save_checked
from ..train import CHECKPOINT, TrainConfig, fit, init_distributed, loop_field, remove_checkpoint, world
from .losses import CenterLoss, LossWeights, make_adapters, total_loss
from .taps import record

log = logging.getLogger(__name__)
_W = {f.name: dict(f.metadata) for f in fields(LossWeights)}


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Settings of ``lamina distill`` (the training loop's: :class:`lamina.train.TrainConfig`)."""

    out: str = field(metadata={"help": "output folder: OUT/model, OUT/distill.json"})
    width: float | None = field(default=None, metadata={
        "help": "instead of a student: a narrow copy of the teacher with this fraction of its channels "
                "(e.g. 0.5, 0.25), initialized from the most important ones"})
    scratch: bool = field(default=False, metadata={
        "help": "re-initialize the student's weights (baseline: the small model trained from scratch)"})
    data: str | None = field(default=None, metadata={
        "help": "labelled data; default: the teacher's own (finetune.json), with its split. A causal LM teacher "
                "learns next tokens of this text instead (packed blocks of --seq-len tokens, perplexity)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed block when the task is language modelling"})
    ce: float = field(default=1.0, metadata=_W.get("ce", {}))
    kd: float = field(default=1.0, metadata=_W.get("kd", {}))
    temperature: float = field(default=2.0, metadata=_W.get("temperature", {}))
    cosine: float = field(default=0.5, metadata=_W.get("cosine", {}))
    fsp: float = field(default=0.5, metadata=_W.get("fsp", {}))
    center: float = field(default=0.0, metadata=_W.get("center", {}))
    taps: str = field(default="all", metadata={
        "help": "which mapped blocks feed the cosine / FSP losses: 'all', or 'stages' (the last block before each "
                "change of width, and the last block: SKT's per-stage taps, fewer FSP pairs for CNNs)",
        "choices": ("all", "stages")})
    layer_map: str | None = field(default=None, metadata={
        "help": "student block : teacher block pairs, e.g. '0:1,1:3,2:5' (default: from plan.json)"})
    seed: int = loop_field(0, "seed of the order, the adapters and a re-initialized student")
    train_limit: int | None = field(default=None, metadata={
        "help": "train on at most this many of the training rows (stratified); validation and test stay whole"})
    teacher_correction: int = field(default=0, metadata={
        "help": "Minitron's teacher correction (causal LMs): first fine-tune a copy of the teacher with next-token "
                "CE for this many steps of --batch-size training blocks (peak --lr, warm-up and decay), then distill "
                "toward it instead of the original; kept in OUT/corrected-teacher (safetensors + sha256) and reused "
                "by a later run into OUT with the same settings. 0: distill toward the teacher as given"})
    teacher_correction_lr: float | None = field(default=None, metadata={
        "help": "peak learning rate of the teacher correction (default: --lr)"})
    calibration_samples: int = field(default=256, metadata={
        "help": "training rows whose activations rank the channels of a --width copy and re-estimate a "
                "BatchNorm student's running statistics before each validation"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a path", fix="pass --out PATH")
        if self.width is not None and (isinstance(self.width, bool) or not 0 < self.width < 1):
            raise UsageError("--width must be a fraction in (0, 1)", value=self.width, allowed="e.g. 0.5 or 0.25",
                             fix="--width 0.25")
        super().__post_init__()  # the training loop's settings
        self.weights()  # validates them
        if self.layer_map is not None:
            parse_layer_map(self.layer_map)
        if isinstance(self.teacher_correction, bool) or not isinstance(self.teacher_correction, int) \
                or self.teacher_correction < 0:
            raise UsageError("--teacher-correction must be a whole number of steps >= 0", value=self.teacher_correction,
                             allowed="0 (off) or a positive integer", fix="--teacher-correction 64")
        if self.teacher_correction_lr is not None and not (isinstance(self.teacher_correction_lr, (int, float))
                                                           and not isinstance(self.teacher_correction_lr, bool)
                                                           and 0 < self.teacher_correction_lr < 1):
            raise UsageError("--teacher-correction-lr must be a learning rate in (0, 1)",
                             value=self.teacher_correction_lr, allowed="e.g. 1e-5; default: --lr",
                             fix="--teacher-correction-lr 1e-5")
        if self.taps not in ("all", "stages"):
            raise UsageError("unknown --taps", value=self.taps, allowed="all, stages", fix="--taps stages")

    def weights(self) -> LossWeights:
        return LossWeights(ce=self.ce, kd=self.kd, temperature=self.temperature, cosine=self.cosine, fsp=self.fsp,
                           center=self.center)


def parse_layer_map(text: str) -> dict[int, int]:
    """'0:1,1:3' -> {0: 1, 1: 3} (student block -> teacher block)."""
    out = {}
    try:
        for pair in text.split(","):
            s, t = pair.split(":")
            out[int(s)] = int(t)
    except ValueError as e:
        raise UsageError("--layer-map must be student:teacher pairs of block indices", value=text,
                         allowed="e.g. '0:1,1:3,2:5'", fix="--layer-map 0:1,1:3,2:5") from e
    return out


def layer_map(n_teacher: int, n_student: int, student_dir: Path | None, custom: str | None) -> tuple[dict, str]:
    """Student block -> teacher block, and where the map came from."""
    if custom:
        m = parse_layer_map(custom)
        bad = {s: t for s, t in m.items() if not (0 <= s < n_student and 0 <= t < n_teacher)}
        if bad:
            raise UsageError("--layer-map names blocks that do not exist", value=bad,
                             allowed=f"student 0..{n_student - 1}, teacher 0..{n_teacher - 1}",
                             fix="check the block indices")
        return m, "custom"
    plan = student_dir / "plan.json" if student_dir is not None else None
    if plan is not None and plan.exists():
        rec = read_json(plan, "the plan that made the student")
        removed = set((rec.get("depth") or {}).get("remove") or [])
        kept = [i for i in range(n_teacher) if f"blocks.{i}" not in removed]
        if len(kept) == n_student:
            return {j: t for j, t in enumerate(kept)}, "plan"
    if n_teacher == n_student:
        return {j: j for j in range(n_student)}, "identity"
    return {j: round((j + 1) * n_teacher / n_student) - 1 for j in range(n_student)}, "even"


@dataclass
class DistillResult:
    """What ``distill`` wrote (``distill.json`` holds all of it)."""

    out: str
    model_path: str
    test_accuracy: float
    teacher_test_accuracy: float
    accuracy_retained: float
    record: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _student(student, config: DistillConfig, teacher: LoadedModel, task) -> tuple[LoadedModel, Path | None]:
    if config.width is not None:
        from .narrow import narrow_copy
        calib = task.split["train"][: config.calibration_samples]
        bats = list(task.batches(teacher, calib, 32))
        return place(narrow_copy(teacher, config.width, bats), config.runtime(), for_training=True), None
    path = Path(str(student)) if isinstance(student, (str, Path)) else None
    return load_model(student if path is None else str(path), runtime=config.runtime(), for_training=True), path


def distill(teacher, student=None, config: DistillConfig | None = None) -> DistillResult:
    """Train ``student`` to match ``teacher``; see the module doc.

    Args:
        teacher: a ``lamina finetune`` folder or a classifier folder (anything ``load_model`` takes).
        student: a ``lamina prune`` output or a classifier folder; None with ``config.width`` (a narrow
            copy of the teacher).
        config: a :class:`DistillConfig`.
    """
    config = as_config(DistillConfig, config, "distill")  # None or anything else: a TypeError naming the class
    if (student is None) == (config.width is None):
        raise UsageError("give exactly one of a student and --width", value=(student, config.width),
                         allowed="--student small/ (a pruned model) or --width 0.25 (a narrow copy)",
                         fix="pass --student OUT_OF_PRUNE, or --width 0.5")
    rt = config.runtime()
    init_distributed(resolve_device(rt.device))
    rank, size = world()
    out = Path(config.out)
    plan_writes(out, "distill", writes(), config.overwrite, resume=config.resume, resumable=True)
    check_out(out, config.overwrite, config.resume, CHECKPOINT)
    with claim(out, "distill", writes(), config.overwrite, resume=config.resume,
               resumable=True, rank=rank):
        return _distill(teacher, student, config, out, rank, size)


def writes() -> list[str]:
    """What ``distill`` writes in OUT."""
    from ..finetune.finetune import checkpoint_files
    from ._correct import files
    return ["model", "distill.json", *checkpoint_files(), RESUME, *files()]


def _distill(teacher, student, config: DistillConfig, out: Path, rank: int, size: int) -> DistillResult:
    from ..finetune.finetune import checkpoint_files
    t0 = time.perf_counter()
    rt = config.runtime()
    teacher_src = teacher
    # The teacher is never trained: it is read straight in the compute dtype (--torch-dtype; bfloat16 halves
    # its memory), except for --width, whose student is sliced from the teacher's full-precision weights
    # (the teacher is cast once the student exists).
    teacher = load_model(teacher, runtime=rt, for_training=config.width is not None)  # a missing teacher is named first
    spec = teacher_spec(teacher_src, teacher, config.data, config.seq_len)
    lm_task = getattr(spec, "kind", "classification") == "lm"
    if lm_task and config.center > 0:
        raise UsageError("the centre loss needs class labels; a language-modelling task has none", value=config.center,
                         allowed="--center 0 for a causal LM", fix="drop --center")
    task = make_task(spec, teacher)
    split = task.split
    student_src = student
    student, student_dir = _student(student, config, teacher, task)
    if teacher.dtype != teacher.compute_dtype:
        teacher = place(teacher, rt)  # the --width copy is made: the teacher now runs in the compute dtype
    if config.scratch:
        student = random_init(student, seed=config.seed)
    used = {"teacher": "original", "path": str(teacher_src)}
    if config.teacher_correction:
        if not lm_task:
            raise UsageError("--teacher-correction fine-tunes a causal LM teacher on next tokens; this task is "
                             "classification", value=config.teacher_correction, allowed="0 for a classifier",
                             fix="drop --teacher-correction (fine-tune the teacher with lamina finetune instead)")
        from ._correct import corrected_teacher  # after the student: a --width copy is cut from the original
        original_test = _teacher_test(teacher_src, teacher, task)
        teacher, used = corrected_teacher(teacher, task, config, out, rank, size)
        used["test"] = task.evaluate(teacher, split["test"])
    if not lm_task:
        if num_classes(student) != num_classes(teacher):
            raise UsageError("the student predicts another number of classes than the teacher",
                             value=num_classes(student), allowed=str(num_classes(teacher)),
                             fix="prune the teacher itself (lamina prune TEACHER ...) to make the student")
        check_classes(num_classes(teacher), task.ds)
    train_rows = task.train_rows(config.train_limit, config.seed)
    n_t, n_s = teacher.blocks.n_blocks, student.blocks.n_blocks
    lmap, map_source = layer_map(n_t, n_s, student_dir, config.layer_map)
    if config.taps == "stages":
        lmap = _stage_ends(student, lmap)
    s_paths = [student.blocks.block_paths[j] for j in sorted(lmap)]
    t_paths = [teacher.blocks.block_paths[lmap[j]] for j in sorted(lmap)]
    w = config.weights()
    notes = []
    if w.fsp > 0 and len(s_paths) < 2:  # FSP relates pairs of taps; a one-block student has none
        w = dataclasses.replace(w, fsp=0.0)
        notes.append("fsp weight set to 0: the student has a single mapped block, so no pair of taps")
        log.warning(notes[-1])
    need_feats = w.cosine > 0 or w.fsp > 0 or w.center > 0
    shared = [who for who, m in (("teacher", teacher), ("student", student)) if m.blocks.shared]
    if need_feats and shared:  # feature taps are read per module: one module that is k blocks has one output
        raise UsageError(f"the {' and '.join(shared)} runs one layer as several blocks (ALBERT), so its blocks have "
                         "no outputs of their own to distill features from", value=shared,
                         allowed="--cosine 0 --fsp 0 --center 0 (logit distillation only) for such models",
                         fix="pass --cosine 0 --fsp 0 --center 0")
    need_teacher = w.kd > 0 or w.cosine > 0 or w.fsp > 0
    teacher.module.eval()
    for p in teacher.module.parameters():
        p.requires_grad_(False)

    def run(rows):
        b = task.batch(student, rows)
        mask = b.get("attention_mask")
        t_logits, t_feats = None, None
        if need_teacher:
            tb = b if teacher.dtype == student.dtype else {  # float inputs (pixels) in the teacher's dtype
                k: v.to(teacher.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b.items()}
            with torch.no_grad(), record(teacher.module, t_paths) as tf:
                t_logits = logits_of(teacher.forward(tb)).float()
                t_feats = [tf[p] for p in t_paths]
        if need_feats:
            with record(student.module, s_paths) as sf:
                s_logits = logits_of(student.forward(b)).float()
                s_feats = [sf[p] for p in s_paths]
        else:
            s_logits, s_feats = logits_of(student.forward(b)).float(), None
        return s_logits, s_feats, t_logits, t_feats, mask

    # adapters (student width -> teacher width) and centres, shaped from one real batch
    torch.manual_seed(config.seed)
    extra = torch.nn.ModuleDict()
    if need_feats:
        with torch.no_grad():
            _, s_f, _, t_f, _ = run(split["train"][:2])
        if w.cosine > 0 or w.fsp > 0:
            extra["adapters"] = make_adapters(s_f, t_f)
        if w.center > 0:
            extra["center"] = CenterLoss(len(task.ds.classes), s_f[-1].shape[1 if s_f[-1].dim() == 4 else -1])

    def step(rows, gbs):
        with oom_message(len(rows), "--batch-size", student.device):
            s_logits, s_feats, t_logits, t_feats, mask = run(rows)
        cfeats = None
        if w.center > 0:
            last = s_feats[-1]
            if last.dim() == 4:
                cfeats = last.mean((2, 3))
            elif mask is not None:
                m = mask.unsqueeze(-1).to(last.dtype)
                cfeats = (last * m).sum(1) / m.sum(1).clamp(min=1)
            else:
                cfeats = last.mean(1)
        s_pred, labels = task.align(s_logits, rows)  # an LM: every position predicts the next token
        t_pred = task.align(t_logits, rows)[0] if t_logits is not None else None
        loss, parts = total_loss(w, student_logits=s_pred, teacher_logits=t_pred, labels=labels,
                                 student_feats=s_feats, teacher_feats=t_feats,
                                 adapters=extra["adapters"] if "adapters" in extra else None, masks=mask,
                                 center=extra["center"] if "center" in extra else None, center_feats=cfeats)
        scale = len(rows) / gbs  # batch means -> this rank's share of the global mean
        return loss * scale, {k: torch.tensor(v * scale, device=loss.device) for k, v in parts.items() if k != "total"}

    calib = list(task.batches(student, split["train"][: config.calibration_samples], 32)) \
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.module.modules()) else []

    def validate(rows):
        # BN running statistics lag the weights (EfficientNet's momentum is 0.01): re-estimate them first
        recalibrate_bn(student, calib)
        return task.counts(student, rows)

    params = [p for p in student.module.parameters()] + [p for p in extra.parameters()]
    for p in params:
        p.requires_grad_(True)
    settings = {**asdict(config), "teacher": same_path(teacher_src), "student": same_path(student_src),
                "data": same_path(config.data),
                "teacher_fingerprint": teacher.fingerprint(),
                "student_fingerprint": student.fingerprint(),
                "rows": rows_hash(task.ds, getattr(task, "doc_split", None) or {**split, "train": train_rows})}
    check_resume(out, "distill", settings, config.resume, rank, config)  # before training writes anything
    if rank == 0:
        record_files(out, "distill", checkpoint_files())
    mods = {"student": student.module, **({"extra": extra} if len(extra) else {})}
    loop = dataclasses.replace(config.loop(), best="accuracy" if task.higher_is_better else "loss")
    hist = fit(mods, params, step, train_rows, split["val"], validate, loop, out,
               resume=config.resume, desc="distill", device=student.device, dtype=teacher.compute_dtype)
    test = task.evaluate(student, split["test"])
    # the original teacher's: the student's retention is measured against what it was pruned from
    t_rec = original_test if config.teacher_correction else _teacher_test(teacher_src, teacher, task)
    rec = {"lamina_distill": 1, "teacher": str(teacher_src),
           "student": str(student_src) if student_src is not None else f"narrow copy, width {config.width}",
           "scratch": config.scratch, "task": task.record(), "weights": asdict(w),
           "layer_map": {str(k): v for k, v in lmap.items()}, "layer_map_source": map_source,
           "taps": {"student": s_paths, "teacher": t_paths},
           "parameters": {"teacher": sum(p.numel() for p in teacher.module.parameters()),
                          "student": sum(p.numel() for p in student.module.parameters())},
           "train_rows": len(train_rows), "notes": notes, "config": asdict(config),
           "runtime": {**describe(student.device, teacher.compute_dtype), "teacher_dtype": _dt(teacher.dtype),
                       "student_weights_dtype": _dt(student.dtype)},
           "history": hist, "test": test,
           "teacher_test": t_rec, "teacher_used": used, "accuracy_retained": test["accuracy"] / t_rec["accuracy"] if t_rec["accuracy"] else None,
           "metric": task.metric,
           "model_path": str(out / "model"), "seconds": None}
    if rank == 0:
        check = task.batch(student, (list(split["test"]) or list(split["train"]))[:8])
        rec["format"], rec["reload_check"] = save_checked(student, out / "model", teacher, check, stage="distill")
        rec["seconds"] = time.perf_counter() - t0
        record_files(out, "distill", ["distill.json", "distill.json.tmp"])
        save_json(out / "distill.json", rec, nulls=("history",))  # null in the history: a loss that was not finite
        remove_checkpoint(out)
        (out / RESUME).unlink(missing_ok=True)
    if size > 1:
        torch.distributed.barrier()
    return DistillResult(str(out), str(out / "model"), test["accuracy"], t_rec["accuracy"],
                         rec["accuracy_retained"], rec)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _teacher_test(path, teacher, task) -> dict:
    """The teacher's test metrics: from finetune.json when it measured the same rows, else measured now."""
    f = Path(str(path)) / "finetune.json"
    if f.exists():
        rec = read_json(f, "the teacher's task record")
        if rec.get("task") == task.record() and rec.get("test"):
            return rec["test"]
    return task.evaluate(teacher, task.split["test"])


def _stage_ends(student: LoadedModel, lmap: dict) -> dict:
    """Keep the mapped student blocks whose output width differs from the next block's, and the last one."""
    widths = {}
    hooks = []
    for j in lmap:
        mod = student.module.get_submodule(student.blocks.block_paths[j])
        hooks.append(mod.register_forward_hook(
            lambda _m, _i, o, j=j: widths.__setitem__(j, (o[0] if isinstance(o, tuple) else o).shape[1])))
    try:
        x = {"pixels": torch.zeros(1, student.in_channels, student.image_size or 32, student.image_size or 32)} \
            if student.modality != "text" else dict(student.tokenizer(["a"], return_tensors="pt"))
        with torch.no_grad():
            student.forward(x)
    finally:
        for h in hooks:
            h.remove()
    js = sorted(lmap)
    keep = [j for a, j in enumerate(js) if a == len(js) - 1 or widths.get(j) != widths.get(js[a + 1])]
    return {j: lmap[j] for j in keep}
