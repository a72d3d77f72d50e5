"""Strict JSON in and out: every JSON file lamina writes goes through :func:`write_json`.

JSON has no NaN or infinity; Python's ``json`` writes them as bare ``NaN``,
which other readers reject and which silently changes any ranking it enters.
So lamina converts a non-finite number to ``null`` only under keys where the
writer documents null as "not computable", refuses it elsewhere naming the
key, and reads back with :func:`read_json`, which refuses ``NaN``/``Infinity``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import LaminaError


def strict_json(obj, nulls: tuple[str, ...] = (), _where: str = "", _null_ok: bool = False):
    """``obj`` as plain JSON data: numpy scalars and arrays become numbers and lists, paths strings.

    A non-finite float becomes null under a key named in ``nulls`` (where the
    writer documents null as "not computable"), anywhere else it is refused
    with a LaminaError naming the key, so no file lamina writes holds a bare
    ``NaN`` (which is not JSON).
    """
    import numpy as np
    if isinstance(obj, dict):
        return {str(k): strict_json(v, nulls, f"{_where}.{k}" if _where else str(k), _null_ok or k in nulls)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, nulls, f"{_where}[{i}]", _null_ok) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist(), nulls, _where, _null_ok)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isfinite(v):
            return v
        if _null_ok:
            return None
        raise LaminaError(f"refusing to write a non-finite number ({v}) into JSON", value=_where or "(top level)",
                          allowed="finite numbers (JSON has no NaN or infinity)",
                          fix="the value comes from a diverged or degenerate computation: check the inputs and "
                              "settings that produced it")
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)  # paths, dtypes, devices: their text, as before


def write_json(path, obj, nulls: tuple[str, ...] = ()) -> Path:
    """Write ``obj`` as strict JSON (see :func:`strict_json`) atomically: a temp file, then a rename."""
    path = Path(path)
    text = json.dumps(strict_json(obj, nulls), indent=2, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (a non-finite number)")


def read_json(path):
    """Parse a JSON file lamina reads back, refusing ``NaN``/``Infinity`` (ValueError, like any bad JSON)."""
    return json.loads(Path(path).read_text(), parse_constant=_no_constant)
