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


def sha256_of(path, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


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
