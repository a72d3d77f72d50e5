"""The labelled dataset every stage reads, and deterministic subsampling.

Shapes:
    text:  ``inputs`` is a list of N strings.
    image: ``inputs`` is an array (N, H, W) or (N, H, W, C) of uint8 0-255 or
           floats 0-1, or a list of N image file paths read lazily.
    array: ``inputs`` is an array (N, ...) fed to the model as float32 as is.
``labels`` is int64 (N,), indices into ``classes``; ``ids`` (N,) are strings
that name each sample in its source (row number, file path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

KINDS = ("text", "image", "array")


@dataclass
class Dataset:
    name: str
    kind: str
    inputs: object
    labels: np.ndarray
    classes: list[str]
    ids: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.ids = np.asarray(self.ids).astype(str)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.labels) != len(self.ids) or len(self.labels) != len(self.inputs):
            raise ValueError("inputs, labels and ids must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> Dataset:
        """A new Dataset of the rows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        if isinstance(self.inputs, np.ndarray):
            inputs = self.inputs[idx]
        else:
            inputs = [self.inputs[i] for i in idx]
        return Dataset(self.name, self.kind, inputs, self.labels[idx], list(self.classes),
                       self.ids[idx], self.source, dict(self.meta))

    def images(self, idx) -> np.ndarray:
        """Images ``idx`` as float32 (B, C, H, W) in [0, 1] (image kind only)."""
        if isinstance(self.inputs, np.ndarray):
            arr = self.inputs[np.asarray(idx)]
        else:
            imgs = [read_image(self.inputs[i]) for i in idx]
            if len({im.shape for im in imgs}) > 1:
                # A folder of mixed sizes: bring the batch to its first image's size so it
                # stacks; the model's own resize (LoadedModel.batch) follows.
                from PIL import Image
                h, w = imgs[0].shape[:2]
                imgs = [im if im.shape[:2] == (h, w)
                        else np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in imgs]
            arr = np.stack(imgs)
        arr = np.asarray(arr)
        scale = 255.0 if arr.dtype == np.uint8 or arr.max(initial=0) > 1.5 else 1.0
        arr = arr.astype(np.float32) / scale
        if arr.ndim == 3:  # (B, H, W) grayscale
            arr = arr[:, None]
        elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)[:, :3]
        return arr

    def describe(self) -> dict:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        out = {"name": self.name, "kind": self.kind, "source": self.source, "n": len(self),
               "classes": list(self.classes), "class_counts": counts.tolist()}
        if self.meta.get("dropped"):  # rows the loader left out, by reason: part of what was measured
            out["dropped"] = dict(self.meta["dropped"])
            if self.meta.get("dropped_files"):
                out["dropped_files"] = list(self.meta["dropped_files"])
        return out


# What PIL raises for a file it cannot decode: not an image (UnidentifiedImageError is an
# OSError), truncated data (OSError), broken chunks (SyntaxError, ValueError), a short read (EOFError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def read_image(path) -> np.ndarray:
    """One image file as uint8 (H, W, 3); a UsageError naming the file when it cannot be decoded."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (*IMAGE_ERRORS, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read the image {path}: {e}", value=str(path),
                         allowed="image files PIL can decode (PNG, JPEG, BMP, GIF, WebP, TIFF)",
                         fix="replace or remove the file, or pass --skip-bad-files to leave unreadable images out "
                             "(they are counted on screen and in the run's record)") from e


def check_labels(ds: Dataset, min_per_class: int = 1) -> None:
    """Refuse datasets no stage can use: empty, one class, or too few per class."""
    if len(ds) == 0:
        raise UsageError(f"dataset {ds.name!r} is empty", value=ds.source or ds.name,
                         allowed="at least 2 labelled samples of 2 classes",
                         fix="check the file or the filter that produced it")
    present = np.unique(ds.labels)
    if len(present) < 2:
        only = ds.classes[present[0]] if len(present) else "?"
        raise UsageError(f"the label column of {ds.name!r} is constant: every sample is {only!r}",
                         value=only, allowed="at least 2 distinct labels",
                         fix="choose another --label-column, or data with more than one class")
    counts = np.bincount(ds.labels, minlength=len(ds.classes))
    small = [ds.classes[i] for i in present if counts[i] < min_per_class]
    if small:
        raise UsageError(f"dataset {ds.name!r} is too small: some classes have fewer than "
                         f"{min_per_class} samples", value={c: int(counts[ds.classes.index(c)]) for c in small[:5]},
                         allowed=f">= {min_per_class} samples per class",
                         fix="use more data, a larger --limit, or drop the rare classes")


def _take(counts: np.ndarray, limit: int) -> np.ndarray:
    """Rows per class of a stratified ``limit`` (largest remainder, at least one each when ``limit`` allows)."""
    share = counts / counts.sum() * limit
    take = np.floor(share).astype(int)
    if limit >= len(counts):
        take = np.maximum(take, 1)
    while take.sum() < limit:  # largest remainder first, ties by class index
        rem = np.where(take < counts, share - take, -np.inf)
        take[int(np.argmax(rem))] += 1
    while take.sum() > limit:
        take[int(np.argmax(take))] -= 1
    return take


def _usable(take: np.ndarray, per_class: int) -> bool:
    """What check_labels asks of a subsample: 2 classes present, each present one with ``per_class`` rows."""
    present = take[take > 0]
    return len(present) >= 2 and bool((present >= per_class).all())


def _min_limit(counts: np.ndarray, per_class: int) -> int:
    """The smallest limit whose stratified subsample passes check_labels (scanned: it runs only to word an error)."""
    for limit in range(2, int(counts.sum()) + 1):
        if _usable(_take(counts, limit), per_class):
            return limit
    return int(counts.sum())


def subsample(ds: Dataset, limit: int | None, seed: int = 0, min_per_class: int = 1,
              flag: str = "--limit") -> Dataset:
    """At most ``limit`` rows, stratified by label, chosen by ``seed``.

    Each class keeps its share (largest-remainder rounding, at least one per
    class when ``limit`` allows); chosen rows keep their original order, so the
    result depends only on (data, limit, seed). A limit whose subsample would
    fail :func:`check_labels` (``min_per_class``) while the full data passes is
    refused with the smallest limit that works; ``flag`` names the option in
    that message.
    """
    if limit is None or limit == 0:
        return ds
    if limit < 0:
        raise UsageError(f"{flag} must be positive", value=limit, allowed="an integer >= 2, or 0 for all rows",
                         fix=f"drop {flag} to use every sample")
    if limit > len(ds):
        raise UsageError(f"{flag} is larger than the dataset {ds.name!r}", value=limit,
                         allowed=f"at most {len(ds)} (the number of samples)",
                         fix=f"use {flag} {len(ds)} or less, or drop {flag}")
    if limit == len(ds):
        return ds
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(ds.labels, return_counts=True)
    take = _take(counts, limit)
    # Only the limit is to blame when the full data would pass check_labels and the subsample would not
    # (one class left, or a class cut below min_per_class); otherwise check_labels words the problem.
    if min_per_class > 0 and _usable(counts, min_per_class) and not _usable(take, min_per_class):
        need = _min_limit(counts, min_per_class)
        raise UsageError(f"{flag} {limit} is too small for {ds.name!r}: the subsample needs 2 classes with at "
                         f"least {min_per_class} row{'s' if min_per_class > 1 else ''} each",
                         value=limit, allowed=f">= {need} (or 0 for all {len(ds)} rows)",
                         fix=f"use {flag} {need} or more, or drop {flag}")
    chosen = []
    for c, k in zip(classes, take):
        rows = np.flatnonzero(ds.labels == c)
        chosen.append(rng.permutation(rows)[:k])
    return ds.take(np.sort(np.concatenate(chosen)))
