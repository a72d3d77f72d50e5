"""``transfer``: heads on a frozen backbone, and the truncated model that serves them.

``lamina transfer RUN --head last|best|mix|select|side`` trains one head on a
captured run and writes:

    RUN/transfer/HEAD/     the deployable model: the head on the backbone cut after the deepest
                           block it reads (``lamina.load``; ``lamina bench`` measures it)
    RUN/transfer.json      per head: test accuracy (95% interval), trainable parameters, training
                           time, peak memory, layers read, deepest block, mix weights, selection

Design decisions:
- ``last``, ``best``, ``mix`` and ``select`` train on the store's pooled
  features alone (seconds). A store captured with ``--pooling none`` is pooled
  here, as many ways as ``--pooling`` asks (Head2Toe's multi-pooling, see
  ``_pools``); a pooled store offers its own pooling only.
- ``side`` needs token-level block outputs: it reads them from a ``--pooling
  none`` store when the run has one, else runs the frozen backbone for them
  (cached in memory when they fit).
- ``--device``: heads (and ``side``'s backbone passes) run there; the saved
  model and every check after training are on the CPU.
- Rows: the task of a ``lamina finetune`` folder (``--task``), mapped onto the
  store by sample id, so heads and fine-tuning share their test rows; without
  it, analyze's split of the store (see ``_rows``).
- The backbone never changes: heads read detached outputs, the deployable model
  holds a copy, and the model is checked against the store's fingerprint.
- The saved model is reloaded and compared with the trained one on a
  calibration batch of test rows before ``transfer`` returns; a difference is
  an error (exit 1), and so is a deployable model whose features disagree with
  the store it was trained on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..blocks import BlockMap, Tap, select_taps
from ..errors import LaminaError, UsageError
from ..models import save_json
from ..runtime import check_runtime, resolve_device, resolve_dtype
from ..runfolder import RUN_CONFIG, claim, plan_writes, record
from ..runfolder import update_run_config, versions
from ..store import FeatureStore
from ..threads import limit_threads
from ..train import Loop, TrainConfig, check_loop_args, loop_field
from ._memory import PeakMemory
from ._pools import kept_per_way, parse, pooled_inputs
from ._rows import refuse_unlabelled, reload_model_and_data, split_rows
from ._store_heads import FITTERS
from ._train import test_record, train_head
from ..savefmt import save_format
from .deploy import _backbone_of, build_deployable, load_transfer, max_difference, save_transfer

log = logging.getLogger(__name__)

HEADS = ("last", "best", "mix", "select", "side")
RECORD = "transfer.json"


@dataclass(frozen=True)
class TransferConfig(TrainConfig):
    """Settings of ``lamina transfer`` (the training loop's: :class:`lamina.train.TrainConfig`, with a head's
    defaults)."""

    NO_FLAGS = ("resume",)  # TrainConfig fields transfer has no use for: not offered on the command line

    head: str = field(default="mix", metadata={"choices": HEADS, "help": (
        "last: linear on the last captured layer; best: linear on the best layer by validation; mix: softmax-"
        "weighted sum of every layer (HiCMAE/ELMo), then linear or --hidden MLP; select: Head2Toe group-lasso "
        "selection of --keep of all layers' features, then linear; side: a small network reading every block's "
        "token/patch outputs (DiST/LST), the backbone frozen")})
    layers: str | None = field(default=None, metadata={
        "help": "captured layers the head may read: all (default), or names/globs/indices such as "
                "'blocks.*' or 'embed,blocks.2' (side: block outputs only)"})
    task: str | None = field(default=None, metadata={
        "help": "a `lamina finetune` OUT folder: train, validate and test on its rows (compare on the same test "
                "rows); default: analyze's split of the store"})
    fractions: tuple[float, ...] = field(default=(0.6, 0.2, 0.2), metadata={
        "help": "train/validation/test fractions of the store's rows when --task is not given (analyze's split)"})
    # the training loop's settings: TrainConfig's fields, with a head's defaults (a head on pooled features
    # trains for seconds: more epochs, a larger learning rate and batch than fine-tuning)
    seed: int = loop_field(0, "seed of the split (without --task), the head's init and order")
    epochs: int | None = loop_field(None, "passes over the training rows (default 40; side 6)")
    lr: float | None = loop_field(None, "peak AdamW learning rate (default 3e-3; side 1e-3)")
    batch_size: int = loop_field(64, "rows per step (side: also rows per backbone pass)")
    weight_decay: float = loop_field(0.01, "AdamW weight decay")
    patience: int | None = loop_field(5, "stop after this many epochs without a validation gain (the best epoch "
                                         "is kept)")
    hidden: int | None = field(default=None, metadata={"help": "mix: an MLP head with this hidden width "
                                                               "(default: linear)"})
    l2_cv: int | None = field(default=None, metadata={
        "help": "last/best: fit the linear head to convergence (full-batch L-BFGS) with an L2 penalty chosen by "
                "this many-fold cross-validation on the training rows (e.g. 5), instead of AdamW with early "
                "stopping on the validation rows; for small tasks, whose few validation rows cannot choose "
                "(default: off)"})
    pooling: str | None = field(default=None, metadata={
        "help": "pooled heads: how each layer is pooled, one way or several joined by ',' (mean, max, cls, last "
                "for token sequences; mean, max, mean2x2 for CNN maps); several ways need a store captured "
                "with --pooling none (default: the store's own pooling; mean for a none store)"})
    keep: float | None = field(default=None, metadata={
        "help": "select: fraction of all features kept (0 < keep <= 1); default: chosen on validation among "
                "0.01 0.02 0.05 0.1 0.2 0.5"})
    group_lasso: float | None = field(default=None, metadata={
        "help": "select: strength of the per-feature group-lasso penalty that ranks the features; default: "
                "chosen on validation among 1e-3 1e-2 1e-1"})
    side_width: float = field(default=0.125, metadata={
        "help": "side: width of the side network as a fraction of the backbone's (multiple of 8, at least 8)"})
    side_cache_mb: int = field(default=512, metadata={
        "help": "side: keep the backbone's token-level outputs in memory when they fit in this many MiB "
                "(else recompute them every epoch)"})
    overwrite: bool = loop_field(False, "replace RUN/transfer/HEAD and its transfer.json entry")
    progress: bool = loop_field(False, "show progress bars")
    # A head trains in seconds to minutes and writes no checkpoint: TrainConfig's resume has nothing to resume
    # (not a CLI flag of transfer: NO_FLAGS; the API refuses True).
    resume: bool = loop_field(False, "not used by transfer (a head writes no checkpoint)")

    def __post_init__(self):  # not TrainConfig's: epochs and lr may be None (a head's own default)
        if self.head not in HEADS:
            from ..errors import suggest
            raise UsageError("unknown head", value=self.head, allowed=", ".join(HEADS),
                             fix=suggest(self.head, HEADS) or "--head mix")
        check_loop_args(self.epochs if self.epochs is not None else 1, self.lr, self.batch_size, self.patience,
                        self.max_steps)
        check_runtime(self)
        if self.resume:
            raise UsageError("transfer has nothing to resume: a head writes no checkpoint", value=self.resume,
                             allowed="False", fix="run lamina transfer again (with --overwrite to replace a head)")
        if self.pooling is not None:
            parse(self.pooling)
            if self.head == "side":
                raise UsageError("--pooling is for the heads on pooled features; side reads token-level outputs",
                                 value=self.pooling, allowed="--head last, best, mix or select",
                                 fix="leave --pooling out for --head side")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))
                                      or not 0 < self.keep <= 1):
            raise UsageError("--keep must be a fraction of the features in (0, 1]", value=self.keep,
                             allowed="0 < keep <= 1", fix="--keep 0.01 keeps 1% of the features (Head2Toe's range)")
        if self.group_lasso is not None and not self.group_lasso >= 0:
            raise UsageError("--group-lasso must be >= 0", value=self.group_lasso, allowed=">= 0",
                             fix="--group-lasso 1e-3")
        if not 0 < self.side_width <= 1:
            raise UsageError("--side-width must be a fraction of the backbone's width in (0, 1]",
                             value=self.side_width, allowed="0 < w <= 1", fix="--side-width 0.125")
        if self.hidden is not None and self.hidden < 1:
            raise UsageError("--hidden must be a positive width", value=self.hidden, allowed=">= 1",
                             fix="--hidden 256, or leave it out for a linear head")
        if self.l2_cv is not None and (isinstance(self.l2_cv, bool) or not isinstance(self.l2_cv, int)
                                       or self.l2_cv < 2 or self.head not in ("last", "best")):
            raise UsageError("--l2-cv is a number of folds (>= 2) for the linear heads last and best",
                             value=f"--l2-cv {self.l2_cv} with --head {self.head}", allowed="--head last|best, "
                             "--l2-cv 2 or more", fix="--head last --l2-cv 5, or leave --l2-cv out")
        if self.side_cache_mb < 0:
            raise UsageError("--side-cache-mb must be >= 0", value=self.side_cache_mb, allowed=">= 0 (0: never cache)",
                             fix="--side-cache-mb 512")
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise UsageError("--fractions must be three positive numbers that sum to 1", value=self.fractions,
                             allowed="e.g. 0.6 0.2 0.2", fix="--fractions 0.6 0.2 0.2")

    def loop(self) -> Loop:
        side = self.head == "side"
        return Loop(epochs=self.epochs or (6 if side else 40), lr=self.lr or (1e-3 if side else 3e-3),
                    batch_size=self.batch_size, max_steps=self.max_steps, weight_decay=self.weight_decay,
                    patience=self.patience, seed=self.seed, progress=self.progress)


@dataclass
class TransferResult:
    """What ``transfer`` wrote and measured (``record`` is the head's entry of transfer.json)."""

    head: str
    model_path: str
    test_accuracy: float
    ci_low: float
    ci_high: float
    trainable_parameters: int
    seconds: float
    peak_memory_bytes: int
    layers: list[str]
    deepest_block: int
    n_blocks: int
    record: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _layers(store: FeatureStore, selection: str | None, side: bool) -> list[str]:
    """The captured layers the head may read, in forward order."""
    b = store.manifest.get("blocks") or {}
    taps = tuple(Tap(t["name"], t["path"], t.get("side", "output")) for t in b.get("taps", []))
    captured = store.layers
    if not taps:
        taps = tuple(Tap(n, n) for n in captured)
    bmap = BlockMap(tuple(b.get("block_paths", [])), taps, b.get("container", ""))
    asked = [t.name for t in select_taps(bmap, selection)]
    missing = [n for n in asked if n not in captured]
    if missing and selection is not None:
        raise UsageError("the head is asked to read layers that were not captured", value=missing,
                         allowed=", ".join(captured),
                         fix="capture them (lamina capture --layers all), or pick captured layers with --layers")
    names = [n for n in asked if n in captured] if selection is None else asked
    if side:
        names = [n for n in names if n == "embed" or n.startswith("blocks.")]
    if not names:
        raise UsageError("no captured layer left for the head to read", value=selection,
                         allowed=", ".join(captured), fix="leave --layers out to read every captured layer")
    return names


def _check_out(run_dir: Path, head: str, overwrite: bool) -> Path:
    out = run_dir / "transfer" / head
    rec = run_dir / RECORD
    had = rec.exists() and head in json.loads(rec.read_text()).get("heads", {})
    if (out.exists() or had) and not overwrite:
        raise UsageError(f"the run already has a '{head}' head", value=str(out), allowed="a head not trained yet",
                         fix="pass --overwrite to replace it")
    if out.exists() and not (out / "lamina_head.json").exists():
        raise UsageError("the head's folder exists but was not written by lamina transfer, so it is not replaced",
                         value=str(out), allowed="a folder lamina wrote", fix="move it away")
    return out


def transfer(run, config: TransferConfig = TransferConfig(), *, model=None, data=None) -> TransferResult:
    """Train ``config.head`` on the run's store (and, for ``side``, the frozen backbone); see the module doc.

    Args:
        run: a run folder (or FeatureStore) written by :func:`lamina.capture`.
        config: a :class:`TransferConfig`.
        model, data: only when the store was captured from Python objects.
    """
    store = run if isinstance(run, FeatureStore) else FeatureStore.open(run)
    refuse_unlabelled(store, data)  # before anything is written: a head needs labels
    run_dir = store.root.parent
    out = _check_out(run_dir, config.head, config.overwrite)
    writes = [f"transfer/{config.head}", RECORD]
    plan_writes(run_dir, "transfer", writes, config.overwrite, merge=(RUN_CONFIG, RECORD))  # before the work
    side = config.head == "side"
    names = _layers(store, config.layers, side)
    split, split_info = split_rows(store, config.task, config.fractions, config.seed)
    lm, ds = reload_model_and_data(store, model, data, config.trust_remote_code)
    save_format(_backbone_of(lm))  # refuses, before any training, a model lamina could not save
    labels = store.labels
    classes = store.classes or [str(c) for c in ds.classes]
    n_classes = len(classes)
    cap = store.manifest.get("config", {})
    stored = store.manifest.get("pooling", "mean")
    loop = config.loop()
    at = (resolve_device(config.device), resolve_dtype(config.torch_dtype, None))
    # process CPU time beside wall time: a ratio of training times read from CPU time barely moves with the load
    # other processes put on a shared machine, wall time does (BENCHMARKS.md "transfer")
    t0, c0 = time.perf_counter(), time.process_time()
    if side:
        head, dep, info, extra, feats_of, mem = _train_side(lm, ds, names, split, labels, n_classes, cap, config,
                                                            loop, store if stored == "none" else None, at)
        reads = names
    else:
        pooling, X = pooled_inputs(store, names, config.head, config.pooling)
        # the kernels of a head on pooled features are tiny: one thread on the CPU (threads.py says why)
        with PeakMemory(str(at[0])) as mem, limit_threads(1):
            head, reads, extra = FITTERS[config.head](X, names, labels, split, loop, n_classes, config, at=at)
        head.cpu()
        extra["pooling"] = pooling
        if "kept_features" in extra and "+" in pooling:
            extra["kept_per_pooling"] = kept_per_way(extra["kept_features"], names, X, pooling, store)
        dep, info = build_deployable(lm, head, reads, pooling)

        def feats_of(rows):
            return [X[n][rows] for n in reads], None
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    head.eval()
    test = test_record(head, feats_of, labels, split["test"])
    trainable = sum(p.numel() for p in head.parameters())
    calib = split["test"][:8]
    batch = dep.batch(ds, calib, cap.get("max_length", 128), cap.get("image_size"))
    with torch.no_grad():
        deployed = dep.forward(batch).float()
        from_store = head(*feats_of(calib)).float()
    store_diff = float((deployed - from_store).abs().max())
    scale = float(from_store.abs().max()) + 1.0
    tol = (1e-3 if store.manifest.get("dtype") == "float32" else 2e-2) * scale
    if store_diff > tol:
        raise LaminaError("the deployable model's scores differ from the head's on the store's features",
                          value=f"max |difference| {store_diff:.3g}", allowed=f"<= {tol:.3g}",
                          fix="capture the store again with this model and these settings (--max-length, "
                              "--image-size must match)")
    # one writer at a time; only lamina's own files are replaced (lamina.runfolder)
    with claim(run_dir, "transfer", writes, config.overwrite, merge=(RUN_CONFIG, RECORD)):
        out.parent.mkdir(parents=True, exist_ok=True)
        save_transfer(dep, out, classes, {"trained_on": str(run_dir), "head_name": config.head})
        back = load_transfer(out)
        reload_diff = max_difference(dep, back, batch)
        if not reload_diff <= 1e-5 * scale:
            raise LaminaError("the saved model does not reproduce the trained one after reloading",
                              value=reload_diff, allowed="identical outputs on the calibration batch",
                              fix="report this as a bug")
        rec = {"head": config.head, "test": test, "trainable_parameters": int(trainable),
               "backbone_parameters": int(sum(p.numel() for p in info["backbone"].module.parameters())),
               "deployed_parameters": int(sum(p.numel() for p in dep.module.parameters())),
               "seconds": seconds, "cpu_seconds": cpu_seconds,
               "peak_memory_bytes": int(mem.bytes), "peak_memory_method": mem.method,
               "layers": reads, "deepest_block": info["deepest_block"], "n_blocks": info["n_blocks"],
               "blocks_removed": info["removed"], "model_path": str(out),
               "reload_check": {"rows": int(len(calib)), "max_abs_difference": reload_diff,
                                "store_max_abs_difference": store_diff},
               "config": asdict(config), **{k: v for k, v in extra.items() if k != "history"},
               "history": extra.get("history")}
        record(run_dir, "transfer", [RECORD, RECORD + ".tmp"])
        _write_record(run_dir, store, split, split_info, rec, _reference(config.task))
        update_run_config(run_dir, f"transfer.{config.head}", {"config": asdict(config), "model": str(out)})
    log.info("transfer %s: test accuracy %.4f, %d trainable parameters", config.head, test["accuracy"], trainable)
    return TransferResult(config.head, str(out), test["accuracy"], test["ci_low"], test["ci_high"], int(trainable),
                          seconds, int(mem.bytes), reads, info["deepest_block"], info["n_blocks"], rec)


def _train_side(lm, ds, names, split, labels, n_classes, cap, config, loop, none_store=None,
                at=(torch.device("cpu"), torch.float32)):
    from ._side_train import StoreTokens, TokenFeatures
    from .side import side_for
    dep, info = build_deployable(lm, torch.nn.Identity(), names, "none")
    with PeakMemory(str(at[0])) as mem:
        if none_store is not None:  # the token-level outputs are on disk already: no backbone pass at all
            feats = StoreTokens(none_store, names)
        else:
            cache_rows = np.concatenate([split["train"], split["val"]])
            feats = TokenFeatures(dep, ds, cap.get("max_length", 128), cap.get("image_size"), config.batch_size,
                                  cache_rows, config.side_cache_mb, at)
        torch.manual_seed(loop.seed)
        net = side_for(feats.shapes, n_classes, config.side_width)
        hist = train_head(net, list(net.parameters()), feats, labels, split, loop, device=at[0], dtype=at[1])
    net.cpu().eval()
    dep.module.head = net
    feats.to_cpu()
    extra = {"history": hist, "side_width": net.width, "side_kind": net.kind, "token_shapes": feats.shapes,
             "cached": feats.cached, "cache_estimate_mb": feats.estimated_mb,
             "token_source": "store" if none_store is not None else "backbone"}
    return net, dep, info, extra, feats, mem


def _reference(task: str | None) -> dict | None:
    """The fine-tuning that ``--task`` names, as a point to compare with (same test rows)."""
    f = Path(task) / "finetune.json" if task else None
    if f is None or not f.is_file():
        return None
    r = json.loads(f.read_text())
    return {"folder": str(task), "mode": r.get("mode"), "accuracy": (r.get("test") or {}).get("accuracy"),
            "trainable_parameters": r.get("trainable_parameters"), "parameters": r.get("parameters"),
            "seconds": r.get("seconds")}


def _write_record(run_dir: Path, store: FeatureStore, split: dict, split_info: dict, rec: dict,
                  reference: dict | None) -> None:
    path = run_dir / RECORD
    old = json.loads(path.read_text()) if path.exists() else {}
    sizes = {k: int(len(v)) for k, v in split.items()}
    if old and (old.get("split") != split_info or old.get("split_sizes") != sizes):
        keep = {}  # heads trained on other rows are not comparable: they go
    else:
        keep = old.get("heads", {})
    keep[rec["head"]] = rec
    man = store.manifest
    save_json(path, {"lamina_transfer": 1, "model": man.get("model", {}), "data": man.get("data", {}),
                     "pooling": man.get("pooling"), "split": split_info, "split_sizes": sizes,
                     "heads": keep, "reference": reference or old.get("reference"), "versions": versions(),
                     "definitions": {
                         "test.accuracy": "accuracy on the test rows, 95% Wilson interval in ci_low/ci_high",
                         "trainable_parameters": "parameters of the trained head (select: the final head on the "
                                                 "kept features; the ranking stage trains one weight per feature "
                                                 "and class)",
                         "seconds": "wall time of training (store heads: from features in memory; side: including "
                                    "the frozen backbone's passes)",
                         "cpu_seconds": "CPU time of this process over the same span as seconds (every thread)",
                         "peak_memory_bytes": "rise of peak memory during training (see peak_memory_method)",
                         "deepest_block": "index of the deepest block the head reads (-1: the embeddings only); "
                                          "the deployable model keeps blocks 0..deepest_block"}})
