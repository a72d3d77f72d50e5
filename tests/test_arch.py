"""Architectures of issue 11, in the default run: ALBERT's shared layer as k blocks, ResNet end to end through the
CLI, and the reload check that stops a stage from exiting 0 with a model that does not reload."""

import json

import numpy as np
import pytest
import torch
import transformers as T

import lamina
from lamina import CaptureConfig, FeatureStore, capture
from lamina import testing as lt
from lamina.analyze.importance import block_importance, naive_skip_importance
from lamina.blocks import bypass, find_blocks
from lamina.cli import main
from lamina.compress.depth import drop_blocks_
from lamina.models import load_model


@pytest.fixture(scope="module")
def albert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("albert") / "albert"
    torch.manual_seed(0)
    T.AlbertModel(T.AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                 num_attention_heads=2, intermediate_size=32)).eval().save_pretrained(path)
    lt.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("blocks", [None, "encoder.albert_layer_groups.0.albert_layers"])
def test_albert_shared_layer_is_one_block_per_call_in_capture(albert_dir, tmp_path, blocks):
    """Found without --blocks too; each of the 3 calls is its own layer, equal to the model's hidden states."""
    ds = lt.tiny_text_dataset(8)
    res = capture(str(albert_dir), ds, CaptureConfig(out=str(tmp_path / "run"), pooling="none", max_length=16,
                                                     blocks=blocks, progress=False))
    store = FeatureStore.open(res.store)
    lm = load_model(str(albert_dir), blocks=blocks)
    assert lm.blocks.n_blocks == 3 and lm.blocks.shared
    batch = lm.batch(ds, np.arange(8), 16)
    with torch.no_grad():
        hs = lm.module(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    for i, name in enumerate(["embed", "blocks.0", "blocks.1", "blocks.2"]):
        got = store.load(name)
        for r in range(8):
            np.testing.assert_allclose(got[r][: hs[i].shape[1]][mask[r].numpy()], hs[i][r][mask[r]].numpy(),
                                       atol=1e-5)
    assert not np.allclose(store.load("blocks.0"), store.load("blocks.2"))  # not the last call three times


def test_albert_importance_per_call_matches_naive_and_prune_matches_bypass(albert_dir, tmp_path):
    lm = load_model(str(albert_dir))
    ds = lt.tiny_text_dataset(10)
    batches = [lm.batch(ds, np.arange(0, 5), 16), lm.batch(ds, np.arange(5, 10), 16)]
    fast = block_importance(lm, batches, progress=False)
    naive = naive_skip_importance(lm, batches, progress=False)
    assert [b.skippable for b in fast.blocks] == [True, True, True]
    for b in fast.blocks:
        assert b.skip_importance == pytest.approx(naive[b.name], rel=1e-6)
    # skipping any one call of the one shared layer is the model with one call fewer (f^3 -> f^2), so every
    # call scores the same, and prune lowers the count
    assert max(b.skip_importance for b in fast.blocks) == pytest.approx(min(b.skip_importance for b in fast.blocks))
    x = batches[0]
    for j in range(3):
        with torch.no_grad(), bypass(lm.module, [j], lm.blocks):
            want = lm.module(**x).last_hidden_state
        small = load_model(str(albert_dir))
        drop_blocks_(small.module, [j])
        assert small.module.config.num_hidden_layers == 2
        small.module.save_pretrained(tmp_path / f"a{j}")
        back = T.AlbertModel.from_pretrained(tmp_path / f"a{j}").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(**x).last_hidden_state, want, atol=1e-5, rtol=1e-4)


def test_albert_with_several_layer_groups_refuses_depth_pruning():
    m = T.AlbertModel(T.AlbertConfig(vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=4,
                                     num_hidden_groups=2, num_attention_heads=2, intermediate_size=32))
    assert find_blocks(m).n_blocks == 4
    with pytest.raises(lamina.UsageError, match="shared layer group"):
        drop_blocks_(m, [3])


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A tiny 3-stage ResNet folder (no image_size in its config) captured and analyzed through the CLI."""
    from lamina.analyze import AnalyzeConfig, analyze
    root = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16], depths=[2, 2, 1],
                                 layer_type="basic")).eval().save_pretrained(root / "resnet")
    ds = lt.tiny_image_dataset(40, size=32)
    np.savez(root / "imgs.npz", x=ds.inputs, y=ds.labels)
    assert main(["capture", "--model", str(root / "resnet"), "--data", str(root / "imgs.npz"), "--out", str(root / "run"),
                 "--image-size", "32"]) == 0
    analyze(root / "run", AnalyzeConfig(progress=False, control=False))
    return root


def test_resnet_prune_end_to_end_lowers_depths_and_reloads(resnet_run, tmp_path, capsys):
    scores = json.loads((resnet_run / "run" / "scores.json").read_text())
    imp = scores["importance"]
    skippable = dict(zip(imp["blocks"], imp["skippable"]))
    # blocks.0..4 over stages [2, 2, 1]: 1 and 3 keep their shape; stage 2's only block cannot go
    assert skippable["blocks.1"] and skippable["blocks.3"] and not skippable["blocks.4"]
    out = tmp_path / "small"
    rc = main(["prune", str(resnet_run / "resnet"), "--scores", str(resnet_run / "run" / "scores.json"),
               "--drop-blocks", "0.2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["reload_check"]["ok"] and plan["reload_check"]["reloaded_with"] == "ResNetModel.from_pretrained"
    back = T.ResNetModel.from_pretrained(out / "model")
    assert sum(back.config.depths) == 4 and back.config.layer_types == ["basic", "bottleneck"]
    gone = int(plan["depth"]["remove"][0].split(".")[1])
    orig = load_model(str(resnet_run / "resnet"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), bypass(orig.module, [gone], orig.blocks):
        want = orig.module(pixel_values=x).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(pixel_values=x).last_hidden_state, want)


def test_failed_prune_leaves_no_plan_and_no_model(resnet_run, tmp_path, monkeypatch, capsys):
    """A stage failure after the refusal checks (here: apply) writes neither plan.json nor OUT/model."""
    import sys
    prune_mod = sys.modules["lamina.compress.prune"]

    def broken(*a, **k):
        raise lamina.LaminaError("injected failure while pruning", value=None, allowed=None, fix="none")
    monkeypatch.setattr(prune_mod, "apply", broken)
    out = tmp_path / "small"
    rc = main(["prune", str(resnet_run / "resnet"), "--scores", str(resnet_run / "run" / "scores.json"),
               "--drop-blocks", "0.2", "--out", str(out)])
    assert rc == 1 and "injected failure" in capsys.readouterr().err
    assert not (out / "plan.json").exists() and not (out / "model").exists()


def test_reload_check_fails_on_wrong_saved_weights(resnet_run, tmp_path, monkeypatch, capsys):
    """The saved weights are tampered with after saving: prune exits 1, says what failed, keeps no model."""
    from safetensors.torch import load_file, save_file

    import lamina.savefmt
    real = lamina.savefmt.save

    def save_then_damage(lm, dest, source=None, **kw):
        fmt = real(lm, dest, source, **kw)
        f = next(p for p in dest.iterdir() if p.suffix == ".safetensors")
        tensors = load_file(f)
        key = next(k for k in tensors if k.endswith("convolution.weight"))
        tensors[key] = tensors[key] + 0.5
        save_file(tensors, f, metadata={"format": "pt"})
        return fmt
    monkeypatch.setattr(lamina.savefmt, "save", save_then_damage)
    out = tmp_path / "small"
    rc = main(["prune", str(resnet_run / "resnet"), "--scores", str(resnet_run / "run" / "scores.json"),
               "--drop-blocks", "0.2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "ResNetModel.from_pretrained does not reproduce the saved one" in err
    assert not (out / "model").exists() and not (out / "plan.json").exists()


def test_reload_check_fails_when_from_pretrained_reinitializes_a_tensor(tmp_path):
    """A config that describes another architecture: the missing tensor is named, not silently random."""
    from lamina.verify import check_saved
    lt.save_tiny_text_model(tmp_path / "bert", "bert")
    small = load_model(str(tmp_path / "bert"))
    del small.module.encoder.layer[1]  # the config still says 2 layers
    small.module.save_pretrained(tmp_path / "out")
    batch = small.batch(lt.tiny_text_dataset(4), np.arange(4), 16)
    with pytest.raises(lamina.LaminaError, match="missing_keys: .*encoder.layer.1"):
        check_saved(small, tmp_path / "out", batch, "huggingface")


def test_t5_encoder_block_0_is_not_skippable_and_not_removable():
    m = T.T5EncoderModel(T.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2, vocab_size=64)).eval()
    lm = lamina.models.wrap_module(m)
    x = {"input_ids": torch.randint(4, 60, (2, 6))}
    scores = block_importance(lm, [x], progress=False)
    assert [b.skippable for b in scores.blocks] == [False, True, True]
    assert "relative_attention_bias" in scores.blocks[0].note
    with pytest.raises(lamina.UsageError, match="relative_attention_bias"):
        drop_blocks_(m, [0])


def test_save_checked_without_data_uses_a_stand_in_batch_or_the_weights(tmp_path):
    from lamina.verify import save_checked
    text = load_model(str(lt.save_tiny_text_model(tmp_path / "bert", "bert")))
    fmt, rec = save_checked(text, tmp_path / "t", text, None)
    assert fmt == "huggingface" and rec["ok"] and rec["batch"].startswith("synthetic")
    cnn = load_model("lamina.testing:tiny_cnn")  # plain arrays: lamina cannot know the input shape
    fmt, rec = save_checked(cnn, tmp_path / "c", cnn, None)
    assert fmt == "lamina" and rec["ok"] and rec["compared"].startswith("weights")


def test_albert_distill_refuses_feature_losses_and_runs_logits_only(albert_dir, sentences_csv, tmp_path, capsys):
    """Feature taps are per module; ALBERT's blocks share one, so feature losses are refused (exit 2), and
    logit distillation runs and passes the reload check."""
    from lamina.finetune import FinetuneConfig, finetune
    teacher = tmp_path / "teacher"
    finetune(str(albert_dir), str(sentences_csv), FinetuneConfig(out=str(teacher), full=True, epochs=1, lr=3e-3,
                                                                 batch_size=32, patience=None, progress=False))
    rc = main(["distill", "--teacher", str(teacher), "--student", str(teacher), "--epochs", "1", "--out",
               str(tmp_path / "d1")])
    assert rc == 2 and "ALBERT" in capsys.readouterr().err and not (tmp_path / "d1" / "model").exists()
    rc = main(["distill", "--teacher", str(teacher), "--student", str(teacher), "--epochs", "1", "--cosine", "0",
               "--fsp", "0", "--out", str(tmp_path / "d2")])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "d2" / "distill.json").read_text())
    assert rec["reload_check"]["ok"] and rec["reload_check"]["reloaded_with"].endswith(".from_pretrained")


@pytest.mark.parametrize("cls,cfg,glob", [
    (T.ResNetModel, T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic"),
     "encoder.stages.*.layers"),
    (T.ConvNextModel, T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 2]), "encoder.stages.*.layers"),
    (T.SwinModel, T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 2], num_heads=[2, 2],
                               window_size=4), "encoder.layers.*.blocks")])
def test_blocks_inside_stages_are_found_and_each_stage_keeps_one(cls, cfg, glob):
    m = cls(cfg).eval()
    bm = find_blocks(m)
    assert bm.container == glob and bm.n_blocks == 3 and not bm.shared
    assert find_blocks(m, glob).block_paths == bm.block_paths  # the user's spelling of the same blocks
    assert bm.block_paths[0].startswith(glob.split("*")[0] + "0.") and bm.block_paths[1].startswith(
        glob.split("*")[0] + "1.")
    with pytest.raises(lamina.UsageError, match="empty stage 0"):
        drop_blocks_(m, [0])
    drop_blocks_(m, [2])
    assert list(m.config.depths) == [1, 1] and find_blocks(m).n_blocks == 2
