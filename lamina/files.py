"""Reading the files a user hands lamina, and failing with a message instead of a traceback.

Three kinds of file trouble share this module because they share one rule
(what, value, allowed, fix; never a library's traceback):
- JSON files of a run or model folder that are not JSON (:func:`read_json`);
- model folders whose files cannot be read: a truncated ``model.safetensors``,
  a ``config.json`` that is not JSON, no weights at all
  (:func:`check_model_folder` before loading, :func:`reading_model` around it);
- the operating system refusing a write: a read-only folder, a full disk
  (:func:`os_error`, used by the CLI at the stage boundary).
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import shutil
from pathlib import Path

from .errors import LaminaError

# Files a folder may hold the weights in; any one of them is enough.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (a non-finite number)")


def read_json(path, what: str | None = None, fix: str | None = None):
    """The parsed JSON of ``path``; a LaminaError naming the file, line and column when it is not JSON.

    ``what`` says what the file is ('the run's settings'); ``fix`` how to get a good one.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, parse_constant=_no_constant)  # NaN/Infinity are not JSON
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) \
            else "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise LaminaError(f"{path.name} is not valid JSON" + (f" ({what})" if what else ""),
                          value=f"{path}: {where}", allowed="a JSON file as lamina writes it",
                          fix=fix or f"restore {path.name} from a copy, or re-run the stage that wrote it") from e


def _damaged(path: Path, file: Path, why: str, fix: str | None = None) -> LaminaError:
    return LaminaError(f"the model folder cannot be loaded: {file.name} {why}", value=str(file),
                       allowed="a complete folder as save_pretrained / lamina writes it",
                       fix=fix or f"copy or save the model to {path} again (the file is damaged or was not "
                                  "written to the end)")


def check_model_folder(path) -> None:
    """Refuse a model folder whose JSON files are not JSON or whose .safetensors files are damaged.

    Cheap: JSON files are parsed, .safetensors files only have their header
    read (safetensors checks that the header covers the file exactly, which is
    what a truncated or appended-to file fails).
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    for f in sorted(path.glob("*.json")):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise _damaged(path, f, f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                           fix=f"restore {f.name} from the original model, or save the model again") from e
        except UnicodeDecodeError as e:
            raise _damaged(path, f, "is not text (not UTF-8)",
                           fix=f"restore {f.name} from the original model, or save the model again") from e
        if f.name in ("config.json", "lamina.json") and not isinstance(obj, dict):
            raise _damaged(path, f, f"holds a JSON {type(obj).__name__}, not an object of settings",
                           fix=f"restore {f.name} from the original model, or save the model again")
        if f.name.endswith(".index.json") and isinstance(obj, dict) and isinstance(obj.get("weight_map"), dict):
            shards = sorted({str(s) for s in obj["weight_map"].values()})
            gone = [s for s in shards if Path(s).name != s or not (path / s).is_file()]
            if gone:
                raise _damaged(path, f, f"lists {len(shards)} weight shards, of which {len(gone)} are not in the "
                                        f"folder ({', '.join(gone[:3])})",
                               fix="copy every shard the index lists into the folder, or save the model again")
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            size = f.stat().st_size
            raise _damaged(path, f, f"is not a readable safetensors file ({size:,} bytes; {e})") from e


def _no_weights(path: Path) -> LaminaError:
    have = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    if (path / "lamina.json").exists():
        return LaminaError("the model folder holds no weights", value=f"{path} (holds: {have})",
                           allowed="model.safetensors next to lamina.json",
                           fix="copy model.safetensors along with lamina.json, or re-run the stage that saved it")
    return LaminaError("the model folder holds no weights", value=f"{path} (holds: {have})",
                       allowed=" or ".join(_WEIGHTS),
                       fix="save the model with model.save_pretrained(path) (it writes model.safetensors), "
                           "or point --model at the folder that holds the weights")


@contextlib.contextmanager
def reading_model(path):
    """Turn any failure to read a model folder's files into a LaminaError naming the folder and file.

    Errors lamina already explains pass through, and so do the OS's refusals
    (permissions, a full disk) that the CLI reports with their path. What the
    libraries raise while reading (OSError, ValueError, RuntimeError,
    SafetensorError) is, inside this block, a file that could not be read.
    """
    from safetensors import SafetensorError
    path = Path(path)
    try:
        yield
    except LaminaError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError, EOFError) as e:
        if isinstance(e, OSError) and e.errno in _OS_MESSAGES:
            raise  # permissions and the like: the CLI's own message names the path
        if not any((path / w).exists() for w in _WEIGHTS) and not any(path.glob("*.safetensors")):
            raise _no_weights(path) from e
        kind = _unknown_type(path, e)
        if kind is not None:
            raise kind from e
        # The library rarely says which file it choked on: name the weights it was reading.
        weights = [f for f in sorted(path.iterdir()) if f.name in _WEIGHTS or f.suffix in (".safetensors", ".bin")]
        held = ", ".join(f"{f.name} ({f.stat().st_size:,} bytes)" for f in weights[:4])
        raise LaminaError(f"the model folder cannot be loaded: {type(e).__name__}: {str(e)[:300]}",
                          value=f"{path} (weights: {held})",
                          allowed="a complete folder as save_pretrained / lamina writes it",
                          fix=f"check that {weights[0].name if len(weights) == 1 else 'every file'} was copied "
                              "whole (a truncated or damaged file fails like this); save the model again") from e


def check_loaded_weights(path, module, info: dict) -> None:
    """Refuse a Hugging Face model whose weights file did not cover it (``output_loading_info`` of from_pretrained).

    transformers initializes what the checkpoint lacks at random and only logs
    it; every number lamina then reports would describe random weights.
    Extra tensors in the file (a task head the loaded class does not have) are fine.
    """
    path = Path(path)
    missing = list(info.get("missing_keys") or [])
    bad = [str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or []]
    if not missing and not bad:
        return
    total = len(module.state_dict())
    names = (missing + bad)[:4]
    raise LaminaError(f"the weights in {path.name} do not fit its config: {len(missing)} of {total} tensors are "
                      f"missing" + (f" and {len(bad)} have another shape" if bad else ""),
                      value=f"{path} (e.g. {', '.join(names)})",
                      allowed="weights saved together with this config.json (save_pretrained writes both)",
                      fix="the weights file belongs to another model or is incomplete: copy or save the model again")


def _unknown_type(path: Path, e: Exception) -> LaminaError | None:
    """The installed transformers does not know the folder's model_type (a newer model, or a typo)."""
    msg = str(e)
    if not isinstance(e, ValueError) or not ("Unrecognized" in msg or "does not recognize" in msg):
        return None
    import transformers
    cfg = path / "config.json"
    mtype = json.loads(cfg.read_text(encoding="utf-8")).get("model_type") if cfg.exists() else None
    return LaminaError(f"transformers {transformers.__version__} does not know this model's type",
                       value=f"model_type {mtype!r} in {cfg}", allowed="a model_type this transformers knows",
                       fix="check model_type in config.json, or upgrade transformers if the model is newer")


# errno -> (what went wrong, what to do); the path is added from the error.
_OS_MESSAGES = {
    errno.EACCES: ("permission denied", "check the permissions of that path (chmod u+rw), or pick another --out"),
    errno.EPERM: ("operation not permitted", "check the permissions of that path (chmod u+rw), or pick another "
                                             "--out"),
    errno.EROFS: ("the file system is read-only", "pick an --out on a writable disk"),
    errno.ENOSPC: ("no space left on the device", "free space on that disk, or pick an --out on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or pick an --out on another disk"),
    errno.EEXIST: ("something already exists where a folder was to be made (a file?)",
                   "pick another --out, or move that file aside"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "pick an --out whose parents are folders"),
    errno.EISDIR: ("a folder is where a file was expected", "remove or rename that folder, or pick another --out"),
    errno.ENAMETOOLONG: ("the file name is too long", "pick a shorter --out"),
}


def _free(path) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"; {shutil.disk_usage(p).free / 1e6:,.1f} MB free there"
    except OSError:
        return ""


def _errno_of(e: BaseException) -> tuple[int | None, str | None]:
    """(errno, path) of an OSError, or of a library error that carries one in its text: safetensors
    writes from Rust and reports 'I/O error: ... (os error 28) at path "..."' as a SafetensorError."""
    if isinstance(e, OSError):
        return e.errno, e.filename
    m = re.search(r"\(os error (\d+)\)(?: at path \"([^\"]+)\")?", str(e))
    return (int(m.group(1)), m.group(2)) if m else (None, None)


def os_error(e: BaseException, resumable: bool = False, out=None) -> LaminaError | None:
    """A LaminaError for an OS refusal a user can act on (permissions, read-only, full disk), else None.

    ``resumable``: the stage has ``--resume``, so a full disk can be continued.
    ``out``: the stage's output folder, named when the error does not say the path.
    """
    code, filename = _errno_of(e)
    if code not in _OS_MESSAGES:
        return None
    what, fix = _OS_MESSAGES[code]
    where = filename or (f"somewhere in {out}" if out else "(the path was not reported)")
    extra = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        extra = _free(filename or out) if (filename or out) else ""
        if resumable:
            fix += "; then run the same command with --resume to continue where it stopped"
    return LaminaError(f"{what}: {where}{extra}", value=str(where),
                       allowed="a folder path" if code in (errno.ENOTDIR, errno.EEXIST)
                       else "a folder lamina can write to",
                       fix=fix)
