"""bench/transfer.py's time fraction and bench/transfer_recipes.py's summary: what a target reads.

The time fraction reads process CPU time where both sides record it (wall time stretches with other jobs' load on
a shared machine; CPU time of a one-thread run barely does) and wall time otherwise; the recipe summary chooses on
CV / validation accuracy only, never on the held-out rows it reports.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import transfer as bt  # noqa: E402
import transfer_recipes as br  # noqa: E402


def _head(wall, cpu=None):
    h = {"seconds": {"mean": wall}}
    if cpu is not None:
        h["cpu_seconds"] = {"mean": cpu}
    return h


def test_time_fraction_reads_cpu_time_when_both_record_it():
    # wall time of the head stretched by load (0.2 of the wall) while its CPU time is 0.05 of the fine-tuning's
    t = bt._time_fraction(_head(40.0, 7.0), {"seconds": 200.0, "cpu_seconds": 140.0}, "select")
    assert t["value"] == pytest.approx(0.05) and t["met"]
    assert "CPU" in t["goal"] and "0.200" in t["goal"]  # the wall fraction stays beside it


def test_time_fraction_falls_back_to_wall_time():
    t = bt._time_fraction(_head(40.0, 7.0), {"seconds": 200.0}, "select")  # an old record: no CPU time
    assert t["value"] == pytest.approx(0.2) and not t["met"] and "wall" in t["goal"]
    t = bt._time_fraction(_head(10.0), {"seconds": 200.0, "cpu_seconds": 150.0}, "last")
    assert t["value"] == pytest.approx(0.05) and t["met"]


def _row(recipe, cv, val, held, kind="scikit-learn LogisticRegressionCV"):
    r = {"recipe": recipe, "kind": kind, "val_accuracy": val, "test_accuracy": 0.7, "heldout_accuracy": held,
         "cpu_seconds": 1.0}
    if cv is not None:
        r.update(cv_accuracy=cv, C=0.01)
    return r


def test_recipe_summary_chooses_on_cv_and_validation_never_on_held_out_rows():
    rows = [_row("a", 0.76, 0.70, 0.70), _row("a", 0.74, 0.72, 0.72),  # best CV, worse held-out
            _row("b", 0.70, 0.80, 0.75), _row("b", 0.72, 0.80, 0.75),
            _row("h1", None, 0.79, 0.69, "lamina transfer"), _row("h2", None, 0.81, 0.68, "lamina transfer")]
    s = br.summarize(rows, full_heldout=0.75)
    assert s["chosen_by_cv"] == "a" and s["chosen_by_validation"] == "h2" and s["best_heldout"] == "b"
    a = s["recipes"]["a"]
    assert a["cv_accuracy"]["mean"] == pytest.approx(0.75) and a["heldout_accuracy"]["mean"] == pytest.approx(0.71)
    assert a["retained_heldout"] == pytest.approx(0.71 / 0.75) and a["C"] == [0.01, 0.01]
    assert s["recipes"]["b"]["retained_heldout"] == pytest.approx(1.0)


def test_a_cv_tie_goes_to_the_recipe_with_fewer_features():
    rows = [dict(_row("wide", 0.76, 0.7, 0.72), features=5376), dict(_row("narrow", 0.76, 0.7, 0.70), features=384),
            dict(_row("other", 0.75, 0.7, 0.73), features=10)]
    s = br.summarize(rows, full_heldout=0.75)
    assert s["chosen_by_cv"] == "narrow" and sorted(s["cv_ties"]) == ["narrow", "wide"]
