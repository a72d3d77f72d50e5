"""``capture``: one forward pass per batch records every selected block.

Design decisions:
- Batches are fixed slices of the (subsampled) dataset in order, so batch b
  always holds the same rows: resume and multi-rank runs process identical
  batches and write identical bytes.
- Ranks under torchrun take remaining batches round-robin and write their own
  rows into the shared, preallocated layer files; rank 0 allocates and
  finalizes. The process group (gloo on CPU) only provides barriers.
- A capture key (model fingerprint + data identity + every setting that
  changes the bytes) is stored in the manifest; resuming with another key is
  refused rather than silently mixing two captures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .._cliargs import as_config
from ..blocks import select_taps
from ..data import Dataset, check_labels, subsample
from ..errors import LaminaError, UsageError
from ..runtime import Runtime, describe, dist_backend, oom_message
from ..models import LoadedModel, load_model
from ..runfolder import claim, record, remove_owned, update_run_config
from ..store import FeatureStore, StoreWriter, read_manifest
from ..store.store import _safe
from .dist import Dist
from .hooks import POOLINGS, recording

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureConfig(Runtime):
    """Settings of ``lamina capture``."""

    out: str = field(metadata={"help": "run folder; features go to OUT/features"})
    layers: str | None = field(default=None, metadata={
        "help": "layers to record: all (default), N for the last N blocks, or comma-separated names/globs/"
                "indices such as 'embed,blocks.-1' or 'blocks.*'"})
    blocks: str | None = field(default=None, metadata={
        "help": "where the blocks are, for models lamina cannot read by itself: a module path such as "
                "'encoder.layers' or a glob such as 'layer*.*'"})
    pooling: str = field(default="mean", metadata={"choices": POOLINGS,
        "help": "mean (padding-aware), cls (first token), last (last non-pad token), none (full sequences); "
                "CNN maps are always spatially averaged unless none"})
    batch_size: int = field(default=32, metadata={"help": "samples per forward pass"})
    max_length: int = field(default=128, metadata={"help": "text: truncate to this many tokens"})
    seq_len: int | None = field(default=None, metadata={
        "help": "a causal LM on text without labels (a .txt, 'debates'): tokens per packed block (default 128, or "
                "the model's context when shorter); the samples are "
                "the language-modelling task's training blocks (documents split train/val/test by --seed), and "
                "--limit counts blocks"})
    image_size: int | None = field(default=None, metadata={
        "help": "images: resize to this side (default: the model's own, 224 for efficientnet-lite0)"})
    limit: int | None = field(default=None, metadata={
        "help": "use at most this many samples, stratified by label (deterministic given --seed); 0 or "
                "unset: all rows"})
    seed: int = field(default=0, metadata={"help": "seed of the subsample"})
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float16"),
                                                    "help": "storage dtype: float32 or float16"})
    text_column: str | None = field(default=None, metadata={"help": "text column of a CSV/JSONL/Parquet file"})
    label_column: str | None = field(default=None, metadata={"help": "label column of a CSV/JSONL/Parquet file"})
    skip_bad_files: bool = field(default=False, metadata={
        "help": "image folders: leave out files that cannot be decoded (each image is decoded once up front; "
                "the count is shown and recorded) instead of refusing the folder"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted capture in OUT"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the store lamina wrote in OUT (a file it did not write is never touched)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise UsageError("unknown pooling", value=self.pooling, allowed=", ".join(POOLINGS),
                             fix="--pooling mean")
        if self.dtype not in ("float32", "float16"):
            raise UsageError("unknown storage dtype", value=self.dtype, allowed="float32, float16",
                             fix="--dtype float16 halves the store size")
        for name in ("batch_size", "max_length", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1", value=getattr(self, name),
                                 allowed="a positive integer", fix=f"--{name.replace('_', '-')} 32")
        if self.image_size is not None and self.image_size < 8:
            raise UsageError("--image-size is too small", value=self.image_size, allowed=">= 8",
                             fix="--image-size 64")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other", value="both given",
                             allowed="one of them", fix="--resume continues; --overwrite starts over")


@dataclass
class CaptureResult:
    """What a capture produced (``rank`` > 0 only under torchrun)."""

    store: str
    n: int
    layers: list[str]
    batches_run: int
    batches_total: int
    seconds: float
    resumed: bool
    rank: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def open(self) -> FeatureStore:
        return FeatureStore.open(self.store)


def _key(model: LoadedModel, ds: Dataset, cfg: CaptureConfig, taps) -> dict:
    ids_hash = hashlib.sha256("\n".join(ds.ids.tolist()).encode()).hexdigest()[:16]
    parts = {"model": model.fingerprint(), "data": ds.name, "source": ds.source, "ids": ids_hash,
             "layers": [t.name for t in taps], "pooling": cfg.pooling, "dtype": cfg.dtype,
             "batch_size": cfg.batch_size, "max_length": cfg.max_length, "image_size": cfg.image_size}
    if getattr(ds, "meta", {}).get("packed"):  # packed LM blocks: their length and task split change the bytes
        parts["lm_task"] = {k: v for k, v in ds.record().items() if k != "data"}
    if model.dtype != torch.float32:  # another compute dtype gives other bytes (float32 keys stay as they were)
        parts["compute_dtype"] = str(model.dtype).replace("torch.", "")
    parts["key"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return parts


def _prepare_folder(root: Path, cfg: CaptureConfig, key: dict, dist: Dist) -> str:
    """Decide 'fresh', 'resume' or 'done' for OUT/features; refuse what would lose data."""
    exists = (root / "manifest.json").exists()
    if not exists and root.exists() and any(root.iterdir()) and not cfg.overwrite:
        raise UsageError("the features folder exists but holds no lamina store", value=str(root),
                         allowed="an empty or missing folder", fix="choose another --out, or pass --overwrite")
    if exists and not cfg.overwrite:
        man = read_manifest(root)
        if not cfg.resume:
            state = "a complete" if man.get("complete") else "an interrupted"
            raise UsageError(f"{state} feature store already exists", value=str(root),
                             allowed="a new --out folder",
                             fix="--resume to continue it, --overwrite to replace it, or another --out")
        old = man.get("capture_key", {})
        if old.get("key") != key["key"]:
            diff = [k for k in key if k != "key" and old.get(k) != key[k]]
            raise UsageError("the store in OUT was captured with another model or settings; refusing to mix them",
                             value=str(root), allowed=f"the same settings (differs in: {', '.join(diff)})",
                             fix="use the original settings with --resume, or --overwrite to start over")
        return "done" if man.get("complete") else "resume"
    if root.exists() and cfg.overwrite and dist.rank == 0:
        remove_owned(root.parent, root.name)  # only what lamina recorded; anything else there is refused
    return "fresh"


def _store_files(taps, world: int, lengths: bool) -> list[str]:
    """Every file a capture may write in OUT/features (see lamina/store/store.py), recorded before writing."""
    names = ["manifest.json", "manifest.json.tmp", "labels.npy", "ids.npy",
             *(f"layers/{_safe(t.name)}.npy" for t in taps), *(f"progress/rank{r}.txt" for r in range(world))]
    return [f"features/{n}" for n in names + (["lengths.npy"] if lengths else [])]


def _check_out(cfg: CaptureConfig) -> None:
    """OUT must be a folder (or not exist yet); --resume needs a store to continue."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError("--out is a file, not a folder", value=str(out), allowed="a new folder or a run folder",
                         fix="pick another --out (capture writes OUT/features and OUT/config.json)")
    if cfg.resume and not (out / "features" / "manifest.json").exists():
        raise UsageError("nothing to resume: OUT has no features/manifest.json", value=str(out),
                         allowed="the OUT folder of an interrupted capture", fix="run without --resume")


def _disk_full(e: OSError, root: Path, written: int, total: int) -> LaminaError | None:
    """A full disk mid-capture: say how far it got; the batches on disk stay, so --resume continues."""
    import errno
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    from ..files import os_error
    err = os_error(e)
    return LaminaError(f"the disk filled up during capture: {written} of {total} batches are written to {root}",
                       value=err.value, allowed="enough free space for the whole store",
                       fix="free space on that disk, then run the same command with --resume to continue "
                           f"({err.what})")


def _to_numpy(t: torch.Tensor, dtype: str, name: str, ids) -> np.ndarray:
    # One reduction screens the whole batch; the element-wise check runs only if
    # it fails (a finite sum can overflow, so that path re-checks properly).
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise LaminaError(f"non-finite activations (NaN or inf) in layer {name!r}",
                          value=f"samples {[str(ids[i]) for i in bad[:5]]}", allowed="finite values",
                          fix="check the inputs of those samples and the model's weights; the store stays "
                              "resumable")
    arr = t.float().cpu().numpy()
    if dtype == "float16":
        arr16 = arr.astype(np.float16)
        if not np.isfinite(arr16).all():
            raise LaminaError(f"layer {name!r} overflows float16 (values beyond 65504)",
                              value=float(np.abs(arr).max()), allowed="|x| <= 65504 for float16 storage",
                              fix="capture with --dtype float32")
        return arr16
    return arr


def capture(model, data, config: CaptureConfig) -> CaptureResult:
    """Record every selected block's (pooled) output for every sample.

    Args:
        model: a bundled name, HF folder, 'module:factory', nn.Module or LoadedModel.
        data: a bundled name, a path, or a :class:`~lamina.data.Dataset`.
        config: a :class:`CaptureConfig`.
    Returns:
        CaptureResult; the store itself is in ``config.out/features``.
    """
    config = as_config(CaptureConfig, config, "capture")
    t0 = time.perf_counter()
    _check_out(config)
    lm = load_model(model, blocks=config.blocks, runtime=config.runtime())
    if config.blocks and lm.blocks.container != config.blocks and isinstance(model, LoadedModel):
        from ..blocks import find_blocks
        lm = replace(lm, blocks=find_blocks(lm.module, config.blocks))  # never touch the caller's object
    from ..data.text import load_for_capture
    from .packed import PackedRows, is_packed, packed_rows
    ds = data if isinstance(data, PackedRows) else \
        load_for_capture(data, config.text_column, config.label_column, config.skip_bad_files)
    if is_packed(lm, ds):  # a causal LM on text without labels: the LM task's packed training blocks
        if not isinstance(ds, PackedRows):
            ds = packed_rows(lm, ds, seq_len=config.seq_len, limit=config.limit, seed=config.seed,
                             text_column=config.text_column)
    else:
        ds = subsample(ds, config.limit, config.seed)
        if not ds.meta.get("unlabelled"):  # unlabelled text (a .txt, 'debates'): features for geometry and importance
            check_labels(ds)
    if len(ds) < 2:
        raise UsageError("the dataset is too small to capture", value=len(ds), allowed=">= 2 samples",
                         fix="use more data")
    taps = select_taps(lm.blocks, config.layers)
    key = _key(lm, ds, config, taps)
    root = Path(config.out) / "features"
    n, bs = len(ds), config.batch_size
    n_batches = (n + bs - 1) // bs
    unpooled_text = config.pooling == "none" and lm.modality == "text"
    packed = isinstance(ds, PackedRows)
    pad_to = ds.seq_len if packed else config.max_length

    writes = ["features", "config.json"]
    with Dist(dist_backend(lm.device)) as dist, claim(config.out, "capture", writes, config.overwrite,
                                                    resume=config.resume, rank=dist.rank, resumable=True):
        state = _prepare_folder(root, config, key, dist)
        if dist.rank == 0:
            record(config.out, "capture", _store_files(taps, dist.world, unpooled_text))
        dist.barrier()
        with torch.inference_mode(), recording(lm.module, taps, config.pooling) as rec:
            def run_batch(b: int) -> dict[str, np.ndarray]:
                rows = np.arange(b * bs, min((b + 1) * bs, n))
                batch = ds.batch(lm, rows) if packed else lm.batch(ds, rows, config.max_length, config.image_size)
                rec.mask = batch.get("attention_mask")
                rec.outputs.clear()
                with oom_message(len(rows), device=lm.device):
                    lm.forward(batch)
                arrays = {t.name: rec.outputs[t.name] for t in taps}
                if unpooled_text:
                    arrays = {k: _pad_tokens(v, pad_to) for k, v in arrays.items()}
                out = {k: _to_numpy(v, config.dtype, k, ds.ids[rows]) for k, v in arrays.items()}
                if unpooled_text:
                    out["__lengths__"] = batch["attention_mask"].sum(1).cpu().numpy()
                return out

            writer = StoreWriter(root, rank=dist.rank)
            if state == "fresh" and dist.rank == 0:
                # The first real batch tells each layer's shape; it is then written
                # like any other, so learning the shapes costs no extra forward.
                first = run_batch(0)
                shapes = {t.name: first[t.name].shape[1:] for t in taps}
                specs = {"model_spec": model if isinstance(model, str) else None,
                         "data_spec": str(data) if isinstance(data, (str, Path)) else None}
                described = {k: v for k, v in lm.describe(fingerprint=key["model"]).items() if k != "blocks"}
                manifest = {"lamina_version": __version__, "capture_key": key, "pooling": config.pooling, **specs,
                            "model": described, "blocks": lm.blocks.to_dict(), "data": ds.describe(),
                            "config": asdict(config), "torch": torch.__version__,
                            "runtime": describe(lm.device, lm.dtype)}
                if packed:
                    manifest["lm_task"] = ds.record()
                writer.create(manifest, shapes, config.dtype, ds.labels, ds.ids, lengths=unpooled_text)
                writer.open()
                writer.write_batch(0, 0, first)
            dist.barrier()
            if state == "done":
                return CaptureResult(str(root), n, [t.name for t in taps], 0, n_batches,
                                     time.perf_counter() - t0, True, rank=dist.rank)
            if not writer.is_open:
                writer.open()
            done = writer.done_batches()
            todo = [b for b in range(n_batches) if b not in done][dist.rank::dist.world]
            dist.barrier()  # every rank must read `done` before any rank writes more
            bar = None
            if config.progress and dist.rank == 0:
                from tqdm.auto import tqdm
                bar = tqdm(total=n_batches, initial=len(done), desc=f"capture {lm.name}", unit="batch")
            written = len(done)
            try:
                for b in todo:
                    writer.write_batch(b, b * bs, run_batch(b))
                    written += 1
                    if bar is not None:
                        bar.update(dist.world if dist.world > 1 else 1)
            except OSError as e:
                raise _disk_full(e, root, written, n_batches) or e
            finally:
                writer.close()
                if bar is not None:
                    bar.close()
        dist.barrier()
        if dist.rank == 0:
            StoreWriter(root).finish(n_batches)
            update_run_config(config.out, "capture", {"config": asdict(config), "model": lm.name,
                                                      "data": ds.name, "n": n, "store": str(root),
                                                      **({"lm_task": ds.record()} if packed else {})})
        dist.barrier()
    ran = len(todo) + (1 if state == "fresh" and dist.rank == 0 else 0)
    return CaptureResult(str(root), n, [t.name for t in taps], ran, n_batches,
                         time.perf_counter() - t0, state == "resume", rank=dist.rank)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T, D) -> (B, length, D), zero padding after the last token."""
    if x.dim() != 3 or x.shape[1] == length:
        return x
    out = x.new_zeros(x.shape[0], length, x.shape[2])
    out[:, : x.shape[1]] = x[:, :length]
    return out
