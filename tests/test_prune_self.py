"""`prune` of a fine-tuned model without --scores: importance measured on the teacher's own training rows,
equal to what capture + analyze of the same model on the same rows gives; another model's scores are refused
with the command that works."""

import json

import pytest

from lamina import UsageError
from lamina.analyze import AnalyzeConfig, analyze
from lamina.capture import CaptureConfig, capture
from lamina.cli import main
from lamina.compress import PruneConfig, prune
from lamina.compress._selfscore import calibration_rows
from lamina.task import read_task


def test_prune_without_scores_equals_prune_with_an_explicit_analyze_of_the_same_rows(tiny_teacher, tmp_path):
    # about the scores themselves: the single-block method reads them (auto would choose jointly here)
    own = prune(str(tiny_teacher), None, PruneConfig(out=str(tmp_path / "own"), drop_blocks=0.5,
                                                     calibration_samples=40, method="skip_nmse"))
    plan = own.plan
    assert plan["result"]["scores_computed_by"] == "prune"
    saved = json.loads((tmp_path / "own" / "scores.json").read_text())
    assert saved["computed_by"] == "prune" and saved["rows"]["split"] == "train" and saved["rows"]["n"] == 40

    # the same rows, through the documented analysis path
    rows = calibration_rows(read_task(tiny_teacher), 40)
    run = tmp_path / "run"
    capture(str(tiny_teacher), rows, CaptureConfig(out=str(run), progress=False))
    analyze(str(run), AnalyzeConfig(control=False, importance_samples=0, progress=False),
            model=str(tiny_teacher), data=rows)
    ref = prune(str(tiny_teacher), str(run / "scores.json"), PruneConfig(out=str(tmp_path / "ref"), drop_blocks=0.5,
                                                                             method="skip_nmse"))
    a, b = plan["depth"], ref.plan["depth"]
    assert a["remove"] == b["remove"] and len(a["remove"]) == 1
    assert a["scores"].keys() == b["scores"].keys()
    for k in a["scores"]:
        assert a["scores"][k] == pytest.approx(b["scores"][k], rel=1e-6)
    assert plan["model"]["fingerprint"] == ref.plan["model"]["fingerprint"]
    # training rows only: none of the task's test rows was used to choose blocks
    task = read_task(tiny_teacher)
    ds, split = task.load()
    test_ids = set(ds.take(split["test"]).ids)
    assert not test_ids & set(rows.ids)


def test_cli_prune_without_scores_says_so_and_prints_the_next_command(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["prune", str(tiny_teacher), "--drop-blocks", "0.5", "--calibration-samples", "32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no --scores given" in printed and "32 training rows" in printed
    assert f"next: lamina distill --teacher {tiny_teacher} --student {out}" in printed
    assert (out / "scores.json").exists() and (out / "model").is_dir()


def test_scores_of_another_model_are_refused_with_the_command_that_works(tiny_teacher, tiny_dirs, tmp_path, capsys):
    run = tmp_path / "base-run"
    capture(str(tiny_dirs["bert"]), str(read_task(tiny_teacher).data), CaptureConfig(out=str(run), limit=40,
                                                                                    progress=False))
    analyze(str(run), AnalyzeConfig(control=False, importance_samples=16, progress=False))
    out = tmp_path / "small"
    rc = main(["prune", str(tiny_teacher), "--scores", str(run / "scores.json"), "--drop-blocks", "0.5",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "another model" in err
    assert f"lamina prune {tiny_teacher} --drop-blocks 0.5 --out {out}" in err


def test_a_model_without_a_task_record_needs_scores(tiny_dirs, tmp_path):
    with pytest.raises(UsageError, match="task record") as e:
        prune(str(tiny_dirs["bert"]), None, PruneConfig(out=str(tmp_path / "s"), drop_blocks=0.5))
    assert "lamina analyze run" in str(e.value) and not (tmp_path / "s").exists()


def test_a_model_that_does_not_exist_is_named_before_the_scores(tmp_path):
    with pytest.raises(UsageError, match="neither a bundled name") as e:
        prune(str(tmp_path / "nope"), None, PruneConfig(out=str(tmp_path / "s"), drop_blocks=0.5))
    assert str(tmp_path / "nope") in str(e.value) and not (tmp_path / "s").exists()
