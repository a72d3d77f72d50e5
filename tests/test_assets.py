"""The bundled real models: capture equals the model's own forward."""

import numpy as np
import pytest
import torch

from lamina import CaptureConfig, FeatureStore, capture
from lamina.capture import pool
from lamina.data import load_data, subsample
from lamina.models import load_model

pytestmark = pytest.mark.assets


def test_minilm_capture_equals_output_hidden_states(tmp_path):
    lm = load_model("minilm")
    ds = subsample(load_data("rotten-tomatoes"), 24, seed=0)
    res = capture(lm, ds, CaptureConfig(out=str(tmp_path), batch_size=8, progress=False))
    store = FeatureStore.open(res.store)
    assert store.layers == ["embed"] + [f"blocks.{i}" for i in range(6)]
    batch = lm.batch(ds, np.arange(24))  # one batch: other padding than capture's batches of 8
    with torch.no_grad():
        hs = lm.module(**batch, output_hidden_states=True).hidden_states
    for i, name in enumerate(store.layers):
        ref = pool(hs[i], "mean", batch["attention_mask"]).numpy()
        np.testing.assert_allclose(store.load(name), ref, atol=1e-5)


def test_efficientnet_capture_equals_manual_forward(tmp_path):
    lm = load_model("efficientnet-lite0")
    ds = subsample(load_data("mnist-5k"), 20, seed=0)
    res = capture(lm, ds, CaptureConfig(out=str(tmp_path), image_size=64, batch_size=8, progress=False))
    store = FeatureStore.open(res.store)
    assert store.layers[-1] == "head_conv" and len(store.layers) == 18
    net = lm.module
    ref: dict[str, list] = {}
    with torch.no_grad():
        for start in range(0, 20, 8):  # the capture's own batches: same conv kernels, same numbers
            x = lm.batch(ds, np.arange(start, min(start + 8, 20)), image_size=64)["pixels"]
            h = net._swish(net._bn0(net._conv_stem(x)))
            ref.setdefault("embed", []).append(h.mean((2, 3)))
            for i, block in enumerate(net._blocks):
                h = block(h)
                ref.setdefault(f"blocks.{i}", []).append(h.mean((2, 3)))
            ref.setdefault("head_conv", []).append(net.extract_features(x).mean((2, 3)))
    for name, parts in ref.items():
        np.testing.assert_allclose(store.load(name), torch.cat(parts).numpy(), atol=1e-5)


def test_demo_end_to_end_small(tmp_path, capsys):
    """`lamina demo` = capture -> analyze -> report on the bundled model and data."""
    from lamina.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "150", "--no-control"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "blocks.5" in printed
    assert (out / "features" / "manifest.json").exists() and (out / "scores.json").exists()
    html = (out / "report.html").read_text()
    assert "minilm" in html and html.count("<svg") >= 3
