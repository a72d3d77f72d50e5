"""Issue 16 point 2: the report's Pareto figure shows every model of the run together: the teacher, a quantized
model (by its bench.json latency and accuracy), the members of an elastic family and an extracted member."""

import json
import re

from lamina.cli import main
from lamina.report import sample_scores
from lamina.report._pareto import MEMBER_KIND, collect


def test_quantized_and_elastic_models_are_points_of_the_pareto_figure(tmp_path, tiny_teacher):
    q, e, x, b = (tmp_path / n for n in ("q", "E", "member", "bench"))
    assert main(["quantize", str(tiny_teacher), "--fraction", "0.5", "--calibration-samples", "16",
                 "--out", str(q)]) == 0
    assert main(["elastic", "--teacher", str(tiny_teacher), "--out", str(e), "--depths", "2,1", "--widths", "1,0.5",
                 "--sampled", "1", "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--no-progress",
                 "--latency-repeats", "2", "--calibration-samples", "32"]) == 0
    assert main(["elastic", "extract", str(e), "--depth", "1", "--out", str(x)]) == 0
    assert main(["bench", str(tiny_teacher), str(q), str(x), "--out", str(b), "--repeats", "2", "--warmup", "1",
                 "--batch-sizes", "1", "4", "--no-progress"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(4, control=False)))
    out = tmp_path / "r.html"
    stages = [str(tiny_teacher), str(q), str(e), str(x), str(b)]
    assert main(["report", str(run), "--stages", *stages, "--out", str(out)]) == 0

    bench = {m["model"]: m for m in json.loads((b / "bench.json").read_text())["models"]}
    fam = json.loads((e / "elastic.json").read_text())["members"]
    pts = {p["name"]: p for p in collect(run, stages)}
    # the quantized model: one point, its stage named, bench's accuracy and latency (not its float OUT/model)
    qp = pts["q"]
    assert qp["kind"] == "quantized" and qp["accuracy"] == bench[str(q)]["accuracy"]
    assert qp["latency"]["4"] == bench[str(q)]["latency"]["4"]["median_ms"]
    plan = json.loads((q / "quant_plan.json").read_text())
    assert qp["parameters"] == bench[str(q)]["parameters"] and plan["model"]["parameters"] > 0
    # the extracted member, benched: its OUT and OUT/model are one model
    xp = pts["member"]
    assert xp["kind"] == "elastic member" and xp["accuracy"] == bench[str(x)]["accuracy"]
    # every member of the family, by its validation metric and elastic's own latency
    members = [p for p in pts.values() if p["kind"] == MEMBER_KIND]
    assert len(members) == len(fam)
    assert sorted((p["accuracy"], p["parameters"]) for p in members) == sorted(
        (m["val_metric"], m["parameters"]) for m in fam)
    assert all(p["latency"] == {str(m["latency_batch"]): m["latency_ms"]} for p, m in zip(members, fam))
    assert pts["teacher"]["kind"] == "fine-tuned"

    html = out.read_text()
    sec = html.split('id="tradeoff"')[1].split("</section>")[0]
    for name in ["teacher", "q", "member"] + [p["name"] for p in members]:
        assert f"<td>{name}</td>" in sec, name
    assert "<td>quantized</td>" in sec and f"<td>{MEMBER_KIND}</td>" in sec
    # the parameters panel has a point per model; latency at the batch every timed point shares (1)
    assert len(re.findall(r'id="params-point-\d+"', sec)) == len(pts)
    assert len(re.findall(r'id="lat-point-\d+"', sec)) == len(pts)
