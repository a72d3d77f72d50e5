"""Elastic models: ordering keeps the function (BERT, GQA Llama, MBConv CNN); every member extracted equals its
in-family forward and reloads; the full budget is the parent exactly; a step of the full member alone is a
plain distill step; a resumed run ends with the same weights; the selector picks by parameters and latency;
bad input exits 2 with a message."""

import copy
import json

import pytest
import torch

from lamina import UsageError
from lamina import testing as lt
from lamina.cli import main
from lamina.elastic import (Budget, ElasticConfig, ExtractConfig, Family, Grid, block_order, elastic,
                            elastic_extract, order_, sandwich_loss)
from lamina.elastic.select import pareto, pick
from lamina.models import load_model, wrap_module
from conftest import die_in_epoch
from test_channels import tiny_mbconv


def _text_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # padding must not matter to ordering
    return {"input_ids": ids, "attention_mask": mask}


def _out(lm, batch):
    with torch.no_grad():
        y = lm.forward(batch)
    return getattr(y, "logits", y)


def _models():
    return {
        "bert": (wrap_module(lt.tiny_hf_model("bert", layers=3, head=True, seed=4)), _text_batch(), {"ffn"}),
        "llama-gqa": (wrap_module(lt.tiny_causal_lm("llama", layers=3, seed=5)), _text_batch(1), {"ffn", "heads"}),
        "gpt2": (wrap_module(lt.tiny_causal_lm("gpt2", layers=2, seed=6)), _text_batch(2), {"ffn"}),
        "mbconv": (wrap_module(tiny_mbconv(), modality="image", image_size=16),
                   {"pixels": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))}, {"channels"}),
    }


@pytest.mark.parametrize("name", ["bert", "llama-gqa", "gpt2", "mbconv"])
def test_ordering_by_importance_keeps_the_function_and_sorts_every_prefix(name):
    lm, batch, axes = _models()[name]
    assert lm.module.config.num_key_value_heads == 2 if name == "llama-gqa" else True  # GQA: 4 heads, 2 groups
    before = _out(lm, batch)
    done = order_(lm.module, [batch], axes, lm.blocks.container or None)
    after = _out(lm, batch)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    assert set(done) == axes
    # scores of the ordered model are non-increasing: its prefixes are its most important units
    from lamina.compress import channel_importance, ffn_importance, head_importance
    if "ffn" in axes:
        for s in ffn_importance(lm.module, [batch]):
            assert torch.all(s[:-1] >= s[1:] - 1e-9)
    if "heads" in axes:
        for s in head_importance(lm.module, [batch]):
            g = s.view(2, -1).sum(1)
            assert g[0] >= g[1] - 1e-9
    if "channels" in axes:
        for s in channel_importance(lm.module, [batch]).values():
            assert torch.all(s[:-1] >= s[1:] - 1e-9)


@pytest.mark.parametrize("name", ["bert", "llama-gqa", "mbconv"])
def test_every_member_extracted_equals_its_in_family_forward_and_the_full_one_is_the_parent(name, tmp_path):
    lm, batch, axes = _models()[name]
    container = lm.blocks.container or None
    order_(lm.module, [batch], axes, container)
    order, _ = block_order(lm, [batch])
    n = lm.blocks.n_blocks
    grid = Grid((n, n - 1), (1.0, 0.5) if "ffn" in axes else (1.0,), (1.0, 0.5) if "heads" in axes else (1.0,),
                (1.0, 0.5) if "channels" in axes else (1.0,))
    fam = Family(lm, order, grid)
    full = fam.extract(grid.full)
    a, b = lm.module.state_dict(), full.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sizes = set()
    for budget in grid.members():
        sub = fam.extract(budget)
        n_params = sum(p.numel() for p in sub.module.parameters())
        assert n_params == fam.parameters(budget)
        sizes.add(n_params)
        torch.testing.assert_close(_out(sub, batch), fam.forward(budget, batch).__getattribute__("logits")
                                   if hasattr(fam.forward(budget, batch), "logits") else fam.forward(budget, batch))
    assert len(sizes) == len(grid.members())  # every member is a different, smaller model
    if name != "mbconv":  # the Hugging Face config describes every member: save_pretrained + from_pretrained
        sub = fam.extract(grid.smallest)
        sub.module.save_pretrained(tmp_path / "m")
        re = type(sub.module).from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(_out(wrap_module(re), batch), _out(sub, batch))


def test_shared_weights_get_the_gradients_of_a_member():
    lm, batch, axes = _models()["bert"]
    order_(lm.module, [batch], axes)
    grid = Grid((3, 2), (1.0, 0.5))
    fam = Family(lm, [1, 0, 2], grid)
    lm.module.train()
    fam.forward(Budget(2, 0.5), batch).logits.sum().backward()
    w = lm.module.bert.encoder.layer[0].intermediate.dense.weight.grad
    assert w is not None and w[:32].abs().sum() > 0 and torch.all(w[32:] == 0)  # only the kept prefix
    assert lm.module.bert.encoder.layer[1].intermediate.dense.weight.grad is None  # block 1 is dropped first


def _cfg(out, **kw):
    base = dict(out=str(out), depths="2,1", widths="1,0.5", epochs=2, lr=3e-3, batch_size=16, patience=None,
                progress=False, latency_repeats=3, calibration_samples=32)
    return ElasticConfig(**{**base, **kw})


def test_the_full_member_alone_is_a_plain_distill_step(nodrop_teacher):
    from lamina.distill.losses import LossWeights, total_loss
    from lamina.task import logits_of, make_task, read_task
    t = load_model(str(nodrop_teacher))
    parent = copy.copy(t)
    parent.module = copy.deepcopy(t.module)
    with torch.no_grad():
        for p in parent.module.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a student that differs from its teacher
    task = make_task(read_task(nodrop_teacher), t)
    rows = task.split["train"][:8]
    batch = task.batch(parent, rows)
    fam = Family(parent, [], Grid((2,)))
    cfg = _cfg("x", depths=None, widths=None, teacher_kd=0.7, ce=1.0, temperature=3.0)
    with torch.no_grad():
        t_logits = logits_of(t.forward(batch)).float()
        loss, _ = sandwich_loss(fam, task, batch, rows, [], cfg, t_logits)
        ref, _ = total_loss(LossWeights(ce=1.0, kd=0.7, temperature=3.0, cosine=0, fsp=0),
                            student_logits=logits_of(parent.forward(batch)).float(), teacher_logits=t_logits,
                            labels=task.align(t_logits, rows)[1])
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert float(loss) > 0


def test_in_place_distillation_alone_the_full_member_learns_the_task_loss(nodrop_teacher):
    """--teacher-kd 0: no teacher forward; the full member's loss is its task loss, each sub-member's its task
    loss plus KD to the full member's detached logits."""
    from lamina.distill.losses import ce_loss, kd_loss
    from lamina.task import logits_of, make_task, read_task
    parent = load_model(str(nodrop_teacher))
    task = make_task(read_task(nodrop_teacher), parent)
    rows = task.split["train"][:8]
    batch = task.batch(parent, rows)
    grid = Grid((2, 1))
    fam = Family(parent, [1], grid)
    cfg = _cfg("x", widths=None, teacher_kd=0.0, ce=1.0, kd=0.5, temperature=2.0)
    with torch.no_grad():
        full = logits_of(parent.forward(batch)).float()
        small = logits_of(fam.forward(grid.smallest, batch)).float()
        labels = task.align(full, rows)[1]
        alone, parts = sandwich_loss(fam, task, batch, rows, [], cfg, None)
        both, _ = sandwich_loss(fam, task, batch, rows, [grid.smallest], cfg, None)
    assert float(alone) == pytest.approx(float(ce_loss(full, labels)), rel=1e-6) and set(parts) == {"full"}
    ref = ce_loss(full, labels) + ce_loss(small, labels) + 0.5 * kd_loss(small, full, 2.0)
    assert float(both) == pytest.approx(float(ref), rel=1e-6)


def test_hidden_distillation_matches_each_kept_block_to_the_same_block_of_the_full_member(nodrop_teacher):
    """--hidden: cosine between the member's block outputs and the full member's outputs of the same blocks,
    checked against both models' own output_hidden_states."""
    import torch.nn.functional as F
    from lamina.task import make_task, read_task
    parent = load_model(str(nodrop_teacher))
    task = make_task(read_task(nodrop_teacher), parent)
    rows = task.split["train"][:8]
    batch = task.batch(parent, rows)
    grid = Grid((2, 1))
    fam = Family(parent, [0], grid)  # depth 1 keeps block 1: its output is compared with block 1's, not 0's
    assert fam.taps(grid.smallest) == [(fam.taps(grid.smallest)[0][0], parent.blocks.block_paths[1])]
    base = _cfg("x", widths=None, teacher_kd=0.0, kd=0.5)
    with torch.no_grad():
        plain, _ = sandwich_loss(fam, task, batch, rows, [grid.smallest], base, None)
        loss, parts = sandwich_loss(fam, task, batch, rows, [grid.smallest], _cfg("x", widths=None, teacher_kd=0.0,
                                                                                     kd=0.5, hidden=0.7), None)
        hs_full = parent.module(**batch, output_hidden_states=True).hidden_states
        hs_small = fam.extract(grid.smallest).module(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].float()
    cos = 1 - F.cosine_similarity(hs_full[2], hs_small[1], dim=-1)
    ref = float((cos * m).sum() / m.sum())
    assert ref > 1e-3 and parts["hidden"] == pytest.approx(ref, rel=1e-4)
    assert float(loss) == pytest.approx(float(plain) + 0.7 * ref, rel=1e-5)


def test_without_training_the_full_member_only_sub_members_give_gradients(nodrop_teacher):
    """--no-train-full: the loss is the sub-members' alone (the full member's forward only gives their KD target),
    so a block only the full member keeps gets no gradient; with the full member trained it does."""
    from lamina.distill.losses import ce_loss, kd_loss
    from lamina.task import make_task, read_task
    parent = load_model(str(nodrop_teacher))
    task = make_task(read_task(nodrop_teacher), parent)
    rows = task.split["train"][:8]
    batch = task.batch(parent, rows)
    grid = Grid((2, 1))
    fam = Family(parent, [1], grid)  # depth 1 drops block 1
    parent.module.train()
    block1 = parent.module.get_submodule(parent.blocks.block_paths[1])
    for train_full in (False, True):
        parent.module.zero_grad(set_to_none=True)
        cfg = _cfg("x", widths=None, teacher_kd=0.0, kd=0.5, train_full=train_full)
        loss, parts = sandwich_loss(fam, task, batch, rows, [grid.smallest], cfg, None)
        loss.backward()
        grads = [p.grad for p in block1.parameters()]
        assert all(g is None for g in grads) if not train_full else any(g is not None and g.abs().sum() > 0
                                                                         for g in grads)
        assert "full" in parts  # logged either way
    parent.module.eval()
    with torch.no_grad():
        cfg = _cfg("x", widths=None, teacher_kd=0.0, kd=0.5, train_full=False)
        loss, _ = sandwich_loss(fam, task, batch, rows, [grid.smallest], cfg, None)
        full = _out(parent, batch).float()
        small = fam.forward(grid.smallest, batch).logits.float()
        labels = task.align(full, rows)[1]
    assert float(loss) == pytest.approx(float(ce_loss(small, labels) + 0.5 * kd_loss(small, full, 2.0)), rel=1e-6)
    with pytest.raises(UsageError, match="trains the full member"):
        _cfg("x", train_full=False, teacher_kd=1.0)


def test_sub_members_can_distill_from_the_teacher_and_the_full_member_can_sit_a_step_out(nodrop_teacher):
    """--target teacher: each sub-member's KD target is the original teacher's logits and its hidden target the
    teacher's output of the same block (checked against both models' output_hidden_states); a step on which the
    full member is not trained does not run it at all, so a block only it keeps gets no gradient."""
    import torch.nn.functional as F
    from lamina.distill.losses import ce_loss, kd_loss
    from lamina.distill.taps import record
    from lamina.task import logits_of, make_task, read_task
    t = load_model(str(nodrop_teacher))
    parent = copy.copy(t)
    parent.module = copy.deepcopy(t.module)
    with torch.no_grad():
        for p in parent.module.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(3)))  # not the teacher
    task = make_task(read_task(nodrop_teacher), t)
    rows = task.split["train"][:8]
    batch = task.batch(parent, rows)
    grid = Grid((2, 1))
    fam = Family(parent, [0], grid)  # depth 1 keeps block 1
    cfg = _cfg("x", widths=None, teacher_kd=0.0, kd=0.5, hidden=0.7, target="teacher", train_full=False)
    with torch.no_grad(), record(t.module, t.blocks.block_paths) as feats:
        t_logits = logits_of(t.forward(batch)).float()
    fam.module(grid.smallest)  # built first: a deep copy of the parent would carry the hook below
    calls = []
    hook = parent.module.register_forward_pre_hook(lambda *_: calls.append(1))
    parent.module.train()
    loss, parts = sandwich_loss(fam, task, batch, rows, [grid.smallest], cfg, t_logits, False, dict(feats))
    hook.remove()
    assert not calls and set(parts) == {"members", "hidden"}  # the full member was not run
    loss.backward()
    block0 = parent.module.get_submodule(parent.blocks.block_paths[0])
    assert all(p.grad is None for p in block0.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in parent.module.get_submodule(parent.blocks.block_paths[1]).parameters())
    parent.module.eval()
    with torch.no_grad():
        loss, parts = sandwich_loss(fam, task, batch, rows, [grid.smallest], cfg, t_logits, False, dict(feats))
        hs_t = t.module(**batch, output_hidden_states=True).hidden_states
        small = fam.extract(grid.smallest).module(**batch, output_hidden_states=True)
    labels = task.align(t_logits, rows)[1]
    m = batch["attention_mask"].float()
    cos = float(((1 - F.cosine_similarity(hs_t[2], small.hidden_states[1], dim=-1)) * m).sum() / m.sum())
    ref = ce_loss(small.logits, labels) + 0.5 * kd_loss(small.logits, t_logits, 2.0) + 0.7 * cos
    assert cos > 1e-4 and float(loss) == pytest.approx(float(ref), rel=1e-5)
    # trained this step: the full member's own loss is added, the sub-member's target is still the teacher's
    with torch.no_grad():
        both, parts = sandwich_loss(fam, task, batch, rows, [grid.smallest], _cfg(
            "x", widths=None, teacher_kd=0.0, kd=0.5, hidden=0.7, target="teacher"), t_logits, True, dict(feats))
        full = logits_of(parent.forward(batch)).float()
    assert "full" in parts and float(both) == pytest.approx(float(ref + ce_loss(full, labels)), rel=1e-5)


def test_the_full_member_is_trained_on_the_drawn_fraction_of_the_steps():
    from lamina.elastic.train import full_now
    cfg = _cfg("x", full_fraction=0.25)
    picks = [full_now(cfg, [r, r + 1]) for r in range(0, 4000, 2)]
    assert abs(sum(picks) / len(picks) - 0.25) < 0.04  # about the fraction asked
    assert picks == [full_now(cfg, [r, r + 1]) for r in range(0, 4000, 2)]  # the same rows decide the same
    assert all(full_now(_cfg("x"), [r]) for r in range(50))
    assert not any(full_now(_cfg("x", train_full=False, teacher_kd=0.0), [r]) for r in range(50))
    for bad in (0, 1.5, -0.1):
        with pytest.raises(UsageError, match="full.fraction"):
            _cfg("x", full_fraction=bad)
    with pytest.raises(UsageError, match="never does"):
        _cfg("x", full_fraction=0.5, train_full=False, teacher_kd=0.0)
    with pytest.raises(UsageError, match="target"):
        _cfg("x", target="parent")


def test_a_member_runs_on_the_parents_own_tensors_where_it_keeps_them_whole():
    """Depth-only cuts keep whole tensors: the member's forward gets the parent's Parameters themselves (no
    slice, so no scatter of the gradient into a zero tensor of the parent's size); width cuts get prefix views
    of the same storage; the forward equals the extracted member's."""
    lm, batch, axes = _models()["bert"]
    fam = Family(lm, [1, 0, 2], Grid((3, 2), (1.0, 0.5)))
    own = dict(lm.module.named_parameters())
    _, names = fam._skeleton(Budget(2, 1.0))
    t = fam.tensors(Budget(2, 1.0))
    assert all(t[k] is own[names[k]] for k in t if names[k] in own)
    w = fam.tensors(Budget(2, 0.5))
    _, wn = fam._skeleton(Budget(2, 0.5))
    sliced = [k for k in w if names.get(k) in own and w[k].shape != own[wn[k]].shape]
    assert sliced and all(w[k].data_ptr() == own[wn[k]].data_ptr() for k in sliced)
    for b in (Budget(2, 1.0), Budget(2, 0.5)):
        torch.testing.assert_close(_out(fam.extract(b), batch), fam.forward(b, batch).logits)


@pytest.mark.slow
def test_elastic_end_to_end_extract_and_select(tmp_path, nodrop_teacher, capsys):
    e = tmp_path / "E"
    assert main(["elastic", "--teacher", str(nodrop_teacher), "--out", str(e), "--depths", "2,1", "--widths",
                 "1,0.5", "--sampled", "1", "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--no-progress",
                 "--latency-repeats", "3", "--calibration-samples", "32"]) == 0
    assert "pareto" in capsys.readouterr().out
    rec = json.loads((e / "elastic.json").read_text())
    assert rec["grid"] == {"depths": [2, 1], "widths": [1.0, 0.5], "heads": [1.0], "channels": [1.0]}
    assert sorted(rec["block_order"]) == [0, 1] and rec["metric"] == "accuracy"
    assert len(rec["members"]) == 4 and any(m["pareto"] for m in rec["members"])
    for m in rec["members"]:
        assert {"depth", "ffn", "heads", "channels", "parameters", "latency_ms", "latency_batch", "metric",
                "val_metric", "pareto"} <= set(m)
        assert m["latency_ms"] > 0 and 0 <= m["val_metric"] <= 1
    assert rec["members"][0]["parameters"] == rec["teacher"]["parameters"]
    assert rec["training"]["steps"] == 2 * rec["history"]["steps_per_epoch"] and rec["training"]["flops"] > 0
    assert rec["training"]["members_per_step"] == 3  # full + smallest + 1 sampled
    parent = load_model(str(e))
    # full budget: the trained parent, exactly
    res = elastic_extract(str(e), ExtractConfig(out=str(tmp_path / "full")))
    a, b = parent.module.state_dict(), load_model(res.path).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a smaller member reloads with from_pretrained and equals the in-family forward
    assert main(["elastic", "extract", str(e), "--out", str(tmp_path / "m"), "--depth", "1", "--ffn", "0.5"]) == 0
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m" / "model").eval()
    fam = Family(parent, rec["block_order"], Grid.from_dict(rec["grid"]))
    from lamina.task import make_task, read_task
    task = make_task(read_task(tmp_path / "m"), parent)  # the extracted member knows the teacher's task
    assert read_task(tmp_path / "m" / "model") == read_task(tmp_path / "m")  # `lamina bench M/model` too
    batch = task.batch(parent, task.split["test"][:8])
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, fam.forward(Budget(1, 0.5), batch).logits)
    # the selector: by parameters and by measured latency
    half = elastic_extract(str(e), ExtractConfig(out=str(tmp_path / "p"), params=0.75))
    assert half.parameters <= 0.75 * rec["members"][0]["parameters"]
    fastest = min(rec["members"], key=lambda m: m["latency_ms"])
    lat = elastic_extract(str(e), ExtractConfig(out=str(tmp_path / "l"), latency_ms=fastest["latency_ms"]))
    chosen = [m for m in rec["members"] if m["latency_ms"] <= fastest["latency_ms"]]
    assert lat.record["measured_in_family"]["val_metric"] == max(m["val_metric"] for m in chosen)
    # bad input: a budget outside the trained grid, an unreachable latency
    assert main(["elastic", "extract", str(e), "--out", str(tmp_path / "x"), "--ffn", "0.25"]) == 2
    assert "not in the trained budget grid" in capsys.readouterr().err
    assert main(["elastic", "extract", str(e), "--out", str(tmp_path / "y"), "--latency-ms", "1e-9"]) == 2
    assert "fastest member" in capsys.readouterr().err
    # a damaged elastic.json is a message, not a traceback
    bad = json.loads((e / "elastic.json").read_text())
    del bad["members"][1]["parameters"]
    (e / "elastic.json").write_text(json.dumps(bad))
    assert main(["elastic", "extract", str(e), "--out", str(tmp_path / "z"), "--params", "0.8"]) == 2
    assert "incomplete or damaged" in capsys.readouterr().err


@pytest.mark.slow
def test_best_on_members_keeps_the_epoch_best_for_the_pooled_grid(tmp_path, nodrop_teacher):
    """--best-on members: each epoch's validation accuracy is every member's, pooled; checked against the
    selector's own scoring of each extracted member on the same rows, after the kept epoch is restored."""
    e = tmp_path / "E"
    rec = elastic(str(nodrop_teacher), ElasticConfig(out=str(e), depths="2,1", widths="1,0.5", sampled=1, epochs=2,
                                                     lr=3e-3, batch_size=16, patience=None, best_on="members",
                                                     progress=False, latency_repeats=1,
                                                     calibration_samples=32)).record
    hist = rec["history"]
    pooled = sum(m["val_metric"] for m in rec["members"]) / len(rec["members"])
    assert len(rec["members"]) == 4 and hist["best_val_accuracy"] == pytest.approx(pooled, abs=1e-9)
    assert hist["best_val_accuracy"] == max(ep["val_accuracy"] for ep in hist["epochs"])
    assert rec["training"]["best_on"] == "members"
    with pytest.raises(UsageError, match="best.on must be"):
        ElasticConfig(out="x", best_on="smallest")
    # the default: the pooled grid when the full member is not trained (its score alone says little), else the full
    assert ElasticConfig(out="x", train_full=False, teacher_kd=0).picks_on() == "members"
    assert ElasticConfig(out="x").picks_on() == "full"
    assert ElasticConfig(out="x", train_full=False, teacher_kd=0, best_on="full").picks_on() == "full"


def test_max_steps_stops_part_way_and_the_cost_counts_the_rows_trained(tmp_path, nodrop_teacher):
    """--max-steps between whole epochs: the last epoch stops part-way, and the recorded steps, rows and FLOPs
    are what ran (the cost a budget comparison reads), not whole epochs."""
    rec = elastic(str(nodrop_teacher), ElasticConfig(out=str(tmp_path / "E"), depths="2,1", sampled=0, epochs=1,
                                                     max_steps=3, batch_size=100, patience=None, progress=False,
                                                     latency_repeats=1, calibration_samples=32)).record
    hist, tr = rec["history"], rec["training"]
    spe, n = hist["steps_per_epoch"], rec["train_rows"]
    assert spe == 2 and len(hist["epochs"]) == 2  # 3 steps of 2 an epoch: the second epoch stops after one
    assert [e["steps"] for e in hist["epochs"]] == [2, 1] and tr["steps"] == 3
    assert tr["rows"] == n + 100 == sum(e["rows"] for e in hist["epochs"])
    assert tr["flops"] == pytest.approx(tr["rows"] * tr["flops_per_row"]["step_expected"])


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_weights(tmp_path, nodrop_teacher, monkeypatch):
    ref = elastic(str(nodrop_teacher), _cfg(tmp_path / "ref", epochs=3))
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        elastic(str(nodrop_teacher), _cfg(tmp_path / "cut", epochs=3))
    restore()
    res = elastic(str(nodrop_teacher), _cfg(tmp_path / "cut", epochs=3, resume=True))
    a, b = load_model(ref.model_path).module.state_dict(), load_model(res.model_path).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert res.record["training"]["resumed_from"] == 0


@pytest.mark.slow
def test_a_decoder_lm_with_grouped_query_attention(tmp_path):
    texts, _ = lt.tiny_sentences(80, seed=2)
    (tmp_path / "d.txt").write_text("\n".join(texts))
    t = lt.save_tiny_causal_lm(tmp_path / "teacher", layers=3)
    res = elastic(str(t), _cfg(tmp_path / "E", data=str(tmp_path / "d.txt"), seq_len=8, depths="3,2",
                               widths="1,0.5", heads="1,0.5", epochs=1, batch_size=8, lr=1e-3))
    assert res.record["metric"] == "perplexity" and len(res.members) == 8
    assert all(m["val_metric"] > 1 for m in res.members)
    out = elastic_extract(res.out, ExtractConfig(out=str(tmp_path / "m"), depth=2, ffn=0.5, heads=0.5))
    from transformers import AutoModelForCausalLM
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "model").config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (2, 32, 2, 1)
    assert out.record["reload_check"]["ok"]


def test_bad_input(tmp_path, nodrop_teacher, sentences_csv, capsys):
    base = ["elastic", "--teacher", str(nodrop_teacher), "--no-progress", "--epochs", "1"]
    # an empty grid axis
    assert main(base + ["--out", str(tmp_path / "a"), "--widths", ""]) == 2
    assert "empty" in capsys.readouterr().err
    # more blocks than the teacher has
    assert main(base + ["--out", str(tmp_path / "b"), "--depths", "5,1"]) == 2
    # --no-train-full with the teacher's KD (which trains the full member), or with no sub-member to train
    assert main(base + ["--out", str(tmp_path / "b2"), "--depths", "2,1", "--no-train-full"]) == 2
    assert "--teacher-kd 0" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b3"), "--no-train-full", "--teacher-kd", "0"]) == 2
    assert "has none" in capsys.readouterr().err and not (tmp_path / "b3").exists()
    assert main(base + ["--out", str(tmp_path / "b4"), "--hidden", "-1"]) == 2
    # heads of a BERT: its config cannot express fewer heads of the same size
    assert main(base + ["--out", str(tmp_path / "c"), "--heads", "1,0.5"]) == 2
    assert "Llama" in capsys.readouterr().err
    # a teacher that is neither a classifier nor an LM
    lt.tiny_hf_model("bert").save_pretrained(tmp_path / "bare")
    lt.tiny_tokenizer().save_pretrained(tmp_path / "bare")
    assert main(["elastic", "--teacher", str(tmp_path / "bare"), "--data", str(sentences_csv), "--out",
                 str(tmp_path / "d"), "--no-progress"]) == 2
    assert "neither a classifier nor a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    # a head fraction that does not keep whole KV groups (2 groups: 0.75 is 1.5 of them)
    t = lt.save_tiny_causal_lm(tmp_path / "lm", layers=2)
    texts, _ = lt.tiny_sentences(40, seed=1)
    (tmp_path / "d.txt").write_text("\n".join(texts))
    assert main(["elastic", "--teacher", str(t), "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "e"),
                 "--heads", "1,0.75", "--no-progress"]) == 2
    assert "whole number of key-value groups" in capsys.readouterr().err
    # not an elastic folder
    assert main(["elastic", "extract", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "lamina elastic extract: error: not a `lamina elastic` folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --help: the usage line shows the nested spelling users type
        main(["elastic", "extract", "--help"])
    assert capsys.readouterr().out.startswith("usage: lamina elastic extract ")
    # two ways of naming the budget
    with pytest.raises(UsageError):
        ExtractConfig(out="x", depth=1, params=0.5)


def test_pareto_and_pick_rules():
    ms = [{"depth": 2, "ffn": 1.0, "heads": 1.0, "channels": 1.0, "parameters": 100, "val_metric": 0.9,
           "latency_ms": 10.0},
          {"depth": 1, "ffn": 1.0, "heads": 1.0, "channels": 1.0, "parameters": 60, "val_metric": 0.8,
           "latency_ms": 5.0},
          {"depth": 2, "ffn": 0.5, "heads": 1.0, "channels": 1.0, "parameters": 70, "val_metric": 0.7,
           "latency_ms": 6.0}]
    assert pareto(ms, True) == [True, True, False]
    assert pick(ms, True, latency_ms=6.5)["parameters"] == 60
    assert pick(ms, True, params=0.7)["parameters"] == 60
    with pytest.raises(UsageError):
        pick(ms, True, params=0.5)
    # perplexity: lower is better
    assert pareto([{**m, "val_metric": 10 - m["val_metric"]} for m in ms], False) == [True, True, False]


@pytest.mark.slow
def test_a_cnn_with_batchnorm_channels_and_depth(tmp_path, capsys):
    import numpy as np
    from test_channels import FACTORY
    ds = lt.tiny_image_dataset(60, size=16, classes=3)
    np.savez(tmp_path / "imgs.npz", x=ds.inputs, y=ds.labels)
    e = tmp_path / "E"
    assert main(["elastic", "--teacher", FACTORY, "--data", str(tmp_path / "imgs.npz"), "--out", str(e),
                 "--depths", "4,3", "--channels", "1,0.5", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3",
                 "--no-progress", "--latency-repeats", "2", "--calibration-samples", "16"]) == 0, \
        capsys.readouterr().err
    rec = json.loads((e / "elastic.json").read_text())
    assert 1 not in rec["block_order"]  # the stride-2 block changes the resolution: it never goes
    assert len(rec["members"]) == 4
    parent = rec["members"][0]["parameters"]
    assert all(m["parameters"] < parent for m in rec["members"][1:])
    assert main(["elastic", "extract", str(e), "--out", str(tmp_path / "m"), "--depth", "3", "--channels", "0.5",
                 "--trust-code"]) == 0, capsys.readouterr().err
    x = json.loads((tmp_path / "m" / "extract.json").read_text())
    assert x["format"] == "lamina" and x["bn_recalibrated"] and x["reload_check"]["ok"]
    assert x["parameters"] == next(m["parameters"] for m in rec["members"] if m["depth"] == 3 and m["channels"] == 0.5)


@pytest.mark.slow
def test_two_torchrun_ranks_follow_one_rank(tmp_path, nodrop_teacher, one_and_two_ranks):
    common = ["elastic", "--teacher", str(nodrop_teacher), "--depths", "2,1", "--widths", "1,0.5", "--sampled", "1",
              "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--latency-repeats", "1",
              "--calibration-samples", "16", "--teacher-kd", "0.5"]
    one, two = one_and_two_ranks(common, tmp_path)
    a = json.loads((one / "elastic.json").read_text())
    b = json.loads((two / "elastic.json").read_text())
    assert b["history"]["world_size"] == 2 and a["history"]["world_size"] == 1
    for k in ("loss", "full", "members"):
        assert b["history"]["epochs"][0]["train"][k] == pytest.approx(a["history"]["epochs"][0]["train"][k],
                                                                      rel=2e-3, abs=1e-5), k


def test_configs_are_frozen_dataclasses_or_dicts():
    with pytest.raises(TypeError, match=r"elastic\(\) takes its settings as a ElasticConfig"):
        elastic("teacher/", 0.5)
    with pytest.raises(TypeError, match=r"elastic_extract\(\) takes its settings as a ExtractConfig"):
        elastic_extract("E/", ["out"])
    with pytest.raises(UsageError, match="ElasticConfig has no setting 'width'"):
        elastic("teacher/", {"out": "x", "width": "1,0.5"})
    with pytest.raises(UsageError, match="widths takes kept fractions"):
        ElasticConfig(out="x", widths="1,1.5")
    with pytest.raises(UsageError, match="depths must be a comma-separated list of integers"):
        ElasticConfig(out="x", depths="6,four")
    assert ElasticConfig(out="x", depths=(6, 4), widths=[1, 0.5]).depths == (6, 4)  # Python lists work too
    from dataclasses import FrozenInstanceError
    with pytest.raises(FrozenInstanceError):
        ElasticConfig(out="x").sampled = 3
