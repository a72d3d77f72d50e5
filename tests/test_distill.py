"""`lamina distill` end to end: a student equal to its teacher has zero distillation loss; a pruned
student learns from its own original blocks (plan.json) and saves as a normal model; two torchrun ranks
follow one rank's loss curve; a resumed run ends where an uninterrupted one does; narrow copies keep the
teacher's most important channels; bad input exits 2."""

import json

import pytest
import torch

from lamina import UsageError
from lamina.cli import main
from lamina.compress import PruneConfig, prune
from lamina.distill import DistillConfig, distill, layer_map
from lamina.models import load_model, wrap_module
from conftest import die_in_epoch, make_text_run


def _cfg(out, **kw):
    base = dict(out=str(out), epochs=2, lr=3e-3, batch_size=16, patience=None, progress=False)
    return DistillConfig(**{**base, **kw})


def test_student_equal_to_teacher_has_zero_distillation_loss(tmp_path, nodrop_teacher):
    res = distill(nodrop_teacher, nodrop_teacher / "model", _cfg(tmp_path / "d", epochs=1, lr=1e-12))
    first = res.record["history"]["epochs"][0]["train"]
    for part in ("kd", "cosine", "fsp"):
        assert abs(first[part]) < 1e-6, (part, first[part])
    assert res.record["layer_map_source"] == "identity"
    assert res.accuracy_retained == pytest.approx(1.0)


@pytest.fixture(scope="module")
def pruned_student(tmp_path_factory, nodrop_teacher):
    root = tmp_path_factory.mktemp("student")
    run, _ = make_text_run(root, nodrop_teacher, 60, seed=2, control=False, importance_samples=16)
    prune(str(nodrop_teacher), str(run / "scores.json"), PruneConfig(out=str(root / "small"), drop_blocks=0.5))
    return root / "small"


def test_pruned_student_learns_from_its_own_blocks_and_saves(tmp_path, nodrop_teacher, pruned_student, capsys):
    plan = json.loads((pruned_student / "plan.json").read_text())
    kept = [i for i in range(2) if f"blocks.{i}" not in plan["depth"]["remove"]]
    out = tmp_path / "rec"
    assert main(["distill", "--teacher", str(nodrop_teacher), "--student", str(pruned_student), "--out", str(out),
                 "--epochs", "3", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--center", "0.1"]) == 0
    assert "retained" in capsys.readouterr().out
    rec = json.loads((out / "distill.json").read_text())
    assert rec["layer_map"] == {"0": kept[0]} and rec["layer_map_source"] == "plan"
    assert rec["taps"]["teacher"] == [f"bert.encoder.layer.{kept[0]}"]
    assert "fsp weight set to 0" in rec["notes"][0]  # one mapped block: no pair of taps
    assert {"ce", "kd", "cosine", "center"} <= set(rec["history"]["epochs"][0]["train"])
    assert len(rec["history"]["epochs"]) == 3 and rec["test"]["n"] == 48
    assert rec["accuracy_retained"] == pytest.approx(rec["test"]["accuracy"] / rec["teacher_test"]["accuracy"])
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert hf.config.num_hidden_layers == 1
    # bench follows distill.json back to the teacher's task
    from lamina.task import read_task
    assert read_task(out) == read_task(nodrop_teacher)


def test_layer_map_rules():
    assert layer_map(6, 3, None, None) == ({0: 1, 1: 3, 2: 5}, "even")
    assert layer_map(4, 4, None, None)[1] == "identity"
    assert layer_map(6, 3, None, "0:0,1:2,2:4") == ({0: 0, 1: 2, 2: 4}, "custom")
    with pytest.raises(UsageError, match="do not exist"):
        layer_map(6, 3, None, "0:6")


def test_two_ranks_follow_one_rank(tmp_path, nodrop_teacher, pruned_student, one_and_two_ranks):
    common = ["distill", "--teacher", str(nodrop_teacher), "--student", str(pruned_student), "--epochs", "2",
              "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--patience", "5"]
    one, two = one_and_two_ranks(common, tmp_path)
    a = json.loads((one / "distill.json").read_text())["history"]
    b = json.loads((two / "distill.json").read_text())["history"]
    assert b["world_size"] == 2 and a["world_size"] == 1
    for ea, eb in zip(a["epochs"], b["epochs"]):
        for k in ("loss", "ce", "kd"):
            assert eb["train"][k] == pytest.approx(ea["train"][k], rel=2e-3, abs=1e-5), k
        # the cosine loss averages over a shard's valid tokens, so shards weight tokens slightly differently
        assert eb["train"]["cosine"] == pytest.approx(ea["train"]["cosine"], rel=0.05)
        assert eb["val_accuracy"] == pytest.approx(ea["val_accuracy"], abs=1 / 24 + 1e-9)


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path, nodrop_teacher, pruned_student, monkeypatch):
    ref = distill(nodrop_teacher, pruned_student, _cfg(tmp_path / "ref", epochs=3))
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        distill(nodrop_teacher, pruned_student, _cfg(tmp_path / "cut", epochs=3))
    restore()
    res = distill(nodrop_teacher, pruned_student, _cfg(tmp_path / "cut", epochs=3, resume=True))
    a, b = load_model(ref.model_path).module.state_dict(), load_model(res.model_path).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    la = [e["train"]["loss"] for e in ref.record["history"]["epochs"]]
    lb = [e["train"]["loss"] for e in res.record["history"]["epochs"]]
    assert lb == pytest.approx(la, rel=1e-6)


def test_bad_input_exits_2(tmp_path, nodrop_teacher, pruned_student, capsys):
    base = ["distill", "--teacher", str(nodrop_teacher), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2  # neither --student nor --width
    assert "exactly one" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--student", str(pruned_student), "--width", "0.5"]) == 2
    assert main(base + ["--out", str(tmp_path / "c"), "--width", "0.5"]) == 2  # BERT: no narrow copy
    assert "narrow copy" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "d"), "--student", str(pruned_student), "--kd", "-1"]) == 2
    assert main(base + ["--out", str(tmp_path / "e"), "--student", str(pruned_student), "--layer-map", "x"]) == 2
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep").write_text("mine")
    assert main(base + ["--out", str(tmp_path / "f"), "--student", str(pruned_student)]) == 2
    assert (tmp_path / "f" / "keep").read_text() == "mine"


def _effnet(num_classes=3):
    from efficientnet_lite_pytorch import EfficientNet
    torch.manual_seed(0)
    return wrap_module(EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes), modality="image",
                       image_size=32)


@pytest.mark.assets
def test_narrow_copy_keeps_the_most_important_channels(tmp_path):
    from lamina.distill.narrow import narrow_copy
    lm = _effnet()
    x = torch.randn(3, 3, 32, 32)
    calib = [{"pixels": torch.randn(8, 3, 32, 32)}]
    with torch.no_grad():
        # keeping every channel changes nothing
        assert torch.equal(narrow_copy(lm, 1.0, calib, recalibrate=False).module(x), lm.module(x))
        q = narrow_copy(lm, 0.25, calib)
        assert q.module(x).shape == (3, 3)
    n_t = sum(p.numel() for p in lm.module.parameters())
    n_s = sum(p.numel() for p in q.module.parameters())
    assert n_s < 0.1 * n_t
    assert q.module._conv_stem.out_channels == 8 and q.module._conv_head.out_channels == 320
    # the stem keeps its 8 channels of largest mean |activation|
    acts = {}

    def keep(_m, _i, o):  # returns None: the hook must not replace the output
        acts["stem"] = o.abs().mean((0, 2, 3))

    h = lm.module._bn0.register_forward_hook(keep)
    with torch.no_grad():
        lm.module(calib[0]["pixels"])
    h.remove()
    want = torch.sort(torch.argsort(acts["stem"], descending=True)[:8]).values
    torch.testing.assert_close(q.module._bn0.weight, lm.module._bn0.weight[want])
    # its BatchNorm statistics were re-estimated on the calibration batch: the stem's equal the batch's own
    pre = {}
    h = q.module._conv_stem.register_forward_hook(lambda m, i, o: pre.__setitem__("x", o.detach()) or None)
    with torch.no_grad():
        q.module(calib[0]["pixels"])
    h.remove()
    xs = pre["x"].double().numpy()
    torch.testing.assert_close(q.module._bn0.running_mean.double(), torch.from_numpy(xs.mean((0, 2, 3))),
                               rtol=1e-4, atol=1e-5)
    n = xs.shape[0] * xs.shape[2] * xs.shape[3]
    torch.testing.assert_close(q.module._bn0.running_var.double(),
                               torch.from_numpy(xs.var((0, 2, 3)) * n / (n - 1)), rtol=1e-4, atol=1e-5)
    # saved in lamina's format, it loads back to the same outputs
    from lamina.savefmt import save
    save(q, tmp_path / "narrow", lm)
    back = load_model(str(tmp_path / "narrow"))
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), q.module(x))
