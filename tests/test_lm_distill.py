"""Distilling a decoder LM (Minitron): next-token CE + KL at every position, perplexity recorded."""

import json
import math

import pytest
import torch

from lamina.distill import DistillConfig, distill
from lamina.distill.losses import kd_loss
from lamina.lm_task import LMTaskSpec
from lamina.models import load_model
from lamina.task import make_task


@pytest.fixture()
def setup(lm_pair):
    return lm_pair(80, 2)  # tmp_path: d.txt, teacher/, student/ (conftest.py)


def test_kd_of_an_lm_against_itself_is_zero_at_every_position(setup):
    lm = load_model(str(setup / "teacher"))
    task = make_task(LMTaskSpec(data=str(setup / "d.txt"), seq_len=8), lm)
    rows = task.split["train"][:4]
    with torch.no_grad():
        z = lm.forward(task.batch(lm, rows)).logits
    pred, target = task.align(z, rows)
    assert pred.shape[:2] == target.shape == (4, 7)
    assert float(kd_loss(pred, pred.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(pred, pred.flip(0), 2.0)) > 0



def _kd_by_autograd(s, t, tau):
    import torch.nn.functional as F
    k = s.shape[-1]
    ls = F.log_softmax(s.reshape(-1, k).double() / tau, -1)
    lt = F.log_softmax(t.reshape(-1, k).double() / tau, -1)
    return tau * tau * (lt.exp() * (lt - ls)).sum() / ls.shape[0]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_kd_loss_and_gradient_equal_autograd_over_many_chunks(monkeypatch, tau):
    import importlib
    losses = importlib.import_module("lamina.distill.losses")
    monkeypatch.setattr(losses, "_KD_CHUNK", 3 * 50)  # 3 rows a chunk: 7 chunks, the last one short
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 10, 50, generator=g) * 3).requires_grad_()
    t = torch.randn(2, 10, 50, generator=g) * 3
    got = kd_loss(s, t, tau)
    (got * 0.7).backward()
    sd = s.detach().double().requires_grad_()
    want = _kd_by_autograd(sd, t, tau)
    (want * 0.7).backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(s.grad.double(), sd.grad, rtol=1e-4, atol=1e-7)
    # a bf16 student gets a bf16 gradient; no gradient is built for a student without one
    sb = s.detach().bfloat16().requires_grad_()
    kd_loss(sb, t, tau).backward()
    assert sb.grad.dtype == torch.bfloat16
    with torch.no_grad():
        assert float(kd_loss(s, t, tau)) == pytest.approx(float(want.detach()), rel=1e-5)


def test_distill_self_with_kd_only_stays_at_zero(setup):
    res = distill(str(setup / "teacher"), str(setup / "teacher"), DistillConfig(out=str(setup / "o0"),
                                data=str(setup / "d.txt"), seq_len=8, ce=0.0, kd=1.0, cosine=0.0, fsp=0.0,
                                epochs=1, batch_size=8, weight_decay=0.0, lr=1e-12, progress=False))
    # (lr ~0: Adam turns the float noise of a zero gradient into full-size steps)
    ep = res.record["history"]["epochs"][0]
    assert ep["train"]["kd"] == pytest.approx(0.0, abs=1e-6)
    assert res.record["test"]["perplexity"] == pytest.approx(res.record["teacher_test"]["perplexity"], rel=1e-5)


def test_distill_a_pruned_lm_records_perplexity_and_reloads(setup):
    res = distill(str(setup / "teacher"), str(setup / "student"), DistillConfig(out=str(setup / "o"),
                                data=str(setup / "d.txt"), seq_len=8, epochs=2, batch_size=8, lr=1e-3,
                                temperature=1.5, cosine=0.5, fsp=0.0, progress=False))
    rec = json.loads((setup / "o" / "distill.json").read_text())
    assert rec["task"]["kind"] == "lm" and rec["metric"] == "perplexity"
    assert math.isfinite(rec["test"]["perplexity"]) and rec["test"]["perplexity"] > 1
    assert set(rec["history"]["epochs"][0]["train"]) >= {"loss", "ce", "kd", "cosine"}
    assert rec["history"]["best_val_loss"] == min(e["val_loss"] for e in rec["history"]["epochs"])
    # the saved student reloads and measures the same test perplexity on the recorded task
    back = load_model(res.model_path)
    task = make_task(LMTaskSpec(**{k: v for k, v in rec["task"].items() if k not in ("documents", "blocks")}), back)
    assert task.evaluate(back, task.split["test"])["perplexity"] == pytest.approx(rec["test"]["perplexity"], rel=1e-5)


def test_distill_lm_refuses_the_centre_loss(setup):
    from lamina.errors import UsageError
    with pytest.raises(UsageError, match="centre"):
        distill(str(setup / "teacher"), str(setup / "student"), DistillConfig(out=str(setup / "o2"),
                              data=str(setup / "d.txt"), seq_len=8, center=0.1, progress=False))


def test_cli_bench_and_distill_an_lm_on_text(setup, capsys):
    from lamina.cli import main
    txt = str(setup / "d.txt")
    assert main(["bench", str(setup / "teacher"), str(setup / "student"), "--data", txt, "--seq-len", "8",
                 "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--no-progress",
                 "--out", str(setup / "b")]) == 0
    out = capsys.readouterr().out
    assert "perple" in out and json.loads((setup / "b" / "bench.json").read_text())["task"]["kind"] == "lm"
    assert main(["distill", "--teacher", str(setup / "teacher"), "--student", str(setup / "student"), "--data", txt,
                 "--seq-len", "8", "--epochs", "1", "--batch-size", "8", "--fsp", "0", "--no-progress",
                 "--out", str(setup / "r")]) == 0
    out = capsys.readouterr().out
    assert "val ppl" in out and "test ppl" in out
    assert main(["bench", str(setup / "teacher"), "--data", txt, "--seq-len", "65", "--out", str(setup / "b2")]) == 2
    assert "context" in capsys.readouterr().err


def test_finetune_an_lm_on_text_and_distill_reads_its_task(setup):
    from lamina.finetune import FinetuneConfig, finetune
    from lamina.errors import UsageError
    txt = str(setup / "d.txt")
    with pytest.raises(UsageError, match="full"):
        finetune(str(setup / "teacher"), txt, FinetuneConfig(out=str(setup / "ft0"), seq_len=8, progress=False))
    res = finetune(str(setup / "teacher"), txt, FinetuneConfig(out=str(setup / "ft"), full=True, seq_len=8, epochs=2,
                                                              batch_size=8, lr=1e-3, progress=False))
    rec = json.loads((setup / "ft" / "finetune.json").read_text())
    assert rec["task"]["kind"] == "lm" and rec["metric"] == "perplexity"
    assert rec["history"]["best_val_loss"] == min(e["val_loss"] for e in rec["history"]["epochs"])
    # the saved model reloads with the same test perplexity; distill finds the task without --data
    back = load_model(res.model_path)
    task = make_task(LMTaskSpec(**{k: v for k, v in rec["task"].items() if k not in ("documents", "blocks")}), back)
    assert task.evaluate(back, task.split["test"])["perplexity"] == pytest.approx(rec["test"]["perplexity"], rel=1e-5)
    before = load_model(str(setup / "teacher"))
    assert rec["test"]["perplexity"] < task.evaluate(before, task.split["test"])["perplexity"]  # it learned
    d = distill(str(setup / "ft"), str(setup / "student"),
                DistillConfig(out=str(setup / "r"), epochs=1, batch_size=8, fsp=0.0, progress=False))
    assert d.record["task"] == rec["task"]
    assert d.record["teacher_test"] == rec["test"]  # read from finetune.json: the same blocks


def test_cli_teacher_correction_trains_caches_reuses_and_refuses_a_changed_cache(setup, capsys):
    """Minitron's teacher correction through `lamina distill`: the corrected teacher's validation loss is below the
    original's (recomputed here from the saved weights), a second run reuses the cached copy, a cache whose bytes
    no longer match their sha256 is refused, and distill.json says which teacher the student learned from."""
    from safetensors.torch import load_model as st_load
    from lamina.cli import main
    txt, out = str(setup / "d.txt"), setup / "r"
    args = ["distill", "--teacher", str(setup / "teacher"), "--student", str(setup / "student"), "--data", txt,
            "--seq-len", "8", "--epochs", "1", "--batch-size", "8", "--lr", "3e-3", "--fsp", "0", "--no-progress",
            "--teacher-correction", "12", "--out", str(out)]
    assert main(args) == 0
    rec = json.loads((out / "distill.json").read_text())
    used = rec["teacher_used"]
    assert used["teacher"] == "corrected" and used["cached"] is False and used["steps"] == 12
    assert used["val_loss_after"] < used["val_loss_before"]
    # independently: the saved weights in the teacher's architecture, evaluated on the recorded task's blocks
    lm = load_model(str(setup / "teacher"))
    task = make_task(LMTaskSpec(**{k: v for k, v in rec["task"].items() if k not in ("documents", "blocks")}), lm)
    original = task.evaluate(lm, task.split["val"])["loss"]
    st_load(lm.module, str(out / "corrected-teacher" / "model.safetensors"), strict=True)
    corrected = task.evaluate(lm, task.split["val"])["loss"]
    assert corrected == pytest.approx(used["val_loss_after"], rel=1e-5) and original == pytest.approx(
        used["val_loss_before"], rel=1e-5)
    assert corrected < original
    assert task.evaluate(lm, task.split["test"])["loss"] == pytest.approx(used["test"]["loss"], rel=1e-5)
    assert rec["teacher_test"]["loss"] == pytest.approx(
        task.evaluate(load_model(str(setup / "teacher")), task.split["test"])["loss"], rel=1e-5)  # the original's
    # the second run reuses it (same bytes, not retrained)
    w = out / "corrected-teacher" / "model.safetensors"
    stat = w.stat().st_mtime_ns
    assert main(args + ["--overwrite"]) == 0
    again = json.loads((out / "distill.json").read_text())["teacher_used"]
    assert again["cached"] is True and again["sha256"] == used["sha256"] and w.stat().st_mtime_ns == stat
    # changed bytes: refused before loading, a clear message, exit 1
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF
    w.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(args + ["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and "delete" in err and "Traceback" not in err
    # without the flag: the original teacher, and said so
    assert main(args[:-4] + ["--out", str(setup / "r0")]) == 0
    assert json.loads((setup / "r0" / "distill.json").read_text())["teacher_used"]["teacher"] == "original"
    assert main(args[:-2] + ["--out", str(setup / "r1"), "--teacher-correction", "-1"]) == 2


def test_kd_follows_the_corrected_teacher(setup):
    """A student equal to the original teacher has KD 0 toward it (the test above this file's); toward the
    corrected teacher its KD is positive: the KD target really is the corrected copy."""
    res = distill(str(setup / "teacher"), str(setup / "teacher"), DistillConfig(
        out=str(setup / "oc"), data=str(setup / "d.txt"), seq_len=8, ce=0.0, kd=1.0, cosine=0.0, fsp=0.0, epochs=1,
        batch_size=8, weight_decay=0.0, lr=1e-12, progress=False, teacher_correction=12, teacher_correction_lr=3e-3))
    assert res.record["teacher_used"]["teacher"] == "corrected"
    assert res.record["history"]["epochs"][0]["train"]["kd"] > 0


def test_resume_of_an_lm_distill_with_teacher_correction_ends_where_an_uninterrupted_run_does(setup, monkeypatch):
    """An LM distill cut after epoch 1 and resumed: the cached corrected teacher is reused (not retrained) and the
    student ends with the uninterrupted run's weights and loss curve."""
    from conftest import die_in_epoch

    def cfg(out, **kw):
        return DistillConfig(out=str(setup / out), data=str(setup / "d.txt"), seq_len=8, epochs=3, batch_size=8,
                             lr=1e-3, fsp=0.0, progress=False, teacher_correction=6, **kw)
    ref = distill(str(setup / "teacher"), str(setup / "student"), cfg("ref"))
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        distill(str(setup / "teacher"), str(setup / "student"), cfg("cut"))
    restore()
    res = distill(str(setup / "teacher"), str(setup / "student"), cfg("cut", resume=True))
    assert res.record["teacher_used"]["cached"] is True and ref.record["teacher_used"]["cached"] is False
    assert res.record["teacher_used"]["sha256"] == ref.record["teacher_used"]["sha256"]
    a, b = load_model(ref.model_path).module.state_dict(), load_model(res.model_path).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    la = [e["train"]["loss"] for e in ref.record["history"]["epochs"]]
    assert [e["train"]["loss"] for e in res.record["history"]["epochs"]] == pytest.approx(la, rel=1e-6)
