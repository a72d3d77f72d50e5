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

A store may come from anyone, so opening one checks (cheaply, always) that
every file named by the manifest lies inside the folder (no ``..``, no symlink
out) and has the size its shape and dtype call for; reading a whole layer
(``load``, ``read_rows``) verifies its sha256 against the manifest once per
process (the hash runs over the bytes as they are read).
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
from ..trust import inside

FORMAT_VERSION = 1
_DTYPES = ("float32", "float16")
_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) of layer files verified in this process


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
        np.save(self._target("labels.npy"), np.asarray(labels, dtype=np.int64))
        np.save(self._target("ids.npy"), np.asarray(ids).astype(str))
        layers = {}
        for name, shape in layer_shapes.items():
            fname = f"layers/{_safe(name)}.npy"
            _alloc_npy(self._target(fname), (n, *shape), dtype)
            layers[name] = {"file": fname, "shape": [n, *shape], "dtype": dtype}
        if lengths:
            _alloc_npy(self._target("lengths.npy"), (n,), np.int64)
        manifest = dict(manifest, format=FORMAT_VERSION, n=n, dtype=dtype, layers=layers,
                        complete=False, has_lengths=lengths)
        _write_json(self.root / "manifest.json", manifest)

    def _target(self, rel: str) -> Path:
        """``root/rel`` to write, refused when a symlink there (or above) would lead the write out of the store."""
        return inside(self.root, rel, f"the store's {rel}")

    def open(self) -> dict:
        """Open the allocated files for writing; returns the manifest (checked as :meth:`FeatureStore.open`
        does: a manifest naming a file outside the folder is refused before anything is written)."""
        man = read_manifest(self.root)
        files = check_store(self.root, man)
        for name, info in man["layers"].items():
            path, off = files[info["file"]]
            row = int(np.prod(info["shape"][1:])) * np.dtype(info["dtype"]).itemsize
            self._files[name] = (open(path, "r+b"), off, row, np.dtype(info["dtype"]))
        if man.get("has_lengths"):
            path, off = files["lengths.npy"]
            self._files["__lengths__"] = (open(path, "r+b"), off, 8, np.dtype(np.int64))
        inside(self.root, "progress", "the store's progress/ folder").mkdir(exist_ok=True)
        self._progress = open(inside(self.root, f"progress/rank{self.rank}.txt", "a progress file"), "a")
        return man

    def done_batches(self) -> set[int]:
        """Batches already written by any rank of any earlier attempt."""
        done: set[int] = set()
        pdir = inside(self.root, "progress", "the store's progress/ folder")
        for p in pdir.glob("rank*.txt") if pdir.exists() else []:
            inside(self.root, f"progress/{p.name}", "a progress file")
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
        files = check_store(self.root, man)
        sums = {rel: sha256_file(path) for rel, (path, _) in files.items()}
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
    try:
        man = json.loads(inside(root, "manifest.json", "the store's manifest.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LaminaError(f"the store's manifest.json is not valid JSON ({e})", value=str(path),
                          allowed="a manifest written by `lamina capture`", fix="capture again with --overwrite") from e
    _check_manifest(man, path)
    return man


def _bad_manifest(path, what: str, value) -> LaminaError:
    return LaminaError(f"the store's manifest.json is not a lamina manifest: {what}", value=value,
                       allowed=f"a manifest written by `lamina capture` ({path})",
                       fix="capture again with --overwrite")


def _check_manifest(man, path) -> None:
    """The structure every reader relies on: layers with a file name, an integer shape and a storage dtype."""
    if not isinstance(man, dict) or not isinstance(man.get("layers"), dict):
        raise _bad_manifest(path, "no 'layers' object", type(man).__name__)
    n = man.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise _bad_manifest(path, "'n' is not a row count", n)
    for name, info in man["layers"].items():
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            raise _bad_manifest(path, f"layer {name!r} has no file name", info)
        shape = info.get("shape")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                          for d in shape) and shape[0] == n):
            raise _bad_manifest(path, f"layer {name!r} has no valid shape (n={n} rows first)", shape)
        if info.get("dtype") not in _DTYPES:
            raise _bad_manifest(path, f"layer {name!r} has an unknown dtype", info.get("dtype"))
    if not isinstance(man.get("checksums", {}), dict):
        raise _bad_manifest(path, "'checksums' is not an object", man.get("checksums"))


def _npy_header(path: Path) -> tuple[tuple, np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, dtype, fortran, f.tell()


def check_store(root: Path, man: dict) -> dict[str, tuple[Path, int]]:
    """Every file of the store, checked: inside ``root`` and of the size its shape and dtype call for.

    Returns {relative name: (path, data offset)}. Raises LaminaError naming the
    layer (or file) that is outside, missing, truncated or of another shape.
    Costs one small header read per file, so every open does it.
    """
    n = int(man["n"])
    # relative name -> (what it is, for messages; manifest key it came from; shape; dtype, or None: any but object)
    want = {"labels.npy": ("the labels", "labels.npy", (n,), np.dtype(np.int64)),
            "ids.npy": ("the sample ids", "ids.npy", (n,), None)}
    if man.get("has_lengths"):
        want["lengths.npy"] = ("the token counts", "lengths.npy", (n,), np.dtype(np.int64))
    for name, info in man["layers"].items():
        want[info["file"]] = (f"layer {name!r}", f"manifest.json layers[{name!r}].file", tuple(info["shape"]),
                              np.dtype(info["dtype"]))
    for rel in man.get("checksums", {}):
        if rel not in want:
            raise _bad_manifest(root / "manifest.json", "a checksum for a file that is not in the store", rel)
    out = {}
    for rel, (what, key, shape, dtype) in want.items():
        path = inside(root, rel, key)
        if not path.is_file():
            raise LaminaError(f"{what} of the store is missing its file", value=str(root / rel),
                              allowed="a complete store as capture wrote it",
                              fix="capture again with --overwrite (or --resume when the capture was interrupted)")
        try:
            got_shape, got_dtype, fortran, off = _npy_header(path)
        except (ValueError, OSError, SyntaxError) as e:
            raise LaminaError(f"{what} of the store is not a readable .npy file ({e})", value=str(path),
                              fix="capture again with --overwrite") from e
        if tuple(got_shape) != shape or fortran or (dtype is not None and got_dtype != dtype) \
                or got_dtype.hasobject:
            raise LaminaError(f"{what} of the store has another shape or dtype than the manifest records",
                              value=f"{path}: {got_dtype} {tuple(got_shape)}",
                              allowed=f"{dtype or 'as captured'} {shape}", fix="capture again with --overwrite")
        size, expect = path.stat().st_size, off + int(np.prod(shape, dtype=np.int64)) * got_dtype.itemsize
        if size != expect:
            raise LaminaError(f"{what} of the store is {'truncated' if size < expect else 'longer than recorded'}: "
                              f"{size} bytes, {expect} expected", value=str(path),
                              allowed="the file as capture wrote it",
                              fix="capture again with --overwrite (`lamina info RUN --verify` checks every file)")
        out[rel] = (path, off)
    return out


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
            inside(root, "features", "the run's features/ folder")
            root = root / "features"
        man = read_manifest(root)
        if not man.get("complete") and not allow_incomplete:
            raise UsageError("the feature store is incomplete (the capture was interrupted)", value=str(root),
                             allowed="a completed capture",
                             fix="re-run the capture command with --resume to finish it")
        store = cls(root, man)
        store._files = check_store(root, man)
        return store

    def _path(self, rel: str) -> Path:
        files = getattr(self, "_files", None) or check_store(self.root, self.manifest)
        self._files = files
        return files[rel][0]

    def _small(self, rel: str) -> np.ndarray:
        """A small whole-file array (labels, ids, lengths), its checksum verified as it is read."""
        path = self._path(rel)
        digest = self.manifest.get("checksums", {}).get(rel)
        if digest is None:
            return np.load(path, allow_pickle=False)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._mismatch(rel, rel)
        import io
        return np.load(io.BytesIO(data), allow_pickle=False)

    def _mismatch(self, what: str, rel: str) -> LaminaError:
        return LaminaError(f"{what} of the store does not match its checksum: the file was changed or damaged "
                           "after capture", value=str(self.root / rel), allowed="the bytes capture wrote",
                           fix="capture again with --overwrite (`lamina info RUN --verify` lists every damaged "
                               "file)")

    def verify_layer(self, layer: str) -> None:
        """Check one layer's file against its recorded sha256 (once per process while the file is unchanged);
        a store without checksums (an interrupted capture) has nothing to check."""
        rel = self.manifest["layers"][layer]["file"]
        digest = self.manifest.get("checksums", {}).get(rel)
        if digest is None:
            return
        path = self._path(rel)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, digest)
        if key in _VERIFIED:
            return
        if sha256_file(path) != digest:
            raise self._mismatch(f"layer {layer!r}", rel)
        _VERIFIED.add(key)

    def _read_verified(self, layer: str) -> np.ndarray:
        """The whole layer in memory, hashed in the same pass that reads it."""
        info = self.manifest["layers"][layer]
        rel = info["file"]
        path, off = self._path(rel), self._files[rel][1]
        out = np.empty(info["shape"], dtype=np.dtype(info["dtype"]))
        buf = out.reshape(-1).view(np.uint8)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(off))
            pos, chunk = 0, 1 << 22
            while pos < len(buf):
                got = f.readinto(memoryview(buf)[pos:pos + chunk])
                if not got:
                    raise self._mismatch(f"layer {layer!r}", rel)
                h.update(memoryview(buf)[pos:pos + got])
                pos += got
        digest = self.manifest.get("checksums", {}).get(rel)
        if digest is not None and h.hexdigest() != digest:
            raise self._mismatch(f"layer {layer!r}", rel)
        return out

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def labels(self) -> np.ndarray:
        return self._small("labels.npy")

    @property
    def ids(self) -> np.ndarray:
        return self._small("ids.npy")

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("data", {}).get("classes", []))

    @property
    def lengths(self) -> np.ndarray | None:
        return self._small("lengths.npy") if self.manifest.get("has_lengths") else None

    def __repr__(self) -> str:  # the manifest (checksums and all) is one attribute away, not in the repr
        m, names = self.manifest, self.layers
        shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
        return (f"FeatureStore({str(self.root)!r}, model={m.get('model', {}).get('name')!r}, "
                f"data={m.get('data', {}).get('name')!r}, n={m.get('n')}, layers=[{shown}] ({len(names)}))")

    def layer_name(self, layer) -> str:
        """The stored name of ``layer``: a name, ``blocks.-1`` (the model's last block, as ``--layers``
        accepts it), or an int position in :attr:`layers` (negatives from the end)."""
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            if not -len(self.layers) <= layer < len(self.layers):
                raise UsageError("layer position out of range", value=int(layer),
                                 allowed=f"{-len(self.layers)}..{len(self.layers) - 1}", fix="store.layers lists them")
            return self.layers[layer]
        layer = str(layer)
        if layer.startswith("blocks.") and layer[7:].startswith("-") and layer[8:].isdigit():
            n = len((self.manifest.get("blocks") or {}).get("block_paths") or []) \
                or sum(1 for x in self.layers if x.startswith("blocks."))
            if -n <= int(layer[7:]):
                return f"blocks.{int(layer[7:]) % n}"
        return layer

    def load(self, layer: str, mmap: bool = True) -> np.ndarray:
        """One layer's array, (N, ...), without reading any other layer (``blocks.-1`` is the last block); its checksum verified.

        ``mmap=True``: a read-only memory map (the file is hashed once per
        process first); ``mmap=False``: read into memory, hashed as it is read.
        """
        layer = self.layer_name(layer)
        info = self.manifest["layers"].get(layer)
        if info is None:
            raise UsageError("no such layer in the store", value=layer, allowed=", ".join(self.layers),
                             fix=suggest(layer, self.layers) or None)
        if not mmap:
            return self._read_verified(layer)
        self.verify_layer(layer)
        return np.load(self._path(info["file"]), mmap_mode="r", allow_pickle=False)

    def read_rows(self, layer: str, rows) -> np.ndarray:
        """Rows ``rows`` (sorted ints) of one layer, read with plain file reads.

        Unlike indexing the memory map, this leaves no pages of the file mapped
        in the process, so streaming over a store of any size keeps resident
        memory at the size of one batch. Consecutive rows are read in one call.
        """
        layer = self.layer_name(layer)
        info = self.manifest["layers"].get(layer)
        if info is None:
            self.load(layer)  # raises the helpful error
        self.verify_layer(layer)  # once per process: the rows of later calls come from verified bytes
        rows = np.asarray(rows, dtype=np.int64)
        dtype = np.dtype(info["dtype"])
        shape = info["shape"][1:]
        row_bytes = int(np.prod(shape)) * dtype.itemsize
        path = self._path(info["file"])
        out = np.empty((len(rows), *shape), dtype=dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        with open(path, "rb") as f:
            offset = self._files[info["file"]][1]
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
            if sha256_file(inside(self.root, rel, "a checksummed file")) != digest:
                bad.append(rel)
        return bad

    def summary(self) -> dict:
        m = self.manifest
        return {"path": str(self.root), "n": m["n"], "dtype": m["dtype"], "pooling": m.get("pooling"),
                "model": m.get("model", {}).get("name"), "data": m.get("data", {}).get("name"),
                "layers": {k: v["shape"][1:] for k, v in m["layers"].items()},
                "classes": dict(zip(map(str, m.get("data", {}).get("classes") or []),
                                    m.get("data", {}).get("class_counts") or [])),
                "bytes": sum(self._path(v["file"]).stat().st_size for v in m["layers"].values())}
