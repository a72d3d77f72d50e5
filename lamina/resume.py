"""``--resume`` continues only the same run (finetune, distill).

A fresh run records its settings in OUT/resume.json before training writes
anything; a resumed run compares its own settings key by key and refuses,
naming each that differs, as ``capture --resume`` does with its capture key.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .jsonio import read_json, strict_json, write_json
from .runfolder import record

RESUME = "resume.json"
_NOT_SETTINGS = ("out", "resume", "overwrite", "progress")  # where and how it runs, not what it computes
_SHOW = 5  # differences spelled out in a refusal


def check_resume(out, stage: str, settings: dict, resume: bool, rank: int = 0, config=None) -> None:
    """A fresh run records ``settings`` in OUT/resume.json (before training writes anything); ``resume``
    refuses when they differ from the recorded ones, naming each, as ``capture --resume`` does. Every
    setting that changes the result must match, ``epochs`` included: the learning-rate schedule is laid
    out over all epochs, so a longer run is a new run (start over with --overwrite).

    ``config`` (the stage's dataclass config): a setting added to lamina after the interrupted run started
    is missing from its record; it matches when it is at its default now, which is what the older lamina
    did (so an upgrade does not strand a checkpoint)."""
    out = Path(out)
    now = strict_json({k: v for k, v in settings.items() if k not in _NOT_SETTINGS}, nulls=tuple(settings))
    added = _defaults(config) if config is not None else {}
    if not resume:
        if rank == 0:
            record(out, stage, [RESUME, RESUME + ".tmp"])
            write_json(out / RESUME, {"lamina_resume": 1, "stage": stage, "settings": now})
        return
    try:
        rec = read_json(out / RESUME)
        old = rec["settings"]
        if rec.get("stage") != stage or not isinstance(old, dict):
            raise ValueError(f"written by {rec.get('stage')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"the checkpoint in OUT has no readable record of its settings ({e})",
                         value=str(out / RESUME), allowed=f"the OUT folder of an interrupted `lamina {stage}`",
                         fix="start over with --overwrite") from e
    diff = sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k)
                  and not (k not in old and k in added and now.get(k) == added[k]))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} then, {now.get(k)!r} now" for k in diff[:_SHOW])
        raise UsageError(f"--resume with other settings than the interrupted run's; refusing to mix them "
                         f"(differs in: {', '.join(diff)})", value=shown,
                         allowed="the settings the run started with",
                         fix="resume with the original settings, or start over with --overwrite")


def _defaults(config) -> dict:
    """Each field of a dataclass config that has a default, as resume.json would record it."""
    import dataclasses
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return strict_json(out, nulls=tuple(out))


def same_path(spec):
    """A model or data spec as resume compares it: an existing path resolved (``./m`` and ``/abs/m`` are one
    folder), a name as given, a Python object by its class."""
    if spec is None or isinstance(spec, (str, Path)):
        return str(Path(spec).resolve()) if spec is not None and Path(spec).exists() else spec
    return type(spec).__name__


def rows_hash(ds, split: dict) -> str:
    """A short hash of the sample ids in each split: the same data file, limit, seed and fractions give the
    same rows, and an edited data file does not."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(split):
        h.update(name.encode() + b"\0" + "\n".join(str(ds.ids[int(i)]) for i in split[name]).encode() + b"\0")
    return h.hexdigest()[:16]
