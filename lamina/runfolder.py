"""The run folder's ``config.json``: resolved settings of every stage that ran."""

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
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg[stage] = dict(settings, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    cfg["versions"] = versions()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, default=str))
    os.replace(tmp, path)
    return cfg
