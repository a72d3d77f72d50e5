"""GGUF loading: the float model equals the tensors the file was written from, and is cached."""

import json

import pytest
import torch

import lamina.gguf as G
from lamina.errors import UsageError
from lamina.models import load_model
from lamina.testing import write_tiny_gguf


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMINA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_loads_the_state_dict_it_came_from(tmp_path, cache):
    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    lm = load_model(str(tmp_path / "tiny.gguf"))
    assert type(lm.module).__name__ == "LlamaForCausalLM" and lm.blocks.n_blocks == 2
    got, want = lm.module.state_dict(), src.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(lm.module(x).logits, src(x).logits)
    assert lm.tokenizer is not None and lm.tokenizer.pad_token is not None
    # the cache entry is a plain HF folder with no GGUF quantization record
    entry = G.cached_folder(tmp_path / "tiny.gguf")
    assert entry.parent == cache / "gguf"
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())


def test_second_load_uses_the_cache_and_a_corrupted_entry_is_rebuilt(tmp_path, cache, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    entry = G.cached_folder(tmp_path / "tiny.gguf")
    calls = []
    real = G.convert
    monkeypatch.setattr(G, "convert", lambda *a: (calls.append(a), real(*a)))
    assert G.cached_folder(tmp_path / "tiny.gguf") == entry and calls == []
    (entry / "model.safetensors").write_bytes(b"garbage")
    assert G.cached_folder(tmp_path / "tiny.gguf") == entry and len(calls) == 1
    load_model(str(tmp_path / "tiny.gguf"))  # the rebuilt entry loads


def test_a_changed_file_gets_its_own_entry(tmp_path, cache):
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    a = G.cached_folder(tmp_path / "tiny.gguf")
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)
    assert G.cached_folder(tmp_path / "tiny.gguf") != a


def test_missing_gguf_is_a_usage_error(tmp_path, cache):
    with pytest.raises(UsageError):
        G.cached_folder(tmp_path / "nope.gguf")


@pytest.mark.assets
def test_smollm2_cached_float_model_equals_the_direct_gguf_load(tmp_path, cache):
    from transformers import AutoModelForCausalLM
    lm = load_model("smollm2")
    assert lm.name == "smollm2" and lm.blocks.n_blocks == 30
    path = G.smollm2_file()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    got = lm.module.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    ids = lm.tokenizer("The capital of Italy is", return_tensors="pt")
    out = lm.module.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Rome" in lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
