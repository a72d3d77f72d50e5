"""Capture equals the model's own hidden states; pooling, dtype, bad input."""

import numpy as np
import pytest
import torch

import lamina
from lamina import CaptureConfig, FeatureStore, LaminaError, UsageError, capture
from lamina import testing as lt
from lamina.capture import pool
from lamina.models import load_model


def _hidden_states(lm, ds, rows, max_length=128):
    batch = lm.batch(ds, rows, max_length)
    with torch.no_grad():
        out = lm.module(**batch, output_hidden_states=True)
    return batch, out


@pytest.mark.parametrize("arch", lt.TEXT_ARCHS)
def test_unpooled_capture_equals_output_hidden_states(arch, tiny_dirs, tmp_path):
    ds = lt.tiny_text_dataset(12)
    res = capture(str(tiny_dirs[arch]), ds, CaptureConfig(out=str(tmp_path), pooling="none", batch_size=5,
                                                          max_length=16, progress=False))
    store = FeatureStore.open(res.store)
    lm = load_model(str(tiny_dirs[arch]))
    lengths = store.lengths
    n_blocks = lm.blocks.n_blocks
    for b in range(0, 12, 5):
        rows = np.arange(b, min(b + 5, 12))
        batch, out = _hidden_states(lm, ds, rows, 16)
        hs = out.hidden_states
        decoder = "final_norm" in store.layers
        for i in range(n_blocks + 1):
            name = "embed" if i == 0 else f"blocks.{i - 1}"
            if decoder and i == n_blocks:
                continue  # HF's last hidden state of a decoder is after the final norm
            got = store.load(name)[rows]
            for r, row in enumerate(rows):
                n_tok = int(batch["attention_mask"][r].sum())
                assert lengths[row] == n_tok
                ref = hs[i][r].numpy()
                mask = batch["attention_mask"][r].numpy().astype(bool)
                np.testing.assert_allclose(got[r][: ref.shape[0]][mask], ref[mask], atol=1e-5)
        if decoder:
            np.testing.assert_allclose(store.load("final_norm")[rows][:, : hs[-1].shape[1]], hs[-1].numpy(),
                                       atol=1e-5)


def test_last_block_and_final_norm_are_separate(tiny_dirs, tmp_path):
    """For decoders the last block is read before ln_f; ln_f's output is its own entry."""
    ds = lt.tiny_text_dataset(6)
    res = capture(str(tiny_dirs["gpt2"]), ds, CaptureConfig(out=str(tmp_path), progress=False))
    store = FeatureStore.open(res.store)
    lm = load_model(str(tiny_dirs["gpt2"]))
    last, final = store.load("blocks.1"), store.load("final_norm")
    assert not np.allclose(last, final)
    # manual: ln_f applied to the last block output, then mean pooled, equals the final entry
    batch = lm.batch(ds, np.arange(6))
    with torch.no_grad():
        out = lm.module(**batch, output_hidden_states=True)
    ref = pool(out.last_hidden_state, "mean", batch["attention_mask"]).numpy()
    np.testing.assert_allclose(final, ref, atol=1e-5)


def test_vit_folder_capture_matches(tiny_vit_dir, tmp_path):
    ds = lt.tiny_image_dataset(8, size=16)
    res = capture(str(tiny_vit_dir), ds, CaptureConfig(out=str(tmp_path), pooling="none", progress=False))
    store = FeatureStore.open(res.store)
    lm = load_model(str(tiny_vit_dir))
    batch = lm.batch(ds, np.arange(8))
    with torch.no_grad():
        hs = lm.module(pixel_values=batch["pixels"], output_hidden_states=True).hidden_states
    for i, name in enumerate(["embed", "blocks.0", "blocks.1"]):
        np.testing.assert_allclose(store.load(name), hs[i].numpy(), atol=1e-5)


def test_cnn_factory_capture_matches_manual_forward(tmp_path):
    ds = lt.tiny_image_dataset(10, size=16)
    res = capture("lamina.testing:tiny_cnn", ds, CaptureConfig(out=str(tmp_path), batch_size=4, progress=False))
    store = FeatureStore.open(res.store)
    m = lt.tiny_cnn()
    x = torch.from_numpy(ds.images(np.arange(10))).repeat(1, 3, 1, 1)
    feats = {}
    with torch.no_grad():
        h = m.stem(x)
        feats["embed"] = h.mean((2, 3))
        for i, b in enumerate(m.blocks):
            h = b(h)
            feats[f"blocks.{i}"] = h.mean((2, 3))
    for name, ref in feats.items():
        np.testing.assert_allclose(store.load(name), ref.numpy(), atol=1e-5)


def test_mean_pooling_unchanged_by_padding(tiny_dirs):
    lm = load_model(str(tiny_dirs["bert"]))
    ds = lt.tiny_text_dataset(2)
    short = lm.batch(ds, [0], 32)
    ids = torch.cat([short["input_ids"], torch.zeros(1, 7, dtype=torch.long)], 1)
    mask = torch.cat([short["attention_mask"], torch.zeros(1, 7, dtype=torch.long)], 1)
    from lamina.capture import recording
    outs = []
    for inp in (short, {"input_ids": ids, "attention_mask": mask}):
        with torch.no_grad(), recording(lm.module, list(lm.blocks.taps), "mean") as rec:
            rec.mask = inp["attention_mask"]
            lm.module(**inp)
        outs.append({k: v.clone() for k, v in rec.outputs.items()})
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=1e-5, rtol=1e-5)


def test_pool_modes():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right and left padding
    torch.testing.assert_close(pool(x, "mean", mask), torch.stack([x[0, :2].mean(0), x[1, 1:].mean(0)]))
    torch.testing.assert_close(pool(x, "last", mask), torch.stack([x[0, 1], x[1, 3]]))
    torch.testing.assert_close(pool(x, "cls", mask), x[:, 0])
    assert pool(x, "none", mask) is x
    img = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(pool(img, "mean"), img.mean((2, 3)))


def test_hooks_removed_after_capture_and_on_error(tiny_dirs, tmp_path):
    lm = load_model(str(tiny_dirs["bert"]))
    capture(lm, lt.tiny_text_dataset(6), CaptureConfig(out=str(tmp_path / "a"), progress=False))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.module.modules())
    with pytest.raises(LaminaError):
        capture("lamina.testing:nan_model", lamina.Dataset("v", "array", np.ones((4, 4), np.float32),
                                                           [0, 1, 0, 1], ["a", "b"], np.arange(4)),
                CaptureConfig(out=str(tmp_path / "b"), progress=False))


def test_nan_activation_names_layer_and_sample(tmp_path):
    ds = lamina.Dataset("v", "array", np.ones((4, 4), np.float32), [0, 1, 0, 1], ["a", "b"],
                        ["s0", "s1", "s2", "s3"])
    with pytest.raises(LaminaError) as e:
        capture("lamina.testing:nan_model", ds, CaptureConfig(out=str(tmp_path), progress=False))
    assert "blocks.1" in str(e.value) and "s1" in str(e.value)
    assert not isinstance(e.value, UsageError)


def test_float16_store_and_layer_selection(tiny_dirs, tmp_path):
    ds = lt.tiny_text_dataset(8)
    r32 = capture(str(tiny_dirs["bert"]), ds, CaptureConfig(out=str(tmp_path / "a"), progress=False))
    r16 = capture(str(tiny_dirs["bert"]), ds, CaptureConfig(out=str(tmp_path / "b"), dtype="float16",
                                                            layers="embed,blocks.-1", progress=False))
    s32, s16 = FeatureStore.open(r32.store), FeatureStore.open(r16.store)
    assert s16.layers == ["embed", "blocks.1"] and s16.load("embed").dtype == np.float16
    np.testing.assert_allclose(s16.load("blocks.1").astype(np.float32), s32.load("blocks.1"), rtol=2e-3, atol=2e-3)
    assert s32.verify() == [] and s16.verify() == []
    np.testing.assert_array_equal(s32.labels, ds.labels)
    assert list(s32.ids) == list(ds.ids)


def test_store_refuses_overwrite_and_other_model(tiny_dirs, tmp_path):
    ds = lt.tiny_text_dataset(8)
    cfg = CaptureConfig(out=str(tmp_path), progress=False)
    capture(str(tiny_dirs["bert"]), ds, cfg)
    before = FeatureStore.open(tmp_path).manifest["checksums"]
    with pytest.raises(UsageError, match="already exists"):
        capture(str(tiny_dirs["bert"]), ds, cfg)
    with pytest.raises(UsageError, match="another model or settings"):
        capture(str(tiny_dirs["gpt2"]), ds, CaptureConfig(out=str(tmp_path), resume=True, progress=False))
    assert FeatureStore.open(tmp_path).manifest["checksums"] == before  # untouched
    res = capture(str(tiny_dirs["gpt2"]), ds, CaptureConfig(out=str(tmp_path), overwrite=True, progress=False))
    assert "final_norm" in FeatureStore.open(res.store).layers


def test_config_validation():
    for kw in ({"pooling": "max"}, {"dtype": "int8"}, {"batch_size": 0}, {"resume": True, "overwrite": True}):
        with pytest.raises(UsageError):
            CaptureConfig(out="x", **kw)


def test_read_rows_equals_memory_map(tiny_dirs, tmp_path):
    res = capture(str(tiny_dirs["bert"]), lt.tiny_text_dataset(20), CaptureConfig(out=str(tmp_path), progress=False))
    store = FeatureStore.open(res.store)
    rows = np.array([0, 1, 2, 5, 7, 8, 19])
    for name in store.layers:
        np.testing.assert_array_equal(store.read_rows(name, rows), store.load(name)[rows])
