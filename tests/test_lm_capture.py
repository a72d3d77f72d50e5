"""Unlabelled text through capture and analyze (a .txt file, 'debates'): label-free metrics, a clear note."""

import json

import numpy as np
import pytest

from lamina.testing import save_tiny_causal_lm, tiny_sentences


@pytest.fixture()
def lm_and_text(tmp_path):
    texts, _ = tiny_sentences(60, seed=7)
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n\n")  # blank lines are not documents
    return save_tiny_causal_lm(tmp_path / "tl", layers=3), tmp_path / "d.txt"


def test_cli_capture_and_analyze_a_txt_file_with_a_causal_lm(lm_and_text, tmp_path, capsys):
    from lamina.analyze.metrics import cka_matrix, effective_rank
    from lamina.cli import main
    from lamina.store import FeatureStore
    model, txt = lm_and_text
    run = tmp_path / "R"
    assert main(["capture", "--model", str(model), "--data", str(txt), "--pooling", "last", "--limit", "20",
                 "--seq-len", "8", "--out", str(run), "--no-progress"]) == 0
    store = FeatureStore.open(run)  # a causal LM on text: packed blocks of 8 tokens, --limit counts blocks
    assert len(store.labels) == 20 and set(np.unique(store.labels)) == {0}
    assert main(["analyze", str(run), "--no-progress", "--importance-samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "no labels" in out and "probe" in out
    s = json.loads((run / "scores.json").read_text())
    m = s["metrics"]
    assert all(v is None for k in ("probe_acc", "knn_acc", "ncc_acc", "within_between_ratio") for v in m[k])
    assert s["notes"] and "no labels" in s["notes"][0]
    # the label-free metrics equal an independent computation on the stored features
    feats = [np.asarray(store.load(n), dtype=np.float32) for n in store.layers]
    for i, x in enumerate(feats):
        assert m["effective_rank"][i] == pytest.approx(effective_rank(x), rel=1e-6)
    cka = cka_matrix(feats)
    got = [v for v in m["cka_to_last"]]
    for i in range(len(feats)):
        if got[i] is not None:
            assert got[i] == pytest.approx(float(cka[i, -1]), rel=1e-6)
    imp = s["importance"]
    assert len(imp["skip_nmse"]) == 3 and all(v is not None and v > 0 for v in imp["skip_nmse"])
    # the control (random weights, same samples) is analyzed the same way
    assert all(v is None for v in s["control"]["metrics"]["probe_acc"])


def test_capture_text_refuses_a_label_column_and_empty_text(lm_and_text, tmp_path, capsys):
    from lamina.cli import main
    model, txt = lm_and_text
    assert main(["capture", "--model", str(model), "--data", str(txt), "--label-column", "y",
                 "--out", str(tmp_path / "R2")]) == 2
    assert "no label column" in capsys.readouterr().err
    (tmp_path / "e.txt").write_text("\n  \n")
    assert main(["capture", "--model", str(model), "--data", str(tmp_path / "e.txt"), "--out", str(tmp_path / "R3")]) == 2
    assert "no text" in capsys.readouterr().err


def test_prune_jointly_from_a_text_run(lm_and_text, tmp_path, capsys):
    """A scores run captured on a .txt gives the joint method its calibration rows (the LM's token loss)."""
    from lamina.cli import main
    model, txt = lm_and_text
    run = tmp_path / "R"
    assert main(["capture", "--model", str(model), "--data", str(txt), "--pooling", "mean", "--limit", "16",
                 "--seq-len", "8", "--out", str(run), "--no-progress"]) == 0
    assert main(["analyze", str(run), "--no-control", "--importance-samples", "16", "--no-progress"]) == 0
    out = tmp_path / "small"
    assert main(["prune", str(model), "--scores", str(run / "scores.json"), "--drop-blocks", "0.34",
                 "--method", "joint", "--calibration-samples", "16", "--out", str(out)]) == 0
    depth = json.loads((out / "plan.json").read_text())["depth"]
    assert depth["joint"]["objective"] == "loss" and len(depth["remove"]) == 1
    assert len(depth["rounds"][0]["candidates"]) == 3
