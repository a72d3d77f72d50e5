"""`lamina prune` end to end on a tiny bert run: plan.json first, a reloadable pruned model that equals the
original with the removed block bypassed, and refusals (exit 2) that write or overwrite nothing."""

import dataclasses
import json

import pytest
import torch

import lamina
from lamina import UsageError
from lamina import testing as lt
from lamina.blocks import bypass, find_blocks
from lamina.cli import main
from lamina.compress import PruneConfig, prune
from conftest import make_text_run


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_dirs):
    run, _ = make_text_run(tmp_path_factory.mktemp("prune"), tiny_dirs["bert"], 60, seed=4, control=False,
                           importance_samples=16)
    return run


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 60, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _bypassed_output(module, remove: list[int], x: dict) -> torch.Tensor:
    """Output of ``module`` with blocks ``remove`` passing their input through unchanged."""
    with bypass(module, remove):
        return module(**x).last_hidden_state


def _listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_cli_prune_writes_plan_and_a_reloadable_model_equal_to_the_bypassed_original(bert_run, tiny_dirs,
                                                                                     tmp_path, capsys):
    out = tmp_path / "small"
    rc = main(["prune", str(tiny_dirs["bert"]), "--scores", str(bert_run / "scores.json"), "--drop-blocks", "0.5",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 kept, 1 removed of 2" in printed and "->" in printed and str(out / "plan.json") in printed

    plan = json.loads((out / "plan.json").read_text())
    assert plan["applied"] is True and plan["depth"]["n_removed"] == 1
    removed = plan["depth"]["remove"]
    assert len(removed) == 1 and removed[0] in ("blocks.0", "blocks.1")
    scores = json.loads((bert_run / "scores.json").read_text())
    assert plan["model"]["fingerprint"] == scores["model"]["fingerprint"]
    assert plan["result"]["blocks_after"] == 1
    assert plan["result"]["parameters_after"] < plan["result"]["parameters_before"]

    # block discovery needs a stack of two or more blocks, so a one-block model names its stack
    assert plan["result"]["blocks_container"] == "encoder.layer"
    lm = lamina.load_model(str(out / "model"))  # one block left: found through its config
    assert lm.blocks.n_blocks == 1 and lm.module.config.num_hidden_layers == 1
    assert lm.tokenizer is not None
    from transformers import AutoModel
    back = AutoModel.from_pretrained(out / "model").eval()
    assert len(back.encoder.layer) == 1

    orig = lamina.load_model(str(tiny_dirs["bert"])).module
    x = _inputs()
    want = _bypassed_output(orig, [int(removed[0].split(".")[1])], x)
    with torch.no_grad():
        torch.testing.assert_close(lm.module(**x).last_hidden_state, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(**x).last_hidden_state, want, rtol=1e-5, atol=1e-6)


def test_cli_prune_refusals_exit_2_and_leave_out_untouched(bert_run, tiny_dirs, tmp_path, capsys):
    model, scores = str(tiny_dirs["bert"]), str(bert_run / "scores.json")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "marker.txt").write_text("keep me")
    before = _listing(out)

    # OUT exists and is not empty, no --overwrite
    assert main(["prune", model, "--scores", scores, "--drop-blocks", "0.5", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # scores file missing
    assert main(["prune", model, "--scores", str(tmp_path / "nope.json"), "--drop-blocks", "0.5",
                 "--out", str(out), "--overwrite"]) == 2
    assert "no scores file" in capsys.readouterr().err
    # the budget removes every block
    assert main(["prune", model, "--scores", scores, "--drop-blocks", "0.9", "--out", str(out), "--overwrite"]) == 2
    assert "every block" in capsys.readouterr().err
    # nothing to remove
    assert main(["prune", model, "--scores", scores, "--out", str(out), "--overwrite"]) == 2
    assert "removes nothing" in capsys.readouterr().err
    # another model's scores (same architecture, other weights)
    other = lt.save_tiny_text_model(tmp_path / "other-bert", "bert", seed=7)
    assert main(["prune", str(other), "--scores", scores, "--drop-blocks", "0.5", "--out", str(out),
                 "--overwrite"]) == 2
    assert "another model" in capsys.readouterr().err
    # heads of a model whose config cannot express fewer heads
    assert main(["prune", model, "--scores", scores, "--heads", "0.5", "--out", str(out), "--overwrite"]) == 2
    assert "Llama-family" in capsys.readouterr().err
    # a model that cannot be saved with save_pretrained
    assert main(["prune", "lamina.testing:tiny_cnn", "--scores", scores, "--drop-blocks", "0.5", "--out",
                 str(out / "cnn")]) == 2
    capsys.readouterr()

    assert _listing(out) == before and (out / "marker.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    assert main(["prune", str(other), "--scores", scores, "--drop-blocks", "0.5", "--out", str(fresh)]) == 2
    assert not fresh.exists()  # refused before the folder was even made


def test_overwrite_replaces_plan_and_model_only(bert_run, tiny_dirs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "marker.txt").write_text("keep me")
    (out / "model").mkdir()
    (out / "model" / "stale.bin").write_text("old")
    cfg = PruneConfig(out=str(out), drop_blocks=0.5, method="even",
                      overwrite=True)
    with pytest.raises(UsageError, match="lamina did not write") as e:  # model/ holds a file that is not lamina's
        prune(str(tiny_dirs["bert"]), str(bert_run / "scores.json"), cfg)
    assert "model/stale.bin" in str(e.value) and (out / "model" / "stale.bin").read_text() == "old"
    assert not (out / "plan.json").exists()
    (out / "model" / "stale.bin").unlink()
    prune(str(tiny_dirs["bert"]), str(bert_run / "scores.json"), dataclasses.replace(cfg, method="skip_nmse"))
    res = prune(str(tiny_dirs["bert"]), str(bert_run / "scores.json"), cfg)  # lamina's own earlier plan and model are replaced
    assert res.blocks_after == 1 and res.removed == ["blocks.1"]  # even keeps the first block
    assert (out / "marker.txt").read_text() == "keep me" and (out / "model" / "config.json").exists()
    assert json.loads((out / "plan.json").read_text())["depth"]["method"] == "even"


def test_ffn_pruning_uses_the_runs_data_for_calibration(bert_run, tiny_dirs, tmp_path):
    out = tmp_path / "ffn"
    res = prune(str(tiny_dirs["bert"]), str(bert_run / "scores.json"),
                PruneConfig(out=str(out), ffn=0.5, calibration_samples=20))
    assert res.blocks_after == res.blocks_before == 2 and res.parameters_after < res.parameters_before
    plan = json.loads((out / "plan.json").read_text())
    size = lamina.load_model(str(tiny_dirs["bert"])).module.config.intermediate_size
    assert all(len(v) == size // 2 for v in plan["ffn"]["remove"].values())
    lm = lamina.load_model(str(out / "model"))
    assert lm.module.config.intermediate_size == size - size // 2


def test_config_validation():
    with pytest.raises(UsageError):
        PruneConfig(out="o", drop_blocks=1.0)
    with pytest.raises(UsageError):
        PruneConfig(out="o", method="skip")
    with pytest.raises(UsageError):
        PruneConfig(out="o", calibration_samples=0)


def _cnn_scores(cnn) -> dict:
    from lamina.models import model_fingerprint
    n = find_blocks(cnn).n_blocks
    return {"model": {"name": "tiny_cnn", "fingerprint": model_fingerprint(cnn), "parameters": 1},
            "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "paths": list(find_blocks(cnn).block_paths),
                           "skip_nmse": [3.0, 9.0, 1.0, 2.0], "block_influence": [1.0] * n,
                           "skippable": [True, False, True, True]}}


def test_a_python_module_lamina_cannot_rebuild_is_refused_before_writing(tmp_path):
    cnn = lt.tiny_cnn()
    out = tmp_path / "cnn"
    with pytest.raises(UsageError, match="does not know how to rebuild"):
        prune(cnn, _cnn_scores(cnn), PruneConfig(out=str(out), drop_blocks=0.25))
    assert not out.exists()


def test_a_factory_model_is_saved_in_lamina_format_and_reloads(tmp_path):
    """module:factory models have no save_pretrained: OUT/model is lamina's format, rebuilt from the factory."""
    cnn = lt.tiny_cnn()
    out = tmp_path / "cnn"
    res = prune("lamina.testing:tiny_cnn", _cnn_scores(cnn),
                PruneConfig(out=str(out), drop_blocks=0.25))
    assert res.format == "lamina" and res.removed == ["blocks.2"] and (out / "model" / "lamina.json").exists()
    back = lamina.load_model(str(out))  # the OUT folder maps to OUT/model
    assert back.blocks.n_blocks == 3
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), bypass(cnn, [2]):
        want = cnn(x)
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), want, rtol=1e-5, atol=1e-6)


def test_cli_target_params_and_its_refusals(bert_run, tiny_dirs, tmp_path, capsys):
    model, scores = str(tiny_dirs["bert"]), str(bert_run / "scores.json")
    total = json.loads((bert_run / "scores.json").read_text())["model"]["parameters"]
    out = tmp_path / "t"
    assert main(["prune", model, "--scores", scores, "--target-params", str(total - 1), "--out", str(out)]) == 0
    capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["depth"]["n_removed"] == 1 and plan["depth"]["target_parameters"] == total - 1
    assert plan["result"]["parameters_after"] <= total - 1 and plan["result"]["format"] == "huggingface"
    # unreachable (one block must stay), and already met: exit 2, nothing written
    for value, msg in ((100, "cannot be reached"), (total + 5, "already meets")):
        fresh = tmp_path / f"no-{value}"
        assert main(["prune", model, "--scores", scores, "--target-params", str(value), "--out", str(fresh)]) == 2
        assert msg in capsys.readouterr().err and not fresh.exists()
    assert main(["prune", model, "--scores", scores, "--target-params", "0.5", "--drop-blocks", "0.5",
                 "--out", str(tmp_path / "both")]) == 2
    assert "one depth budget" in capsys.readouterr().err


def test_cli_per_layer_ffn_is_saved_in_lamina_format(bert_run, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "pl"
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(bert_run / "scores.json"), "--ffn", "0.5",
                 "--ffn-per-layer", "--calibration-samples", "20", "--out", str(out)]) == 0
    capsys.readouterr()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["result"]["format"] == "lamina" and plan["ffn"]["per_layer"] is True
    sizes = plan["ffn"]["intermediate_size_after"]
    assert sum(sizes.values()) == 2 * 64 - 64  # half of all channels, split between the blocks by importance
    lm = lamina.load_model(str(out))
    assert lm.tokenizer is not None
    assert [b.intermediate.dense.out_features for b in lm.module.encoder.layer] == list(sizes.values())
