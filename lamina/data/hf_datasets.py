"""Data read by the Hugging Face ``datasets`` library.

Two spellings of ``--data``:
    FOLDER[:split]             a folder written by ``Dataset.save_to_disk`` (no split) or
                               ``DatasetDict.save_to_disk`` (split required: ``folder:train``)
    NAME:split                 a Hub dataset, ``load_dataset(NAME, split=split)``: downloaded where there
    ORG/NAME:split             is a network, read from the cache (HF_HUB_CACHE / HF_DATASETS_CACHE) where
    NAME/CONFIG:split          there is not; ``glue/sst2:validation`` is ``load_dataset("glue", "sst2",
    ORG/NAME/CONFIG:split      split="validation")`` when no repository ``glue/sst2`` exists

Text and label columns are found like a table's (or named with
``--text-column/--label-column``); a ``ClassLabel`` label column gives the class
names in its own order; rows labelled -1 (unlabelled test splits, as in GLUE)
are dropped. An ``Image`` column makes an image dataset.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import UsageError, suggest
from .dataset import Dataset

_HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+){0,2}:[\w.\-\[\]%+]+$")
_SAVED = ("dataset_dict.json", "dataset_info.json", "state.json")


def _saved_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in _SAVED)


def is_hf_spec(spec: str) -> bool:
    """A save_to_disk folder (with or without ``:split``) or a ``name:split`` Hub dataset id."""
    folder, _, _ = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if _saved_folder(Path(spec)) or (folder and _saved_folder(Path(folder))):
        return True
    return bool(_HUB_SPEC.match(spec)) and not Path(spec).exists() and ".." not in spec


def _import():
    try:
        import datasets
    except ImportError as e:
        raise UsageError("reading this data needs the `datasets` library", value="datasets",
                         allowed="pip install datasets", fix="pip install 'lamina[datasets]'") from e
    return datasets


def _offline() -> bool:
    try:
        import datasets
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE or getattr(datasets.config, "HF_HUB_OFFLINE", False))
    except (ImportError, AttributeError):
        return False


def _from_disk(spec: str):
    datasets = _import()
    path, split = Path(spec), None
    if not _saved_folder(path):
        folder, _, split = spec.rpartition(":")
        path = Path(folder)
    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        splits = list(obj.keys())
        if split is None:
            raise UsageError("the saved dataset has several splits; name one", value=spec,
                             allowed=", ".join(splits), fix=f"--data {path}:{splits[0]}")
        if split not in obj:
            raise UsageError("the saved dataset has no such split", value=split, allowed=", ".join(splits),
                             fix=suggest(split, splits) or f"--data {path}:{splits[0]}")
        return obj[split], f"{path.name}:{split}", str(path)
    if split is not None:
        raise UsageError("the saved dataset has a single split, so it takes no ':split'", value=spec,
                         allowed=str(path), fix=f"--data {path}")
    return obj, path.name, str(path)


def _from_hub(spec: str):
    datasets = _import()
    name, _, split = spec.rpartition(":")
    parts = name.split("/")
    tries = [(name,)] if len(parts) < 3 else [("/".join(parts[:2]), parts[2])]
    if len(parts) == 2:  # 'org/name', else 'name/config' (glue/sst2)
        tries.append((parts[0], parts[1]))
    err = None
    for args in tries:
        try:
            return datasets.load_dataset(*args, split=split), name + ":" + split, "hf:" + spec
        except ValueError as e:
            text = str(e)
            m = re.search(r"[Uu]nknown split \"?([^\"]*)\"?\. Should be one of (\[.*\])", text)
            if m or "split" in text.lower() and "should be one of" in text.lower():
                raise UsageError("the dataset has no such split", value=split,
                                 allowed=m.group(2) if m else text[:200],
                                 fix=f"--data {name}:SPLIT with one of those") from e
            err = e
        except Exception as e:  # noqa: BLE001 - datasets raises many types (ConnectionError, DatasetNotFoundError...)
            err = e
    text = str(err)
    if "config" in text.lower() and ("missing" in text.lower() or "available" in text.lower()):
        raise UsageError("the dataset needs a configuration name", value=spec,
                         allowed=text.splitlines()[0][:300], fix=f"--data {name}/CONFIG:{split}") from err
    if _offline() or any(w in text.lower() for w in ("offline", "connect", "couldn't reach", "network")):
        raise UsageError("the Hub dataset is not available: no network and not in the cache", value=spec,
                         allowed="a dataset in the Hugging Face cache, or a folder written by save_to_disk",
                         fix=f"download it once with network access (load_dataset({name!r}) or `hf download "
                             f"--repo-type dataset {name}`), or point --data at a save_to_disk folder") from err
    raise UsageError("the Hub dataset could not be found or read", value=spec,
                     allowed="an existing dataset id NAME[/CONFIG]:SPLIT",
                     fix=f"check the id, the configuration and the split; datasets said: "
                         f"{text.splitlines()[0][:200] if text else type(err).__name__}") from err


# the column guesses and the refusal are the table loader's (one rule for every tabular source)
from .loaders import _GUESS_LABEL, _GUESS_TEXT  # noqa: E402
from .loaders import _pick_column as _pick  # noqa: E402


def load_hf(spec: str, text_column: str | None = None, label_column: str | None = None) -> Dataset:
    """A lamina Dataset from a save_to_disk folder or a Hub dataset id with a split (see the module doc)."""
    datasets = _import()
    hf, name, source = _from_disk(spec) if _saved_folder(Path(spec)) or _saved_folder(
        Path(spec.rpartition(":")[0])) else _from_hub(spec)
    cols = list(hf.column_names)
    feats = hf.features
    image_cols = [c for c in cols if isinstance(feats.get(c), datasets.Image)]
    lcol = _pick(cols, label_column, _GUESS_LABEL, "label", "--label-column", name)
    if image_cols and text_column is None:
        icol, kind = image_cols[0], "image"
    else:
        icol, kind = _pick([c for c in cols if c != lcol], text_column, _GUESS_TEXT, "text", "--text-column",
                           name), "text"
    labels_raw = hf[lcol]
    lab = feats.get(lcol)
    if isinstance(lab, datasets.ClassLabel):  # its names, in its own order
        labels = np.asarray(labels_raw, dtype=np.int64)
        classes = list(lab.names)
        keep = np.flatnonzero(labels >= 0)  # -1: unlabelled rows (GLUE's test splits)
    else:
        from .loaders import _encode
        present = [i for i, v in enumerate(labels_raw) if v is not None]
        labels, classes = _encode([labels_raw[i] for i in present])
        keep = np.asarray(present, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        full = np.full(len(labels_raw), -1, dtype=np.int64)
        full[keep] = labels
        labels = full
    if len(keep) == 0:
        raise UsageError("the split has no labelled rows", value=spec, allowed="a split with labels (not -1)",
                         fix="use the train or validation split")
    if kind == "text":
        values = hf[icol]
        keep = np.asarray([i for i in keep if values[i] is not None], dtype=np.int64)
        inputs = [str(values[i]) for i in keep]
    else:
        inputs = _images([hf[int(i)][icol] for i in keep], name)
    return Dataset(name, kind, inputs, labels[keep], classes, keep.astype(str), source=source,
                   meta={"text_column" if kind == "text" else "image_column": icol, "label_column": lcol})


def _images(pils, name) -> np.ndarray:
    """PIL images -> one uint8 array (N, H, W, C); they must share a size (lamina resizes per model later)."""
    arrs = [np.asarray(im.convert("RGB")) for im in pils]
    sizes = {a.shape for a in arrs}
    if len(sizes) > 1:
        raise UsageError("the dataset's images differ in size", value=f"{name}: {sorted(sizes)[:3]}",
                         allowed="images of one size", fix="resize them first (dataset.map), or export an image "
                                                           "folder (one sub-folder per class)")
    return np.stack(arrs)
