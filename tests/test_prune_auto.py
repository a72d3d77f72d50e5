"""`--method auto`, prune's default: the joint method where the model can be run on calibration rows (a fine-tuned
model's own task rows, or the data path a --scores run was captured from), else skip_nmse; plan.json says which
and why, and an explicit --method is taken as given."""

import json

import pytest

from lamina import CaptureConfig, UsageError, capture
from lamina import testing as lt
from lamina.analyze import AnalyzeConfig, analyze
from lamina.cli import main
from lamina.compress import PruneConfig, prune
from conftest import make_text_run


@pytest.fixture(scope="module")
def path_run(tmp_path_factory, tiny_dirs):
    """A scores run captured from a CSV path: its manifest names data that prune can reload."""
    run, _ = make_text_run(tmp_path_factory.mktemp("auto-path"), tiny_dirs["bert"], 48, seed=5, control=False,
                           importance_samples=16)
    return run


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, tiny_dirs):
    """A scores run captured from in-memory rows: nothing for prune to reload."""
    import pandas as pd

    from lamina.data.text import load_for_capture
    root = tmp_path_factory.mktemp("auto-mem")
    texts, labels = lt.tiny_sentences(48, seed=5)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(root / "sent.csv", index=False)
    rows = load_for_capture(str(root / "sent.csv"), None, None, False)  # a Dataset in memory, no path recorded
    run = root / "run"
    capture(str(tiny_dirs["bert"]), rows, CaptureConfig(out=str(run), batch_size=16, progress=False))
    analyze(str(run), AnalyzeConfig(control=False, importance_samples=16, progress=False), model=str(tiny_dirs["bert"]),
            data=rows)
    return run


def _depth(out) -> dict:
    return json.loads((out / "plan.json").read_text())["depth"]


def test_auto_is_the_default_and_the_cli_offers_it():
    assert PruneConfig(out="x", drop_blocks=0.5).method == "auto"
    with pytest.raises(UsageError) as e:
        PruneConfig(out="x", drop_blocks=0.5, method="jiont")
    assert "auto" in str(e.value) and "joint" in str(e.value)


def test_cli_help_describes_auto(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'auto' (default)" in text and "else 'skip_nmse'" in text


def test_api_auto_on_a_fine_tuned_model_is_joint_on_its_own_rows(tiny_teacher, tmp_path):
    auto = prune(str(tiny_teacher), None, PruneConfig(out=str(tmp_path / "auto"), drop_blocks=0.5,
                                                      calibration_samples=40))
    d = auto.plan["depth"]
    assert d["method"] == "joint" and d["method_requested"] == "auto" and "own task rows" in d["method_reason"]
    assert auto.plan["config"]["method"] == "joint" and d["joint"]["objective"] == "accuracy"  # labels were used
    same = prune(str(tiny_teacher), None, PruneConfig(out=str(tmp_path / "joint"), drop_blocks=0.5,
                                                      calibration_samples=40, method="joint"))
    assert d["remove"] == same.plan["depth"]["remove"] and same.plan["depth"]["method_reason"] == "given by --method"
    assert _depth(tmp_path / "auto")["method"] == "joint"  # what was written is what was returned


def test_api_auto_without_calibration_rows_is_skip_nmse(path_run, tiny_dirs, tmp_path):
    scores = json.loads((path_run / "scores.json").read_text())  # a dict: no run folder, no data to reload
    auto = prune(str(tiny_dirs["bert"]), scores, PruneConfig(out=str(tmp_path / "auto"), drop_blocks=0.5))
    d = auto.plan["depth"]
    assert d["method"] == "skip_nmse" and d["method_requested"] == "auto"
    assert "no calibration rows" in d["method_reason"]
    ref = prune(str(tiny_dirs["bert"]), scores, PruneConfig(out=str(tmp_path / "ref"), drop_blocks=0.5,
                                                            method="skip_nmse"))
    assert d["remove"] == ref.plan["depth"]["remove"]
    imp = scores["importance"]  # the block with the lowest skip nMSE goes, as before auto existed
    low = min(range(len(imp["blocks"])), key=lambda i: (imp["skip_nmse"][i], i))
    assert d["remove"] == [imp["blocks"][low]]


def test_cli_auto_with_a_classifier_scores_run_is_skip_nmse_and_joint_when_asked(path_run, tiny_dirs, tmp_path):
    # prune has no labels on this path: joint could only use logit nMSE, not shown to beat single-block scores
    out = tmp_path / "small"
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(path_run / "scores.json"), "--drop-blocks", "0.5",
                 "--out", str(out)]) == 0
    d = _depth(out)
    assert d["method"] == "skip_nmse" and d["method_requested"] == "auto" and "no labels" in d["method_reason"]
    out2 = tmp_path / "joint"
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(path_run / "scores.json"), "--drop-blocks", "0.5",
                 "--method", "joint", "--out", str(out2)]) == 0
    d2 = _depth(out2)
    assert d2["method"] == "joint" and d2["joint"]["objective"] == "nmse" and len(d2["remove"]) == 1


def test_auto_resolves_a_causal_lm_scores_run_to_joint():
    from lamina.compress.prune import resolve_method
    man = {"data_spec": {"data": "debates"}, "model": {"class": "LlamaForCausalLM"}}
    method, why = resolve_method(PruneConfig(out="x", drop_blocks=0.5), False, man)
    assert method == "joint" and "next-token loss" in why
    man["model"]["class"] = "BertForSequenceClassification"
    assert resolve_method(PruneConfig(out="x", drop_blocks=0.5), False, man)[0] == "skip_nmse"


def test_cli_auto_with_a_scores_run_of_in_memory_rows_is_skip_nmse(memory_run, tiny_dirs, tmp_path):
    out = tmp_path / "small"
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(memory_run / "scores.json"), "--drop-blocks",
                 "0.5", "--out", str(out)]) == 0
    d = _depth(out)
    assert d["method"] == "skip_nmse" and d["method_requested"] == "auto"
    assert "in-memory" in d["method_reason"] and "joint" not in d


def test_cli_auto_on_a_fine_tuned_model_is_joint(tiny_teacher, tmp_path):
    out = tmp_path / "small"
    assert main(["prune", str(tiny_teacher), "--drop-blocks", "0.5", "--calibration-samples", "40",
                 "--out", str(out)]) == 0
    d = _depth(out)
    assert d["method"] == "joint" and d["method_requested"] == "auto" and d["joint"]["objective"] == "accuracy"


def test_cli_explicit_method_is_kept_where_auto_would_choose_joint(tiny_teacher, tmp_path):
    out = tmp_path / "small"
    assert main(["prune", str(tiny_teacher), "--drop-blocks", "0.5", "--calibration-samples", "40",
                 "--method", "skip_nmse", "--out", str(out)]) == 0
    d = _depth(out)
    assert d["method"] == "skip_nmse" and d["method_requested"] == "skip_nmse"
    assert d["method_reason"] == "given by --method" and "joint" not in d
