"""Compression: plans are pure data that choose only skippable blocks; apply works on a copy; a depth-pruned
model equals the original with those blocks bypassed; pruning zeroed FFN channels is the identity; pruned
Hugging Face models round-trip through save_pretrained and still generate with a KV cache."""

import json

import pytest
import torch
import torch.nn as nn

from lamina import UsageError
from lamina import testing as lt
from lamina.blocks import bypass, find_blocks
from lamina.compress import PlanConfig, apply, ffn_layout, is_empty, load_plan, make_plan, save_plan
from lamina.models import model_fingerprint

ARCHS = ("bert", "gpt2", "llama", "qwen2", "mistral", "vit", "cnn")


def _model(arch: str, layers: int = 3, seed: int = 0) -> nn.Module:
    return lt.tiny_cnn(seed=seed) if arch == "cnn" else lt.tiny_hf_model(arch, layers=layers, seed=seed)


def _inputs(arch: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch in ("vit", "cnn"):
        x = torch.randn(2, 3, 16, 16, generator=g)
        return {"pixel_values": x} if arch == "vit" else {"x": x}
    ids = torch.randint(4, 60, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: pruned and original must agree on it too
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    o = model(**inputs)
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _scores(model: nn.Module, skip=None, bi=None, skippable=None) -> dict:
    """A scores.json as `lamina analyze` writes it (only the parts a plan reads)."""
    n = find_blocks(model).n_blocks
    return {"model": {"name": "tiny", "fingerprint": model_fingerprint(model), "parameters": 1},
            "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "paths": list(find_blocks(model).block_paths),
                           "skip_nmse": skip or [float(i + 1) for i in range(n)],
                           "block_influence": bi or [float(n - i) for i in range(n)],
                           "skippable": skippable or [True] * n}}


# ---------------------------------------------------------------- plans (no model needed beyond a fingerprint)

@pytest.mark.parametrize("kw", [dict(drop_blocks=1.0), dict(drop_blocks=-0.1), dict(ffn=1.0), dict(method="skip"),
                                dict(heads=1.0), dict(drop_blocks="0.5")])
def test_config_rejects_bad_values(kw):
    with pytest.raises(UsageError):
        PlanConfig(**kw)


def test_plan_methods_choose_the_right_blocks(tmp_path):
    m = _model("bert", layers=4)
    sc = _scores(m, skip=[0.5, 0.1, 0.3, 0.9], bi=[0.2, 0.8, 0.05, 0.9])
    assert make_plan(sc, PlanConfig(drop_blocks=0.5))["depth"]["remove"] == ["blocks.1", "blocks.2"]
    assert make_plan(sc, PlanConfig(drop_blocks=0.25, method="block_influence"))["depth"]["remove"] == ["blocks.2"]
    even = make_plan(sc, PlanConfig(drop_blocks=0.5, method="even"))["depth"]
    assert even["remove"] == ["blocks.1", "blocks.2"] and even["scores"] is None
    plan = make_plan(sc, PlanConfig(drop_blocks=0.25))
    assert plan["model"]["fingerprint"] == model_fingerprint(m)
    assert plan["depth"]["scores"]["blocks.1"] == 0.1 and plan["depth"]["method"] == "skip_nmse"
    save_plan(plan, tmp_path)
    assert load_plan(tmp_path) == json.loads(json.dumps(plan)) == plan
    assert is_empty(make_plan(sc, PlanConfig())) and not is_empty(plan)


def test_non_skippable_blocks_are_never_chosen():
    m = _model("bert", layers=4)
    sc = _scores(m, skip=[0.01, 0.02, 0.5, 0.9], skippable=[False, False, True, True])
    for method in ("skip_nmse", "block_influence", "even"):
        plan = make_plan(sc, PlanConfig(drop_blocks=0.5, method=method))
        assert plan["depth"]["remove"] == ["blocks.2", "blocks.3"]
    with pytest.raises(UsageError, match="skippable"):
        make_plan(sc, PlanConfig(drop_blocks=0.75))


def test_budget_removing_every_block_is_refused():
    sc = _scores(_model("bert", layers=2))
    with pytest.raises(UsageError, match="every block"):
        make_plan(sc, PlanConfig(drop_blocks=0.9))  # round(1.8) = 2 of 2


def test_plan_for_another_model_is_refused():
    a, b = _model("bert", seed=0), _model("bert", seed=1)
    plan = make_plan(_scores(a), PlanConfig(drop_blocks=0.3))
    with pytest.raises(UsageError, match="another model"):
        apply(b, plan)


# ---------------------------------------------------------------- apply: depth

def test_empty_plan_is_the_identity_and_the_caller_model_is_untouched():
    m = _model("llama")
    fp = model_fingerprint(m)
    res = apply(m, make_plan(_scores(m), PlanConfig()))
    x = _inputs("llama")
    assert torch.equal(_out(res.model, x), _out(m, x))
    assert res.model is not m and model_fingerprint(m) == fp and res.parameters_after == res.parameters_before


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_pruned_equals_original_with_blocks_bypassed(arch):
    m = _model(arch, layers=3)
    n = find_blocks(m).n_blocks
    # skip importance lowest on block 1 (the CNN's block 1 changes shape: it must never be chosen)
    skippable = [True] * n if arch != "cnn" else [True, False, True, True]
    plan = make_plan(_scores(m, skip=[0.5, 0.1, 0.3, 0.9][:n], skippable=skippable), PlanConfig(drop_blocks=0.3))
    res = apply(m, plan)
    removed = [int(b.split(".")[1]) for b in res.plan["depth"]["remove"]]
    assert removed == ([1] if arch != "cnn" else [2])
    assert find_blocks(res.model).n_blocks == n - 1
    x = _inputs(arch)
    with bypass(m, removed):
        want = _out(m, x)
    torch.testing.assert_close(_out(res.model, x), want, rtol=1e-5, atol=1e-6)
    if arch != "cnn":
        assert res.model.config.num_hidden_layers == n - 1
        idx = [mod.layer_idx for mod in res.model.modules() if isinstance(getattr(mod, "layer_idx", None), int)]
        assert idx == ([] if arch == "vit" else list(range(n - 1)))  # ViT layers keep no index
        if getattr(res.model.config, "layer_types", None) is not None:
            assert len(res.model.config.layer_types) == n - 1


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_pruned_decoder_round_trips_and_generates_with_cache(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(lt.tiny_config(arch, layers=4)).eval()
    plan = make_plan(_scores(m, skip=[0.9, 0.1, 0.2, 0.8]), PlanConfig(drop_blocks=0.5))
    pruned = apply(m, plan).model
    pruned.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 9, 12, 7]])
    torch.testing.assert_close(_out(back, {"input_ids": ids}), _out(pruned, {"input_ids": ids}), rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = back.generate(ids, use_cache=True, **kw)
        uncached = back.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == 9 and torch.equal(cached, uncached)


# ---------------------------------------------------------------- apply: FFN width

def _zero_channels(m: nn.Module, chans: list[int]) -> None:
    """Make FFN channels ``chans`` of every block contribute nothing (first linear's rows and bias zero)."""
    blocks, (firsts, _, _) = ffn_layout(m)
    with torch.no_grad():
        for b in blocks:
            first = b.get_submodule(firsts[0])
            if isinstance(first, nn.Linear):
                first.weight[chans] = 0
            else:  # Conv1D: weight (in, out)
                first.weight[:, chans] = 0
            if first.bias is not None:
                first.bias[chans] = 0


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "mistral", "vit"])
def test_pruning_zeroed_ffn_channels_is_the_identity(arch, tmp_path):
    m = _model(arch, layers=2)
    blocks, (firsts, last, key) = ffn_layout(m)
    w = blocks[0].get_submodule(last).weight
    size = w.shape[0] if arch == "gpt2" else w.shape[1]  # Conv1D stores (in, out)
    zeroed = list(range(0, size, 4))  # a quarter of the channels
    _zero_channels(m, zeroed)
    x = _inputs(arch)
    plan = make_plan(_scores(m), PlanConfig(ffn=len(zeroed) / size))
    res = apply(m, plan, batches=[x])
    assert all(v == zeroed for v in res.plan["ffn"]["remove"].values())
    assert getattr(res.model.config, key) == size - len(zeroed)
    assert res.parameters_after < res.parameters_before
    torch.testing.assert_close(_out(res.model, x), _out(m, x), rtol=1e-5, atol=1e-6)
    res.model.save_pretrained(tmp_path)
    back = type(res.model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(back, x), _out(res.model, x), rtol=0, atol=0)


def test_ffn_and_depth_together_and_plan_json_of_the_result(tmp_path):
    m = _model("bert", layers=3)
    x = _inputs("bert")
    plan = make_plan(_scores(m), PlanConfig(drop_blocks=0.3, ffn=0.5))
    save_plan(plan, tmp_path)
    res = apply(m, load_plan(tmp_path), batches=[x])
    assert res.model.config.num_hidden_layers == 2 and res.model.config.intermediate_size == 32
    assert res.model.encoder.layer[0].intermediate.dense.weight.shape == (32, 32)
    assert res.plan["applied"] and len(res.plan["ffn"]["remove"]["blocks.0"]) == 32
    json.dumps(res.plan)  # the carried-out plan is plain data too
    with pytest.raises(UsageError, match="already applied"):
        apply(res.model, res.plan, batches=[x])
    with pytest.raises(UsageError, match="calibration"):
        apply(m, plan)


def test_gpt2_scaled_by_layer_index_is_refused():
    m = _model("gpt2")
    m.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UsageError, match="layer index"):
        apply(m, make_plan(_scores(m), PlanConfig(drop_blocks=0.3)))


def test_plan_from_real_importance_scores():
    """block_importance -> scores['importance'] as analyze writes it -> plan -> apply."""
    from lamina.analyze.analyze import _importance_dict
    from lamina.analyze.importance import block_importance
    from lamina.models import LoadedModel
    m = _model("bert", layers=3)
    lm = LoadedModel(m, "tiny-bert", "testing", "text", find_blocks(m), tokenizer=lt.tiny_tokenizer())
    ds = lt.tiny_text_dataset(8)
    imp = _importance_dict(block_importance(lm, ds, batch_size=8, progress=False))
    scores = {"model": lm.describe(), "importance": imp}
    plan = make_plan(scores, PlanConfig(drop_blocks=0.3, ffn=0.25))
    lowest = min(range(3), key=lambda i: imp["skip_nmse"][i])
    assert plan["depth"]["remove"] == [f"blocks.{lowest}"]
    res = apply(lm, plan, batches=[lm.batch(ds, range(8))])
    assert res.model.blocks.n_blocks == 2 and res.model.module.config.intermediate_size == 48
    assert lm.module is m and find_blocks(m).n_blocks == 3


# ---------------------------------------------------------------- apply: attention heads (Llama family)

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pruning_silent_heads_is_the_identity_and_round_trips(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    cfg = lt.tiny_config(arch, layers=2)
    cfg.num_key_value_heads = 4  # one KV head per query head, so a head can be silenced through its v_proj
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    hd = 8
    with torch.no_grad():
        for layer in m.model.layers:
            for h in (1, 2):  # heads 1 and 2 output zero: v rows (and bias) zero
                layer.self_attn.v_proj.weight[h * hd:(h + 1) * hd] = 0
                if layer.self_attn.v_proj.bias is not None:
                    layer.self_attn.v_proj.bias[h * hd:(h + 1) * hd] = 0
    x = _inputs(arch)
    res = apply(m, make_plan(_scores(m), PlanConfig(heads=0.5)), batches=[x])
    assert all(v == [1, 2] for v in res.plan["heads"]["remove"].values())
    assert res.model.config.num_attention_heads == 2 == res.model.config.num_key_value_heads
    assert res.model.config.head_dim == hd
    assert res.model.model.layers[0].self_attn.v_proj.weight.shape == (2 * hd, 32)
    assert res.model.model.layers[0].self_attn.q_proj.weight.shape == (2 * hd, 32)
    torch.testing.assert_close(_out(res.model, x), _out(m, x), rtol=1e-5, atol=1e-6)
    res.model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(back, x), _out(res.model, x), rtol=0, atol=0)


def test_heads_with_grouped_kv_keep_every_group_and_generate():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(lt.tiny_config("llama", layers=3)).eval()  # 4 query heads, 2 KV heads
    x = _inputs("llama")
    res = apply(m, make_plan(_scores(m), PlanConfig(heads=0.5, drop_blocks=0.3, ffn=0.5)), batches=[x])
    for gone in res.plan["heads"]["remove"].values():
        assert len(gone) == 2 and {h // 2 for h in gone} == {0, 1}  # one head from each KV group
    ids = torch.tensor([[5, 9, 12, 7]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = res.model.generate(ids, use_cache=True, **kw)
        assert torch.equal(cached, res.model.generate(ids, use_cache=False, **kw))
    with pytest.raises(UsageError, match="every attention head"):
        apply(m, make_plan(_scores(m), PlanConfig(heads=0.9)), batches=[x])  # 2 per group -> round(1.8) = 2 gone


def test_heads_refused_where_the_config_cannot_express_them():
    m = _model("bert")
    with pytest.raises(UsageError, match="Llama-family"):
        apply(m, make_plan(_scores(m), PlanConfig(heads=0.5)), batches=[_inputs("bert")])


class _SeqStack(nn.Module):
    """Any nn.Module whose blocks sit in an nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.body(x))


def test_depth_on_a_plain_sequential_stack():
    torch.manual_seed(0)
    m = _SeqStack().eval()
    res = apply(m, make_plan(_scores(m, skip=[3.0, 1.0, 2.0]), PlanConfig(drop_blocks=0.3)))
    assert isinstance(res.model.body, nn.Sequential) and len(res.model.body) == 2
    assert res.plan["depth"]["kept"] == [0, 2]
    x = torch.randn(2, 4)
    torch.testing.assert_close(res.model(x), m.out(m.body[2](m.body[0](x))))


# ---------------------------------------------------------------- depth chosen with the model: iterative, target

def _lm(m: nn.Module):
    from lamina.models import LoadedModel
    return LoadedModel(m, "tiny", "testing", "text", find_blocks(m))


def test_iterative_rescores_on_the_model_with_blocks_removed():
    from lamina.analyze.importance import naive_skip_importance
    from lamina.compress import choose_blocks, needs_model
    m = _model("bert", layers=4)
    fp = model_fingerprint(m)
    x = _inputs("bert")
    plan = make_plan(_scores(m), PlanConfig(drop_blocks=0.5, method="iterative"))
    assert plan["depth"]["remove"] is None and plan["depth"]["n_removed"] == 2 and needs_model(plan)
    assert not is_empty(plan)
    chosen = choose_blocks(m, plan, batches=[x])
    assert model_fingerprint(m) == fp and not chosen["applied"] and not needs_model(chosen)
    r1, r2 = chosen["depth"]["rounds"]
    # round 1: skip nMSE on the full model; round 2: on the model without round 1's block (naive reference)
    ref1 = naive_skip_importance(_lm(m), [x], progress=False)
    assert r1["scores"] == pytest.approx(ref1, rel=1e-5)
    assert r1["removed"] == min(ref1, key=lambda k: (ref1[k], k))
    first = int(r1["removed"].split(".")[1])
    m1 = apply(m, make_plan(_scores(m, skip=[1.0 if i == first else 2.0 for i in range(4)]),
                            PlanConfig(drop_blocks=0.25))).model
    ref2 = naive_skip_importance(_lm(m1), [x], progress=False)
    left = [i for i in range(4) if i != first]
    assert r2["scores"] == pytest.approx({f"blocks.{i}": ref2[f"blocks.{j}"] for j, i in enumerate(left)}, rel=1e-5)
    assert r2["removed"] == min(r2["scores"], key=lambda k: (r2["scores"][k], k))
    assert chosen["depth"]["remove"] == sorted([r1["removed"], r2["removed"]])
    # apply does the same choice itself when given the unresolved plan
    res = apply(m, plan, batches=[x])
    assert res.plan["depth"]["remove"] == chosen["depth"]["remove"] and res.plan["depth"]["rounds"] == [r1, r2]
    with bypass(m, chosen["depth"]["remove"]):
        torch.testing.assert_close(_out(res.model, x), _out(m, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="calibration"):
        apply(m, plan)


def _block_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.get_submodule(find_blocks(m).block_paths[0]).parameters())


@pytest.mark.parametrize("method,want", [("skip_nmse", ["blocks.1", "blocks.2"]),
                                         ("block_influence", ["blocks.2", "blocks.3"]),
                                         ("even", ["blocks.1", "blocks.2"])])
def test_target_params_removes_blocks_in_the_method_order_until_the_count_fits(method, want):
    m = _model("bert", layers=4)
    total, per = sum(p.numel() for p in m.parameters()), _block_params(m)
    sc = _scores(m, skip=[0.5, 0.1, 0.3, 0.9], bi=[0.9, 0.8, 0.05, 0.2])
    target = total - per - per // 2  # one block is not enough, two are
    for value in (target, target / total):  # a count, or the same as a fraction of the parameters
        plan = make_plan(sc, PlanConfig(target_params=value, method=method))
        assert plan["depth"]["remove"] is None and plan["depth"]["target_params"] == value
        res = apply(m, plan)
        assert res.plan["depth"]["remove"] == want, value
        assert res.parameters_after == total - 2 * per <= res.plan["depth"]["target_parameters"]
        assert res.plan["depth"]["predicted_parameters"] == res.parameters_after


def test_target_params_counts_width_pruning_and_refuses_the_impossible():
    m = _model("bert", layers=3)
    x = _inputs("bert")
    total, per = sum(p.numel() for p in m.parameters()), _block_params(m)
    floor = total - 2 * per  # every removable block gone (one must stay)
    with pytest.raises(UsageError, match="cannot be reached"):
        apply(m, make_plan(_scores(m), PlanConfig(target_params=floor - 1)))
    # FFN width makes the same target reachable: the blocks are counted after width pruning
    res = apply(m, make_plan(_scores(m), PlanConfig(target_params=floor - 1, ffn=0.5)), batches=[x])
    assert res.parameters_after <= floor - 1 and res.plan["depth"]["n_removed"] == 2
    assert apply(m, make_plan(_scores(m), PlanConfig(target_params=total, ffn=0.5)), batches=[x]).plan[
        "depth"]["remove"] == []  # width alone meets it
    for bad in (dict(target_params=0), dict(target_params=2.5), dict(target_params=-1), dict(target_params=True),
                dict(target_params=100, drop_blocks=0.5)):
        with pytest.raises(UsageError):
            PlanConfig(**bad)


def test_per_layer_ffn_removes_the_zeroed_channels_of_each_layer_and_reloads(tmp_path):
    from lamina.compress.width import ffn_keep_per_layer
    from lamina.models import LoadedModel
    from lamina.savefmt import config_describes, load_lamina, save_loaded
    m = _model("bert", layers=2)
    zeroed = {0: list(range(0, 64, 8)), 1: list(range(0, 64, 8)) + list(range(1, 64, 4))}  # 8 and 24 of 64
    with torch.no_grad():
        for j, chans in zeroed.items():
            m.encoder.layer[j].intermediate.dense.weight[chans] = 0
            m.encoder.layer[j].intermediate.dense.bias[chans] = 0
    x = _inputs("bert")
    res = apply(m, make_plan(_scores(m), PlanConfig(ffn=0.25, ffn_per_layer=True)), batches=[x])
    assert res.plan["ffn"]["remove"] == {"blocks.0": zeroed[0], "blocks.1": sorted(zeroed[1])}
    assert res.plan["ffn"]["intermediate_size_after"] == {"blocks.0": 56, "blocks.1": 40}
    assert res.model.config.intermediate_size == 64 and not config_describes(res.model)
    torch.testing.assert_close(_out(res.model, x), _out(m, x), rtol=1e-5, atol=1e-6)
    save_loaded(LoadedModel(res.model, "t", "testing", "text", find_blocks(res.model), tokenizer=lt.tiny_tokenizer()),
                tmp_path / "m")
    back = load_lamina(tmp_path / "m").module
    assert back.encoder.layer[1].output.dense.weight.shape == (32, 40)
    assert torch.equal(_out(back, x), _out(res.model, x))
    # every block keeps at least one channel, whatever the scores
    keep = ffn_keep_per_layer([torch.ones(4), torch.arange(1.0, 5.0)], 0.75)  # normalized: 1,1,1,1 / .4,.8,1.2,1.6
    assert [k.tolist() for k in keep] == [[0], [3]]  # the top two are block 1's; block 0 takes back its best
    with pytest.raises(UsageError, match="ffn_per_layer=True needs ffn"):
        PlanConfig(ffn_per_layer=True)
