"""``elastic extract``: cut one member out of a trained family, with no training.

``lamina elastic extract E --out M (--depth 4 --ffn 0.5 --heads 0.75 | --params 0.5 | --latency-ms X)``
(``elastic_extract(E, config)`` in Python) reads E/model (the ordered, trained
parent) and E/elastic.json (grid, block order, the members' measurements),
slices the prefixes and drops the blocks of the chosen budget
(:meth:`lamina.elastic.family.Family.extract`), re-estimates BatchNorm
statistics on calibration rows of the task, and saves M/model through
:func:`lamina.verify.save_checked` (``from_pretrained`` when the config
describes it, lamina's format otherwise) and M/extract.json (the budget, the
task record, so ``lamina bench`` measures it on the teacher's test rows).

Choosing the budget: explicit axes (an axis not given keeps its full value),
or ``--params F`` (the most accurate member, by validation metric, with at most
F of the full member's parameters), or ``--latency-ms X`` (the most accurate
member whose latency measured by ``lamina elastic`` is at most X ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .._cliargs import as_config
from ..errors import UsageError
from ..files import read_json
from ..models import load_model, recalibrate_bn, save_json
from ..runfolder import claim
from ..runfolder import record as record_files
from ..runtime import Runtime
from ..task import make_task, spec_from_record
from ..verify import save_checked
from .budget import Budget, Grid, Written
from .family import Family
from .select import budget_of, pick
from .train import RECORD

EXTRACT_RECORD = "extract.json"


@dataclass(frozen=True)
class ExtractConfig(Runtime):
    """Settings of ``lamina elastic extract``."""

    out: str = field(metadata={"help": "output folder: OUT/model (the member), OUT/extract.json"})
    depth: int | None = field(default=None, metadata={"help": "blocks kept (default: all)"})
    ffn: float | None = field(default=None, metadata={"help": "kept fraction of the FFN neurons (default: 1)"})
    heads: float | None = field(default=None, metadata={"help": "kept fraction of the KV groups (default: 1)"})
    channels: float | None = field(default=None, metadata={
        "help": "kept fraction of the expanded CNN channels (default: 1)"})
    params: float | None = field(default=None, metadata={
        "help": "instead of the axes: the most accurate member with at most this fraction of the full member's "
                "parameters"})
    latency_ms: float | None = field(default=None, metadata={
        "help": "instead of the axes: the most accurate member whose latency measured by `lamina elastic` "
                "(elastic.json) is at most this many milliseconds"})
    calibration_samples: int = field(default=256, metadata={
        "help": "training rows that re-estimate a BatchNorm member's running statistics"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace what lamina wrote in OUT (a file it did not write is never touched)"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a path", fix="pass --out PATH")
        axes = [a for a in ("depth", "ffn", "heads", "channels") if getattr(self, a) is not None]
        ways = bool(axes) + (self.params is not None) + (self.latency_ms is not None)
        if ways > 1:
            raise UsageError("give the budget one way: axes (--depth/--ffn/--heads/--channels), --params or "
                             "--latency-ms", value={"axes": axes, "params": self.params,
                                                    "latency_ms": self.latency_ms},
                             allowed="one of them", fix="e.g. --params 0.5 alone")
        for name in ("params", "latency_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0 or (name == "params" and v > 1)):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number"
                                 + (" <= 1 (a fraction)" if name == "params" else ""), value=v,
                                 allowed="e.g. 0.5" if name == "params" else "e.g. 12.5",
                                 fix=f"--{name.replace('_', '-')} {'0.5' if name == 'params' else '12.5'}")


@dataclass
class ExtractResult(Written):
    """What ``elastic_extract`` wrote."""

    path: str
    model_path: str
    budget: dict
    parameters: int
    chosen_by: str
    record: dict


def read_family(elastic_dir) -> dict:
    """E/elastic.json, its grid and block order checked against each other (the file is untrusted)."""
    p = Path(str(elastic_dir)) / RECORD
    if not p.exists():
        raise UsageError("not a `lamina elastic` folder (no elastic.json)", value=str(elastic_dir),
                         allowed="the OUT folder of `lamina elastic`", fix="run lamina elastic --teacher T --out E")
    rec = read_json(p, "the elastic family's record")
    try:
        grid = Grid.from_dict(rec["grid"])
        order = [int(j) for j in rec["block_order"]]
        members = list(rec["members"])
        if not isinstance(rec["higher_is_better"], bool) or not members or not isinstance(rec["task"], dict):
            raise ValueError("higher_is_better, members or task")
        for m in members:
            budget_of(m)
            for k in ("parameters", "val_metric"):
                if isinstance(m[k], bool) or not isinstance(m[k], (int, float)):
                    raise ValueError(f"member {k}")
            if m.get("latency_ms") is not None and not isinstance(m["latency_ms"], (int, float)):
                raise ValueError("member latency_ms")
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"elastic.json is incomplete or damaged ({type(e).__name__}: {e})", value=str(p),
                         allowed="the file `lamina elastic` wrote", fix="run lamina elastic again") from e
    if len(set(order)) != len(order):
        raise UsageError("elastic.json lists a block twice in its block order", value=order,
                         allowed="distinct block indices", fix="run lamina elastic again")
    return {**rec, "_grid": grid, "_order": order, "_members": members}


def elastic_extract(elastic_dir, config: ExtractConfig | None = None) -> ExtractResult:
    """Write one member of the family in ``elastic_dir`` as a standalone model; see the module doc."""
    config = as_config(ExtractConfig, config, "elastic_extract")
    fam_rec = read_family(elastic_dir)
    grid, members = fam_rec["_grid"], fam_rec["_members"]
    if config.params is not None or config.latency_ms is not None:
        chosen = pick(members, fam_rec["higher_is_better"], params=config.params, latency_ms=config.latency_ms)
        budget, how = budget_of(chosen), "params" if config.params is not None else "latency_ms"
    else:
        full = grid.full
        budget = Budget(config.depth if config.depth is not None else full.depth,
                        config.ffn if config.ffn is not None else full.ffn,
                        config.heads if config.heads is not None else full.heads,
                        config.channels if config.channels is not None else full.channels)
        how = "axes"
    grid.check(budget)
    out = Path(config.out)
    with claim(out, "elastic-extract", ["model", EXTRACT_RECORD], config.overwrite):
        parent = load_model(str(Path(str(elastic_dir)) / "model"), runtime=config.runtime())
        n = parent.blocks.n_blocks
        if any(not 0 <= j < n for j in fam_rec["_order"]) or grid.depths[0] != n:
            raise UsageError("elastic.json does not describe E/model (block indices or depth differ)",
                             value={"blocks": n, "grid depths": list(grid.depths)}, allowed="the pair lamina wrote",
                             fix="run lamina elastic again")
        fam = Family(parent, fam_rec["_order"], grid)
        member = fam.extract(budget)
        spec = spec_from_record(fam_rec["task"])
        task = make_task(spec, parent)
        calib = list(task.batches(member, task.split["train"][: config.calibration_samples], 32))
        recalibrated = recalibrate_bn(member, calib)
        measured = next((m for m in members if budget_of(m) == budget), None)
        rec = {"lamina_elastic_extract": 1, "elastic": str(elastic_dir), "budget": budget.to_dict(),
               "chosen_by": how, "target": {"params": config.params, "latency_ms": config.latency_ms},
               "parameters": sum(p.numel() for p in member.module.parameters()),
               "parent_parameters": sum(p.numel() for p in parent.module.parameters()),
               "kept_blocks": fam.kept(budget), "bn_recalibrated": recalibrated,
               "measured_in_family": measured, "task": fam_rec["task"], "metric": fam_rec.get("metric")}
        check = task.batch(member, (list(task.split["test"]) or list(task.split["train"]))[:8])
        rec["format"], rec["reload_check"] = save_checked(member, out / "model", parent, check,
                                                          stage="elastic-extract")
        record_files(out, "elastic-extract", [EXTRACT_RECORD, EXTRACT_RECORD + ".tmp"])
        save_json(out / EXTRACT_RECORD, rec)
    return ExtractResult(str(out), str(out / "model"), budget.to_dict(), rec["parameters"], how, rec)
