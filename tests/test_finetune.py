"""`lamina finetune`: a head on a backbone, frozen or full; the saved classifier loads with standard
tools to the same outputs; an interrupted run resumes to the same weights; bad input exits 2."""

import json

import pytest
import torch

from lamina import UsageError
from lamina import testing as lt
from lamina.cli import main
from lamina.finetune import FinetuneConfig, attach_head, finetune, head_parameters
from lamina.models import load_model
from lamina.task import read_task
from conftest import die_in_epoch


def _cfg(out, **kw):
    base = dict(out=str(out), full=True, epochs=3, lr=3e-3, batch_size=16, patience=None, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_full_finetune_learns_and_round_trips(tiny_teacher, sentences_csv):
    rec = json.loads((tiny_teacher / "finetune.json").read_text())
    assert rec["mode"] == "full" and rec["trainable_parameters"] == rec["parameters"]
    assert rec["test"]["accuracy"] >= 0.9  # the sentences carry one sentiment word: learnable
    assert rec["split_sizes"] == {"train": 168, "val": 24, "test": 48}
    assert len(rec["history"]["epochs"]) == 6
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_teacher / "model").eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher / "model")
    lm = load_model(str(tiny_teacher))  # the OUT folder resolves to OUT/model
    texts, _ = lt.tiny_sentences(6, seed=9)
    b = dict(tok(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(hf(**b).logits, lm.forward(b).logits)
    spec = read_task(tiny_teacher)
    assert spec.data == str(sentences_csv) and spec.test == 0.2


def test_frozen_backbone_trains_only_the_head(tmp_path, tiny_dirs, sentences_csv):
    before = load_model(str(tiny_dirs["bert"])).module.state_dict()
    res = finetune(str(tiny_dirs["bert"]), str(sentences_csv), _cfg(tmp_path / "t", full=False, lr=1e-2))
    after = load_model(res.model_path).module
    sd = after.state_dict()
    for k, v in before.items():  # every backbone tensor but the pooler (a head-side module) is untouched
        key = "bert." + k
        if "pooler" not in k:
            assert torch.equal(sd[key], v), k
    assert not torch.equal(sd["bert.pooler.dense.weight"], before["pooler.dense.weight"])
    assert res.trainable_parameters == sum(p.numel() for n, p in after.named_parameters()
                                           if n.startswith(("classifier", "bert.pooler")))


@pytest.mark.parametrize("arch,expect", [("bert", {"bert.pooler", "classifier"}), ("gpt2", {"transformer.ln_f", "score"}),
                                         ("llama", {"model.norm", "score"})])
def test_head_is_what_runs_after_the_last_block(tiny_dirs, arch, expect):
    lm = attach_head(load_model(str(tiny_dirs[arch])), ["a", "b", "c"])
    b = dict(lm.tokenizer(["the film was good"], return_tensors="pt"))
    names = head_parameters(lm, b)
    assert {n.rsplit(".", 1)[0].rsplit(".", 1)[0] if "pooler" in n else n.rsplit(".", 1)[0] for n in names} == expect
    assert lm.forward(b).logits.shape == (1, 3)


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path, tiny_dirs, sentences_csv, monkeypatch):
    ref = finetune(str(tiny_dirs["bert"]), str(sentences_csv), _cfg(tmp_path / "ref"))
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_dirs["bert"]), str(sentences_csv), _cfg(tmp_path / "cut"))
    restore()
    assert (tmp_path / "cut" / "checkpoint.json").exists() and not (tmp_path / "cut" / "model").exists()
    res = finetune(str(tiny_dirs["bert"]), str(sentences_csv), _cfg(tmp_path / "cut", resume=True))
    assert res.record["history"]["resumed_from"] == 0
    a, b = load_model(ref.model_path).module.state_dict(), load_model(res.model_path).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert res.test_accuracy == ref.test_accuracy
    assert not list((tmp_path / "cut").glob("checkpoint*"))


def test_bad_input_exits_2_and_overwrites_nothing(tmp_path, tiny_dirs, sentences_csv, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["finetune", "--model", str(tiny_dirs["bert"]), "--data", str(sentences_csv)]
    assert main(base + ["--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(base + ["--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "n2"), "--epochs", "0"]) == 2
    assert main(base + ["--out", str(tmp_path / "n3"), "--test", "0.7"]) == 2
    with pytest.raises(UsageError, match="cannot put a classification head"):
        attach_head(load_model(lt.tiny_cnn()), ["a", "b"])
