"""Fused int8fused siblings (query / key / value, gate / up): one GEMM computes exactly what the separate layers do."""

import copy

import pytest
import torch
from torch import nn

import lamina
from lamina.quantize.formats import Int8FusedLinear, apply_layers, linear_names
from lamina.quantize.fuse import FusedInt8Group, fuse_int8
from lamina.quantize.quantize import _run


def _batches(lm, csv, n=16, bs=8):
    ds = lamina.load_data(str(csv))
    return [lm.batch(ds, range(s, min(n, s + bs)), 32) for s in range(0, n, bs)]


def _with(lm, plan, fuse):
    out = copy.copy(lm)
    out.module = apply_layers(copy.deepcopy(lm.module), plan, fuse=fuse).eval()
    return out


def _groups(module):
    return {id(m._group) for m in module.modules() if isinstance(m, Int8FusedLinear) and m._group is not None}


@pytest.mark.parametrize("arch,firsts", [("bert", ("query",)), ("llama", ("q_proj", "gate_proj"))])
def test_fused_model_equals_the_separate_layers_exactly(tiny_dirs, sentences_csv, arch, firsts):
    lm = lamina.load_model(str(tiny_dirs[arch]))
    plan = {n: "int8fused" for n in linear_names(lm.module)}
    sep, fused = _with(lm, plan, False), _with(lm, plan, True)
    expect = sum(1 for n in linear_names(lm.module) if n.rpartition(".")[2] in firsts)  # q / k / v, gate / up
    assert expect >= 2 and not _groups(sep.module) and len(_groups(fused.module)) == expect
    b = _batches(lm, sentences_csv)
    want, got = _run(sep, b), _run(fused, b)
    assert all(torch.equal(w, g) for w, g in zip(want, got))  # bit for bit, not close
    assert not torch.equal(want[0], _run(lm, b)[0])  # and it is the int8 model, not the float one
    # nothing is held between forwards (the group drops its outputs once every member took its part)
    assert all(m._group._x is None for m in fused.module.modules() if getattr(m, "_group", None) is not None)


def test_only_the_int8fused_members_are_fused_and_the_rest_is_untouched(tiny_dirs, sentences_csv):
    lm = lamina.load_model(str(tiny_dirs["bert"]))
    names = linear_names(lm.module)
    q, k, v = (next(n for n in names if n.endswith(f"attention.self.{s}")) for s in ("query", "key", "value"))
    plan = {q: "int8fused", v: "int8fused", k: "bf16"}
    fused = _with(lm, plan, True)
    mq, mk, mv = (fused.module.get_submodule(n) for n in (q, k, v))
    assert mq._group is mv._group is not None and mq._group.sizes == [mq.out_features, mv.out_features]
    assert type(mk).__name__ == "BF16Linear"
    b = _batches(lm, sentences_csv)
    assert all(torch.equal(w, g) for w, g in zip(_run(_with(lm, plan, False), b), _run(fused, b)))


def test_members_called_with_different_inputs_still_compute_their_own_layer():
    torch.manual_seed(0)
    parent = nn.Module()
    parent.query, parent.key, parent.value = (nn.Linear(16, 8) for _ in range(3))
    separate = {k: Int8FusedLinear(getattr(parent, k)) for k in ("query", "key", "value")}
    for k in separate:
        setattr(parent, k, Int8FusedLinear(getattr(parent, k)))
    assert fuse_int8(parent) == 1
    x1, x2 = torch.randn(4, 16), torch.randn(4, 16) * 3
    # interleaved, one member twice, inputs switched mid-way: each call is still its own layer on its own input
    for name, x in (("query", x1), ("key", x2), ("key", x2), ("value", x1), ("query", x2), ("value", x2)):
        assert torch.equal(getattr(parent, name)(x), separate[name](x))


def test_a_copy_keeps_onednn_numerics_and_its_own_group(tiny_dirs, sentences_csv):
    """Copying a packed weight the default way re-packs it for the global engine (different outputs here): a copy
    of an int8fused model must compute what the original does."""
    lm = lamina.load_model(str(tiny_dirs["bert"]))
    fused = _with(lm, {n: "int8fused" for n in linear_names(lm.module)}, True)
    dup = copy.deepcopy(fused)
    b = _batches(lm, sentences_csv)
    assert all(torch.equal(w, g) for w, g in zip(_run(fused, b), _run(dup, b)))
    assert not (_groups(dup.module) & _groups(fused.module)) and len(_groups(dup.module)) == len(_groups(fused.module))
    single = Int8FusedLinear(nn.Linear(32, 8))
    x = torch.randn(5, 32)
    assert torch.equal(copy.deepcopy(single)(x), single(x))


def test_group_needs_two_members_of_one_width():
    parent = nn.Module()
    parent.query, parent.key = Int8FusedLinear(nn.Linear(16, 8)), Int8FusedLinear(nn.Linear(12, 8))
    parent.value = nn.Linear(16, 8)
    assert fuse_int8(parent) == 0 and parent.query._group is None
    assert isinstance(FusedInt8Group([parent.query]), FusedInt8Group)  # one member is allowed, just never formed
