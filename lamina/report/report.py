"""``report``: one self-contained HTML page from a run folder.

Design decisions:
- The page is a view of the run folder, never a source of truth: every
  number comes from ``scores.json`` (required), ``config.json`` and any later
  stage's ``plan.json`` / ``distill.json`` / ``bench.json`` (optional), and
  ``scores.json`` and ``config.json`` are embedded verbatim as JSON data blocks
  with their SHA-256, so each number on the page can be traced to its file.
- It works offline by construction: plots are inline SVG (or base64 PNG), CSS
  is inline, there is no script to run, and a Content-Security-Policy forbids
  the browser from fetching anything, so a stray external reference fails
  loudly in the Chromium test instead of quietly needing the network.
- Re-running replaces an earlier report lamina wrote (it is derived data,
  recorded in the folder's ``.lamina-files.json`` and carrying a generator
  tag); any other file at the target is never replaced, even with
  ``overwrite``, as everywhere in lamina (lamina/runfolder.py).
- Rendering is deterministic: the same run folder gives the same bytes.
- It does not write ``config.json``: a report is a view, and recording it
  there would change the settings the next report shows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from .. import __version__
from .._cliargs import as_config
from ..errors import LaminaError, UsageError
from ..jsonio import strict_json
from ..runfolder import claim, record, unknown_files
from . import _catalog as cat
from . import _context as ctx
from . import _pareto as pareto
from . import _plots as plots
from ._scores import Scores, parse_scores
from ._stages import section, stage_paths

log = logging.getLogger(__name__)

GENERATOR = "lamina report"
PLOT_FORMATS = ("svg", "png")


@dataclass(frozen=True)
class ReportConfig:
    """Settings of ``lamina report``."""

    out: str | None = field(default=None, metadata={
        "help": "where to write the page; unset means RUN/report.html"})
    overwrite: bool = field(default=False, metadata={
        "help": "accepted for symmetry with the other stages: an earlier lamina report is always replaced "
                "(it is derived from the run folder), and a file lamina did not write never is"})
    title: str | None = field(default=None, metadata={"help": "page title; unset means 'MODEL on DATA'"})
    stages: tuple[str, ...] = field(default=(), metadata={
        "help": "more folders (or files) whose finetune.json / plan.json / distill.json / bench.json get a section: "
                "the OUT folders of `lamina finetune`, `prune`, `distill`, `bench`"})
    plots: str = field(default="svg", metadata={
        "help": "svg (inline vectors, sharp at any zoom) or png (inline base64 images, smaller for very "
                "deep models)"})

    def __post_init__(self):
        if self.plots not in PLOT_FORMATS:
            raise UsageError("unknown plot format", value=self.plots, allowed=", ".join(PLOT_FORMATS),
                             fix="--plots svg")
        if self.out is not None and not str(self.out).strip():
            raise UsageError("--out is empty", value=repr(self.out), allowed="a file path",
                             fix="leave --out out to write RUN/report.html")


@dataclass
class ReportResult:
    """What a report produced."""

    path: str
    bytes: int
    plots: int
    sections: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LaminaError(f"{path.name} is not valid JSON", value=f"{path}: line {e.lineno}, column {e.colno}: "
                          f"{e.msg}", fix=f"re-run the stage that wrote {path.name}") from e


def _read_optional(path: Path) -> tuple[object | None, str | None]:
    """(data, problem) of an optional file: a broken one is reported on the page, not fatal."""
    if not path.is_file():
        return None, None
    try:
        return _read_json(path), None
    except (LaminaError, OSError, UnicodeDecodeError) as e:
        log.warning("report: skipping %s: %s", path, e)
        return None, str(e).splitlines()[0] + (f" ({e.value})" if getattr(e, "value", None) else "")


def _run_dir(run: str | Path) -> Path:
    run = Path(run)
    if run.is_file() and run.name == "scores.json":
        run = run.parent
    if not run.is_dir():
        raise UsageError("the run folder does not exist", value=str(run), allowed="a folder with scores.json",
                         fix="give the folder that `lamina analyze` wrote to")
    return run


def _is_lamina_report(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return f'<meta name="generator" content="{GENERATOR}'.encode() in head


def _target(run: Path, config: ReportConfig) -> Path:
    out = Path(config.out) if config.out else run / "report.html"
    if out.is_dir():
        raise UsageError("--out is a folder", value=str(out), allowed="a file path",
                         fix=f"--out {out / 'report.html'}")
    if os.path.lexists(out) and unknown_files(out.parent, out.name) and not _is_lamina_report(out):
        raise UsageError("the output file exists and is not a report lamina wrote, so it is not replaced",
                         value=str(out), allowed="a new path, or an earlier lamina report",
                         fix="choose another --out, or move that file away (--overwrite never replaces files "
                             "lamina did not write)")
    return out


def _data_block(obj) -> Markup:
    """JSON for a ``<script type=application/json>`` block: ``<``, ``>``, ``&`` escaped so it cannot end it."""
    # strict JSON like every file lamina writes: a NaN read from a hand-edited file shows as null
    text = json.dumps(strict_json(obj, nulls=tuple(obj) if isinstance(obj, dict) else ()), indent=1, allow_nan=False)
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))


def _figures(s, fmt: str) -> dict:
    """Rendered figures by section: accuracy (one), geometry (one per metric), cka, importance."""
    ctrl = s.control.metrics if s.control else {}
    out: dict = {"accuracy": None, "geometry": [], "cka": None, "importance": None}
    m = s.main.metrics
    if any(cat.is_accuracy(n) for n in m):
        fig = plots.accuracy_figure(s.layers, m, ctrl or None, ctx.chance(s))
        out["accuracy"] = plots.render(fig, fmt, "test accuracy per layer")
    for name in cat.ordered(m):
        if cat.is_accuracy(name) or name in cat.BAND:
            continue
        fig = plots.metric_figure(name, s.layers, m[name], ctrl.get(name))
        out["geometry"].append({"name": name, "label": cat.label(name), "hint": cat.hint(name),
                                "definition": s.definitions.get(name, ""),
                                "markup": plots.render(fig, fmt, f"{cat.label(name)} per layer")})
    if s.main.cka is not None:
        fig = plots.cka_figure(s.layers, s.main.cka, s.control.cka if s.control else None)
        out["cka"] = plots.render(fig, fmt, "layer by layer linear CKA")
    if s.main.importance is not None:
        ci = s.control.importance if s.control else None
        if ci is not None and ci.blocks != s.main.importance.blocks:
            log.warning("report: the control's importance lists other blocks; drawing it is skipped")
            ci = None
        fig = plots.importance_figure(s.main.importance, ci, importance_marks(s))
        out["importance"] = plots.render(fig, fmt, "block importance")
    return out


def importance_marks(s: Scores) -> dict[str, list[int]]:
    """{depth method: indices of the blocks it would remove at a quarter of the blocks}, as the importance bars mark
    them (a causal LM's scores; empty otherwise). The sets are ``lamina prune``'s own plans (``ctx.method_sets``)."""
    imp = s.main.importance
    if imp is None:
        return {}
    return {m: [imp.blocks.index(b) for b in d["remove"] if b in imp.blocks] for m, d in ctx.method_sets(s).items()}


def _stages(run: Path, extra, fmt: str, points: list[dict]) -> list[dict]:
    out = []
    for path, sid, heading in stage_paths(run, extra):
        data, problem = _read_optional(path)
        if data is None and problem is None:
            continue
        body = section(sid.split("-")[0], data, fmt, points) if data is not None else {"rows": [], "tables": [],
                                                                                "figure": None}
        shown = path.name if path.parent == run else str(path)
        plan_model = data.get("model") if sid.startswith("plan") and isinstance(data, dict) else None
        out.append({"id": sid, "heading": heading, "file": shown, "problem": problem, "plan_model": plan_model,
                    **body})
    return out


def _lm_importance(imp) -> dict | None:
    """A causal LM's importance facts for the report's lead (tokens, perplexity, cost), formatted."""
    if not isinstance(imp, dict) or imp.get("kind") != "lm":
        return None
    x = imp.get("seconds_as_forwards")
    return {"tokens": ctx.fmt(imp.get("tokens")), "n_samples": ctx.fmt(imp.get("n_samples")),
            "seq_len": ctx.fmt(imp.get("seq_len")), "full_perplexity": ctx.fmt(imp.get("full_perplexity")),
            "seconds": ctx.fmt(imp.get("seconds")), "as_forwards": ctx.fmt(x) if isinstance(x, (int, float)) else None}


def _pruned_elsewhere(model: dict, stages: list[dict]) -> list[dict]:
    """Plans among the stages that were made from another model's importance than this run's."""
    out = []
    for st in stages:
        if st["id"].startswith("plan") and st.get("plan_model"):
            pm = st["plan_model"]
            if pm.get("fingerprint") != model.get("fingerprint"):
                out.append({"id": st["id"], "heading": st["heading"], "name": pm.get("name")})
    return out


def _comparison(run: Path, fmt: str) -> dict | None:
    """compare.json of the run folder (``lamina compare RUN OTHER`` writes it there): rows are this run's layers."""
    data, problem = _read_optional(run / "compare.json")
    if problem:
        return {"problem": problem, "figure": None, "table": None}
    if not isinstance(data, dict) or not isinstance(data.get("cka"), list):
        return None
    la, lb, cka = data.get("layers_a") or [], data.get("layers_b") or [], data["cka"]
    rows = [[a] + [ctx.fmt(v) for v in row] for a, row in zip(la, cka)]
    fig = plots.compare_figure(la, lb, cka, data.get("model_a") or "A", data.get("model_b") or "B")
    return {"problem": None, "model_a": data.get("model_a"), "model_b": data.get("model_b"),
            "run_a": data.get("run_a"), "run_b": data.get("run_b"), "n": data.get("n"),
            "definition": data.get("definition"), "figure": plots.render(fig, fmt, "cross-model CKA"),
            "table": {"title": f"CKA: rows {data.get('model_a')} ({data.get('run_a')}), columns {data.get('model_b')} "
                               f"({data.get('run_b')})",
                      "columns": [f"{data.get('model_a')} \\ {data.get('model_b')}"] + list(lb), "rows": rows}}


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = ctx.fmt
    return env


def render_html(run: str | Path, config: ReportConfig = ReportConfig()) -> tuple[str, dict]:
    """The page as a string, and a summary (``plots``, ``sections``), without writing anything."""
    run = _run_dir(run)
    scores_path = run / "scores.json"
    if not scores_path.is_file():
        raise LaminaError("the run folder has no scores.json", value=str(run),
                          allowed="a run folder after `lamina analyze`", fix=f"run `lamina analyze {run}` first")
    scores_bytes = scores_path.read_bytes()
    s = parse_scores(_read_json(scores_path), scores_path)
    run_config, config_problem = _read_optional(run / "config.json")
    if run_config is not None and not isinstance(run_config, dict):
        run_config, config_problem = None, "config.json is not a JSON object"
    config_bytes = (run / "config.json").read_bytes() if run_config is not None else None

    figures = _figures(s, config.plots)
    points = pareto.collect(run, config.stages)
    stages = _stages(run, config.stages, config.plots, points)
    trade = pareto.figure(points, config.plots) if points else None
    comparison = _comparison(run, config.plots)
    settings = []
    for stage, values in (run_config or {}).items():
        if stage != "versions" and isinstance(values, dict):
            rows, tables = ctx.flatten(values)
            settings.append({"stage": stage, "rows": rows, "tables": tables})
    model, data = s.info("model"), s.info("data")
    title = config.title or " on ".join(str(x) for x in (model.get("name"), data.get("name")) if x is not None) \
        or "lamina report"
    sections = ["summary"] + (["tradeoff"] if trade else []) + ["settings"]
    sections += [k for k in ("accuracy", "geometry", "cka", "importance") if figures[k]]
    sections += ["layers"] + (["compare"] if comparison else []) + [st["id"] for st in stages]
    sections += ["definitions"] if s.definitions else []
    context = {
        "generator": f"{GENERATOR} {__version__}", "title": title, "s": s, "synthetic": bool(s.raw.get("synthetic")),
        "subtitle": ctx.subtitle(s), "facts": ctx.run_facts(s), "highlights": ctx.highlights(s), "settings": settings,
        "config_problem": config_problem, "config_versions": (run_config or {}).get("versions"),
        "figures": figures, "control": s.control is not None, "chance": ctx.chance(s),
        "table": ctx.layer_table(s.layers, s.main),
        "control_table": ctx.layer_table(s.layers, s.control) if s.control and s.control.metrics else None,
        "stages": stages, "definitions": ctx.definitions(s), "sections": sections,
        "trade": trade, "model_cards": pareto.cards(points, trade["batch"]) if trade else [],
        "comparison": comparison, "importance_model": model.get("name"),
        "pruned_elsewhere": _pruned_elsewhere(model, stages),
        "least_vs_best": any(h["label"] == "least needed blocks" for h in ctx.highlights(s))
        and any(h["label"] == "best layer" for h in ctx.highlights(s)),
        "nav": [(sid, _NAV[sid]) for sid in sections if sid in _NAV] + [(st["id"], st["heading"]) for st in stages],
        "importance_target": s.main.importance.target if s.main.importance else None,
        "lm_importance": _lm_importance(s.raw.get("importance")),
        "importance_marks": list(importance_marks(s)),
        "unskippable": [b for b, ok in zip(s.main.importance.blocks, s.main.importance.skippable) if not ok]
        if s.main.importance else [],
        "scores_sha": hashlib.sha256(scores_bytes).hexdigest(),
        "config_sha": hashlib.sha256(config_bytes).hexdigest() if config_bytes else None,
        "scores_json": _data_block(s.raw), "config_json": _data_block(run_config) if run_config else None,
        "acc_definitions": [d for d in ctx.definitions(s) if cat.is_accuracy(d["name"]) or d["name"] in cat.BAND],
    }
    html = _environment().get_template("template.html.j2").render(**context)
    n_plots = sum(1 for k in ("accuracy", "cka", "importance") if figures[k]) + len(figures["geometry"])
    n_plots += sum(1 for st in stages if st.get("figure")) + (1 if trade and trade["figure"] else 0)
    n_plots += 1 if comparison and comparison.get("figure") else 0
    return html, {"plots": n_plots, "sections": sections}


_NAV = {"summary": "Summary", "tradeoff": "Which model", "compare": "Compare", "settings": "Settings", "accuracy": "Accuracy", "geometry": "Geometry",
        "cka": "CKA", "importance": "Importance", "layers": "Per-layer table", "definitions": "Definitions"}


def report(run: str | Path, config: ReportConfig = ReportConfig()) -> ReportResult:
    """Write one self-contained HTML page for the run folder ``run`` (default ``RUN/report.html``).

    Reads ``scores.json`` (required) and, when present, ``config.json``,
    ``finetune.json``, ``plan.json``, ``distill.json`` and ``bench.json`` (in
    the run folder and in the ``config.stages`` folders); never changes them.
    ``run`` may also be the path of a ``scores.json``. Raises
    :class:`~lamina.errors.LaminaError` when ``scores.json`` is missing or
    malformed, :class:`~lamina.errors.UsageError` when the target is taken.

        >>> from lamina.report import report, ReportConfig
        >>> res = report("run/")                       # doctest: +SKIP
        >>> res.path, res.plots                        # doctest: +SKIP
        ('run/report.html', 10)
    """
    config = as_config(ReportConfig, config, "report")
    t0 = time.perf_counter()
    run_dir = _run_dir(run)
    out = _target(run_dir, config)  # before the work: a taken target fails fast
    html, summary = render_html(run_dir, config)
    # the target's ownership was settled by _target (an earlier lamina report is always replaced): the claim
    # adds the folder's lock and the record
    with claim(out.parent, "report", [], config.overwrite):
        _target(run_dir, config)  # again under the lock
        tmp = out.with_name(out.name + ".tmp")
        record(out.parent, "report", [out.name, tmp.name])
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)  # atomic: a reader never sees half a page
    log.info("report: wrote %s (%d plots, %.0f kB)", out, summary["plots"], len(html.encode()) / 1e3)
    return ReportResult(path=str(out), bytes=out.stat().st_size, plots=summary["plots"],
                        sections=summary["sections"], seconds=time.perf_counter() - t0)
