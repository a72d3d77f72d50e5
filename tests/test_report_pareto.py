"""The report answers "which model should I ship?": with --stages, a Pareto figure of test accuracy against
measured latency and parameters, one labelled point per model, rendered in headless Chromium."""

import json
import re
from pathlib import Path

import pytest

from lamina.cli import main
from lamina.report import ReportConfig, render_html, sample_scores
from lamina.report._pareto import collect, front
from test_report import ARTIFACTS, _chromium, _headless


def test_front_is_the_set_of_undominated_points():
    #       cheap+bad  dear+good  dominated  tie-on-cost-better
    xs = [1.0, 4.0, 3.0, 4.0]
    ys = [0.5, 0.8, 0.4, 0.9]
    assert front(xs, ys) == [True, False, False, True]
    assert front([1.0], [0.3]) == [True]


def test_points_are_collected_from_any_stage_record(tmp_path):
    a = tmp_path / "teacher"
    a.mkdir()
    (a / "finetune.json").write_text(json.dumps({"test": {"accuracy": 0.8}, "parameters": 1000}))
    q = tmp_path / "quant"
    q.mkdir()  # a later stage lamina does not know yet: any record with accuracy and parameters
    (q / "quantize.json").write_text(json.dumps({"test": {"accuracy": 0.79}, "parameters": 1000}))
    (q / "notes.json").write_text(json.dumps({"whatever": 1}))
    b = tmp_path / "b"
    b.mkdir()
    (b / "bench.json").write_text(json.dumps({"models": [
        {"model": str(a / "model"), "parameters": 1000, "accuracy": 0.81, "latency": {"1": {"median_ms": 2.0}}}]}))
    pts = {p["name"]: p for p in collect(tmp_path, [str(a), str(q), str(b)])}
    assert set(pts) == {"teacher", "quant"}
    assert pts["teacher"]["accuracy"] == 0.81  # bench's measurement wins, and teacher/model is the teacher
    assert pts["teacher"]["latency"] == {"1": 2.0} and pts["quant"]["kind"] == "quantize"


@pytest.fixture(scope="module")
def flow(tmp_path_factory, tiny_teacher, sentences_csv):
    """The README's order on a tiny model, through the CLI: prune (no --scores), distill, bench, analyze."""
    root = tmp_path_factory.mktemp("flow")
    small, rec, run = root / "small", root / "recovered", root / "run"
    assert main(["prune", str(tiny_teacher), "--drop-blocks", "0.5", "--calibration-samples", "32",
                 "--out", str(small)]) == 0
    assert main(["distill", "--teacher", str(tiny_teacher), "--student", str(small), "--out", str(rec),
                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--no-progress"]) == 0
    assert main(["bench", str(tiny_teacher), str(small), str(rec), "--repeats", "2", "--warmup", "1",
                 "--batch-sizes", "1", "4", "--no-progress"]) == 0
    assert main(["capture", "--model", str(tiny_teacher), "--data", str(sentences_csv), "--limit", "80",
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["analyze", str(run), "--no-control", "--importance-samples", "16", "--no-progress"]) == 0
    return root, [str(tiny_teacher), str(small), str(rec)]


def test_report_with_stages_has_one_labelled_point_per_model(flow):
    root, stages = flow
    html, info = render_html(root / "run", ReportConfig(stages=tuple(stages)))
    assert info["sections"][:3] == ["summary", "tradeoff", "settings"]
    for name in ("teacher", "small", "recovered"):
        assert len(re.findall(rf'id="lat-point-\d+"', html)) == 3
        assert f"<td>{name}</td>" in html  # the table under the figure, and the point labels
    assert len(re.findall(r'id="params-point-\d+"', html)) == 3
    assert 'id="model-cards"' in html
    # the plan section is readable: removed blocks, the rule and its scores, not raw keys
    assert "lamina_plan" not in html.split('id="plan')[1].split("</section>")[0]
    assert "Importance of the model that was pruned (teacher)" in html or "Block scores that decided it" in html
    assert "measured by prune on the model&#39;s own training rows" in html


@pytest.mark.slow
def test_pareto_renders_in_chromium_with_a_point_per_model(flow, tmp_path, capsys):
    exe = _chromium()
    root, stages = flow
    out = tmp_path / "r.html"
    assert main(["report", str(root / "run"), "--stages", *stages, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    dom = _headless(exe, tmp_path / "profile", "--dump-dom", out.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    sec = dom.stdout.split('id="tradeoff"')[1].split("</section>")[0]
    assert len(re.findall(r'<g id="lat-point-\d+"', sec)) == 3
    assert len(re.findall(r'<g id="params-point-\d+"', sec)) == 3
    # the command says how many plots the page really has
    n = dom.stdout.count('<svg class="plot"')
    assert f"({n} plots;" in printed
    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "report-stages.png"
    png.unlink(missing_ok=True)
    shot = _headless(exe, tmp_path / "profile", f"--screenshot={png}", "--window-size=1400,2600", out.resolve().as_uri())
    assert shot.returncode == 0 and png.is_file()


def _overlaps(fig) -> list:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    r = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        boxes = [(t.get_text(), t.get_window_extent(r)) for t in ax.get_xticklabels() if t.get_text()]
        for (a, ba), (b, bb) in zip(boxes, boxes[1:]):
            if ba.overlaps(bb):
                bad.append((a, b))
    return bad


def test_layer_tick_labels_never_collide():
    """EfficientNet's layers end '... 14, 15, head_conv': once ran together as '15head_conv'."""
    from lamina.report import _plots as plots
    from lamina.report._scores import Importance
    layers = ["embed"] + [f"blocks.{i}" for i in range(16)] + ["head_conv"]
    vals = [0.5 + 0.01 * i for i in range(len(layers))]
    fig = plots.accuracy_figure(layers, {"probe_acc": vals}, None, None)
    assert _overlaps(fig) == []
    fig = plots.metric_figure("effective_rank", layers, vals)
    assert _overlaps(fig) == []
    blocks = layers[1:]
    imp = Importance(blocks=blocks, block_influence=vals[1:], skip_nmse=vals[1:], skippable=[True] * len(blocks),
                     target="logits")
    assert _overlaps(plots.importance_figure(imp)) == []


def test_compare_json_is_shown_with_rows_and_columns_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(4, control=False)))
    (run / "compare.json").write_text(json.dumps({
        "run_a": "run", "run_b": "other", "model_a": "teacher", "model_b": "minilm", "n": 50,
        "layers_a": ["embed", "blocks.0", "blocks.1"], "layers_b": ["embed", "blocks.0"],
        "cka": [[0.9, 0.2], [0.3, 0.81], [0.1, 0.55]], "definition": "linear CKA, rows A, columns B"}))
    html, info = render_html(run, ReportConfig())
    assert "compare" in info["sections"]
    sec = html.split('<section id="compare">')[1].split("</section>")[0]
    assert "<strong>teacher</strong> (rows" in sec and "<strong>minilm</strong> (columns" in sec
    assert "0.810" in sec and "<svg" in sec


def test_importance_says_when_the_plan_used_another_models_scores(flow, tmp_path):
    root, stages = flow
    run = tmp_path / "base-run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(3, control=False)))  # another model's run
    html, _ = render_html(run, ReportConfig(stages=(stages[1],)))
    sec = html.split('<section id="importance">')[1].split("</section>")[0]
    assert "was made from the importance of <strong>teacher</strong>" in sec
    own, _ = render_html(root / "run", ReportConfig(stages=(stages[1],)))
    assert "was made from the importance of" not in own  # the run is the pruned model itself
