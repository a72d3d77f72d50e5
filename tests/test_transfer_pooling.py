"""lamina transfer on a ``--pooling none`` store (several poolings, side without backbone passes),
select's validation choice, and ``--device``.

Invariants: a none store pooled 'mean' here equals a store pooled 'mean' at capture; max over real tokens
equals numpy's; side's token-level inputs read from the store equal the frozen backbone's; select picks the
(keep, group lasso) pair with the best validation accuracy among those it tried.
"""

import numpy as np
import pytest
import torch

from lamina import CaptureConfig, capture
from lamina import testing as lt
from lamina.errors import UsageError
from lamina.models import wrap_module
from lamina.store import FeatureStore
from lamina.transfer import TransferConfig, transfer
from lamina.transfer._pools import pool_many, pooled_from_store
from lamina.transfer._rows import reload_model_and_data

FAST = dict(epochs=3, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dirs, sentences_csv):
    root = tmp_path_factory.mktemp("pooling")
    out = {}
    for pooling in ("mean", "none"):
        out[pooling] = root / pooling
        capture(str(tiny_dirs["bert"]), str(sentences_csv), CaptureConfig(out=str(out[pooling]), pooling=pooling,
                                                                           batch_size=64, progress=False))
    return out


def test_a_none_store_pooled_here_equals_a_pooled_store(runs):
    mean, none = FeatureStore.open(runs["mean"]), FeatureStore.open(runs["none"])
    got = pooled_from_store(none, mean.layers, ["mean", "max"], chunk=7)  # chunks that do not divide N
    lengths = none.lengths
    for name in mean.layers:
        d = mean.manifest["layers"][name]["shape"][1]
        np.testing.assert_allclose(got[name][:, :d].numpy(), mean.load(name), rtol=1e-5, atol=1e-5)
        full = np.asarray(none.load(name))
        ref = np.stack([full[i, :lengths[i]].max(0) for i in range(none.n)])  # max over real tokens only
        np.testing.assert_array_equal(got[name][:, d:].numpy(), ref)


def test_pool_many_on_feature_maps():
    x = torch.randn(3, 4, 6, 6)
    out = pool_many(x, ["mean", "max", "mean2x2"])
    assert out.shape == (3, 4 + 4 + 16)
    torch.testing.assert_close(out[:, :4], x.mean(dim=(2, 3)))
    torch.testing.assert_close(out[:, 4:8], x.amax(dim=(2, 3)))
    torch.testing.assert_close(out[:, 8:].reshape(3, 4, 2, 2)[:, :, 1, 0], x[:, :, 3:, :3].mean(dim=(2, 3)))


def test_select_with_two_poolings_deploys_and_records_its_choice(runs):
    res = transfer(runs["none"], TransferConfig(head="select", pooling="mean,max", overwrite=True, **FAST))
    rec = res.record
    # the deployable model pools its taps both ways, and matches the head on the store's features
    assert rec["pooling"] == "mean+max" and rec["reload_check"]["store_max_abs_difference"] < 1e-3
    assert sum(rec["kept_per_pooling"].values()) == rec["features_kept"]
    assert rec["chosen_on_validation"] and len(rec["tried"]) == 6 * 3
    best = max(t["val_accuracy"] for t in rec["tried"])
    chosen = [t for t in rec["tried"] if t["keep"] == rec["keep"] and t["group_lasso"] == rec["group_lasso"]]
    assert chosen[0]["val_accuracy"] == best  # chosen on validation, never on test rows
    one = transfer(runs["none"], TransferConfig(head="select", pooling="mean", keep=0.5, group_lasso=0.01,
                                                overwrite=True, **FAST)).record
    assert not one["chosen_on_validation"] and one["keep"] == 0.5 and one["pooling"] == "mean"


def test_a_pooled_store_offers_its_own_pooling_only(runs):
    with pytest.raises(UsageError, match="one pooling only") as e:
        transfer(runs["mean"], TransferConfig(head="select", pooling="mean,max", overwrite=True, **FAST))
    assert "--pooling none" in e.value.cli_text()
    transfer(runs["mean"], TransferConfig(head="last", pooling="mean", overwrite=True, **FAST))  # its own: fine
    with pytest.raises(UsageError, match="pooling"):
        TransferConfig(head="select", pooling="mean,median")
    with pytest.raises(UsageError, match="side reads token-level"):
        TransferConfig(head="side", pooling="mean")
    with pytest.raises(UsageError, match="does not apply"):
        transfer(runs["none"], TransferConfig(head="last", pooling="mean2x2", overwrite=True, **FAST))


def _side_inputs_agree(run, model=None, data=None):
    from lamina.transfer._side_train import StoreTokens, TokenFeatures
    from lamina.transfer.deploy import build_deployable
    store = FeatureStore.open(run)
    lm, ds = reload_model_and_data(store, model, data)
    names = [n for n in store.layers if n == "embed" or n.startswith("blocks.")]
    dep, _ = build_deployable(lm, torch.nn.Identity(), names, "none")
    rows = np.array([5, 0, 11, 3, 2])  # unsorted on purpose
    cfg = store.manifest["config"]
    a, ma = TokenFeatures(dep, ds, cfg.get("max_length", 128), cfg.get("image_size"), 4, rows, 0)(rows)
    b, mb = StoreTokens(store, names)(rows)
    assert (ma is None) == (mb is None)
    if ma is not None:
        assert torch.equal(ma, mb)
    assert len(a) == len(b) == len(names)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_side_reads_a_none_store_as_the_backbone_would_give_it(runs, tmp_path):
    _side_inputs_agree(runs["none"])
    images = lt.tiny_image_dataset(24, size=16)
    cnn = wrap_module(lt.tiny_cnn(), name="tiny-cnn", source="lamina.testing:tiny_cnn", modality="image",
                      image_size=16)
    capture(cnn, images, CaptureConfig(out=str(tmp_path / "cnn"), pooling="none", progress=False))
    _side_inputs_agree(tmp_path / "cnn", cnn, images)
    res = transfer(runs["none"], TransferConfig(head="side", overwrite=True, **FAST))
    assert res.record["token_source"] == "store" and res.record["reload_check"]["max_abs_difference"] == 0.0
    assert res.record["reload_check"]["store_max_abs_difference"] < 1e-3


def test_device_cpu_and_a_missing_device(runs):
    res = transfer(runs["mean"], TransferConfig(head="mix", device="cpu", overwrite=True, **FAST))
    assert res.record["config"]["device"] == "cpu"
    with pytest.raises(UsageError, match="device"):
        TransferConfig(head="mix", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            transfer(runs["mean"], TransferConfig(head="mix", device="cuda", overwrite=True, **FAST))
