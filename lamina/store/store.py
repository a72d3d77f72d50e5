"""The feature store: per-layer arrays on disk, written in chunks, resumable.

Layout of ``run/features/``::

    manifest.json        shapes, dtype, pooling, model fingerprint, config,
                         lamina version, checksums; ``complete`` is false until
                         every batch is on disk and the checksums are written
    labels.npy (N,)      int64 class indices
    ids.npy (N,)         sample ids in the source (strings)
    lengths.npy (N,)     tokens per sample (pooling 'none' on text only)
    layers/NAME.npy      (N, D) pooled, or (N, T, D) / (N, C, H, W) unpooled
    progress/rankR.txt   batch indices already written (during capture only)

Each layer file is a standard ``.npy`` created at full size up front; batches
are written at their row offset with plain file writes (not a memory map), so
the writer's memory stays flat whatever N is, and any layer opens alone with
``np.load(..., mmap_mode='r')``. A batch is listed in ``progress/`` only after
its rows are written to every layer, so a killed capture resumes at the first
missing batch and ends byte-identical to one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LaminaError, UsageError, suggest

FORMAT_VERSION = 1


def _safe(name: str) -> str:
    return name.replace("/", "_")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _alloc_npy(path: Path, shape: tuple, dtype) -> int:
    """Create ``path`` as an .npy of ``shape`` (sparse zeros); return its header size."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return offset


class StoreWriter:
    """Writes one capture into ``root`` (``run/features``); one per rank.

    Call :meth:`create` once (rank 0) or :meth:`open` (every rank, after the
    files exist), then :meth:`write_batch` per batch and :meth:`finish` (rank 0)
    when all ranks are done.
    """

    def __init__(self, root: Path, rank: int = 0):
        self.root = Path(root)
        self.rank = rank
        self._files: dict[str, tuple] = {}

    # -- set-up -------------------------------------------------------------
    def create(self, manifest: dict, layer_shapes: dict[str, tuple], dtype: str, labels, ids,
               lengths: bool = False) -> None:
        """Allocate every file and write an incomplete manifest."""
        (self.root / "layers").mkdir(parents=True, exist_ok=True)
        (self.root / "progress").mkdir(exist_ok=True)
        n = len(labels)
        np.save(self.root / "labels.npy", np.asarray(labels, dtype=np.int64))
        np.save(self.root / "ids.npy", np.asarray(ids).astype(str))
        layers = {}
        for name, shape in layer_shapes.items():
            fname = f"layers/{_safe(name)}.npy"
            _alloc_npy(self.root / fname, (n, *shape), dtype)
            layers[name] = {"file": fname, "shape": [n, *shape], "dtype": dtype}
        if lengths:
            _alloc_npy(self.root / "lengths.npy", (n,), np.int64)
        manifest = dict(manifest, format=FORMAT_VERSION, n=n, dtype=dtype, layers=layers,
                        complete=False, has_lengths=lengths)
        _write_json(self.root / "manifest.json", manifest)

    def open(self) -> dict:
        """Open the allocated files for writing; returns the manifest."""
        man = read_manifest(self.root)
        for name, info in man["layers"].items():
            path = self.root / info["file"]
            with open(path, "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                off = f.tell()
            row = int(np.prod(info["shape"][1:])) * np.dtype(info["dtype"]).itemsize
            self._files[name] = (open(path, "r+b"), off, row, np.dtype(info["dtype"]))
        if man.get("has_lengths"):
            path = self.root / "lengths.npy"
            with open(path, "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                off = f.tell()
            self._files["__lengths__"] = (open(path, "r+b"), off, 8, np.dtype(np.int64))
        (self.root / "progress").mkdir(exist_ok=True)
        self._progress = open(self.root / "progress" / f"rank{self.rank}.txt", "a")
        return man

    def done_batches(self) -> set[int]:
        """Batches already written by any rank of any earlier attempt."""
        done: set[int] = set()
        pdir = self.root / "progress"
        for p in pdir.glob("rank*.txt") if pdir.exists() else []:
            for line in p.read_text().splitlines():
                if line.strip().isdigit():
                    done.add(int(line))
        return done

    # -- writing ------------------------------------------------------------
    def write_batch(self, batch_index: int, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write rows ``start..start+B`` of every layer, then record the batch."""
        for name, arr in arrays.items():
            f, off, row, dt = self._files[name]
            data = np.ascontiguousarray(arr, dtype=dt)
            f.seek(off + start * row)
            f.write(data.tobytes())
            f.flush()
        self._progress.write(f"{batch_index}\n")
        self._progress.flush()

    @property
    def is_open(self) -> bool:
        return bool(self._files)

    def close(self) -> None:
        for f, *_ in self._files.values():
            f.close()
        self._files.clear()
        if getattr(self, "_progress", None):
            self._progress.close()
            self._progress = None

    def finish(self, n_batches: int) -> dict:
        """Check every batch is written, checksum the files, mark complete."""
        self.close()
        missing = sorted(set(range(n_batches)) - self.done_batches())
        if missing:
            raise LaminaError(f"capture is incomplete: {len(missing)} batches missing (first {missing[:5]})",
                              fix="run the same command again with --resume")
        man = read_manifest(self.root)
        sums = {"labels.npy": sha256_file(self.root / "labels.npy"), "ids.npy": sha256_file(self.root / "ids.npy")}
        for info in man["layers"].values():
            sums[info["file"]] = sha256_file(self.root / info["file"])
        if man.get("has_lengths"):
            sums["lengths.npy"] = sha256_file(self.root / "lengths.npy")
        man.update(checksums=sums, complete=True)
        _write_json(self.root / "manifest.json", man)
        shutil.rmtree(self.root / "progress", ignore_errors=True)
        return man


def _write_json(path: Path, obj: dict) -> None:
    from ..jsonio import write_json
    write_json(path, obj)  # strict JSON, atomic: lamina's one JSON writer


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise UsageError("no feature store here (manifest.json missing)", value=str(root),
                         allowed="a folder written by `lamina capture` (RUN/features or RUN)",
                         fix="run `lamina capture --out RUN` first, or point at the right run folder")
    return json.loads(path.read_text())


@dataclass
class FeatureStore:
    """Read side of a complete capture.

    Example::

        store = FeatureStore.open("run/")
        x = store.load("blocks.3")        # (N, D) memory-mapped, read-only
        y = store.labels                  # (N,) int64
    """

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path, allow_incomplete: bool = False) -> FeatureStore:
        root = Path(path)
        if (root / "features" / "manifest.json").exists():
            root = root / "features"
        man = read_manifest(root)
        if not man.get("complete") and not allow_incomplete:
            raise UsageError("the feature store is incomplete (the capture was interrupted)", value=str(root),
                             allowed="a completed capture",
                             fix="re-run the capture command with --resume to finish it")
        return cls(root, man)

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def labels(self) -> np.ndarray:
        return np.load(self.root / "labels.npy")

    @property
    def ids(self) -> np.ndarray:
        return np.load(self.root / "ids.npy")

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("data", {}).get("classes", []))

    @property
    def lengths(self) -> np.ndarray | None:
        p = self.root / "lengths.npy"
        return np.load(p) if p.exists() else None

    def load(self, layer: str, mmap: bool = True) -> np.ndarray:
        """One layer's array, (N, ...), without reading any other layer."""
        info = self.manifest["layers"].get(layer)
        if info is None:
            raise UsageError("no such layer in the store", value=layer, allowed=", ".join(self.layers),
                             fix=suggest(layer, self.layers) or None)
        return np.load(self.root / info["file"], mmap_mode="r" if mmap else None)

    def read_rows(self, layer: str, rows) -> np.ndarray:
        """Rows ``rows`` (sorted ints) of one layer, read with plain file reads.

        Unlike indexing the memory map, this leaves no pages of the file mapped
        in the process, so streaming over a store of any size keeps resident
        memory at the size of one batch. Consecutive rows are read in one call.
        """
        info = self.manifest["layers"].get(layer)
        if info is None:
            self.load(layer)  # raises the helpful error
        rows = np.asarray(rows, dtype=np.int64)
        dtype = np.dtype(info["dtype"])
        shape = info["shape"][1:]
        row_bytes = int(np.prod(shape)) * dtype.itemsize
        path = self.root / info["file"]
        out = np.empty((len(rows), *shape), dtype=dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
            fd = f.fileno()
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for start, run in zip(np.r_[0, breaks], np.split(rows, breaks)):
                if not len(run):
                    continue
                data = os.pread(fd, row_bytes * len(run), offset + int(run[0]) * row_bytes)
                flat[start:start + len(run)] = np.frombuffer(data, np.uint8).reshape(len(run), row_bytes)
        return out

    def verify(self) -> list[str]:
        """Files whose checksum differs from the manifest (empty when intact)."""
        bad = []
        for rel, digest in self.manifest.get("checksums", {}).items():
            if sha256_file(self.root / rel) != digest:
                bad.append(rel)
        return bad

    def summary(self) -> dict:
        m = self.manifest
        return {"path": str(self.root), "n": m["n"], "dtype": m["dtype"], "pooling": m.get("pooling"),
                "model": m.get("model", {}).get("name"), "data": m.get("data", {}).get("name"),
                "layers": {k: v["shape"][1:] for k, v in m["layers"].items()},
                "bytes": sum((self.root / v["file"]).stat().st_size for v in m["layers"].values())}
