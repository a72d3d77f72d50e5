"""Importance: cached skip importance equals the naive forward, Block Influence equals its formula,
shape-changing blocks are not skippable, and the model is left exactly as it was."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from lamina import LaminaError, UsageError
from lamina import testing as lt
from lamina.analyze.importance import block_importance, naive_skip_importance
from lamina.blocks import find_blocks
from lamina.data import Dataset
from lamina.models import LoadedModel, wrap_module

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (arch, head): heads make the target the logits, no head the final hidden states.
CASES = [("bert", False), ("gpt2", True), ("llama", False), ("qwen2", True), ("vit", True), ("vit", False),
         ("cnn", True)]


def _lm(arch: str, head: bool = False, layers: int = 3) -> LoadedModel:
    if arch == "cnn":
        return wrap_module(lt.tiny_cnn(), name="tiny-cnn", modality="image", image_size=16)
    m = lt.tiny_hf_model(arch, layers=layers, head=head)
    if arch == "vit":
        return LoadedModel(m, "tiny-vit", "testing", "image", find_blocks(m), image_size=16,
                           input_name="pixel_values")
    return LoadedModel(m, f"tiny-{arch}", "testing", "text", find_blocks(m), tokenizer=lt.tiny_tokenizer())


def _data(lm: LoadedModel, n: int = 12) -> Dataset:
    return lt.tiny_text_dataset(n) if lm.modality == "text" else lt.tiny_image_dataset(n)


def _batches(lm, ds, bs=5):
    return [lm.batch(ds, np.arange(s, min(len(ds), s + bs)), 16) for s in range(0, len(ds), bs)]


def _close(a, b, rel=1e-5):
    if a is None or b is None:
        return a is None and b is None
    return a == pytest.approx(b, rel=rel, abs=1e-12)


@pytest.mark.parametrize("arch,head", CASES)
def test_skip_importance_equals_naive_forward(arch, head):
    lm = _lm(arch, head)
    ds = _data(lm)
    res = block_importance(lm, ds, batch_size=5, max_length=16, progress=False)
    ref = naive_skip_importance(lm, ds, batch_size=5, max_length=16, progress=False)
    assert res.target == ("logits" if head else "final hidden states")
    assert res.n_samples == len(ds)
    assert [b.name for b in res.blocks] == [f"blocks.{i}" for i in range(lm.blocks.n_blocks)]
    for b in res.blocks:
        assert _close(b.skip_importance, ref[b.name]), (b.name, b.skip_importance, ref[b.name])
        if b.skippable:
            assert np.isfinite(b.skip_importance) and b.skip_importance > 0


def _squared_error_sums(outs_full, outs_skip, masks):
    num = den = 0.0
    for full, skip, mask in zip(outs_full, outs_skip, masks):
        full, skip = full.double(), skip.double()
        w = torch.ones(full.shape[:2], dtype=torch.float64) if mask is None else mask.double()
        w = w.reshape(*w.shape, *([1] * (full.dim() - 2)))
        num += float(((full - skip) ** 2 * w).sum())
        den += float((full ** 2 * w).sum())
    return num / den


@pytest.mark.parametrize("arch", ["bert", "cnn"])
def test_skip_importance_equals_deleting_the_block(arch):
    """Independent of lamina's stubs: drop block j from the module list and rerun."""
    lm = _lm(arch, head=False)
    ds = _data(lm)
    batches = _batches(lm, ds)
    res = block_importance(lm, batches, progress=False)
    container = lm.module.encoder.layer if arch == "bert" else lm.module.blocks
    holder, attr = (lm.module.encoder, "layer") if arch == "bert" else (lm.module, "blocks")
    masks = [b.get("attention_mask") for b in batches]

    def outputs():
        with torch.no_grad():
            outs = [lm.forward(b) for b in batches]
        return [o.last_hidden_state if hasattr(o, "last_hidden_state") else o for o in outs]

    full = outputs()
    for j, score in enumerate(res.blocks):
        if not score.skippable:
            continue
        setattr(holder, attr, nn.ModuleList([blk for i, blk in enumerate(container) if i != j]))
        try:
            s = _squared_error_sums(full, outputs(), masks)
        finally:
            setattr(holder, attr, container)
        assert score.skip_importance == pytest.approx(s, rel=1e-5)


def _manual_bi(xs, ys, masks, channel_dim=-1):
    tot, cnt = 0.0, 0
    for x, y, m in zip(xs, ys, masks):
        x, y = x.double(), y.double()
        # a zero vector (a dead ReLU pixel) has cosine 0 with anything, as in torch's cosine_similarity
        cos = (x * y).sum(channel_dim) / (x.norm(dim=channel_dim) * y.norm(dim=channel_dim)).clamp_min(1e-8)
        w = torch.ones_like(cos) if m is None else m.double()
        tot += float((cos * w).sum())
        cnt += int(w.sum())
    return 1.0 - tot / cnt


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "vit"])
def test_block_influence_equals_hidden_state_formula(arch):
    lm = _lm(arch)
    ds = _data(lm)
    batches = _batches(lm, ds)
    res = block_importance(lm, batches, progress=False)
    n = lm.blocks.n_blocks
    decoder = arch in ("gpt2", "llama")
    last_block = dict(lm.module.named_modules())[lm.blocks.block_paths[-1]]
    hs_all, last_out = [], []
    h = last_block.register_forward_hook(lambda _m, _a, out: last_out.append(out))
    try:
        with torch.no_grad():
            for b in batches:
                kw = {"pixel_values": b["pixels"]} if "pixels" in b else b
                hs_all.append(lm.module(**kw, output_hidden_states=True).hidden_states)
    finally:
        h.remove()
    masks = [b.get("attention_mask") for b in batches]
    for j in range(n):
        xs = [hs[j] for hs in hs_all]
        # a decoder's last hidden state is after the final norm: take the last block's own output
        ys = last_out if (decoder and j == n - 1) else [hs[j + 1] for hs in hs_all]
        assert res.blocks[j].block_influence == pytest.approx(_manual_bi(xs, ys, masks), rel=1e-5, abs=1e-9)
    if decoder:
        assert not torch.allclose(hs_all[0][n], last_out[0])  # the trap the test avoids


def test_cnn_block_influence_and_shape_changing_block():
    lm = _lm("cnn")
    ds = _data(lm)
    batches = _batches(lm, ds)
    res = block_importance(lm, batches, progress=False)
    net = lm.module
    xs, ys = [[] for _ in net.blocks], [[] for _ in net.blocks]
    with torch.no_grad():
        for b in batches:
            x = net.stem(b["pixels"])
            for i, blk in enumerate(net.blocks):
                y = blk(x)
                xs[i].append(x)
                ys[i].append(y)
                x = y
    for i, score in enumerate(res.blocks):
        if i == 1:  # stride 2, 8 -> 16 channels
            assert not score.skippable and score.skip_importance is None and score.block_influence is None
            assert "shape" in score.note
            continue
        assert score.skippable and score.note is None
        manual = _manual_bi(xs[i], ys[i], [None] * len(batches), channel_dim=1)
        assert score.block_influence == pytest.approx(manual, rel=1e-5, abs=1e-9)


def _hooks_and_stubs(lm):
    mods = dict(lm.module.named_modules())
    left = []
    for p in lm.blocks.block_paths:
        m = mods[p]
        if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks:
            left.append(p)
    return left


@pytest.mark.parametrize("arch", ["gpt2", "cnn"])
def test_model_is_left_as_it_was(arch):
    lm = _lm(arch, head=True)
    ds = _data(lm, 6)
    batch = _batches(lm, ds, 6)[0]
    with torch.no_grad():
        before = lm.forward(batch)
    lm.module.train()  # the caller's mode is restored; the analysis itself runs in eval mode
    res = block_importance(lm, ds, progress=False)
    assert all(m.training for m in lm.module.modules())
    lm.module.eval()
    assert res.to_dict() == block_importance(lm, ds, progress=False).to_dict()
    with torch.no_grad():
        after = lm.forward(batch)
    before, after = [getattr(o, "logits", o) for o in (before, after)]
    assert torch.equal(before, after)
    assert _hooks_and_stubs(lm) == []


def test_stubs_removed_on_error():
    lm = _lm("llama")
    ds = _data(lm, 6)
    calls = {"n": 0}
    real_forward = lm.forward

    def failing(batch):
        calls["n"] += 1
        if calls["n"] == 3:  # inside a skip pass, with stubs in place
            raise RuntimeError("boom")
        return real_forward(batch)

    lm.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        block_importance(lm, ds, progress=False)
    assert _hooks_and_stubs(lm) == []


def test_cost_is_one_forward_plus_the_blocks_after_j(monkeypatch):
    """Per batch: N blocks for the full pass, then N-1-j for each skippable j (tiny_cnn: 4 + 3 + 1 + 0)."""
    lm = _lm("cnn")
    ds = _data(lm, 8)
    real = lt.TinyResBlock.forward
    count = {"n": 0}

    def counted(self, x):
        count["n"] += 1
        return real(self, x)

    monkeypatch.setattr(lt.TinyResBlock, "forward", counted)
    block_importance(lm, ds, batch_size=4, progress=False)
    assert count["n"] == 2 * (4 + 3 + 1 + 0)
    count["n"] = 0
    naive_skip_importance(lm, ds, batch_size=4, progress=False)
    assert count["n"] == 2 * (4 + 3 * 3)


class _TupleBlock(nn.Module):
    """Called with keywords only, returns (hidden, aux) like older HF layers."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states, scale=1.0):
        h = hidden_states + scale * torch.tanh(self.lin(hidden_states))
        return h, h.mean()


class _TupleNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList([_TupleBlock(d) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(hidden_states=x, scale=0.5)[0]
        return x


def test_tuple_outputs_and_keyword_calls():
    torch.manual_seed(0)
    lm = wrap_module(_TupleNet().eval())
    rng = np.random.default_rng(0)
    ds = Dataset("arr", "array", rng.normal(size=(10, 5, 8)).astype(np.float32), np.arange(10) % 2, ["a", "b"],
                 np.arange(10))
    res = block_importance(lm, ds, batch_size=4, progress=False)
    ref = naive_skip_importance(lm, ds, batch_size=4, progress=False)
    assert res.target == "final hidden states"
    x = torch.from_numpy(ds.inputs)
    with torch.no_grad():
        full = lm.module(x)
        for j, score in enumerate(res.blocks):
            h = x
            for i, layer in enumerate(lm.module.layers):
                h = h if i == j else layer(hidden_states=h, scale=0.5)[0]
            manual = float(((full.double() - h.double()) ** 2).sum() / (full.double() ** 2).sum())
            assert score.skip_importance == pytest.approx(manual, rel=1e-5)
            assert _close(score.skip_importance, ref[score.name])


def test_selection_batches_and_to_dict():
    lm = _lm("gpt2")
    ds = _data(lm)
    full = block_importance(lm, ds, batch_size=5, max_length=16, progress=False)
    some = block_importance(lm, _batches(lm, ds), layers=[0, -1], progress=False)
    assert [b.name for b in some.blocks] == ["blocks.0", "blocks.2"]
    assert some.n_samples == len(ds)
    for b in some.blocks:
        assert b == next(f for f in full.blocks if f.name == b.name)
    assert naive_skip_importance(lm, ds, layers="blocks.-1", progress=False).keys() == {"blocks.2"}
    d = json.loads(json.dumps(full.to_dict()))
    assert d["target"] == "final hidden states" and len(d["blocks"]) == 3
    assert set(d["definitions"]) == {"block_influence", "skip_importance"}
    assert d["blocks"][1]["skip_importance"] == full.skip_importance["blocks.1"]


def test_bad_input():
    lm = _lm("cnn")
    ds = _data(lm, 4)
    with pytest.raises(UsageError, match="batch_size"):
        block_importance(lm, ds, batch_size=0, progress=False)
    with pytest.raises(UsageError, match="no block"):
        block_importance(lm, ds, layers="embed", progress=False)
    with pytest.raises(UsageError, match="empty"):
        block_importance(lm, ds.take([]), progress=False)
    nan = wrap_module(lt.nan_model())
    arr = Dataset("arr", "array", np.ones((4, 4), np.float32), [0, 1, 0, 1], ["a", "b"], np.arange(4))
    with pytest.raises(LaminaError, match="non-finite"):
        block_importance(nan, arr, progress=False)


@pytest.mark.assets
def test_minilm_real_weights():
    from lamina.data import load_data, subsample
    from lamina.models import load_model
    lm = load_model("minilm")
    ds = subsample(load_data("rotten-tomatoes"), 64, 0)
    res = block_importance(lm, ds, max_length=64, progress=False)
    assert res.target == "final hidden states" and res.n_samples == 64
    assert [b.name for b in res.blocks] == [f"blocks.{i}" for i in range(6)]
    for b in res.blocks:
        assert b.skippable and 0 < b.block_influence < 2 and np.isfinite(b.skip_importance) and b.skip_importance > 0
    ref = naive_skip_importance(lm, ds, max_length=64, progress=False, layers=[0, -1])
    for name, s in ref.items():
        assert res.skip_importance[name] == pytest.approx(s, rel=1e-5)


@pytest.mark.assets
def test_efficientnet_lite0_shape_changing_blocks_not_skippable():
    from lamina.data import load_data, subsample
    from lamina.models import load_model
    lm = load_model("efficientnet-lite0")
    ds = subsample(load_data("digits"), 8, 0)
    res = block_importance(lm, ds, image_size=64, progress=False)
    assert res.target == "logits"
    mods = dict(lm.module.named_modules())
    for b in res.blocks:
        args = mods[b.path]._block_args
        stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
        assert b.skippable == (stride == 1 and args.input_filters == args.output_filters)
        assert (b.skip_importance is None) == (not b.skippable)
    ref = naive_skip_importance(lm, ds, image_size=64, progress=False, layers=["blocks.2", "blocks.-1"])
    assert ref["blocks.15"] is None
    assert res.skip_importance["blocks.2"] == pytest.approx(ref["blocks.2"], rel=1e-5)
