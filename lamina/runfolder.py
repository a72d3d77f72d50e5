"""Output folders: refusing one that holds the user's files, and ``config.json`` (resolved settings of every stage)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


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


def update_run_config(run: str | Path, stage: str, settings: dict) -> dict:
    """Merge ``settings`` under ``stage`` in RUN/config.json (atomic write)."""
    path = Path(run) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from .files import read_json
    cfg = read_json(path, "the run's settings", fix=f"move {path} aside (lamina writes a new one), "
                    "or restore it from a copy") if path.exists() else {}
    cfg[stage] = dict(settings, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    cfg["versions"] = versions()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(tmp, path)
    return cfg


def check_out(out: str | Path, overwrite: bool, resume: bool = False, checkpoint: str | None = None) -> None:
    """Refuse an OUT that is a file, or a folder that holds files, unless ``overwrite``; with ``resume``,
    require OUT/``checkpoint`` instead. The one rule for every stage that writes an OUT folder."""
    from .errors import UsageError
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError("--out is a file, not a folder", value=str(out), allowed="a new or empty folder",
                         fix="pick another --out")
    if resume:
        if checkpoint is None or not (out / checkpoint).exists():
            raise UsageError(f"nothing to resume: OUT has no {checkpoint}", value=str(out),
                             allowed="the OUT folder of an interrupted run", fix="run without --resume")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        hint = ", pass --resume to continue it," if checkpoint else ""
        raise UsageError("the output folder already exists and is not empty", value=str(out),
                         allowed="a new or empty folder",
                         fix=f"pick another --out{hint} or pass --overwrite to replace what lamina writes there")
