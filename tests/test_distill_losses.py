"""Distillation losses and tap recording, checked against plain numpy formulas and invariants.

Numpy references are written from the formulas in the docstrings (float64),
independently of the torch code: cosine and FSP per valid position, adaptive
pooling by block means (the test sizes divide evenly).
"""

import math

import numpy as np
import pytest
import torch

from lamina import testing as lt
from lamina.distill import (Adapter, CenterLoss, LossWeights, ce_loss, cosine_loss, fsp_loss, fsp_matrix, kd_loss,
                            make_adapters, record, total_loss)
from lamina.errors import UsageError

EPS_NORM = 1e-5  # the instance-norm epsilon documented in fsp_matrix (as nn.InstanceNorm)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- numpy references ---------------------------------------------------------------------------------------------

def np_adapt(adapter, x):
    w = adapter.proj.weight.detach().double().numpy()
    b = adapter.proj.bias.detach().double().numpy()
    if adapter.kind == "conv":
        return np.einsum("oc,bchw->bohw", w[:, :, 0, 0], x) + b[None, :, None, None]
    return x @ w.T + b


def np_pool(x, h, w):
    b, c, hh, ww = x.shape
    return x.reshape(b, c, h, hh // h, w, ww // w).mean(axis=(3, 5))


def np_common(a, b):
    if a.ndim == 4 and a.shape[2:] != b.shape[2:]:
        h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
        return np_pool(a, h, w), np_pool(b, h, w)
    return a, b


def np_positions(x):
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1) if x.ndim == 4 else x


def np_cosine(teacher, student, lens=None):
    total = 0.0
    for t, s in zip(teacher, student):
        t, s = (np_positions(v) for v in np_common(t, s))
        gaps = []
        for b in range(t.shape[0]):
            n = t.shape[1] if lens is None or t.ndim != 3 else lens[b]
            for p in range(n):
                cos = t[b, p] @ s[b, p] / (np.linalg.norm(t[b, p]) * np.linalg.norm(s[b, p]))
                gaps.append(1 - cos)
        total += np.mean(gaps)
    return total


def np_fsp_matrix(fi, fj, lens=None):
    fi, fj = (np_positions(v) for v in np_common(fi, fj))
    out = []
    for b in range(fi.shape[0]):
        n = fi.shape[1] if lens is None else lens[b]
        a, c = fi[b, :n], fj[b, :n]
        a = (a - a.mean(0)) / np.sqrt(a.var(0) + EPS_NORM)
        c = (c - c.mean(0)) / np.sqrt(c.var(0) + EPS_NORM)
        out.append(a.T @ c / n)
    return np.stack(out)


def np_fsp(teacher, student, lens=None):
    total = 0.0
    for i in range(len(teacher)):
        for j in range(i + 1, len(teacher)):
            d = np_fsp_matrix(teacher[i], teacher[j], lens) - np_fsp_matrix(student[i], student[j], lens)
            total += np.mean(d ** 2)
    return total


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# ---- fixtures: token features with padding, CNN maps of several resolutions -------------------------------------

LENS = np.array([5, 3, 1])


def token_case():
    """Two taps of (3, 5, 8) teacher tokens, student widths 4 and 6; padded positions hold huge junk."""
    mask = torch.arange(5)[None, :] < torch.tensor(LENS)[:, None]
    teacher = [_randn(3, 5, 8, seed=1), _randn(3, 5, 8, seed=2)]
    student = [_randn(3, 5, 4, seed=3), _randn(3, 5, 6, seed=4)]
    for f in teacher + student:  # must not leak into any loss
        f[~mask] = 1e3 * _randn(int((~mask).sum()), f.shape[-1], seed=5)
    torch.manual_seed(0)
    return teacher, student, make_adapters(student, teacher), mask


def map_case():
    """Teacher maps 8x8 (8 ch) and 4x4 (16 ch); student 4x4 (4 ch) and 2x2 (8 ch): widths and resolutions differ."""
    teacher = [_randn(2, 8, 8, 8, seed=6), _randn(2, 16, 4, 4, seed=7)]
    student = [_randn(2, 4, 4, 4, seed=8), _randn(2, 8, 2, 2, seed=9)]
    torch.manual_seed(0)
    return teacher, student, make_adapters(student, teacher)


def np_adapted(adapters, student):
    return [np_adapt(a, s.double().numpy()) for a, s in zip(adapters, student)]


def np_feats(feats):
    return [f.double().numpy() for f in feats]


# ---- formulas -----------------------------------------------------------------------------------------------------

def test_cosine_loss_matches_numpy_on_padded_tokens():
    teacher, student, adapters, mask = token_case()
    got = cosine_loss(teacher, student, adapters, mask)
    want = np_cosine(np_feats(teacher), np_adapted(adapters, student), LENS)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # one mask per tap is the same as one shared mask
    assert cosine_loss(teacher, student, adapters, [mask, mask]).item() == pytest.approx(got.item(), rel=1e-6)


def test_cosine_loss_matches_numpy_on_maps_of_other_width_and_resolution():
    teacher, student, adapters = map_case()
    got = cosine_loss(teacher, student, adapters)
    want = np_cosine(np_feats(teacher), np_adapted(adapters, student))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_fsp_matrix_matches_numpy_and_is_a_correlation():
    teacher, _, _, mask = token_case()
    got = fsp_matrix(teacher[0], teacher[1], mask)
    want = np_fsp_matrix(*np_feats(teacher), LENS)  # the one-token sample normalizes to 0: its matrix is 0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    assert got.shape == (3, 8, 8)
    diag = fsp_matrix(teacher[0], teacher[0], mask)[:2].diagonal(dim1=1, dim2=2)
    np.testing.assert_allclose(diag.numpy(), 1.0, atol=1e-3)  # a channel correlates fully with itself


def test_fsp_loss_matches_numpy_on_padded_tokens():
    teacher, student, adapters, mask = token_case()
    got = fsp_loss(teacher, student, adapters, mask)
    want = np_fsp(np_feats(teacher), np_adapted(adapters, student), LENS)
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_fsp_loss_matches_numpy_on_maps_pooled_to_the_smaller_resolution():
    teacher, student, adapters = map_case()
    teacher.append(_randn(2, 4, 2, 2, seed=10))  # a third tap: three pairs, pooled 8x8->2x2 too
    student.append(_randn(2, 4, 2, 2, seed=11))
    adapters.append(None)  # widths already equal: no adapter for this tap
    got = fsp_loss(teacher, student, adapters)
    want = np_fsp(np_feats(teacher), np_adapted(adapters[:2], student[:2]) + [student[2].double().numpy()])
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_kd_loss_matches_numpy_kl():
    s, t, tau = _randn(6, 5, seed=1), 3 * _randn(6, 5, seed=2), 2.5
    pt, ps = np_softmax(t.double().numpy() / tau), np_softmax(s.double().numpy() / tau)
    want = tau ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
    assert kd_loss(s, t, tau).item() == pytest.approx(want, rel=1e-5)


def test_ce_loss_matches_numpy():
    z, y = _randn(6, 4, seed=3), torch.tensor([0, 1, 2, 3, 0, 1])
    want = -np.mean(np.log(np_softmax(z.double().numpy())[np.arange(6), y.numpy()]))
    assert ce_loss(z, y).item() == pytest.approx(want, rel=1e-5)


def test_center_loss_matches_numpy():
    torch.manual_seed(0)
    loss = CenterLoss(n_classes=3, dim=4, alpha=0.2)
    x, y = _randn(5, 4, seed=4), torch.tensor([0, 2, 1, 1, 0])
    c, xn = loss.centers.detach().double().numpy(), x.double().numpy()
    d = ((xn[:, None, :] - c[None]) ** 2).sum(-1)  # (B, K)
    own = d[np.arange(5), y.numpy()]
    want = np.mean(0.2 / 2 * own / (d.sum(1) - own + 1))
    assert loss(x, y).item() == pytest.approx(want, rel=1e-5)


# ---- invariants ---------------------------------------------------------------------------------------------------

def test_every_distillation_loss_is_zero_when_the_student_is_the_teacher():
    teacher, _, _, mask = token_case()
    maps, _, _ = map_case()
    logits = _randn(3, 4, seed=7)
    for feats, m in ((teacher, mask), (maps, None)):
        ads = make_adapters(feats, feats)  # equal widths: identity adapters
        assert cosine_loss(feats, feats, ads, m).item() == pytest.approx(0, abs=1e-6)
        assert fsp_loss(feats, feats, ads, m).item() == pytest.approx(0, abs=1e-8)
    assert kd_loss(logits, logits, 2.0).item() == pytest.approx(0, abs=1e-7)
    total, parts = total_loss(LossWeights(ce=0.0), student_logits=logits, teacher_logits=logits,
                              student_feats=teacher, teacher_feats=teacher, adapters=make_adapters(teacher, teacher),
                              masks=mask)
    assert set(parts) == {"kd", "cosine", "fsp", "total"} and total.item() == pytest.approx(0, abs=1e-6)


def _two_copies_loss(model_fn, taps, inputs, weights):
    teacher, student = model_fn(), model_fn()
    with record(teacher, taps) as t_out, torch.no_grad():
        t_logits = teacher(**inputs)
    with record(student, taps) as s_out:
        s_logits = student(**inputs)
    logits = (lambda o: o.logits) if hasattr(t_logits, "logits") else (lambda o: o)
    t_feats, s_feats = [t_out[n] for n in taps], [s_out[n] for n in taps]
    return total_loss(weights, student_logits=logits(s_logits), teacher_logits=logits(t_logits),
                      student_feats=s_feats, teacher_feats=t_feats, adapters=make_adapters(s_feats, t_feats),
                      masks=inputs.get("attention_mask"))


def test_zero_loss_for_two_copies_of_a_tiny_bert():
    ids = torch.randint(4, 30, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    total, parts = _two_copies_loss(lambda: lt.tiny_hf_model("bert", head=True, seed=3),
                                    ["bert.encoder.layer.0", "bert.encoder.layer.1"],
                                    {"input_ids": ids, "attention_mask": mask}, LossWeights(ce=0.0))
    assert set(parts) == {"kd", "cosine", "fsp", "total"}
    assert max(abs(v) for v in parts.values()) < 1e-5
    total.backward()  # the student's graph is intact


def test_zero_loss_for_two_copies_of_a_tiny_cnn():
    x = _randn(2, 3, 16, 16, seed=1)
    total, parts = _two_copies_loss(lambda: lt.tiny_cnn(seed=3), ["blocks.0", "blocks.1", "blocks.3"], {"x": x},
                                    LossWeights(ce=0.0))
    assert max(abs(v) for v in parts.values()) < 1e-5


def test_gradients_reach_adapters_and_student_but_not_teacher():
    teacher, student, adapters, mask = token_case()
    teacher = [t.requires_grad_() for t in teacher]
    student = [s.requires_grad_() for s in student]
    center = CenterLoss(2, 6)
    logits = _randn(3, 2, seed=8).requires_grad_()
    weights = LossWeights(center=1.0)
    pooled = student[1][:, 0]  # (B, 6), a stand-in for the student's pooled features
    total, parts = total_loss(weights, student_logits=logits, teacher_logits=_randn(3, 2, seed=9),
                              labels=torch.tensor([0, 1, 1]), student_feats=student, teacher_feats=teacher,
                              adapters=adapters, masks=mask, center=center, center_feats=pooled)
    total.backward()
    assert parts["total"] == pytest.approx(sum(getattr(weights, k) * v for k, v in parts.items() if k != "total"),
                                           rel=1e-5)
    for p in [*adapters.parameters(), center.centers, logits, *student]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(t.grad is None for t in teacher)  # the teacher is a fixed target
    for s in student:  # padded student tokens get no gradient at all
        assert s.grad[~mask].abs().max() == 0


def test_adapters_start_as_identity_when_widths_match():
    x, m = _randn(2, 5, 8), _randn(2, 8, 3, 3)
    assert torch.equal(Adapter(8, 8, "linear")(x), x)
    assert torch.allclose(Adapter(8, 8, "conv")(m), m)
    assert Adapter(4, 8, "conv")(_randn(2, 4, 3, 3)).shape == (2, 8, 3, 3)
    ads = make_adapters([_randn(2, 5, 4), _randn(2, 4, 3, 3)], [_randn(2, 5, 8), _randn(2, 6, 3, 3)])
    assert [a.kind for a in ads] == ["linear", "conv"] and ads[1].proj.out_channels == 6
    with pytest.raises(UsageError, match="adapter kind"):
        Adapter(4, 8, "mlp")
    with pytest.raises(UsageError):
        Adapter(4, 8, "linear")(_randn(2, 4, 3, 3))  # a linear adapter must not mix a map's W axis


# ---- settings and bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(ce=-1.0), dict(kd=math.nan), dict(cosine=math.inf), dict(fsp=True),
                                 dict(center="0.5"), dict(temperature=0.0), dict(temperature=-2.0)])
def test_loss_weights_reject_bad_values(bad):
    with pytest.raises(UsageError) as err:
        LossWeights(**bad)
    (name, value), = bad.items()
    assert repr(value) in str(err.value) or str(value) in str(err.value)
    assert err.value.allowed and err.value.fix


def test_loss_weights_refuse_all_zero_and_total_loss_names_missing_inputs():
    with pytest.raises(UsageError, match="nothing would be trained"):
        LossWeights(ce=0, kd=0, cosine=0, fsp=0, center=0)
    with pytest.raises(UsageError, match="teacher_logits") as err:
        total_loss(LossWeights(cosine=0, fsp=0), student_logits=_randn(2, 3), labels=torch.tensor([0, 1]))
    assert "LossWeights(kd=0)" in err.value.fix


def test_zero_weights_skip_their_loss_entirely():
    # fsp would refuse a single tap; with its weight 0 it is never called
    feats = [_randn(2, 4, 8)]
    total, parts = total_loss(LossWeights(ce=0, kd=0, fsp=0), student_feats=feats, teacher_feats=feats)
    assert set(parts) == {"cosine", "total"}
    with pytest.raises(UsageError, match="pairs of taps"):
        fsp_loss(feats, feats)


def test_shape_mistakes_are_usage_errors():
    teacher, student, _, mask = token_case()
    with pytest.raises(UsageError, match="make_adapters"):
        cosine_loss(teacher, student)  # widths differ and no adapters
    with pytest.raises(UsageError, match="same, non-zero number of taps"):
        cosine_loss(teacher, student[:1])
    with pytest.raises(UsageError, match="mask"):
        cosine_loss(teacher, teacher, masks=mask[:, :3])
    with pytest.raises(UsageError, match="temperature"):
        kd_loss(_randn(2, 3), _randn(2, 3), 0)


# ---- taps.record --------------------------------------------------------------------------------------------------

def _hooks(model):
    return {(n, kind, k) for n, m in model.named_modules()
            for kind, d in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for k in d}


def _warm_bert():
    """A tiny BERT after one forward: transformers adds its own output-recording hooks on the first one."""
    model = lt.tiny_hf_model("bert")
    model(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    return model, _hooks(model)


def test_record_equals_hidden_states_and_keeps_autograd():
    model, before = _warm_bert()
    ids = torch.randint(4, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    names = ["encoder.layer.0", "encoder.layer.1"]
    with record(model, names) as out:
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert list(out) == names
        for i, name in enumerate(names):
            assert torch.equal(out[name], ref[i + 1])
            assert out[name].requires_grad  # not detached: the student trains through it
        out["stale"] = None
        model(input_ids=ids[:1], attention_mask=mask[:1])
        assert set(out) == set(names) and out[names[0]].shape[0] == 1  # cleared per forward
    assert _hooks(model) == before


def test_record_removes_hooks_after_an_error_and_suggests_names():
    model, before = _warm_bert()
    with pytest.raises(RuntimeError, match="boom"):
        with record(model, "encoder.layer.1"):
            raise RuntimeError("boom")
    assert _hooks(model) == before
    with pytest.raises(UsageError, match="encoder.layer.0"):
        with record(model, ["encoder.layers.0"]):
            pass
    assert _hooks(model) == before
