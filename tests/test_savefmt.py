"""lamina's save format: what a standard config cannot express (per-layer widths) reloads to identical
outputs; tied tensors stay tied; the write is atomic and refuses to replace a folder that is not its own."""

import json

import pytest
import torch
import torch.nn as nn

import lamina
from lamina import UsageError
from lamina import testing as lt
from lamina.compress.width import _replace, _select
from lamina.models import LoadedModel, load_model
from lamina.savefmt import config_describes, load, load_lamina, save_lamina, save_loaded

_PRE = {"modality": "array", "image_size": None, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "in_channels": 3}


def _ids():
    ids = torch.tensor([[2, 5, 9, 12, 7, 3], [2, 6, 8, 3, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_per_layer_ffn_widths_round_trip_through_the_hf_builder(tmp_path):
    m = lt.tiny_hf_model("bert", layers=2, seed=3)
    assert config_describes(m)
    layer = m.encoder.layer[0]  # layer 0 keeps 40 of 64 FFN channels, layer 1 all 64
    keep = torch.arange(0, 64)[torch.arange(64) % 8 < 5]
    _replace(layer, "intermediate.dense", _select(layer.intermediate.dense, keep, dim_out=True))
    _replace(layer, "output.dense", _select(layer.output.dense, keep, dim_out=False))
    assert not config_describes(m)  # BertConfig has one intermediate_size
    lm = LoadedModel(m, "tiny", "testing", "text", lamina.find_blocks(m), tokenizer=lt.tiny_tokenizer())
    save_loaded(lm, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "lamina.json").read_text())
    assert spec["builder"] == "hf:BertModel" and (tmp_path / "m" / "config.json").exists()
    back = load_model(str(tmp_path / "m"))  # load_model reads lamina.json
    assert back.tokenizer is not None and back.modality == "text" and back.blocks.n_blocks == 2
    assert back.module.encoder.layer[0].intermediate.dense.weight.shape == (40, 32)
    assert back.module.encoder.layer[1].intermediate.dense.weight.shape == (64, 32)
    with torch.no_grad():
        assert torch.equal(back.module(**_ids()).last_hidden_state, m(**_ids()).last_hidden_state)
        batch = back.batch(lt.tiny_text_dataset(4), range(4))
        assert torch.equal(back.forward(batch).last_hidden_state, m(**batch).last_hidden_state)


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(lt.tiny_config("gpt2")).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    save_lamina(m, tmp_path / "g", "hf:GPT2LMHeadModel", _PRE | {"modality": "text"}, tokenizer=lt.tiny_tokenizer())
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        assert len([k for k in f.keys() if k.endswith(("wte.weight", "lm_head.weight"))]) == 1
    back = load(tmp_path / "g")
    assert back.lm_head.weight is back.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(back(**_ids()).logits, m(**_ids()).logits)


def test_writes_are_atomic_and_only_replace_lamina_folders(tmp_path):
    cnn = lt.tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "cnn"
    save_lamina(cnn, path, "factory:lamina.testing:tiny_cnn", _PRE)
    other = lt.tiny_cnn(seed=1)
    save_lamina(other, path, "factory:lamina.testing:tiny_cnn", _PRE)  # an earlier lamina folder is replaced
    with torch.no_grad():
        assert torch.equal(load(path)(x), other(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn"]  # no temp or old folder left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a lamina model folder"):
        save_lamina(cnn, foreign, "factory:lamina.testing:tiny_cnn", _PRE)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(UsageError, match="unknown lamina builder"):
        save_lamina(cnn, tmp_path / "x", "resnet", _PRE)
    with pytest.raises(AttributeError):  # an hf: builder needs a config: the half-written folder is removed
        save_lamina(cnn, tmp_path / "y", "hf:BertModel", _PRE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn", "foreign"]
    with pytest.raises(UsageError, match="no lamina.json"):
        load_lamina(foreign)


def test_weights_that_do_not_fit_the_builder_are_an_error(tmp_path):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    save_lamina(Other(), tmp_path / "o", "factory:lamina.testing:tiny_cnn", _PRE)
    with pytest.raises(lamina.LaminaError, match="do not"):
        load_lamina(tmp_path / "o")
