"""The report's elastic section: every member of a nested family against latency and parameters, its Pareto
front highlighted, the separately pruned + distilled models beside it; a malformed elastic.json is refused
with a message on the page, never a traceback."""

import itertools
import json
import re

import numpy as np
import pytest

from lamina.cli import main
from lamina.errors import LaminaError
from lamina.report import ReportConfig, render_html, sample_scores
from lamina.report._elastic import elastic_section, parse_elastic


def _family(seed: int = 0, n: int = 12) -> dict:
    """A hand-made elastic.json: a depth x FFN grid with random-ish costs, so the front is not every point."""
    rng = np.random.default_rng(seed)
    members = []
    for depth, ffn in itertools.islice(itertools.product((6, 4, 3), (1.0, 0.75, 0.5, 0.25)), n):
        size = depth / 6 * (0.5 + 0.5 * ffn)
        members.append({"depth": depth, "ffn": ffn, "heads": 1.0, "channels": None,
                        "parameters": int(11_000_000 + 11_000_000 * size),
                        "latency_ms": float(2 + 20 * size * rng.uniform(0.7, 1.3)), "latency_batch": 8,
                        "latency_threads": 1, "metric": "accuracy",
                        "val_metric": float(0.6 + 0.2 * size + rng.normal(0, 0.02)), "pareto": False,
                        "pareto_parameters": False})
    return {"grid": {"depths": [6, 4, 3], "widths": [1, 0.75, 0.5, 0.25]}, "block_order": [0, 5, 1, 4, 2, 3],
            "members": members, "training": {"steps": 120, "wall_s": 300.5, "flops": 1.2e15},
            "teacher": {"path": "teacher/"}, "metric": "accuracy", "higher_is_better": True,
            "runtime": {"device": "cpu"}}


def _brute_front(xs, ys) -> set[int]:
    """Non-dominated indices by checking every pair: nothing cheaper-or-equal is also as good and better in one."""
    out = set()
    for i in range(len(xs)):
        dominated = False
        for j in range(len(xs)):
            if j != i and xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i]):
                dominated = True
        if not dominated:
            out.add(i)
    return out


def _run(tmp_path, family) -> tuple:
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(4, control=False)))
    e = tmp_path / "elastic"
    e.mkdir()
    (e / "elastic.json").write_text(json.dumps(family) if not isinstance(family, str) else family)
    teacher, small = tmp_path / "teacher", tmp_path / "small-distilled"
    teacher.mkdir()
    (teacher / "finetune.json").write_text(json.dumps({"test": {"accuracy": 0.81}, "parameters": 22_000_000}))
    small.mkdir()
    (small / "distill.json").write_text(json.dumps({"test": {"accuracy": 0.74},
                                                    "parameters": {"teacher": 22_000_000, "student": 16_000_000}}))
    b = tmp_path / "b"
    b.mkdir()  # the distilled model timed at the family's batch size; the teacher not timed
    lat = {"median_ms": 9.5, "p25_ms": 9.0, "p75_ms": 10.0}
    (b / "bench.json").write_text(json.dumps({
        "task": {"data": "rotten-tomatoes"}, "test_rows": 100, "settings": {"warmup": 1, "repeats": 3},
        "machine": {"threads": 1}, "models": [
            {"model": str(small / "model"), "parameters": 16_000_000, "accuracy": 0.74, "flops_per_sample": 1e9,
             "latency": {"8": lat}, "vs_first": {"parameter_ratio": 1.0, "flop_ratio": 1.0, "ideal_speedup": 1.0,
                                                 "speedup": {"8": 1.0}, "speedup_efficiency": {"8": 1.0}}}]}))
    return run, [str(e), str(teacher), str(small), str(b)]


def test_section_shows_every_member_and_the_exact_front(tmp_path):
    fam = _family()
    run, stages = _run(tmp_path, fam)
    html, info = render_html(run, ReportConfig(stages=tuple(stages)))
    assert "elastic" in info["sections"] and "Elastic family: elastic" in html
    sec = html.split('<section id="elastic">')[1].split("</section>")[0]
    m = fam["members"]
    acc = [x["val_metric"] for x in m]
    for prefix, xs in (("lat", [x["latency_ms"] for x in m]), ("par", [x["parameters"] for x in m])):
        want = _brute_front(xs, acc)
        assert 0 < len(want) < len(m)  # a real test: some members are dominated
        got_front = {int(i) for i in re.findall(rf'id="elastic-{prefix}-front-(\d+)"', sec)}
        got_rest = {int(i) for i in re.findall(rf'id="elastic-{prefix}-member-(\d+)"', sec)}
        assert got_front == want and got_rest == set(range(len(m))) - want
    # the separately made models beside the family: both by parameters, only the one timed at batch 8 by latency
    assert len(re.findall(r'id="elastic-par-separate-\d+"', sec)) == 2
    assert len(re.findall(r'id="elastic-lat-separate-\d+"', sec)) == 1
    assert "small-distilled" in sec and "not benched at this batch" in sec
    assert "median at batch 8" in sec


def test_front_of_ties_and_duplicates_matches_brute_force(tmp_path):
    fam = _family(seed=3, n=6)
    first = fam["members"][0]
    fam["members"][1].update(latency_ms=first["latency_ms"], val_metric=first["val_metric"])
    fam["members"][2].update(latency_ms=first["latency_ms"], val_metric=first["val_metric"] - 0.1)
    run, stages = _run(tmp_path, fam)
    html, _ = render_html(run, ReportConfig(stages=tuple(stages[:1])))
    xs, ys = [x["latency_ms"] for x in fam["members"]], [x["val_metric"] for x in fam["members"]]
    got = {int(i) for i in re.findall(r'id="elastic-lat-front-(\d+)"', html)}
    assert got == _brute_front(xs, ys) and {0, 1} <= got and 2 not in got


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("members"), "'members' is not a non-empty list"),
    (lambda d: d["members"][2].update(latency_ms="fast"), "members[2].latency_ms is not a positive number"),
    (lambda d: d["members"][0].update(parameters=-5), "members[0].parameters is not a positive number"),
    (lambda d: d["members"][1].pop("val_metric"), "members[1].val_metric is not a finite number"),
    (lambda d: d.update(higher_is_better="yes"), "'higher_is_better' is not true or false"),
    (lambda d: d["members"].__setitem__(3, [1, 2]), "members[3] is not an object"),
])
def test_malformed_elastic_json_is_refused_with_a_message(edit, needle):
    fam = _family()
    edit(fam)
    with pytest.raises(LaminaError, match=re.escape(needle)):
        parse_elastic(fam)
    body = elastic_section(fam, "svg")  # what the page shows: the message, nothing drawn
    assert needle in body["problem"] and "fix:" in body["problem"] and body["figure"] is None


def test_the_page_says_why_elastic_json_was_refused(tmp_path):
    fam = _family()
    fam["members"][2]["latency_ms"] = "fast"
    run, stages = _run(tmp_path, fam)
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--stages", *stages, "--out", str(out)]) == 0  # the rest of the page still
    sec = out.read_text().split('<section id="elastic">')[1].split("</section>")[0]
    assert 'class="problem"' in sec and "members[2].latency_ms is not a positive number" in sec
    assert "<svg" not in sec


def test_invalid_json_and_non_finite_values_are_refused(tmp_path):
    run, stages = _run(tmp_path, "{not json")
    html, _ = render_html(run, ReportConfig(stages=tuple(stages)))
    assert 'class="problem"' in html.split('<section id="elastic">')[1].split("</section>")[0]
    fam = _family()
    fam["members"][0]["val_metric"] = float("nan")
    with pytest.raises(LaminaError, match=re.escape("members[0].val_metric is not a finite number")):
        parse_elastic(fam)


def test_a_lower_is_better_metric_keeps_the_low_values_on_the_front(tmp_path):
    fam = _family(seed=5)
    fam.update(metric="perplexity", higher_is_better=False)
    for x in fam["members"]:
        x.update(metric="perplexity", val_metric=1 / x["val_metric"] * 10)
    members, metric, hib = parse_elastic(fam)
    assert metric == "perplexity" and hib is False
    run, stages = _run(tmp_path, fam)
    html, _ = render_html(run, ReportConfig(stages=tuple(stages[:1])))
    par = [x["parameters"] for x in members]
    got = {int(i) for i in re.findall(r'id="elastic-par-front-(\d+)"', html)}
    assert got == _brute_front(par, [-x["val_metric"] for x in members])
    assert got != _brute_front(par, [x["val_metric"] for x in members])
    assert "lower is better" in html


def test_a_real_elastic_run_and_a_separate_student_in_one_report(tmp_path, nodrop_teacher):
    """What `lamina elastic` writes is what the section reads: no problem, the front as elastic.json marks it."""
    e, small, rec = tmp_path / "E", tmp_path / "small", tmp_path / "recovered"
    assert main(["elastic", "--teacher", str(nodrop_teacher), "--out", str(e), "--depths", "2,1", "--widths",
                 "1,0.5", "--sampled", "1", "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--no-progress",
                 "--latency-repeats", "2", "--calibration-samples", "32"]) == 0
    assert main(["prune", str(nodrop_teacher), "--drop-blocks", "0.5", "--calibration-samples", "32",
                 "--out", str(small)]) == 0
    assert main(["distill", "--teacher", str(nodrop_teacher), "--student", str(small), "--out", str(rec),
                 "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--no-progress"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(sample_scores(4, control=False)))
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--stages", str(e), str(nodrop_teacher), str(small), str(rec),
                 "--out", str(out)]) == 0
    sec = out.read_text().split('<section id="elastic">')[1].split("</section>")[0]
    assert 'class="problem"' not in sec and "<svg" in sec
    fam = json.loads((e / "elastic.json").read_text())["members"]
    got = {int(i) for i in re.findall(r'id="elastic-lat-front-(\d+)"', sec)}
    assert got == _brute_front([m["latency_ms"] for m in fam], [m["val_metric"] for m in fam])
    assert got == {i for i, m in enumerate(fam) if m["pareto"]}  # lamina elastic's own front agrees
    # the teacher and the distilled student (the pruned one has no accuracy of its own until benched)
    assert len(re.findall(r'id="elastic-par-separate-\d+"', sec)) == 2 and "<td>recovered</td>" in sec
