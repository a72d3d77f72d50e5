"""Training checkpoints that hold tensors and plain data only.

A checkpoint is read back on ``--resume`` from a folder that may come from
anyone, so it must not be able to run code (a pickle can: ``torch.load`` with
``weights_only=False`` runs whatever the file says). It is two files in OUT:

    checkpoint.e{EPOCH}.safetensors   every tensor: module states, the best
                                      epoch's states, the optimizer's moments
    checkpoint.json                   the rest as strict JSON: epoch, history,
                                      scheduler state, optimizer param_groups,
                                      the float16 loss scaler's state, the
                                      loop settings, the tensor file's name,
                                      size and sha256, and which tensor is which

Writing is ordered so a crash never leaves a pair that looks complete: the
tensors go to a new file (its name carries the epoch), are fsynced, then the
JSON is written to a temp name, fsynced and renamed over checkpoint.json (the
commit), and only then is the previous epoch's tensor file removed. Reading
verifies the JSON's structure and the tensor file's size and sha256 before
safetensors parses it; anything else is refused with a LaminaError that says
to delete the checkpoint or run without ``--resume``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .errors import LaminaError
from .trust import inside, sha256_of

CHECKPOINT = "checkpoint.json"  # the commit marker: a checkpoint exists when this file does
CHECKPOINT_FILES = (CHECKPOINT, CHECKPOINT + ".tmp")  # fixed names; the tensor file's name carries the epoch
_FORMAT = 1
_TENSORS = re.compile(r"^checkpoint\.e\d{1,9}\.safetensors$")


def checkpoint_files(out) -> list[Path]:
    """Every file of a checkpoint in ``out`` (the JSON and any tensor files, a crashed write's included)."""
    out = Path(out)
    return [p for p in [out / CHECKPOINT, *sorted(out.glob("checkpoint.e*.safetensors"))]
            if p.exists() or p.is_symlink()]


def remove_checkpoint(out) -> None:
    """Delete the checkpoint in ``out``: the JSON first, so a half-deleted pair is never taken as complete."""
    for p in checkpoint_files(out):
        p.unlink()


def save_checkpoint(out, epoch: int, modules: dict, opt, sched, hist: dict, best_state: dict | None,
                    settings: dict, scaler=None) -> Path:
    """Write the state after ``epoch`` (0-based) to ``out``; returns the JSON's path.

    ``scaler``: the ``torch.amp.GradScaler`` of a float16 run (its loss scale and growth counter are
    plain numbers; a disabled scaler's state is empty).
    """
    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    index: dict = {"modules": {}, "best": None, "optimizer": {}}
    for k, m in modules.items():
        index["modules"][k] = _put(tensors, f"module/{k}", m.state_dict())
    if best_state is not None:
        index["best"] = {k: _put(tensors, f"best/{k}", sd) for k, sd in best_state.items()}
    osd = opt.state_dict()
    scalars = {}
    for pid, st in osd["state"].items():
        ten = {n: v for n, v in st.items() if isinstance(v, torch.Tensor)}
        index["optimizer"][str(pid)] = _put(tensors, f"optim/{pid}", ten)
        rest = {n: v for n, v in st.items() if not isinstance(v, torch.Tensor)}
        if rest:
            scalars[str(pid)] = rest
    name = f"checkpoint.e{int(epoch)}.safetensors"
    tpath = out / name
    from .runfolder import record
    record(out, "checkpoint", [name, *CHECKPOINT_FILES])  # lamina's own, so --overwrite may remove them
    from safetensors.torch import save_file
    save_file(_unshared(tensors), str(tpath))
    _fsync(tpath)
    meta = {"lamina_checkpoint": _FORMAT, "epoch": int(epoch), "tensors": name, "bytes": tpath.stat().st_size,
            "sha256": sha256_of(tpath), "index": index, "optimizer_param_groups": osd["param_groups"],
            "optimizer_scalars": scalars, "scheduler": sched.state_dict(), "history": hist, "settings": settings,
            "grad_scaler": {} if scaler is None else dict(scaler.state_dict())}
    tmp = out / (CHECKPOINT + ".tmp")
    tmp.write_text(json.dumps(_plain(meta), allow_nan=False, indent=1))
    _fsync(tmp)
    os.replace(tmp, out / CHECKPOINT)
    _fsync(out)
    for p in out.glob("checkpoint.e*.safetensors"):
        if p.name != name:
            p.unlink()
    return out / CHECKPOINT


def load_checkpoint(out, modules: dict, opt, sched, scaler=None) -> tuple[dict, dict | None, int]:
    """Restore ``modules``, ``opt``, ``sched`` (and the float16 ``scaler``) from the checkpoint in ``out``.

    Returns (history, best_state, epoch). Raises LaminaError for a checkpoint
    that is not one lamina wrote, is incomplete, altered, or of another run.
    """
    out = Path(out)
    path = out / CHECKPOINT
    try:
        meta = json.loads(inside(out, CHECKPOINT, "the checkpoint").read_text(encoding="utf-8"),
                          object_hook=_unplain)
        if not isinstance(meta, dict) or meta.get("lamina_checkpoint") != _FORMAT:
            raise ValueError("not a lamina checkpoint of this format")
        name = meta["tensors"]
        if not isinstance(name, str) or not _TENSORS.match(name):
            raise ValueError(f"tensor file name {name!r} is not checkpoint.eN.safetensors")
        tpath = inside(out, name, "checkpoint.json 'tensors'")
        if not tpath.is_file() or tpath.stat().st_size != meta["bytes"]:
            raise ValueError(f"{name} is missing or has another size than recorded")
        if sha256_of(tpath) != meta["sha256"]:
            raise ValueError(f"{name} does not match its recorded sha256")
        from safetensors.torch import load_file
        tensors = load_file(str(tpath))
        index, epoch = meta["index"], meta["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch {epoch!r} is not a non-negative integer")
        if set(index["modules"]) != set(modules):
            raise ValueError(f"it holds modules {sorted(index['modules'])}, this run trains {sorted(modules)}")
        for k, m in modules.items():
            m.load_state_dict(_take(tensors, f"module/{k}", index["modules"][k]))
        best = None if index["best"] is None else {
            k: _take(tensors, f"best/{k}", keys) for k, keys in index["best"].items()}
        groups = meta["optimizer_param_groups"]
        cur = opt.state_dict()["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(cur):
            raise ValueError("the optimizer's parameter groups differ from this run's")
        for g, c in zip(groups, cur):  # JSON has no tuples: give back the ones the optimizer had (betas)
            if not isinstance(g, dict) or set(g) != set(c):
                raise ValueError("the optimizer's parameter groups differ from this run's")
            for key, v in c.items():
                if isinstance(v, tuple) and isinstance(g.get(key), list):
                    g[key] = tuple(g[key])
        state = {}
        for pid, keys in index["optimizer"].items():
            st = _take(tensors, f"optim/{pid}", keys)
            st.update(meta["optimizer_scalars"].get(pid, {}))
            state[int(pid)] = st
        opt.load_state_dict({"state": state, "param_groups": groups})
        sched_state, cur_sched = meta["scheduler"], sched.state_dict()
        # load_state_dict copies every key onto the scheduler: accept exactly the keys it has
        if not isinstance(sched_state, dict) or set(sched_state) != set(cur_sched) \
                or sched_state.get("lr_lambdas") != cur_sched.get("lr_lambdas"):
            raise ValueError("its scheduler state is not this run's schedule")
        sched.load_state_dict(sched_state)
        if scaler is not None:
            _load_scaler(scaler, meta.get("grad_scaler"))
        hist = meta["history"]
        if not isinstance(hist, dict) or not isinstance(hist.get("epochs"), list):
            raise ValueError("its history is not a lamina training history")
    except LaminaError:
        raise
    except Exception as e:  # noqa: BLE001 - every way an untrusted file can be wrong (safetensors' parse
        raise _refused(path, e) from e  # errors included) is a refused checkpoint, never a traceback
    return hist, best, epoch


def _load_scaler(scaler, state) -> None:
    """Give a float16 run back its loss scale and growth counter, so the resumed steps skip and grow as
    the uninterrupted run's would (a fresh scale of 2^16 would skip steps the run did not)."""
    if not scaler.is_enabled():
        return  # float32 / bfloat16: no loss scale (a float16 run resumed so keeps its float32 weights)
    if not state:
        raise ValueError("it holds no float16 loss-scale state (the run was not float16, or an older lamina "
                         "wrote it), so the resumed steps would not be the run's")
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    ok = (isinstance(state, dict) and set(state) == {"scale", "growth_factor", "backoff_factor", "growth_interval",
                                                     "_growth_tracker"}
          and all(num(v) for v in state.values()) and state["scale"] > 0 and state["growth_factor"] > 1
          and 0 < state["backoff_factor"] < 1 and isinstance(state["growth_interval"], int)
          and state["growth_interval"] > 0 and isinstance(state["_growth_tracker"], int)
          and 0 <= state["_growth_tracker"] < state["growth_interval"])
    if not ok:
        raise ValueError("its float16 loss-scale state is not a GradScaler's")
    scaler.load_state_dict(state)


def _refused(path: Path, e: Exception) -> LaminaError:
    return LaminaError(f"the checkpoint cannot be resumed: {str(e)[:300]}", value=str(path),
                       allowed="a checkpoint written by lamina for this run (checkpoint.json + "
                               "checkpoint.eN.safetensors with the recorded sha256)",
                       fix=f"delete {path.parent / 'checkpoint.*'} and run again, or run without --resume "
                           "(with --overwrite)")


def _put(tensors: dict, prefix: str, sd: dict) -> list[str]:
    keys = []
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise LaminaError(f"cannot checkpoint {prefix}: its state entry {k!r} is not a tensor",
                              value=type(v).__name__, allowed="modules whose state_dict holds tensors only",
                              fix="train without a checkpoint folder, or drop the extra state")
        tensors[f"{prefix}/{k}"] = v
        keys.append(k)
    return keys


def _take(tensors: dict, prefix: str, keys) -> dict:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"its index for {prefix} is not a list of names")
    missing = [k for k in keys if f"{prefix}/{k}" not in tensors]
    if missing:
        raise ValueError(f"tensors missing for {prefix}: {missing[:3]}")
    return {k: tensors[f"{prefix}/{k}"] for k in keys}


def _unshared(tensors: dict) -> dict:
    """safetensors stores each storage once: copy tensors that share one (tied weights) or are not contiguous."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _plain(obj):
    """JSON-ready copy: tuples become lists, non-finite floats a tagged object (strict JSON has none)."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise LaminaError("cannot checkpoint a mapping with non-string keys", value=list(obj)[:5],
                              fix="report this as a lamina bug")
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise LaminaError("cannot checkpoint a value that is not plain data", value=type(obj).__name__,
                      fix="report this as a lamina bug")


def _unplain(d: dict):
    if set(d) == {"$float"} and d["$float"] in ("nan", "inf", "-inf"):
        return float(d["$float"])
    return d


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
