"""quantize's sensitivity from cached block outputs (issue 16): the same scores as requantize-and-forward, fewer
block evaluations, a bounded cache with the full-forward route as fallback."""

import pytest
import torch

import lamina
from lamina.errors import LaminaError
from lamina.quantize import QuantizeConfig, quantize, sensitivity
from lamina.quantize import _cached
from lamina.quantize.formats import linear_names
from lamina.quantize.quantize import quantized_copy
from lamina.testing import (save_tiny_causal_lm, save_tiny_text_model, tiny_image_dataset, tiny_sentences,
                            tiny_text_dataset)

FORMATS = ("int8fused", "bf16")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    bert = lamina.load_model(str(save_tiny_text_model(root / "bert", "bert", seed=1, head=True)))
    llama = lamina.load_model(str(save_tiny_causal_lm(root / "llama", "llama", layers=3, seed=2)))
    cnn = lamina.load_model("lamina.testing:tiny_cnn")
    texts = tiny_text_dataset(24, seed=4)
    images = tiny_image_dataset(12, seed=5)
    return {
        "bert": (bert, [bert.batch(texts, range(s, s + 8), 16) for s in (0, 8, 16)]),
        "llama": (llama, [llama.batch(texts, range(s, s + 6), 12) for s in (0, 6)]),
        "cnn": (cnn, [cnn.batch(images, range(s, s + 6), image_size=16) for s in (0, 6)]),
    }


def _naive(lm, batches, name, fmt) -> float:
    """Independent reference: a deep copy with only ``name`` quantized, full forwards, nMSE in float64."""
    q = quantized_copy(lm, {name: fmt})
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            ref, got = (_main(m.forward(b)).double() for m in (lm, q))
            num += float(((got - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    return num / den


def _main(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _state(lm) -> dict:
    return {k: v.clone() for k, v in lm.module.state_dict().items()}


@pytest.mark.parametrize("kind", ["bert", "llama", "cnn"])
def test_cached_scores_equal_requantize_and_forward(models, kind):
    lm, batches = models[kind]
    before = _state(lm)
    with torch.no_grad():
        out_before = [_main(lm.forward(b)).clone() for b in batches]
    cost: dict = {}
    cached = sensitivity(lm, batches, FORMATS, route="cached", cost=cost)
    naive = sensitivity(lm, batches, FORMATS, route="naive")
    names = linear_names(lm.module)
    assert list(cached) == list(naive) == names
    assert cost["route"] == "cached block outputs" and cost["cache_bytes"] > 0
    for name in names:
        for fmt in FORMATS:
            want = _naive(lm, batches, name, fmt)
            assert cached[name][fmt] == pytest.approx(want, rel=1e-6, abs=1e-15), (name, fmt)
            assert cached[name][fmt] == pytest.approx(naive[name][fmt], rel=1e-6, abs=1e-15), (name, fmt)
    # the heads after every block start past them (only the post-processing runs); layers inside block k at k
    n = cost["blocks"]
    first = cost["first_block"]
    tail = {"bert": ["bert.pooler.dense", "classifier"], "llama": ["lm_head"], "cnn": ["fc"]}[kind]
    assert all(first[t] == n for t in tail), first
    if kind != "cnn":
        paths = lm.blocks.block_paths
        inside = {nm: next(k for k, p in enumerate(paths) if nm.startswith(p + ".")) for nm in names if nm not in tail}
        assert inside and all(first[nm] == k for nm, k in inside.items()), first
        assert cost["block_evaluations"] < cost["block_evaluations_naive"]
    # the model is left as it was: weights, module types and outputs
    after = _state(lm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(lm.module.get_submodule(nm)) is torch.nn.Linear for nm in names)
    with torch.no_grad():
        assert all(torch.equal(_main(lm.forward(b)), o) for b, o in zip(batches, out_before))


def test_cached_route_skips_the_blocks_before(models):
    """Counted by hooks on the modules themselves, not by the route's own bookkeeping: a Linear of block 0 runs
    in the caching forward, the reference forward and when a layer of block 0 is scored, never otherwise."""
    lm, batches = models["llama"]
    probe = lm.module.get_submodule("model.layers.0.self_attn.q_proj")
    last = lm.module.get_submodule("model.layers.2.mlp.down_proj")
    calls = {"first": 0, "last": 0}
    hs = [probe.register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1)),
          last.register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))]
    try:
        cost: dict = {}
        sensitivity(lm, batches, ("int8fused",), route="cached", cost=cost)  # (a bf16 copy would carry the hook)
    finally:
        for h in hs:
            h.remove()
    names = linear_names(lm.module)
    in0 = sum(nm.startswith("model.layers.0.") for nm in names)
    b, f = len(batches), 1
    # q_proj's own scoring replaces it with a quantized copy, so its hook misses those forwards
    assert calls["first"] == 2 * b + (in0 - 1) * f * b
    # the last block runs for every layer but the head (after it) and down_proj itself (swapped out)
    assert calls["last"] == 2 * b + (len(names) - 2) * f * b
    assert cost["block_evaluations"] == sum(
        (3 - cost["first_block"][nm]) for nm in names) * f * b


def test_cache_over_its_bound_falls_back_to_full_forwards(models, monkeypatch):
    lm, batches = models["bert"]
    cached = sensitivity(lm, batches, FORMATS)
    monkeypatch.setattr(_cached, "CACHE_BYTES", 1024)
    cost: dict = {}
    naive = sensitivity(lm, batches, FORMATS, cost=cost)
    assert cost["route"] == "full forwards" and "exceed the cache bound of 1,024 bytes" in cost["route_why"]
    assert cost["block_evaluations"] == cost["block_evaluations_naive"] and cost["cache_bytes"] == 0
    assert all(naive[n][f] == pytest.approx(cached[n][f], rel=1e-6, abs=1e-15) for n in cached for f in FORMATS)
    with pytest.raises(LaminaError, match="cannot run from cached block outputs"):
        sensitivity(lm, batches, FORMATS, route="cached")


def test_quant_plan_records_the_route_and_its_cost(tmp_path):
    from lamina.quantize.quantize import _calibration
    root = save_tiny_causal_lm(tmp_path / "lm", "llama", layers=2, seed=3)
    texts, _ = tiny_sentences(60, seed=1)
    (tmp_path / "d.txt").write_text("\n".join(texts))
    cfg = QuantizeConfig(out=str(tmp_path / "q"), fraction=0.5, formats="int8fused", data=str(tmp_path / "d.txt"),
                         seq_len=8, calibration_samples=6)
    res = quantize(str(root), cfg)
    s = res.plan["cost"]["sensitivity"]
    assert s["route"] == "cached block outputs" and s["blocks"] == 2 and s["batches"] >= 1
    assert 0 < s["cache_bytes"] <= s["cache_bound_bytes"] and s["block_evaluations"] < s["block_evaluations_naive"]
    assert s["first_block"]["lm_head"] == 2 and s["first_block"]["model.layers.1.mlp.up_proj"] == 1
    # the plan's scores are the full-forward route's on the same calibration batches
    lm = lamina.load_model(str(root))
    batches, _ = _calibration(lm, str(root), cfg)
    naive = sensitivity(lm, batches, ("int8fused",), route="naive")
    assert [e["name"] for e in res.plan["layers"]] and all(
        e["scores"]["int8fused"] == pytest.approx(naive[e["name"]]["int8fused"], rel=1e-6, abs=1e-15)
        for e in res.plan["layers"])
    assert res.plan["cost"]["sensitivity_forwards"] == len(linear_names(lm.module))
