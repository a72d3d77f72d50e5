"""lamina transfer: heads on a frozen backbone and the truncated model that serves them.

Invariants, not stored numbers: a one-hot mix is the probe of that layer; select
keeping every feature is the probe of the concatenation; side never changes or
differentiates the backbone; the truncated model's features equal the full
model's; every head reloads to the same outputs; bad input is refused clearly.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import lamina
from lamina import CaptureConfig, capture
from lamina import testing as lt
from lamina.analyze.metrics.split import stratified_split
from lamina.data import Dataset
from lamina.errors import UsageError
from lamina.models import load_model, wrap_module
from lamina.store import FeatureStore
from lamina.task import evaluate
from lamina.transfer import HEADS, TransferConfig, transfer
from lamina.transfer._rows import reload_model_and_data
from lamina.transfer._store_heads import fit_mix, fit_select, linear
from lamina.transfer.transfer import _train_side

FAST = dict(epochs=3, batch_size=32, progress=False)


def _pooled(run):
    store = FeatureStore.open(run)
    X = {n: torch.from_numpy(np.array(store.load(n), dtype=np.float32)) for n in store.layers}
    return store, X, stratified_split(store.labels, (0.6, 0.2, 0.2), 0)


def _logits(head, X, names):
    head.eval()
    with torch.no_grad():
        return head([X[n] for n in names])


def test_mix_with_one_hot_weights_is_the_probe_of_that_layer(bert_run):
    store, X, split = _pooled(bert_run)
    cfg = TransferConfig(head="mix", **FAST)
    loop = cfg.loop()
    for k, name in enumerate(store.layers):
        onehot = [1.0 if i == k else 0.0 for i in range(len(store.layers))]
        mix, _, info = fit_mix(X, store.layers, store.labels, split, loop, 2, cfg, fixed=onehot)
        probe, _ = linear(X, [name], store.labels, split, loop, 2)
        assert info["mix_weights"][name] == 1.0
        assert torch.equal(_logits(mix, X, store.layers), _logits(probe, X, [name]))
    # and the learned mix starts from equal weights and moves
    learned, _, info = fit_mix(X, store.layers, store.labels, split, loop, 2, cfg)
    w = np.array(list(info["mix_weights"].values()))
    assert abs(w.sum() - 1) < 1e-6 and np.ptp(w) > 0


def test_select_keeping_every_feature_is_the_probe_of_the_concatenation(bert_run):
    store, X, split = _pooled(bert_run)
    cfg = TransferConfig(head="select", keep=1.0, **FAST)
    head, reads, info = fit_select(X, store.layers, store.labels, split, cfg.loop(), 2, cfg)
    probe, _ = linear(X, store.layers, store.labels, split, cfg.loop(), 2)
    assert reads == store.layers and info["features_kept"] == info["features_total"] == sum(
        x.shape[1] for x in X.values())
    assert torch.equal(_logits(head, X, reads), _logits(probe, X, store.layers))
    # a real selection: the kept count, and where the kept features come from, add up
    few = TransferConfig(head="select", keep=0.05, **FAST)
    head, reads, info = fit_select(X, store.layers, store.labels, split, few.loop(), 2, few)
    assert info["features_kept"] == int(np.ceil(0.05 * info["features_total"]))
    assert sum(info["kept_per_layer"].values()) == info["features_kept"] == head.linear.in_features
    assert reads == [n for n in store.layers if info["kept_per_layer"][n]]
    # a layer with nothing kept is not read: the slim head equals the same head on the full concatenation
    Z = dict(X, **{"zeros": torch.zeros_like(X["blocks.0"])})
    names = ["embed", "zeros", "blocks.0", "blocks.1"]
    head, reads, info = fit_select(Z, names, store.labels, split, few.loop(), 2, few)
    assert "zeros" not in reads and info["kept_per_layer"]["zeros"] == 0
    from lamina.transfer.heads import ConcatLinear
    ref = ConcatLinear([Z[n].shape[1] for n in names], 2, info["kept_features"])
    state = head.state_dict()
    state["keep"] = ref.keep
    ref.load_state_dict(state)
    assert torch.equal(_logits(head, Z, reads), _logits(ref, Z, names))


def test_side_never_changes_or_differentiates_the_backbone(bert_run, sentences_csv, tiny_dirs):
    store = FeatureStore.open(bert_run)
    lm = load_model(str(tiny_dirs["bert"]))
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    ds = reload_model_and_data(store)[1]
    split = stratified_split(store.labels, (0.6, 0.2, 0.2), 0)
    cfg = TransferConfig(head="side", **FAST)
    names = ["embed", "blocks.0", "blocks.1"]
    net, dep, info, extra, feats, _ = _train_side(lm, ds, names, split, store.labels, 2,
                                                  store.manifest["config"], cfg, cfg.loop())
    assert len(net.down) == len(net.blocks) + 1 == len(names)  # it reads every layer
    backbone = dep.module.backbone
    assert all(p.requires_grad for p in backbone.parameters())  # frozen by detaching, not by a flag
    assert all(p.grad is None for p in backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())  # the side net learned
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in lm.module.state_dict().items():  # the caller's model too
        assert torch.equal(v, before[k]), k


def _mean_pool(h, mask):
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def test_truncated_model_features_equal_the_full_models(bert_run, tiny_dirs, sentences_csv):
    from lamina.transfer.deploy import build_deployable
    lm = load_model(str(tiny_dirs["bert"]))
    ds = lamina.load_data(str(sentences_csv))
    batch = lm.batch(ds, np.arange(12), 128)
    with torch.no_grad():
        hs = lm.module(**batch, output_hidden_states=True).hidden_states
    for name, k in (("embed", 0), ("blocks.0", 1)):
        dep, info = build_deployable(lm, torch.nn.Identity(), [name], "mean")
        bb = dep.module.backbone
        assert len(bb.encoder.layer) == 1 and bb.config.num_hidden_layers == 1  # block 1 really removed
        with torch.no_grad():
            got = dep.module.features(**batch)[0]
        torch.testing.assert_close(got, _mean_pool(hs[k], batch["attention_mask"]), rtol=1e-5, atol=1e-5)
    # a CNN cut after its second block: equal to running the full model's first two blocks by hand
    cnn = wrap_module(lt.tiny_cnn(), name="tiny-cnn", source="lamina.testing:tiny_cnn", modality="image",
                      image_size=16)
    dep, info = build_deployable(cnn, torch.nn.Identity(), ["blocks.1"], "mean")
    assert len(dep.module.backbone.blocks) == 2 and info["removed"] == [2, 3]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = cnn.module.blocks[1](cnn.module.blocks[0](cnn.module.stem(x))).mean(dim=(2, 3))
        torch.testing.assert_close(dep.module.features(x)[0], ref)


@pytest.mark.parametrize("head", HEADS)
def test_every_head_round_trips_through_save_and_load(bert_run, head, sentences_csv):
    res = transfer(bert_run, TransferConfig(head=head, overwrite=True, keep=0.1, **FAST))
    assert res.record["reload_check"]["max_abs_difference"] == 0.0
    loaded = load_model(res.model_path)  # what `lamina bench` and lamina.load do
    assert type(loaded.module).__name__ == "TransferModel" and isinstance(lamina.load(res.model_path),
                                                                          torch.nn.Module)
    store = FeatureStore.open(bert_run)
    split = stratified_split(store.labels, (0.6, 0.2, 0.2), 0)
    from lamina.task import TaskSpec
    spec = TaskSpec(data=str(sentences_csv))
    ds = lamina.load_data(str(sentences_csv))
    assert evaluate(loaded, ds, split["test"], spec)["accuracy"] == pytest.approx(res.test_accuracy, abs=1e-9)
    kept = len(loaded.module.backbone.encoder.layer)
    assert kept == max(res.deepest_block, 0) + 1
    from transformers import AutoModel  # the backbone is a standard Hugging Face folder
    assert AutoModel.from_pretrained(f"{res.model_path}/backbone").config.num_hidden_layers == kept
    rec = json.loads((bert_run / "transfer.json").read_text())["heads"][head]
    assert rec["test"]["ci_low"] <= rec["test"]["accuracy"] <= rec["test"]["ci_high"]
    assert rec["trainable_parameters"] == res.trainable_parameters > 0 and rec["peak_memory_method"]
    # CPU time of the training span only: positive, and no more than every core busy for its wall time (a clock
    # read from the start of the process, which has run the capture and earlier tests, would exceed it)
    assert 0 < rec["cpu_seconds"] <= rec["seconds"] * (os.cpu_count() or 1) + 0.01


def test_side_on_a_cnn_a_decoder_and_a_vit(tmp_path, tiny_dirs, tiny_vit_dir, sentences_csv):
    images = lt.tiny_image_dataset(48, size=16)
    cnn = wrap_module(lt.tiny_cnn(), name="tiny-cnn", source="lamina.testing:tiny_cnn", modality="image",
                      image_size=16)
    for name, model, data in (("cnn", cnn, images), ("vit", str(tiny_vit_dir), images),
                              ("gpt2", str(tiny_dirs["gpt2"]), str(sentences_csv))):
        run = tmp_path / name
        capture(model, data, CaptureConfig(out=str(run), progress=False, limit=60 if name == "gpt2" else None))
        res = transfer(run, TransferConfig(head="side", **FAST), model=model, data=data)
        assert res.record["reload_check"]["max_abs_difference"] == 0.0
        assert res.record["side_kind"] == ("conv_side" if name == "cnn" else "token_side")
        assert len(res.record["token_shapes"]) == len(res.layers) == res.n_blocks + 1  # embed and every block


def test_a_cnn_cut_after_a_block_drops_its_tail(tmp_path):
    """Modules that only run after the block stack (the tiny CNN's fc; EfficientNet's conv_head, bn1, _fc)
    are neither carried nor saved when every tap is a block; scores and reload are unchanged."""
    from lamina.tail import CutOff
    from lamina.transfer.deploy import build_deployable
    images = lt.tiny_image_dataset(48, size=16)
    cnn = wrap_module(lt.tiny_cnn(), name="tiny-cnn", source="lamina.testing:tiny_cnn", modality="image",
                      image_size=16)
    full = cnn.module
    fc = sum(p.numel() for p in full.fc.parameters())
    dep, info = build_deployable(cnn, torch.nn.Identity(), ["blocks.1"], "mean")
    bb = dep.module.backbone
    assert info["cut"] == ["fc"] and isinstance(bb.fc, CutOff) and isinstance(full.fc, torch.nn.Linear)
    assert not any(k.startswith("fc.") for k in bb.state_dict())
    kept = sum(p.numel() for p in full.stem.parameters()) + sum(p.numel() for p in full.blocks[:2].parameters())
    assert sum(p.numel() for p in bb.parameters()) == kept
    with pytest.raises(lamina.errors.LaminaError, match="cut off"):  # it never runs silently
        bb(torch.randn(2, 3, 16, 16))
    run = tmp_path / "cnn"
    capture(cnn, images, CaptureConfig(out=str(run), progress=False))
    res = transfer(run, TransferConfig(head="best", **FAST), model=cnn, data=images)
    rec = res.record
    head = sum(p.numel() for p in load_model(res.model_path).module.head.parameters())
    assert rec["reload_check"]["max_abs_difference"] == 0.0  # store features: checked inside transfer too
    assert rec["reload_check"]["store_max_abs_difference"] <= 1e-5
    assert rec["deployed_parameters"] == rec["backbone_parameters"] - fc - sum(
        p.numel() for b in rec["blocks_removed"] for p in full.blocks[b].parameters()) + head
    back = load_model(res.model_path)  # what lamina.load and `lamina bench` do
    assert isinstance(back.module.backbone.fc, CutOff)
    spec = json.loads((Path(res.model_path) / "backbone" / "lamina.json").read_text())
    assert spec["cut"] == ["fc"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(lamina.load(res.model_path)(x), back.module(x), rtol=0, atol=0)


def test_a_bert_cut_after_a_block_drops_its_pooler(bert_run, tiny_dirs, sentences_csv, tmp_path):
    """BERT's pooler runs only after the stack: a head reading blocks is deployed without it (not carried,
    not saved), through lamina.load and through from_pretrained of the standard class."""
    from transformers import BertModel

    from lamina.tail import CutOff
    from lamina.transfer.deploy import build_deployable
    lm = load_model(str(tiny_dirs["bert"]))
    full = lm.module
    pooler = sum(p.numel() for p in full.pooler.parameters())
    assert pooler > 0
    dep, info = build_deployable(lm, torch.nn.Identity(), ["blocks.0"], "mean")
    bb = dep.module.backbone
    assert info["cut"] == ["pooler"] and isinstance(bb.pooler, CutOff) and not any(
        k.startswith("pooler.") for k in bb.state_dict())
    gone = pooler + sum(p.numel() for b in info["removed"] for p in full.encoder.layer[b].parameters())
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for p in full.parameters()) - gone
    res = transfer(bert_run, TransferConfig(head="best", layers="blocks.0", overwrite=True, **FAST))
    assert res.record["reload_check"]["max_abs_difference"] == 0.0
    back = load_model(res.model_path)  # what lamina.load and `lamina bench` do
    assert isinstance(back.module.backbone.pooler, CutOff)
    assert res.record["deployed_parameters"] == sum(p.numel() for p in back.module.parameters())
    folder = Path(res.model_path) / "backbone"
    assert json.loads((folder / "lamina.json").read_text())["cut"] == ["pooler"]
    ds = lamina.load_data(str(sentences_csv))
    batch = lm.batch(ds, np.arange(8), 128)
    std = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()  # no random pooler either
    assert std.config.num_hidden_layers == 1
    with torch.no_grad():
        hs = full(**batch, output_hidden_states=True).hidden_states
        torch.testing.assert_close(std(**batch).last_hidden_state, hs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.module.features(**batch)[0], _mean_pool(hs[1], batch["attention_mask"]),
                                   rtol=1e-5, atol=1e-5)


def test_efficientnet_deployable_cuts_what_never_runs():
    """The bundled EfficientNet-Lite0: read up to block 3, its head conv, bn1 and classifier go; read at
    head_conv, only the classifier goes. Features equal the full model's either way."""
    from lamina.tail import CutOff
    from lamina.transfer.deploy import build_deployable
    lm = load_model("efficientnet-lite0")
    full = lm.module
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    h = full._blocks[3].register_forward_hook(lambda _m, _a, o: seen.setdefault("b3", o))
    with torch.no_grad():
        ref_head = full.extract_features(x).mean(dim=(2, 3))
    h.remove()
    for tap, cut, ref in (("blocks.3", ["_conv_head", "_bn1", "_fc"], seen["b3"].mean(dim=(2, 3))),
                          ("head_conv", ["_fc"], ref_head)):
        dep, info = build_deployable(lm, torch.nn.Identity(), [tap], "mean")
        bb = dep.module.backbone
        assert info["cut"] == cut and all(isinstance(getattr(bb, c), CutOff) for c in cut)
        gone = sum(p.numel() for c in cut for p in getattr(full, c).parameters())
        gone += sum(p.numel() for b in info["removed"] for p in full._blocks[b].parameters())
        assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for p in full.parameters()) - gone
        with torch.no_grad():
            torch.testing.assert_close(dep.module.features(x)[0], ref, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_clearly(bert_run, tiny_dirs, tmp_path):
    other = lt.save_tiny_text_model(tmp_path / "other", seed=1)
    with pytest.raises(UsageError, match="not the one the store was captured from"):
        transfer(bert_run, TransferConfig(head="last", overwrite=True, **FAST), model=str(other))
    with pytest.raises(UsageError, match="keep"):
        TransferConfig(head="select", keep=0)
    with pytest.raises(UsageError, match="unknown head"):
        TransferConfig(head="mixx")
    # a layer that was not captured
    few = tmp_path / "few"
    capture(str(tiny_dirs["bert"]), lt.tiny_text_dataset(40), CaptureConfig(out=str(few), layers="blocks.1",
                                                                             progress=False))
    with pytest.raises(UsageError, match="not captured") as e:
        transfer(few, TransferConfig(head="best", layers="blocks.0", **FAST), data=lt.tiny_text_dataset(40))
    assert "blocks.1" in e.value.cli_text()
    # side on a model whose blocks return one vector per sample: no tokens, no patches
    x = np.random.default_rng(0).normal(size=(60, 6)).astype(np.float32)
    y = np.arange(60) % 2
    x[:, 0] += 2 * y
    ds = Dataset("vectors", "array", x, y, ["a", "b"], np.arange(60).astype(str), source="testing")
    run = tmp_path / "mlp"
    capture("test_transfer:vector_stack", ds, CaptureConfig(out=str(run), progress=False))
    with pytest.raises(UsageError, match="token- or patch-level") as e:
        transfer(run, TransferConfig(head="side", **FAST), data=ds)
    assert "(B, T, D)" in e.value.cli_text()
    res = transfer(run, TransferConfig(head="mix", **FAST), data=ds)  # pooled heads are fine there
    assert res.record["reload_check"]["max_abs_difference"] == 0.0
    # a model lamina could not save is refused before any training
    plain = tmp_path / "plain"
    capture(vector_stack(), ds, CaptureConfig(out=str(plain), progress=False))
    with pytest.raises(UsageError, match="cannot save it"):
        transfer(plain, TransferConfig(head="mix", **FAST), model=vector_stack(), data=ds)
    assert not (plain / "transfer").exists()


def vector_stack():
    """Blocks that return one vector per sample (``module:factory`` of the bad-input test)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(3)]).eval()


def test_task_rows_are_the_finetune_split_and_its_test_rows_are_analyzes(tmp_path, tiny_teacher, tiny_dirs,
                                                                           sentences_csv):
    from lamina.task import read_task
    from lamina.transfer._rows import split_rows
    spec = read_task(tiny_teacher)
    run = tmp_path / "run"
    capture(str(tiny_dirs["bert"]), str(sentences_csv), CaptureConfig(out=str(run), limit=spec.limit,
                                                                       seed=spec.seed, progress=False))
    store = FeatureStore.open(run)
    rows, info = split_rows(store, str(tiny_teacher), (0.6, 0.2, 0.2), 0)
    ds, split = spec.load()
    for part in ("train", "val", "test"):  # the very rows finetune used, by sample id
        assert list(store.ids[rows[part]]) == list(ds.ids[split[part]])
    assert info["source"] == "task"
    # same rows and the same test fraction: analyze's split holds out the same test rows
    ana = stratified_split(store.labels, (0.7, 0.1, 0.2), 0)
    assert np.array_equal(np.sort(rows["test"]), ana["test"])
    ana = stratified_split(store.labels, (0.6, 0.2, 0.2), 0)
    assert np.array_equal(np.sort(rows["test"]), ana["test"])
    res = transfer(run, TransferConfig(head="best", task=str(tiny_teacher), **FAST))
    assert res.record["test"]["n"] == len(split["test"])


def test_cli_transfer(bert_run, tiny_dirs, sentences_csv, tmp_path, capsys):
    from lamina.cli import main
    run = tmp_path / "run"
    assert main(["capture", "--model", str(tiny_dirs["bert"]), "--data", str(sentences_csv), "--out", str(run),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["transfer", str(run), "--head", "mix", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and f"{run}/transfer/mix" in out
    assert main(["transfer", str(run), "--head", "select", "--keep", "0"]) == 2
    err = capsys.readouterr().err
    assert "--keep" in err and "Traceback" not in err
    assert main(["transfer", str(run), "--head", "mix"]) == 2  # already there, no --overwrite


def test_report_draws_the_heads(bert_run):
    from lamina.analyze import AnalyzeConfig, analyze
    from lamina.report import ReportConfig, report
    for head in ("mix", "select"):
        transfer(bert_run, TransferConfig(head=head, overwrite=True, keep=0.1, **FAST))
    if not (bert_run / "scores.json").exists():
        analyze(bert_run, AnalyzeConfig(importance=False, control=False, progress=False))
    res = report(bert_run, ReportConfig(overwrite=True) if "overwrite" in ReportConfig.__dataclass_fields__
                 else ReportConfig())
    html = open(res.path).read()
    assert 'id="transfer"' in html and "Frozen-backbone heads" in html
    assert "mix" in html and "select" in html and "95% interval" in html


def test_overwrite_keeps_a_users_file(bert_run):
    transfer(bert_run, TransferConfig(head="last", overwrite=True, **FAST))
    mine = bert_run / "transfer" / "last" / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(UsageError, match="lamina did not write"):
        transfer(bert_run, TransferConfig(head="last", overwrite=True, **FAST))
    assert mine.read_text() == "mine"
    mine.unlink()
    transfer(bert_run, TransferConfig(head="last", overwrite=True, **FAST))  # lamina's own head is replaced
