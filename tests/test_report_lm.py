"""The report of a language model's run: perplexity where a classifier's report shows accuracy."""

import json

from lamina.cli import main
from lamina.report._pareto import collect, figure, front, metric_of


def test_lm_points_use_perplexity_and_lower_is_better(tmp_path):
    a, b = tmp_path / "teacher", tmp_path / "small"
    a.mkdir(), b.mkdir()
    (a / "finetune.json").write_text(json.dumps({"metric": "perplexity", "parameters": 1000,
                                                 "test": {"accuracy": 0.30, "perplexity": 20.0}}))
    (b / "distill.json").write_text(json.dumps({"metric": "perplexity", "parameters": {"student": 600},
                                                "test": {"accuracy": 0.31, "perplexity": 35.0}}))
    pts = collect(tmp_path, [str(a), str(b)])
    assert metric_of(pts) == "perplexity"
    fig = figure(pts, "svg")
    assert fig["metric"] == "perplexity" and fig["table"]["columns"][2].startswith("test perplexity")
    # best (lowest) first; the smaller model is on the front (cheaper), and so is the teacher (less perplexed)
    assert [r[0] for r in fig["table"]["rows"]] == ["teacher", "small"]
    assert all(r[5] == "parameters" for r in fig["table"]["rows"])
    # a third model both larger and more perplexed than the teacher is off the front: lower is better
    c = tmp_path / "worse"
    c.mkdir()
    (c / "finetune.json").write_text(json.dumps({"metric": "perplexity", "parameters": 1200,
                                                 "test": {"accuracy": 0.5, "perplexity": 25.0}}))
    rows = {r[0]: r for r in figure(collect(tmp_path, [str(a), str(b), str(c)]), "svg")["table"]["rows"]}
    assert rows["worse"][5] == "no" and rows["teacher"][5] == "parameters"
    assert front([1000, 1200], [-20.0, -25.0]) == [True, False]


def test_report_of_a_tiny_lm_run_shows_perplexity(lm_pair, capsys):
    tmp_path = lm_pair(80, 5, student="small")  # d.txt, teacher/, small/ (conftest.py)
    txt, t = tmp_path / "d.txt", tmp_path / "teacher"
    run = tmp_path / "run"
    assert main(["capture", "--model", str(t), "--data", str(txt), "--pooling", "mean", "--limit", "20",
                 "--seq-len", "8", "--out", str(run), "--no-progress"]) == 0
    assert main(["analyze", str(run), "--no-control", "--importance-samples", "16", "--no-progress"]) == 0
    assert main(["bench", str(t), str(tmp_path / "small"), "--data", str(txt), "--seq-len", "8",
                 "--batch-sizes", "1", "--warmup", "0", "--repeats", "2", "--decode-tokens", "3", "--no-progress",
                 "--out", str(tmp_path / "b")]) == 0
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    capsys.readouterr()
    assert main(["report", str(run), "--stages", str(t), str(tmp_path / "small"), str(tmp_path / "b")]) == 0
    html = (run / "report.html").read_text()
    assert "Perplexity against cost" in html and "test perplexity (lower is better)" in html
    assert "Accuracy against cost" not in html
    assert "perplexity (lower is better)" in html and "decode tokens/s" in html
    # the bench table and the tiles carry the measured perplexities
    for m in bench["models"]:
        assert f"{m['perplexity']:.4g}"[:4] in html
