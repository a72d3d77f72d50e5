"""``elastic``: one training run that makes every budget of a grid (Nemotron Elastic, MatFormer, DynaBERT).

``lamina elastic --teacher T --out E --depths 6,4,3 --widths 1,0.75,0.5 [--heads ...] [--channels ...]``
(``elastic(teacher, config)`` in Python):

1. **Order.** A copy of the teacher is permuted by importance (:mod:`lamina.elastic.order`) so every
   prefix of an axis is its best subset; the copy is checked to compute what the teacher does.
   Blocks are ranked for depth by skip importance.
2. **Train.** Each step (sandwich rule, in-place distillation): the full member on the task loss
   (+ ``teacher_kd`` x KD from the original teacher), then the smallest member and ``sampled``
   random members of the grid, each on ``ce`` x task loss + ``kd`` x KD to the full member's
   detached logits (+ ``hidden`` x the cosine of its block outputs to the full member's outputs
   of the same blocks); one backward over the sum, one optimizer step on the shared weights
   (``train_full=False``: the full member's forward only gives that target, without its own
   loss or backward; ``full_fraction`` p < 1: it is trained on a drawn fraction p of the steps).
   ``target='teacher'``: the sub-members distill from the original, frozen teacher instead (its logits,
   and with ``hidden`` its block outputs: distill's targets), run once per step and shared by every
   member; the full member is then run only on the steps that train it. The
   members are drawn from a generator seeded by (seed, the step's first row), so a resumed run draws
   what the uninterrupted one did; under torchrun rank 0's draw is broadcast to every rank. Everything else is distill's loop (:func:`lamina.train.fit`):
   the teacher's task record and split, checkpoints, ``--resume``, torchrun, early stopping on the
   full member's validation metric.
3. **Select.** Every member is extracted, its BatchNorm statistics re-estimated on calibration
   rows, scored on the validation rows and timed on this machine (``latency_batch`` rows,
   ``threads`` threads, members interleaved, median of ``latency_repeats``);
   the Pareto front of metric against latency is marked (:mod:`lamina.elastic.select`).

Writes E/model (the ordered, trained parent: the full member) and E/elastic.json.

Training cost (``training`` in elastic.json): optimizer steps, wall seconds of the loop, and
estimated FLOPs = training rows seen x (3 x forward FLOPs per row of each member trained per
step, in expectation over the draw, + 1 x each forward run without a backward: the teacher's, and the
full member's on the steps it gives the sub-members' target without being trained). Forward FLOPs
per row are counted by torch's FlopCounterMode on one calibration batch (``flops_per_row``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._cliargs import as_config
from ..errors import LaminaError, UsageError
from ..models import LoadedModel, load_model, recalibrate_bn, save_json
from ..resume import RESUME, check_resume, rows_hash, same_path
from ..runfolder import check_out, claim, plan_writes
from ..runfolder import record as record_files
from ..runtime import describe, oom_message, resolve_device
from ..task import check_classes, logits_of, make_task, num_classes, teacher_spec
from ..train import CHECKPOINT, TrainConfig, fit, init_distributed, loop_field, remove_checkpoint, trained, world
from ..verify import save_checked
from .budget import Budget, Grid, Written, kept_groups, make_grid
from .family import Family
from .order import block_order, check_depths, order_

log = logging.getLogger(__name__)

RECORD = "elastic.json"


@dataclass(frozen=True)
class ElasticConfig(TrainConfig):
    """Settings of ``lamina elastic`` (the training loop's: :class:`lamina.train.TrainConfig`)."""

    out: str = field(metadata={"help": "output folder: OUT/model (the trained parent), OUT/elastic.json"})
    data: str | None = field(default=None, metadata={
        "help": "data; default: the teacher's own (finetune.json), with its split. A causal LM teacher learns "
                "next tokens of this text (packed blocks of --seq-len tokens, perplexity)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed block when the task is language modelling"})
    depths: str | None = field(default=None, metadata={
        "help": "numbers of blocks the members keep, e.g. '6,4,3' (default: all; the full depth is always added)"})
    widths: str | None = field(default=None, metadata={
        "help": "kept fractions of the FFN neurons, e.g. '1,0.75,0.5' (default: 1; 1 is always added)"})
    heads: str | None = field(default=None, metadata={
        "help": "kept fractions of the attention key-value groups (Llama family; query heads move with their "
                "group), e.g. '1,0.5' with 2 KV groups (default: 1)"})
    channels: str | None = field(default=None, metadata={
        "help": "kept fractions of EfficientNet's expanded MBConv channels, e.g. '1,0.75,0.5' (default: 1)"})
    sampled: int = field(default=2, metadata={
        "help": "random grid members trained each step besides the full and the smallest (sandwich rule)"})
    ce: float = field(default=1.0, metadata={"help": "weight of the task loss of every member trained"})
    kd: float = field(default=1.0, metadata={
        "help": "weight of the in-place distillation of each sub-member from the full member's detached logits"})
    hidden: float = field(default=0.0, metadata={
        "help": "weight of the in-place distillation of each sub-member's block outputs from the full member's "
                "outputs of the same blocks (cosine per token or pixel, summed over the blocks it keeps; "
                "0: logits only)"})
    teacher_kd: float = field(default=1.0, metadata={
        "help": "weight of the full member's distillation from the original teacher (0: the teacher is not run)"})
    train_full: bool = field(default=True, metadata={
        "help": "train the full member on its own loss each step (the sandwich rule); --no-train-full: its forward "
                "(no backward) only gives the sub-members' in-place KD target, and it changes only through the "
                "weights it shares with them (cheaper by two forwards of the full model per row)"})
    target: str = field(default="full", metadata={
        "help": "what the sub-members distill from: 'full' (in-place: the full member's detached logits and block "
                "outputs, BigNAS/DynaBERT) or 'teacher' (the original, frozen teacher's: run once per step without "
                "gradients, shared by every member, counted in the training cost; distill's targets)",
        "choices": ("full", "teacher")})
    full_fraction: float = field(default=1.0, metadata={
        "help": "fraction of the steps on which the full member is trained (each step drawn like the members; "
                "1: every step, the sandwich rule). On the other steps it is run only when --target full needs "
                "its outputs, without a backward"})
    best_on: str = field(default="auto", metadata={
        "help": "which validation metric picks the epoch kept (and early stopping): 'full' (the full member's), "
                "'members' (pooled over every member of the grid: the sub-members are products of the run too, and "
                "an epoch that helps them can cost the full member a little) or 'auto': 'members' under "
                "--no-train-full (the full member is not trained then, so its score alone says little of the run), "
                "'full' otherwise",
        "choices": ("auto", "full", "members")})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of both KD losses (> 0)"})
    patience: int | None = loop_field(2, "stop after this many epochs without a validation gain (of what "
                                         "--best-on names: the full member, or every member pooled); the best "
                                         "epoch is kept")
    seed: int = loop_field(0, "seed of the row order and of the members drawn each step")
    train_limit: int | None = field(default=None, metadata={
        "help": "train on at most this many of the training rows (stratified); validation and test stay whole"})
    calibration_samples: int = field(default=256, metadata={
        "help": "training rows that rank channels, heads and blocks, and re-estimate BatchNorm statistics"})
    latency_batch: int = field(default=1, metadata={"help": "rows per forward when timing each member"})
    latency_repeats: int = field(default=7, metadata={
        "help": "timed forwards per member (members interleaved, after one warm-up round); the median is kept"})
    threads: int | None = field(default=1, metadata={"help": "torch threads while timing members (None: as is)"})

    def picks_on(self) -> str:
        """The validation metric that keeps an epoch: --best-on with 'auto' resolved."""
        if self.best_on != "auto":
            return self.best_on
        return "full" if self.train_full else "members"

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a path", fix="pass --out PATH")
        super().__post_init__()  # the training loop's settings
        if isinstance(self.sampled, bool) or not isinstance(self.sampled, int) or self.sampled < 0:
            raise UsageError("--sampled must be a non-negative integer", value=self.sampled,
                             allowed="0, 1, 2, ...", fix="--sampled 2")
        for name in ("latency_batch", "latency_repeats", "calibration_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer", value=v,
                                 allowed="an integer >= 1", fix=f"--{name.replace('_', '-')} 4")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UsageError("--threads must be a positive integer", value=self.threads, allowed=">= 1",
                             fix="--threads 1")
        from ..distill.losses import LossWeights
        LossWeights(ce=self.ce, kd=self.kd, temperature=self.temperature, cosine=0, fsp=0)  # validates them
        if not (isinstance(self.hidden, (int, float)) and self.hidden >= 0):
            raise UsageError("--hidden must be >= 0", value=self.hidden, allowed="a float >= 0", fix="--hidden 1")
        if self.best_on not in ("auto", "full", "members"):
            raise UsageError("--best-on must be 'auto', 'full' or 'members'", value=self.best_on,
                             allowed="auto, full, members",
                             fix="--best-on members to keep the epoch best for the whole grid")
        if self.target not in ("full", "teacher"):
            raise UsageError("--target must be 'full' or 'teacher'", value=self.target, allowed="full, teacher",
                             fix="--target teacher")
        if isinstance(self.full_fraction, bool) or not isinstance(self.full_fraction, (int, float)) or \
                not 0 < self.full_fraction <= 1:
            raise UsageError("--full-fraction must be in (0, 1]", value=self.full_fraction,
                             allowed="a float > 0 and <= 1 (--no-train-full: never)", fix="--full-fraction 0.25")
        if not self.train_full and self.full_fraction < 1:
            raise UsageError("--full-fraction sets how often the full member is trained, which --no-train-full "
                             "never does", value=self.full_fraction, allowed="--full-fraction 1 with --no-train-full",
                             fix="drop --full-fraction, or drop --no-train-full")
        if not self.train_full and self.teacher_kd > 0:
            raise UsageError("--teacher-kd trains the full member, which --no-train-full does not train",
                             value=self.teacher_kd, allowed="--teacher-kd 0 with --no-train-full",
                             fix="pass --teacher-kd 0, or drop --no-train-full")
        if self.teacher_kd < 0:
            raise UsageError("--teacher-kd must be >= 0", value=self.teacher_kd, allowed="a float >= 0",
                             fix="--teacher-kd 1")
        # the grid's own syntax is checked here; its fit to the model when the teacher is loaded
        from .budget import parse_list
        for text, flag, kind in ((self.depths, "--depths", int), (self.widths, "--widths", float),
                                 (self.heads, "--heads", float), (self.channels, "--channels", float)):
            if text is not None:
                parse_list(text, flag, kind)


@dataclass
class ElasticResult(Written):
    """What ``elastic`` wrote (``elastic.json`` holds all of it)."""

    out: str
    model_path: str
    members: list
    record: dict


def writes() -> list[str]:
    """What ``elastic`` writes in OUT."""
    from ..finetune.finetune import checkpoint_files
    return ["model", RECORD, *checkpoint_files(), RESUME]


def elastic(teacher, config: ElasticConfig | None = None) -> ElasticResult:
    """Train the nested family of ``teacher`` over the budget grid of ``config``; see the module doc.

    Args:
        teacher: a ``lamina finetune`` folder (its task record gives the data and split), a classifier folder
            with ``config.data``, or a causal LM with ``config.data`` text.
        config: an :class:`ElasticConfig`.
    """
    config = as_config(ElasticConfig, config, "elastic")
    rt = config.runtime()
    init_distributed(resolve_device(rt.device))
    rank, size = world()
    out = Path(config.out)
    plan_writes(out, "elastic", writes(), config.overwrite, resume=config.resume, resumable=True)
    check_out(out, config.overwrite, config.resume, CHECKPOINT)
    with claim(out, "elastic", writes(), config.overwrite, resume=config.resume, resumable=True, rank=rank):
        return _elastic(teacher, config, out, rank, size)


def _task(teacher_src, teacher: LoadedModel, config: ElasticConfig):
    spec = teacher_spec(teacher_src, teacher, config.data, config.seq_len)
    lm_task = getattr(spec, "kind", "classification") == "lm"
    task = make_task(spec, teacher)
    if not lm_task:
        check_classes(num_classes(teacher), task.ds)
    return task


def _grid(parent: LoadedModel, config: ElasticConfig) -> Grid:
    grid = make_grid(parent.blocks.n_blocks, config.depths, config.widths, config.heads, config.channels)
    if len(grid.heads) > 1:
        from ..compress.heads import _attn_blocks
        _attn_blocks(parent.module, parent.blocks.container or None)
        for f in grid.heads:
            kept_groups(f, parent.module.config.num_key_value_heads)
    return grid


def _same_function(a: LoadedModel, b: LoadedModel, batch: dict) -> float:
    """max |a - b| / max |a| of the two models' main outputs on ``batch`` (eval mode)."""
    from ..verify import _run
    x, y = _run(a, batch), _run(b, batch)
    return float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))


class _Member:
    """A budget of a family seen as something with ``forward(batch)`` (for FLOP counting)."""

    def __init__(self, fam: Family, b: Budget):
        self.fam, self.b = fam, b

    def forward(self, batch):
        return self.fam.forward(self.b, batch)


def draw(grid: Grid, sampled: int, seed: int, rows) -> list[Budget]:
    """The sub-members trained on ``rows`` besides the full one: the smallest, then ``sampled`` others drawn
    without replacement by a generator seeded by (seed, the step's first row): a resumed run draws the same,
    and so does rank 0 of a torchrun job (its first row is the global batch's first)."""
    full, small = grid.full, grid.smallest
    if small == full:
        return []
    pool = [b for b in grid.members() if b not in (full, small)]
    k = min(sampled, len(pool))
    first = np.asarray(rows)[:1]
    rng = np.random.default_rng([seed, int(first[0]) if len(first) else 0])
    pick = sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []
    return [small, *(pool[i] for i in pick)]


def full_now(config: ElasticConfig, rows) -> bool:
    """Whether the full member is trained on ``rows``: always, never (``--no-train-full``), or on a
    ``--full-fraction`` of the steps, drawn by a generator seeded by (seed, the step's first row, 1) so a
    resumed run and every torchrun rank decide what an uninterrupted rank 0 did."""
    if not config.train_full:
        return False
    if config.full_fraction >= 1:
        return True
    first = np.asarray(rows)[:1]
    return bool(np.random.default_rng([config.seed, int(first[0]) if len(first) else 0, 1]).random()
                < config.full_fraction)


def _same_draw(grid: Grid, config: ElasticConfig, rows, device, size: int) -> tuple[list[Budget], bool]:
    """:func:`draw` and :func:`full_now` on rank 0's rows, broadcast, so every torchrun rank trains the same
    members in a step (their summed gradients are then the gradient of one sandwich over the global batch)."""
    members, full = draw(grid, config.sampled, config.seed, rows), full_now(config, rows)
    if size == 1:
        return members, full
    pool = grid.members()
    idx = torch.tensor([int(full), *([pool.index(b) for b in members] or [-1])], dtype=torch.long, device=device)
    torch.distributed.broadcast(idx, src=0)
    return [pool[i] for i in idx.tolist()[1:] if i >= 0], bool(idx[0])


def sandwich_loss(fam: Family, task, batch: dict, rows, members: list[Budget], config: ElasticConfig,
                  teacher_logits: torch.Tensor | None = None, train_full: bool | None = None,
                  teacher_feats: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of one step (module doc): the full member's, plus each of ``members``' against their target.

    ``teacher_logits`` (B, K) / (B, T, V): the original teacher's, for the full member's KD (None: no KD) and,
    with ``config.target == 'teacher'``, the sub-members' KD target. ``teacher_feats``: the teacher's block
    outputs by block path (the sub-members' hidden targets under ``--target teacher --hidden``).
    ``train_full``: whether the full member is trained this step (None: ``config.train_full``); when it is not
    and the sub-members' targets are the teacher's, the full member is not run at all.
    Returns (the summed loss, a mean over rows; parts: 'full' (when it ran) and 'members' as floats).
    """
    from ..distill.losses import LossWeights, cosine_loss, total_loss
    from ..distill.taps import record
    train_full = config.train_full if train_full is None else train_full
    to_teacher = config.target == "teacher"
    if to_teacher and members and teacher_logits is None:
        raise ValueError("--target teacher needs the teacher's logits")
    hidden = config.hidden > 0 and bool(members)
    if hidden and to_teacher and teacher_feats is None:
        raise ValueError("--target teacher --hidden needs the teacher's block outputs")
    loss, out, full_feats, target = None, {}, {}, None
    t_pred = task.align(teacher_logits, rows)[0] if teacher_logits is not None else None
    labels = None
    if train_full or (members and not to_teacher):
        with record(fam.parent.module, fam.parent.blocks.block_paths if hidden and not to_teacher else []) \
                as full_feats, torch.set_grad_enabled(torch.is_grad_enabled() and train_full):
            z = logits_of(fam.forward(fam.grid.full, batch)).float()
        pred, labels = task.align(z, rows)
        w_full = LossWeights(ce=config.ce, kd=config.teacher_kd if t_pred is not None else 0.0,
                             temperature=config.temperature, cosine=0.0, fsp=0.0)
        loss, parts = total_loss(w_full, student_logits=pred, teacher_logits=t_pred, labels=labels)
        out["full"] = parts["total"]
        if not train_full:  # the full member's loss is logged, not trained on
            loss = None
        target = pred.detach()
    if to_teacher:
        target, full_feats = t_pred, teacher_feats
    w_sub = LossWeights(ce=config.ce, kd=config.kd, temperature=config.temperature, cosine=0.0, fsp=0.0)
    sub, sub_hidden = 0.0, 0.0
    for b in members:
        taps = fam.taps(b) if hidden else []
        with record(fam.module(b), [s for s, _ in taps]) as feats:
            zb, lab = task.align(logits_of(fam.forward(b, batch)).float(), rows)
        labels = lab if labels is None else labels
        lb, pb = total_loss(w_sub, student_logits=zb, teacher_logits=target, labels=labels)
        if hidden:  # the member's block j against the full member's (or teacher's) output of the same block
            h = cosine_loss([full_feats[p].detach() for _, p in taps], [feats[s] for s, _ in taps], None,
                            batch.get("attention_mask"))
            lb = lb + config.hidden * h
            sub_hidden += float(h.detach())
        loss = lb if loss is None else loss + lb
        sub += pb["total"] + (config.hidden * float(h.detach()) if hidden else 0.0)
    if members:
        out["members"] = sub / len(members)
        if hidden:
            out["hidden"] = sub_hidden / len(members)
    if loss is None:  # nothing trained this step (a grid of one member whose full member sits this step out)
        loss = fam.parent.module.parameters().__next__().sum() * 0.0
    return loss, out


def _elastic(teacher_src, config: ElasticConfig, out: Path, rank: int, size: int) -> ElasticResult:
    import copy

    from ..bench.bench import flops_per_sample
    from ..distill.taps import record
    from ..finetune.finetune import checkpoint_files
    from .select import score_members
    t_start = time.perf_counter()
    rt = config.runtime()
    teacher = load_model(teacher_src, runtime=rt, for_training=True)
    grid = _grid(teacher, config)  # a grid the model cannot have is refused before any data is read
    if not config.train_full and grid.full == grid.smallest:
        raise UsageError("--no-train-full trains only sub-members, and this grid has none", value=grid.to_dict(),
                         allowed="a grid with a smaller member (--depths, --widths, --heads or --channels)",
                         fix="add a budget, e.g. --depths N,N-2, or drop --no-train-full")
    if config.hidden > 0 and teacher.blocks.shared:  # one module run as k blocks has no output per block
        raise UsageError("the teacher runs one layer as several blocks (ALBERT), so its blocks have no outputs of "
                         "their own to distill", value=config.hidden, allowed="--hidden 0 for such models",
                         fix="pass --hidden 0")
    task = _task(teacher_src, teacher, config)
    split = task.split
    parent = copy.copy(teacher)
    parent.module = copy.deepcopy(teacher.module)
    parent.name = f"{teacher.name} (elastic)"
    container = parent.blocks.container or None
    calib = list(task.batches(parent, split["train"][: config.calibration_samples], 32))
    axes = {a for a, vals in (("ffn", grid.ffn), ("heads", grid.heads), ("channels", grid.channels))
            if len(vals) > 1}
    t0 = time.perf_counter()
    ordered = order_(parent.module, calib, axes, container)
    drift = _same_function(teacher, parent, calib[0])
    if drift > 1e-4:
        raise LaminaError("the model ordered by importance no longer computes what the teacher does",
                          value=f"max relative difference {drift:.3g}", allowed="float rounding (<= 1e-4)",
                          fix="this architecture's units cannot be permuted this way; report it")
    order, block_scores = block_order(parent, calib) if len(grid.depths) > 1 else ([], {})
    check_depths(grid.depths, order, parent.blocks.n_blocks)
    order_seconds = time.perf_counter() - t0
    fam = Family(parent, order, grid)
    members = grid.members()
    for b in members:
        fam.module(b)  # every structure is built (and refused, when a config cannot express it) before training
    probe = {k: v[:8] for k, v in calib[0].items()}
    flops = {b: flops_per_sample(_Member(fam, b), probe) for b in members}
    t_flops = flops_per_sample(teacher, probe)

    teacher.module.eval()
    for p in teacher.module.parameters():
        p.requires_grad_(False)

    to_teacher = config.target == "teacher"
    t_taps = teacher.blocks.block_paths if to_teacher and config.hidden > 0 else []
    full_steps = [0, 0]  # steps on which the full member was trained, steps (this process; for the record)

    def step(rows, gbs):
        b = task.batch(parent, rows)
        with oom_message(len(rows), "--batch-size", parent.device):
            subs, train_full = _same_draw(grid, config, rows, parent.device, size)
            full_steps[0] += int(train_full)
            full_steps[1] += 1
            t_logits, t_feats = None, None
            if (config.teacher_kd > 0 and train_full) or (to_teacher and subs):
                # the ordered parent's blocks are the teacher's blocks, permuted inside: same outputs, same paths
                with torch.no_grad(), record(teacher.module, t_taps) as t_feats:
                    t_logits = logits_of(teacher.forward(b)).float()
            loss, parts = sandwich_loss(fam, task, b, rows, subs, config, t_logits, train_full, t_feats)
        scale = len(rows) / gbs
        return loss * scale, {k: torch.tensor(v * scale, device=loss.device) for k, v in parts.items()}

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in parent.module.modules())
    best_on = config.picks_on()

    def validate(rows):
        if best_on == "full":
            if has_bn:
                recalibrate_bn(parent, calib)
            return task.counts(parent, rows)
        # every member scored on the same rows, counts summed: the pooled metric over the grid
        tot = [0, 0, 0.0]
        for b in grid.members():
            m = fam.extract(b)
            if has_bn:
                recalibrate_bn(m, calib)
            tot = [x + y for x, y in zip(tot, task.counts(m, rows))]
        return tuple(tot)

    train_rows = task.train_rows(config.train_limit, config.seed)
    params = list(parent.module.parameters())
    for p in params:
        p.requires_grad_(True)
    # best_on as resolved: a run recorded before 'auto' (its 'full' or 'members') resumes when it means the same
    settings = {**asdict(config), "best_on": best_on, "teacher": same_path(teacher_src), "data": same_path(config.data),
                "teacher_fingerprint": teacher.fingerprint(),
                "rows": rows_hash(task.ds, getattr(task, "doc_split", None) or {**split, "train": train_rows})}
    check_resume(out, "elastic", settings, config.resume, rank, config)
    if rank == 0:
        record_files(out, "elastic", checkpoint_files())
    loop = dataclasses.replace(config.loop(), best="accuracy" if task.higher_is_better else "loss")
    t_fit = time.perf_counter()
    hist = fit({"model": parent.module}, params, step, train_rows, split["val"], validate, loop, out,
               resume=config.resume, desc="elastic", device=parent.device, dtype=teacher.compute_dtype)
    wall = time.perf_counter() - t_fit
    if has_bn:
        recalibrate_bn(parent, calib)
    steps, rows_seen = trained(hist, len(train_rows))
    sub = draw(grid, 0, 0, [])  # the smallest, when there is one
    pool = [b for b in members if b not in (grid.full, grid.smallest)]
    k = min(config.sampled, len(pool))
    # in expectation over the draw: the full member trained on a fraction p of the steps (forward + backward),
    # run forward only on the others when the sub-members distill from it; the teacher's forward on the steps
    # that need its logits
    p = (config.full_fraction if config.train_full else 0.0)
    has_subs = bool(sub)
    per_row = 3 * p * flops[grid.full] + ((1 - p) * flops[grid.full] if has_subs and not to_teacher else 0.0) + \
        sum(3 * flops[b] for b in sub) + (k * 3 * float(np.mean([flops[b] for b in pool])) if k else 0.0) + \
        (t_flops if to_teacher and has_subs else p * t_flops if config.teacher_kd > 0 else 0.0)
    t_sel = time.perf_counter()
    rec_members = score_members(fam, task, calib, split["val"], config) if rank == 0 else []
    select_seconds = time.perf_counter() - t_sel
    t_val = task.evaluate(teacher, split["val"])
    from ..distill.distill import _teacher_test
    test, t_test = task.evaluate(parent, split["test"]), _teacher_test(teacher_src, teacher, task)
    rec = {"lamina_elastic": 1, "teacher": {"path": str(teacher_src), "val_metric": t_val[task.metric],
                                            "metric": task.metric,
                                            "parameters": sum(p.numel() for p in teacher.module.parameters())},
           "test": test, "teacher_test": t_test,
           "retained": (test[task.metric] / t_test[task.metric] if task.higher_is_better
                        else t_test[task.metric] / test[task.metric]) if t_test[task.metric] else None,
           "task": task.record(), "metric": task.metric, "higher_is_better": task.higher_is_better,
           "grid": grid.to_dict(), "block_order": order,
           "block_order_names": [f"blocks.{j}" for j in order], "block_scores": block_scores,
           "ordered": sorted(ordered), "permutations": ordered, "members": rec_members,
           "training": {"steps": steps, "rows": rows_seen, "wall_s": wall, "flops": rows_seen * per_row,
                        "flops_per_row": {"full_forward": flops[grid.full], "teacher_forward": t_flops,
                                          "step_expected": per_row},
                        "members_per_step": 1 + len(sub) + k, "full_fraction": p,
                        # realized in this process (a resumed run counts its own steps only)
                        "full_trained_steps": full_steps[0], "steps_run": full_steps[1],
                        # one-time work outside the training loop (a separate route's analogue: its scores run)
                        "order_s": order_seconds, "select_s": select_seconds,
                        "best_on": best_on, "resumed_from": hist.get("resumed_from")},
           "history": hist, "config": asdict(config), "runtime": describe(parent.device, teacher.compute_dtype),
           "train_rows": len(train_rows), "model_path": str(out / "model"), "seconds": None}
    if rank == 0:
        check = task.batch(parent, (list(split["test"]) or list(split["train"]))[:8])
        rec["format"], rec["reload_check"] = save_checked(parent, out / "model", teacher, check, stage="elastic")
        rec["seconds"] = time.perf_counter() - t_start
        record_files(out, "elastic", [RECORD, RECORD + ".tmp"])
        save_json(out / RECORD, rec, nulls=("history",))
        remove_checkpoint(out)
        (out / RESUME).unlink(missing_ok=True)
    if size > 1:
        torch.distributed.barrier()
    return ElasticResult(str(out), str(out / "model"), rec_members, rec)
