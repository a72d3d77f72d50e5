"""Every file read from a run or model folder is untrusted input.

A folder may come from anyone, so lamina:
- never follows a path out of it: every name taken from its files (a store
  manifest's layer ``file``, a checkpoint's tensor file, the ``model/``
  subfolder, a symlink) must resolve inside the folder: :func:`inside`;
- never imports code because a file in it says so: a saved model whose
  ``lamina.json`` names a ``factory:`` builder is rebuilt only when the user
  names the same factory or trusts the folder's code explicitly
  (:func:`code_trusted`, set by the CLI's ``--trust-code`` through
  :func:`trusting_code`);
- never unpickles it (checkpoints are safetensors + JSON, see ``lamina.train``);
- checks recorded sizes and checksums when it reads bytes (``lamina.store``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from pathlib import Path

from .errors import LaminaError

_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("lamina_trust_code", default=False)
_NAMED: set[str] = set()  # "module:function" factories the user asked this process to load
# lamina's own tiny test models: importing them runs no code from the folder
_OWN_FACTORIES = "lamina.testing"


def inside(root, rel, what: str) -> Path:
    """``root / rel``, refused unless it resolves (symlinks followed) inside ``root``.

    Args:
        root: the folder the name was read from.
        rel: the relative name a file in it gave (str).
        what: where the name came from, for the message ("manifest.json layers.x.file").

    Returns the resolved path. Raises LaminaError naming ``what`` and ``rel``
    for a name that is not a plain string, is absolute, climbs out with ``..``,
    or is a symlink (at any level) pointing outside ``root``.
    """
    base = Path(root).resolve()
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise LaminaError(f"{what} is not a file name", value=rel, allowed="a path relative to the folder",
                          fix=f"the folder {root} was not written by lamina or was altered: do not use it")
    path = (base / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(base):
        raise LaminaError(f"{what} points outside its folder, so lamina refuses the folder", value=rel,
                          allowed=f"a path inside {base} (no '..', no absolute path, no symlink out)",
                          fix=f"the folder {root} was not written by lamina or was altered: do not use it, "
                              "or write it again with lamina")
    return path


def check_folder(root, names=None) -> None:
    """Refuse ``root`` when any of ``names`` (default: every entry in it, not recursing) resolves outside it."""
    root = Path(root)
    base = root
    if root.resolve().parent.name == "snapshots" and (root.resolve().parent.parent / "blobs").is_dir():
        base = root.resolve().parent.parent  # a Hugging Face cache snapshot: its files link into ../../blobs
    for name in names if names is not None else sorted(p.name for p in root.iterdir()):
        inside(base, _rel(root, base, name), f"{name!r} in {root}")
    if names is None:
        _check_shard_index(root, base)


def _rel(root: Path, base: Path, name: str) -> str:
    return name if base == root else str((root / name).relative_to(base))


def _check_shard_index(root: Path, base: Path) -> None:
    """The shard names a Hugging Face index (``*.index.json`` weight_map) gives must stay in the folder too."""
    import json
    for index in sorted(root.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (ValueError, AttributeError) as e:
            raise LaminaError(f"{index.name} is not a weight index", value=str(index),
                              allowed="a JSON object with a weight_map", fix="save the model again") from e
        if not isinstance(weight_map, dict):
            raise LaminaError(f"{index.name} has no weight_map object", value=str(index),
                              allowed="a JSON object with a weight_map", fix="save the model again")
        for shard in sorted(set(map(str, weight_map.values()))):
            inside(base, _rel(root, base, shard), f"{index.name} weight_map shard")


def sha256_of(path, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def name_factory(spec: str) -> None:
    """Record that the user named factory ``module:function`` (``--model module:function``): a saved folder
    that names the same factory may then be rebuilt with it in this process."""
    _NAMED.add(spec)


def factory_allowed(spec: str, factory: str | None = None, trust_code: bool | None = None) -> bool:
    """May a saved folder's ``factory:<spec>`` builder be imported? Only when the user named the same factory
    (``factory`` here, or earlier in this process), trusts code (``trust_code``, or the CLI's ``--trust-code``),
    or it is one of lamina's own test factories."""
    if trust_code or (trust_code is None and code_trusted()):
        return True
    return spec == factory or spec in _NAMED or spec.partition(":")[0] == _OWN_FACTORIES


def factory_of(spec: str) -> str | None:
    """The ``module:function`` that ``load_model(spec)`` would import, or None (a bundled name or a folder)."""
    spec = str(spec)
    if Path(spec).exists():
        return None
    named, at, folder = spec.partition("@")
    if at and ":" in named and Path(folder).is_dir():
        return named
    return spec if ":" in spec else None


def check_spec_from_file(spec: str, where: str) -> None:
    """Refuse a model spec read from a folder's file (a store manifest's ``model_spec``) that would import code,
    unless the user named that factory or trusts code. Loading a folder it names is safe: that load applies
    the same rules to the folder's own files."""
    named = factory_of(spec)
    if named is not None and not factory_allowed(named):
        from .errors import UsageError
        raise UsageError(f"{where} names code to import to rebuild the model, {named!r}; lamina imports code only "
                         "when you name it", value=spec,
                         allowed=f"name it yourself (Python: model={named!r}), or pass --trust-code "
                                 "(trust_code) if you trust the folder's author",
                         fix="or skip what needs the model again: --no-control --no-importance")


def import_named(module: str):
    """Import a module the user named (``--model module:function``), from the installed packages and
    PYTHONPATH, else from the current folder (only for the module named: it is what the user asked for)."""
    import importlib
    import os
    import sys
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.partition(".")[0]:
            raise
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(os.getcwd())


def code_trusted() -> bool:
    """True inside :func:`trusting_code` (the CLI's ``--trust-code``)."""
    return _TRUST_CODE.get()


@contextlib.contextmanager
def trusting_code(on: bool = True):
    """Within this block, saved models may import the ``factory:`` code their lamina.json names."""
    token = _TRUST_CODE.set(bool(on))
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)
