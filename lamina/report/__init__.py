"""Report: one self-contained HTML page per run folder.

    from lamina.report import report, ReportConfig
    res = report("run/")              # reads run/scores.json (+ config.json, plan/distill/bench.json)
    print(res.path)                   # run/report.html: opens offline, no scripts, no external files

``sample_scores()`` fabricates a plausible, clearly-marked synthetic
``scores.json`` dict for tests and previews.
"""

from .report import GENERATOR, ReportConfig, ReportResult, render_html, report
from .sample import sample_scores

__all__ = ["report", "ReportConfig", "ReportResult", "render_html", "sample_scores", "GENERATOR"]
