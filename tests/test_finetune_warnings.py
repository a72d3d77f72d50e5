"""finetune tells the user when the result is not what it could be: validation accuracy still rising at the
last epoch, or a test accuracy below the base model's best frozen probe on the same data."""

import json

from lamina.analyze import AnalyzeConfig, analyze
from lamina.capture import CaptureConfig, capture
from lamina.cli import main
from lamina.finetune.finetune import _warnings
from lamina.models import load_model


def _hist(vals, stopped=False):
    best = max(range(len(vals)), key=lambda i: (vals[i], -i))
    return {"epochs": [{"epoch": i + 1, "val_accuracy": v} for i, v in enumerate(vals)], "best_epoch": best + 1,
            "stopped_early": stopped}


def test_still_rising_at_the_last_epoch_is_a_warning(tiny_dirs):
    base = load_model(str(tiny_dirs["bert"]))
    test = {"accuracy": 0.7}
    w, probe = _warnings(_hist([0.5, 0.6, 0.7]), test, base, None, None)
    assert len(w) == 1 and "still rising" in w[0] and "0.6000 -> 0.7000" in w[0]
    assert probe["compared"] is False and "--probe-scores" in probe["why"]
    for vals in ([0.5, 0.7, 0.6], [0.5, 0.7, 0.7], [0.7]):  # fell, flat, or one epoch: nothing to say
        assert _warnings(_hist(vals), test, base, None, None)[0] == []


def test_below_the_frozen_probe_is_a_warning(tiny_dirs, sentences_csv, tmp_path, capsys):
    run = tmp_path / "base-run"
    capture(str(tiny_dirs["bert"]), str(sentences_csv), CaptureConfig(out=str(run), progress=False))
    analyze(str(run), AnalyzeConfig(control=False, importance=False, progress=False))
    best = max(json.loads((run / "scores.json").read_text())["metrics"]["probe_acc"])
    # one epoch at a tiny learning rate: a model that has learnt next to nothing
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(tiny_dirs["bert"]), "--data", str(sentences_csv), "--out", str(out),
                 "--full", "--epochs", "1", "--lr", "1e-6", "--no-progress", "--probe-scores",
                 str(run / "scores.json")]) == 0
    printed = capsys.readouterr().out
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["probe_comparison"]["compared"] is True
    assert rec["probe_comparison"]["best_probe"] == best
    assert rec["test"]["accuracy"] < best
    assert any("below the best frozen linear probe" in w for w in rec["warnings"])
    assert "warning: the test accuracy" in printed
    assert f"next: lamina prune {out} --drop-blocks 0.5" in printed
    # scores of other rows: not compared, and said so
    out2 = tmp_path / "ft2"
    assert main(["finetune", "--model", str(tiny_dirs["bert"]), "--data", str(sentences_csv), "--out", str(out2),
                 "--full", "--epochs", "1", "--limit", "120", "--no-progress", "--probe-scores",
                 str(run / "scores.json")]) == 0
    assert "not compared with a frozen probe: the scores are of another model or other rows" in capsys.readouterr().out
