"""analyze / compare on tiny models: scores.json complete and consistent, errors clear."""

import json

import numpy as np
import pytest

from lamina import CaptureConfig, UsageError, capture
from lamina import testing as lt
from lamina.analyze import AnalyzeConfig, CompareConfig, analyze, compare
from lamina.analyze.metrics import cka_matrix, probe_layers
from lamina.cli import main
from conftest import make_text_run
from lamina.store import FeatureStore


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_dirs):
    return make_text_run(tmp_path_factory.mktemp("analyze"), tiny_dirs["bert"], 90, seed=3, importance_samples=32)


def test_scores_json_has_every_metric_for_every_layer(text_run):
    run, _ = text_run
    s = json.loads((run / "scores.json").read_text())
    layers = s["layers"]
    assert layers == ["embed", "blocks.0", "blocks.1"]
    for key in ("probe_acc", "probe_ci_low", "probe_ci_high", "knn_acc", "ncc_acc", "effective_rank",
                "within_between_ratio", "cdnv", "cka_to_last"):
        assert len(s["metrics"][key]) == len(layers), key
        assert key in s["definitions"] or key.startswith("probe_ci") or key == "probe_C"
    assert s["split"]["n_train"] + s["split"]["n_val"] + s["split"]["n_test"] == 90
    assert s["settings"]["metrics_device"] == {"probe": "cpu", "knn_cka": "cpu"}  # no GPU here
    lo, acc, hi = (np.array(s["metrics"][k]) for k in ("probe_ci_low", "probe_acc", "probe_ci_high"))
    assert (lo <= acc).all() and (acc <= hi).all()
    cka = np.array(s["cka"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-9)
    np.testing.assert_allclose(cka, cka.T, atol=1e-12)
    assert s["importance"]["blocks"] == ["blocks.0", "blocks.1"] and all(s["importance"]["skippable"])
    ctrl = s["control"]
    assert len(ctrl["metrics"]["probe_acc"]) == len(layers) and ctrl["importance"] is not None
    assert (run / "control" / "features" / "manifest.json").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert {"capture", "analyze", "versions"} <= set(cfg)


def test_scores_match_metrics_recomputed_from_the_store(text_run):
    run, _ = text_run
    s = json.loads((run / "scores.json").read_text())
    store = FeatureStore.open(run)
    feats = [np.asarray(store.load(n)) for n in store.layers]
    from lamina.analyze.metrics import stratified_split
    split = stratified_split(store.labels, (0.6, 0.2, 0.2), seed=0)
    probes = probe_layers(feats, store.labels, split)
    assert [p.test_accuracy for p in probes] == s["metrics"]["probe_acc"]
    np.testing.assert_allclose(cka_matrix(feats), np.array(s["cka"]), atol=1e-12)


def test_analyze_refuses_to_overwrite_and_python_objects_need_model(text_run, tmp_path):
    run, _ = text_run
    with pytest.raises(UsageError, match="already exists"):
        analyze(run, AnalyzeConfig(progress=False))
    ds = lt.tiny_image_dataset(60, size=16)
    capture(lt.tiny_cnn(), ds, CaptureConfig(out=str(tmp_path), progress=False))
    with pytest.raises(UsageError, match="Python model object"):
        analyze(tmp_path, AnalyzeConfig(progress=False))
    res = analyze(tmp_path, AnalyzeConfig(progress=False), model=lt.tiny_cnn(), data=ds)
    s = json.loads(open(res.scores_path).read())
    assert s["importance"]["skippable"] == [True, False, True, True]  # block 1 downsamples
    assert s["importance"]["skip_nmse"][1] is None
    with pytest.raises(UsageError, match="not the one the store was captured from"):
        analyze(tmp_path, AnalyzeConfig(progress=False, overwrite=True), model=lt.tiny_cnn(seed=5), data=ds)


def test_config_validation():
    with pytest.raises(UsageError):
        AnalyzeConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(UsageError):
        CompareConfig(batch_size=2)
    with pytest.raises(UsageError, match="probe_workers"):
        AnalyzeConfig(probe_workers=-1)


def test_compare_two_models_and_self(text_run, tiny_dirs, tmp_path):
    run, csv = text_run
    other = tmp_path / "gpt2"
    capture(str(tiny_dirs["gpt2"]), str(csv), CaptureConfig(out=str(other), batch_size=16, progress=False))
    res = compare(run, other, CompareConfig(out=str(tmp_path / "c.json"), batch_size=30, n_perm=5))
    cka = np.array(res.cka)
    assert cka.shape == (3, 4)
    data = json.loads((tmp_path / "c.json").read_text())
    assert np.array(data["null"]["p_value"]).shape == (3, 4)
    self_cmp = compare(run, run, CompareConfig(out=str(tmp_path / "s.json"), batch_size=30, n_perm=0))
    # the unbiased estimator of a layer with itself is exactly 1
    np.testing.assert_allclose(np.diag(np.array(self_cmp.cka)), 1.0, atol=1e-9)
    with pytest.raises(UsageError, match="already exists"):
        compare(run, other, CompareConfig(out=str(tmp_path / "c.json")))


def test_compare_refuses_different_samples(text_run, tiny_dirs, tmp_path):
    run, csv = text_run
    other = tmp_path / "fewer"
    capture(str(tiny_dirs["bert"]), str(csv), CaptureConfig(out=str(other), limit=40, progress=False))
    with pytest.raises(UsageError, match="different samples"):
        compare(run, other, CompareConfig(out=str(tmp_path / "x.json")))


def test_cli_analyze_and_report(text_run, capsys):
    run, _ = text_run
    assert main(["analyze", str(run), "--overwrite", "--no-control", "--no-progress",
                 "--importance-samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1" in out and "scores:" in out
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_text().count("<svg") >= 3
    assert main(["analyze", str(run)]) == 2
