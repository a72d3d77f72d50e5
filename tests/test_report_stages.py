"""The report's sections for `finetune`, `distill` and `bench` folders named with --stages: the numbers
of each JSON file are on the page (measured speed-up next to the parameter and FLOP ratios)."""

import json

from lamina.bench import BenchConfig, bench
from lamina.cli import main
from lamina.report import ReportConfig, render_html, sample_scores
from lamina.report._context import fmt


def test_stage_folders_get_their_sections(tmp_path, tiny_teacher):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(4, control=False)))
    b = bench([str(tiny_teacher), str(tiny_teacher)], BenchConfig(out=str(tmp_path / "b"), repeats=2,
                                                                     batch_sizes=(1, 4), progress=False))
    html, info = render_html(run, ReportConfig(stages=(str(tiny_teacher), str(tmp_path / "b"))))
    assert info["sections"][-3:] == ["finetune", "bench", "definitions"]
    ft = json.loads((tiny_teacher / "finetune.json").read_text())
    assert "Fine-tuning: teacher" in html and fmt(ft["test"]["accuracy"]) in html
    for e in ft["history"]["epochs"]:
        assert fmt(e["val_accuracy"]) in html and fmt(e["train"]["loss"]) in html
    m = b["models"][1]
    assert "Speed-up: measured next to the FLOP and parameter ratios" in html
    assert fmt(m["vs_first"]["speedup"]["4"]) in html and fmt(float(m["flops_per_sample"])) in html
    assert fmt(m["latency"]["4"]["median_ms"]) in html
    # the CLI takes the same folders
    assert main(["report", str(run), "--stages", str(tiny_teacher), str(tmp_path / "b"), "--out",
                 str(tmp_path / "r.html")]) == 0
    assert "Speed and accuracy: b" in (tmp_path / "r.html").read_text()


def test_a_stage_file_of_another_shape_is_shown_plainly_not_a_traceback(tmp_path):
    # a bench.json without the fields the speed view draws (another version, or edited by hand)
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(4, control=False)))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "bench.json").write_text(json.dumps({"models": [{"model": "m", "latency": {"1": {}}, "parameters": 7}]}))
    html, info = render_html(run, ReportConfig(stages=(str(odd),)))
    assert "bench" in info["sections"]
    assert "not in the shape this version draws" in html and "KeyError" in html
