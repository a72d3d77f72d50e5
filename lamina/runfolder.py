"""Output folders: what lamina owns in them, who writes them now, and ``config.json``.

Three rules every stage that writes follows (capture, analyze, compare, report,
prune, finetune, distill, bench, demo):

- **Ownership record.** ``FOLDER/.lamina-files.json`` lists every file lamina
  wrote in FOLDER (paths relative to it), recorded *before* the file is
  written, so a crash never leaves a lamina file unrecorded. ``--overwrite``
  removes only recorded files; a target that also holds anything else is
  refused, naming what is there. A folder without a record holds no lamina
  files: it is not a run folder, whatever its files are called. A saved model
  folder carries its own record (:func:`swap_in`), so it answers for itself
  wherever it is.
- **Decide, then write.** :func:`plan_writes` checks every path a stage will
  write (absent, or lamina's and ``overwrite`` given, or ``config.json``, which
  stages merge into) before the stage writes anything; ``demo`` checks its
  three stages' paths before the first one starts.
- **One writer.** :func:`claim` holds an exclusive OS advisory lock on the
  folder (``filelock``; ``.lamina.lock``) while the stage runs; who holds it
  (pid, host, stage, start time) is in ``.lamina.lock.json``, so a second
  writer is refused naming the holder. The OS drops the lock when the process
  dies; the context releases it on errors and Ctrl-C. One process may nest
  claims of one folder (``demo`` runs three stages under one claim); the
  ranks of a torchrun job share rank 0's claim. Read-only stages take none.

Also here: ``config.json`` (:func:`update_run_config`, marked ``"lamina_run": 1``).
Next to it: :mod:`lamina.jsonio` (the one JSON writer, strict) and
:mod:`lamina.resume` (``--resume`` continues only the same run).

lamina's own bookkeeping names (``.lamina-files.json``, ``.lamina.lock``,
``.lamina.lock.json`` and scratch names ending in ``.lamina-tmp``) are never
counted as the user's files.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import LaminaError, UsageError
from .jsonio import write_json

RECORD = ".lamina-files.json"
LOCK = ".lamina.lock"
HOLDER = ".lamina.lock.json"
SCRATCH = ".lamina-tmp"
RUN_CONFIG = "config.json"
_BOOKKEEPING = {RECORD, RECORD + ".tmp", LOCK, HOLDER}
_SHOW = 5  # names listed in a refusal


def versions() -> dict:
    import numpy
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    from . import __version__
    out["lamina"] = __version__
    return out


# ---------------------------------------------------------------- the ownership record

def read_record(folder) -> dict[str, str]:
    """{relative path: stage} of the files lamina wrote in ``folder``; {} when it has no record."""
    path = Path(folder) / RECORD
    if not path.exists():
        return {}
    try:
        rec = json.loads(path.read_text())
        files = rec["files"]
        if rec.get("lamina_run") != 1 or not isinstance(files, dict):
            raise ValueError("unexpected content")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LaminaError(f"the folder's record of lamina's files is damaged ({e})", value=str(path),
                          allowed="the .lamina-files.json lamina writes",
                          fix="move the files you want to keep out of the folder, delete it, and run again") from e
    return {str(k): str(v) for k, v in files.items()}


def _write_record(folder: Path, files: dict) -> None:
    write_json(folder / RECORD, {"lamina_run": 1, "about": "files lamina wrote here; --overwrite removes only these",
                                 "files": dict(sorted(files.items()))})


def record(folder, stage: str, paths) -> None:
    """Add ``paths`` (relative to ``folder``) to its record as written by ``stage``; call it before writing."""
    folder = Path(folder)
    files = read_record(folder)
    # scratch names are lamina's by name: never recorded
    new = {_rel(p): stage for p in paths if not any(_ignored(part) for part in Path(p).parts)}
    if any(files.get(k) != v for k, v in new.items()):
        folder.mkdir(parents=True, exist_ok=True)
        _write_record(folder, {**files, **new})


def record_tree(folder, stage: str, sub) -> None:
    """Record every file now under ``folder/sub`` (a folder lamina just wrote in a scratch place)."""
    folder = Path(folder)
    record(folder, stage, [p.relative_to(folder).as_posix() for p in sorted((folder / sub).rglob("*"))
                           if (p.is_file() or p.is_symlink()) and p.name not in _BOOKKEEPING])


def _rel(p) -> str:
    return Path(p).as_posix()


def _ignored(name: str) -> bool:
    return name in _BOOKKEEPING or name.endswith(SCRATCH)


def _files_under(folder: Path, rel: str) -> list[str]:
    """Files (and links) at or under ``folder/rel``, relative to ``folder``; lamina's scratch names skipped."""
    target = folder / rel
    if target.is_symlink() or target.is_file():
        return [rel]
    if not target.is_dir():
        return [rel] if os.path.lexists(target) else []
    out = []
    for p in sorted(target.rglob("*")):
        if p.is_symlink() or not p.is_dir():
            r = p.relative_to(folder).as_posix()
            if not any(_ignored(part) for part in Path(r).parts):
                out.append(r)
    return out


def unknown_files(folder, rel: str) -> list[str]:
    """Files at or under ``folder/rel`` that lamina did not record (a nested lamina folder answers for itself)."""
    folder = Path(folder)
    target = folder / rel
    if rel != "." and target.is_dir() and not target.is_symlink() and (target / RECORD).exists():
        return [f"{rel}/{u}" for u in unknown_files(target, ".")]
    files = read_record(folder)
    out = []
    for f in _files_under(folder, rel):
        if f in files:
            continue
        parts = Path(f).parts
        nested = next((i for i in range(1, len(parts)) if (folder.joinpath(*parts[:i]) / RECORD).exists()), None)
        if nested is not None and Path(*parts[nested:]).as_posix() in read_record(folder.joinpath(*parts[:nested])):
            continue
        out.append(f)
    return out


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _remove_path(p: Path) -> None:
    import shutil
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def remove_owned(folder, rel: str) -> None:
    """Delete what lamina recorded at or under ``folder/rel`` (then the folders left empty); refuse, deleting
    nothing, when anything else is there. The only way lamina removes an earlier output."""
    folder = Path(folder)
    unknown = unknown_files(folder, rel)
    if unknown:
        raise UsageError("refusing to replace a folder that holds files lamina did not write",
                         value=f"{folder / rel}: {_listing(unknown)}", allowed="only files lamina recorded there",
                         fix="move those files elsewhere, or pick another --out")
    target = folder / rel
    for f in _files_under(folder, rel):  # every one of them is lamina's: checked just above
        os.unlink(folder / f)
    if target.is_dir() and not target.is_symlink():
        for d in sorted((p for p in target.rglob("*") if p.is_dir() and not p.is_symlink()),
                        key=lambda p: -len(p.parts)):
            if d.exists() and not any(_ignored(part) for part in d.relative_to(target).parts) \
                    and all(_ignored(p.name) for p in d.iterdir()):  # empty but for lamina's bookkeeping
                for p in list(d.iterdir()):
                    _remove_path(p)
                d.rmdir()
        if all(_ignored(p.name) for p in target.iterdir()):  # left: lamina's bookkeeping and scratch only
            for p in list(target.iterdir()):
                _remove_path(p)
            target.rmdir()
    files = read_record(folder)
    gone = [k for k in files if (k == rel or k.startswith(rel.rstrip("/") + "/")) and not (folder / k).exists()]
    if gone:
        _write_record(folder, {k: v for k, v in files.items() if k not in gone})


def discard(path) -> None:
    """Remove a model folder lamina has just written (a failed check must not leave it behind), deleting only
    what lamina recorded there; never raises, so the error that led here is the one the user sees."""
    path = Path(path)
    try:
        if os.path.lexists(path):
            remove_owned(path.parent, path.name)
    except (OSError, LaminaError):
        pass


def swap_in(tmp, dest, stage: str) -> None:
    """Move the folder ``tmp`` (just written) to ``dest``, replacing only what lamina recorded there.

    The folder carries its own record (``dest/.lamina-files.json``), so a model folder saved anywhere
    (``save_lamina`` from Python, OUT/model of a stage) can be replaced later without writing beside it."""
    tmp, dest = Path(tmp), Path(dest)
    folder = dest.parent
    unknown = unknown_files(folder, dest.name) if os.path.lexists(dest) else []
    if unknown:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError("refusing to replace a folder that holds files lamina did not write",
                         value=f"{dest}: {_listing(unknown)}", allowed="only files lamina recorded there",
                         fix="move those files elsewhere, or pick another path")
    record_tree(tmp, stage, ".")  # inside the folder, before it moves: it arrives recorded
    if os.path.lexists(dest):
        remove_owned(folder, dest.name)
    os.replace(tmp, dest)


# ---------------------------------------------------------------- decide before writing

def plan_writes(out, stage: str, writes, overwrite: bool, *, resume: bool = False, resumable: bool = False,
                merge=(RUN_CONFIG,)) -> None:
    """Refuse, before anything is written, what ``stage`` writing ``writes`` (paths relative to ``out``) would lose.

    - ``out`` must be a folder (or not exist yet);
    - an existing write target must be recorded as lamina's, entirely, whatever ``overwrite`` says;
    - an existing lamina target is replaced only with ``overwrite`` (or ``resume``, which continues it),
      except the ``merge`` files (config.json, which every stage adds its section to).
    Other files in ``out`` are no concern of the stage: it neither reads nor removes them.
    """
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError("the output folder is a file", value=str(out), allowed="a new or empty folder",
                         fix="pick another --out")
    if not out.is_dir():
        return
    writes = [_rel(w) for w in writes]
    unknown = [u for w in writes if os.path.lexists(out / w) for u in unknown_files(out, w)]
    if unknown:
        raise UsageError(f"{stage} would write where files lamina did not write are; refusing to touch them",
                         value=f"{out}: {_listing(unknown)}",
                         allowed="a new or empty folder, or one lamina wrote",
                         fix="move those files elsewhere, or pick another --out (lamina never deletes files it "
                             "did not write, even with --overwrite)")
    taken = [w for w in writes if w not in merge and os.path.lexists(out / w)]
    if taken and not overwrite and not resume:
        raise UsageError(f"{stage} output already exists", value=f"{out}: {_listing(taken)}",
                         allowed="a folder without them",
                         fix="pass --overwrite to replace what lamina wrote there, "
                             + ("--resume to continue an interrupted run, " if resumable else "")
                             + "or pick another --out")


# ---------------------------------------------------------------- one writer at a time

_HELD: dict[tuple, list] = {}
_HELD_GUARD = threading.Lock()


def holder(folder) -> dict | None:
    """Who holds the lock on ``folder`` (pid, host, stage, since), as its holder wrote it; None if unknown."""
    try:
        return json.loads((Path(folder) / HOLDER).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def lock(folder, stage: str):
    """Exclusive advisory lock on ``folder`` (which must exist) for the ``with`` body; refuses at once when
    another process (or thread) holds it. Nested use by the same thread of the same folder is allowed."""
    from filelock import FileLock, Timeout
    folder = Path(folder)
    key = (str(folder.resolve()), threading.get_ident())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            held[1] -= 1
        return
    fl = FileLock(str(folder / LOCK), thread_local=False)
    try:
        fl.acquire(timeout=0)
    except Timeout:
        who = holder(folder) or {}
        desc = (f"pid {who.get('pid')} on {who.get('host')} running `lamina {who.get('stage')}` since "
                f"{who.get('since')}") if who else "another process (it has not said which yet)"
        raise LaminaError("another lamina process is writing this folder", value=str(folder),
                          allowed=f"one writer at a time; held by {desc}",
                          fix="wait for it to finish, or pick another --out") from None
    except OSError as e:  # read-only file system, no permission (Timeout, an OSError too, is handled above)
        raise LaminaError(f"cannot write to the output folder ({e.strerror or e})", value=str(folder),
                          allowed="a folder you can write", fix="pick another --out, or fix its permissions") from e
    try:
        write_json(folder / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        with _HELD_GUARD:
            _HELD[key] = [fl, 1]
        yield
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        try:
            (folder / HOLDER).unlink()
        except OSError:
            pass
        fl.release()


@contextmanager
def claim(out, stage: str, writes, overwrite: bool, *, resume: bool = False, resumable: bool = False,
          merge=(RUN_CONFIG,), rank: int = 0):
    """The frame of a stage that writes ``writes`` in ``out``: :func:`plan_writes` before anything is created,
    then the folder, its lock, the check again under the lock (another writer may have finished meanwhile),
    and the body. A folder this claim created and the stage left empty is removed again on failure.
    Ranks other than 0 (torchrun) share rank 0's claim: they check nothing and hold nothing."""
    out = Path(out)
    if rank != 0:
        yield out
        return
    check = dict(resume=resume, resumable=resumable, merge=merge)
    plan_writes(out, stage, writes, overwrite, **check)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaminaError(f"cannot create the output folder ({e.strerror or e})", value=str(out),
                          allowed="a folder you can write", fix="pick another --out") from e
    ok = False
    try:
        with lock(out, stage):
            plan_writes(out, stage, writes, overwrite, **check)
            yield out
            ok = True
    finally:
        if not ok and created:
            _remove_if_empty(out)


def _remove_if_empty(out: Path) -> None:
    try:
        if all(_ignored(p.name) for p in out.iterdir()):
            if not any((out / k).exists() for k in read_record(out)):
                for p in out.iterdir():
                    p.unlink()
                out.rmdir()
    except (OSError, LaminaError):
        pass


# ---------------------------------------------------------------- config.json

def update_run_config(run: str | Path, stage: str, settings: dict) -> dict:
    """Merge ``settings`` under ``stage`` in RUN/config.json (atomic write).

    Only a config.json lamina recorded as its own (and marked ``"lamina_run": 1``) is merged into; a user's
    config.json there is refused (a folder lamina did not make is not a run folder)."""
    run = Path(run)
    path = run / RUN_CONFIG
    run.mkdir(parents=True, exist_ok=True)
    cfg = {}
    if os.path.lexists(path):
        if unknown_files(run, RUN_CONFIG):
            raise UsageError("the folder holds a config.json lamina did not write, so it is not a run folder",
                             value=str(path), allowed="a run folder lamina made",
                             fix="move that file elsewhere, or pick another --out")
        try:
            cfg = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise LaminaError(f"the run's config.json is not JSON ({e})", value=str(path),
                              allowed="the config.json lamina writes",
                              fix="delete it (it only records settings) and run the stage again") from e
        if not isinstance(cfg, dict) or cfg.get("lamina_run") != 1:
            raise UsageError("the run's config.json is not one lamina wrote", value=str(path),
                             allowed='a config.json with "lamina_run": 1',
                             fix="move that file elsewhere, or pick another --out")
    cfg["lamina_run"] = 1
    cfg[stage] = dict(settings, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    cfg["versions"] = versions()
    record(run, stage, [RUN_CONFIG])
    write_json(path, cfg)
    return cfg


def check_out(out: str | Path, overwrite: bool, resume: bool = False, checkpoint: str | None = None) -> None:
    """Refuse an OUT that is a file, or a folder that holds files, unless ``overwrite``; with ``resume``,
    require OUT/``checkpoint`` instead. prune, finetune and distill call it next to :func:`plan_writes`
    (which refuses files lamina did not write, whatever ``overwrite`` says); lamina's bookkeeping files do not
    count as content."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError("--out is a file, not a folder", value=str(out), allowed="a new or empty folder",
                         fix="pick another --out")
    if resume:
        if checkpoint is None or not (out / checkpoint).exists():
            raise UsageError(f"nothing to resume: OUT has no {checkpoint}", value=str(out),
                             allowed="the OUT folder of an interrupted run", fix="run without --resume")
        return
    if out.is_dir() and any(not _ignored(p.name) for p in out.iterdir()) and not overwrite:
        hint = ", pass --resume to continue it," if checkpoint else ""
        raise UsageError("the output folder already exists and is not empty", value=str(out),
                         allowed="a new or empty folder",
                         fix=f"pick another --out{hint} or pass --overwrite to replace what lamina writes there")
