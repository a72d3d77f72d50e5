"""The wide architecture matrix: random-init transformers configs shrunk to 2-4 blocks.

For each architecture, through a saved Hugging Face folder (the user's path):
- capture (the stage) equals the model's own ``output_hidden_states``, pooled
  independently here, wherever the model exposes the same point;
- importance marks as skippable only blocks that prune can remove faithfully,
  and every such block, removed and saved the way ``lamina prune`` saves
  (``lamina.verify.save_checked``), reloads through ``from_pretrained`` /
  ``lamina.load`` into a model that equals the original with that block bypassed;
- decoders still generate the same tokens with and without the KV cache after pruning.

Marked ``matrix``: excluded from ``make test`` (see pyproject addopts), run by
``make test-matrix`` and CI.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T

from lamina import CaptureConfig, FeatureStore, capture
from lamina import testing as lt
from lamina.analyze.importance import block_importance
from lamina.blocks import bypass, find_blocks
from lamina.compress.depth import drop_blocks_
from lamina.models import load_model
from lamina.verify import save_checked

pytestmark = pytest.mark.matrix

TXT = dict(vocab_size=64, max_position_embeddings=64)
LLM = dict(TXT, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
           pad_token_id=0, bos_token_id=2, eos_token_id=3)

# name -> (class, config); decoders use their *ForCausalLM class so they can generate.
CASES = {
    "distilbert": (T.DistilBertModel, lambda: T.DistilBertConfig(dim=16, n_layers=3, n_heads=2, hidden_dim=32, **TXT)),
    "roberta": (T.RobertaModel, lambda: T.RobertaConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                         intermediate_size=32, pad_token_id=0, vocab_size=64,
                                                         max_position_embeddings=70)),
    "albert": (T.AlbertModel, lambda: T.AlbertConfig(embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                                      num_attention_heads=2, intermediate_size=32, **TXT)),
    "electra": (T.ElectraModel, lambda: T.ElectraConfig(embedding_size=16, hidden_size=16, num_hidden_layers=3,
                                                         num_attention_heads=2, intermediate_size=32, **TXT)),
    "deberta-v2": (T.DebertaV2Model, lambda: T.DebertaV2Config(hidden_size=16, num_hidden_layers=3,
                                                                num_attention_heads=2, intermediate_size=32,
                                                                relative_attention=True, position_buckets=8,
                                                                pos_att_type=["p2c", "c2p"], **TXT)),
    "opt": (T.OPTForCausalLM, lambda: T.OPTConfig(hidden_size=16, num_hidden_layers=3, ffn_dim=32,
                                                   num_attention_heads=2, word_embed_proj_dim=16, pad_token_id=0,
                                                   bos_token_id=2, eos_token_id=3, **TXT)),
    "gpt-neox": (T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(**LLM)),
    "phi": (T.PhiForCausalLM, lambda: T.PhiConfig(**LLM)),
    "phi3": (T.Phi3ForCausalLM, lambda: T.Phi3Config(num_key_value_heads=2, **LLM)),
    "gemma": (T.GemmaForCausalLM, lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=8, **LLM)),
    "gemma2": (T.Gemma2ForCausalLM, lambda: T.Gemma2Config(num_key_value_heads=1, head_dim=8, sliding_window=4,
                                                            **LLM)),
    "qwen3": (T.Qwen3ForCausalLM, lambda: T.Qwen3Config(num_key_value_heads=1, head_dim=8, **LLM)),
    "falcon": (T.FalconForCausalLM, lambda: T.FalconConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                            pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                                            vocab_size=64)),
    "bloom": (T.BloomForCausalLM, lambda: T.BloomConfig(hidden_size=16, n_layer=3, n_head=2, pad_token_id=0,
                                                         bos_token_id=2, eos_token_id=3, vocab_size=64)),
    "t5-encoder": (T.T5EncoderModel, lambda: T.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2,
                                                         vocab_size=64, pad_token_id=0)),
    "deit": (T.DeiTModel, lambda: T.DeiTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                intermediate_size=32, image_size=32, patch_size=8)),
    "swin": (T.SwinModel, lambda: T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[2, 2],
                                                num_heads=[2, 2], window_size=4)),
    "resnet": (T.ResNetModel, lambda: T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2],
                                                      layer_type="basic")),
    "resnet-3-stages": (T.ResNetModel, lambda: T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16],
                                                               depths=[1, 2, 2], layer_type="bottleneck")),
    "convnext": (T.ConvNextModel, lambda: T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 2],
                                                            image_size=32)),
    # initializer_range 0.5: with the default 0.02 sixteen random blocks shrink every output to ~1e-26
    "mobilenetv2": (T.MobileNetV2Model, lambda: T.MobileNetV2Config(image_size=32, depth_multiplier=0.25,
                                                                      initializer_range=0.5)),
}
VISION = {"deit", "swin", "resnet", "resnet-3-stages", "convnext", "mobilenetv2"}
SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    cache = {}

    def get(name):
        if name not in cache:
            cls, make = CASES[name]
            torch.manual_seed(0)
            model = cls(make()).eval()
            path = root / name
            model.save_pretrained(path)
            if name not in VISION:
                lt.tiny_tokenizer().save_pretrained(path)
            cache[name] = path
        return cache[name]
    return get


def _data(name, n=6):
    return lt.tiny_image_dataset(n, size=SIZE) if name in VISION else lt.tiny_text_dataset(n)


def _batch(lm, name, n=6):
    return lm.batch(_data(name, n), np.arange(n), 16, SIZE)


def _pooled(x: torch.Tensor, mask) -> np.ndarray:
    """The capture's mean pooling, computed independently: spatial mean of maps, masked token mean."""
    x = x.double()
    if x.dim() == 4:
        return x.mean((2, 3)).numpy()
    if mask is None:
        return x.mean(1).numpy()
    m = mask.double().unsqueeze(-1)
    return ((x * m).sum(1) / m.sum(1)).numpy()


def _reference_points(lm, hs) -> dict:
    """{tap name: hidden_states index} of the points the model's hidden_states share with lamina's taps."""
    n = lm.blocks.n_blocks
    cont = lm.blocks.container
    if "*" in cont:  # stages: hidden_states[0] is the embedding, [s+1] stage s's output (Swin: after downsampling)
        ends = np.cumsum(lm.module.config.depths) - 1
        pts = {"embed": 0}
        for s, e in enumerate(ends):
            if lm.blocks.arch != "swin" or s == len(ends) - 1:
                pts[f"blocks.{e}"] = s + 1
        return pts
    if len(hs) == n:  # MobileNetV2: one entry per block, no embedding
        return {f"blocks.{i}": i for i in range(n)}
    pts = {"embed": 0, **{f"blocks.{i}": i + 1 for i in range(n - 1)}}
    pts["last"] = n  # the last block, or the final norm when the model applies it to its last hidden state
    return pts


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_equals_output_hidden_states(name, folders, tmp_path):
    path = folders(name)
    ds = _data(name)
    res = capture(str(path), ds, CaptureConfig(out=str(tmp_path / "run"), batch_size=6, max_length=16,
                                               image_size=SIZE if name in VISION else None, progress=False))
    store = FeatureStore.open(res.store)
    lm = load_model(str(path))
    batch = _batch(lm, name)
    mask = batch.get("attention_mask")
    with torch.no_grad():
        inputs = {"pixel_values": batch["pixels"]} if "pixels" in batch else batch
        hs = lm.module(**inputs, output_hidden_states=True).hidden_states
    pts = _reference_points(lm, hs)
    assert len(pts) >= 2
    for tap, i in pts.items():
        ref = _pooled(hs[i], mask)
        if tap == "last":
            last = f"blocks.{lm.blocks.n_blocks - 1}"
            cands = [last] + (["final_norm"] if "final_norm" in store.layers else [])
            assert any(np.allclose(store.load(c), ref, atol=1e-4) for c in cands), (name, cands)
        else:
            np.testing.assert_allclose(store.load(tap), ref, atol=1e-4, err_msg=f"{name} {tap}")


def _out(lm, batch):
    with torch.no_grad():
        out = lm.forward(batch)
    x = getattr(out, "logits", None)
    return x if x is not None else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(CASES))
def test_prune_reload_equals_bypassed(name, folders, tmp_path):
    lm = load_model(str(folders(name)))
    batch = _batch(lm, name)
    scores = block_importance(lm, [batch], progress=False)
    skippable = [int(b.name.split(".")[1]) for b in scores.blocks if b.skippable]
    assert skippable, f"{name}: no block can be removed"
    if name == "t5-encoder":  # block 0 owns the relative-position bias every later block reuses
        assert not scores.blocks[0].skippable and "relative_attention_bias" in scores.blocks[0].note
    for j in sorted({skippable[0], skippable[-1]}):
        with bypass(lm.module, [j], lm.blocks):
            want = _out(lm, batch)
        small = copy.copy(lm)
        small.module = copy.deepcopy(lm.module)
        drop_blocks_(small.module, [j], lm.blocks.container)
        small.blocks = find_blocks(small.module, lm.blocks.container)
        dest = tmp_path / f"drop{j}"
        fmt, check = save_checked(small, dest, lm, batch)
        assert check["ok"] and check["max_abs_diff"] <= check["tolerance"]
        assert check["max_abs_output"] > 1e-3, f"{name}: outputs too small for the comparison to mean anything"
        again = load_model(str(dest))
        assert again.blocks.n_blocks == lm.blocks.n_blocks - 1
        if fmt == "huggingface":
            assert type(again.module) is type(lm.module)
        # 1e-4 of the output's scale: on an AVX2-only CPU oneDNN picks other conv algorithms for the reloaded
        # (freshly laid out) weights than for the bypassed model's, and MobileNetV2's logits then differ by up to
        # 2.8e-5 of their scale in 4 of 7,680 elements (measured on a Zen 3 EPYC); a wrong block is off by O(1)
        torch.testing.assert_close(_out(again, batch), want, atol=1e-4 * float(want.abs().max()), rtol=1e-4,
                                   msg=lambda m: f"{name} drop {j}: {m}")
        if hasattr(again.module, "generate"):
            ids = batch["input_ids"][:1, :4]
            kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                cached = again.module.generate(ids, use_cache=True, **kw)
                plain = again.module.generate(ids, use_cache=False, **kw)
            assert torch.equal(cached, plain), f"{name}: generation differs with the KV cache after pruning"
