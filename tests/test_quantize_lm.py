"""lamina quantize on a causal LM: logit-nMSE sensitivity, the relative perplexity budget, save / reload, bench."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lamina
from lamina.errors import UsageError
from lamina.lm_task import LMTaskSpec
from lamina.quantize import QuantizeConfig, quantize, sensitivity
from lamina.quantize import lm as qlm
from lamina.quantize.formats import linear_names
from lamina.quantize.quantize import quantized_copy
from lamina.task import make_task, read_task
from lamina.testing import tiny_causal_lm, tiny_sentences, tiny_tokenizer

GAIN = 6.0  # a random tiny Llama predicts near-uniformly; larger weights make int8 rounding move its perplexity


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlm")
    texts, _ = tiny_sentences(80, seed=2)
    (root / "d.txt").write_text("\n".join(texts))
    m = tiny_causal_lm("llama", 2, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(GAIN)
    m.save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    return root


def _task(root, lm, seq_len=8):
    return make_task(LMTaskSpec(data=str(root / "d.txt"), seq_len=seq_len), lm)


def _ppl(lm, task, rows, batch_size) -> float:
    """Perplexity by hand: every next-token cross-entropy of every block, one global mean. (The batch size is
    lamina's: int8fused takes one activation scale per call, over the whole batch.)"""
    losses = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            ids = task.blocks[torch.as_tensor(rows[s:s + batch_size])]
            z = lm.module(input_ids=ids).logits.double()
            losses.append(F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="none"))
    return math.exp(float(torch.cat(losses).mean()))


def test_sensitivity_equals_a_naive_requantize_and_forward(llm, monkeypatch):
    lm = lamina.load_model(str(llm / "lm"))
    task = _task(llm, lm)
    batches = list(task.batches(lm, task.split["train"][:6], 3))
    monkeypatch.setattr(qlm, "LOGIT_BYTES", 4 * 24 * 5)  # 5 vocabulary rows per chunk: 13 chunks per batch
    scores = sensitivity(lm, batches, ("int8fused", "bf16"))
    monkeypatch.setattr(qlm, "REF_LOGIT_BYTES", 0)  # the float logits recomputed, not kept: the same scores
    again = sensitivity(lm, batches, ("int8fused", "bf16"))
    assert again.keys() == scores.keys() and all(
        again[n][f] == pytest.approx(scores[n][f], rel=1e-6) for n in scores for f in scores[n])
    names = linear_names(lm.module)
    assert list(scores) == names and "lm_head" in names
    with torch.no_grad():
        ref = [lm.module(**b).logits for b in batches]
    for name in (names[0], "model.layers.1.mlp.down_proj", "lm_head"):
        for fmt in ("int8fused", "bf16"):
            q = quantized_copy(lm, {name: fmt})
            with torch.no_grad():
                got = [q.module(**b).logits for b in batches]
            naive = sum(float(((g.double() - r.double()) ** 2).sum()) for g, r in zip(got, ref)) / sum(
                float((r.double() ** 2).sum()) for r in ref)
            assert naive > 0 and scores[name][fmt] == pytest.approx(naive, rel=1e-4), (name, fmt)
    # the model is left as it was
    with torch.no_grad():
        assert all(torch.equal(lm.module(**b).logits, r) for b, r in zip(batches, ref))


def test_max_drop_is_a_relative_perplexity_increase_respected_after_the_fact(llm, tmp_path):
    budget = 0.001
    res = quantize(str(llm / "lm"), QuantizeConfig(out=str(tmp_path / "q"), data=str(llm / "d.txt"), seq_len=8,
                                                   max_drop=budget, formats="int8fused", calibration_samples=12))
    plan = json.loads((tmp_path / "q" / "quant_plan.json").read_text())
    tried = {s["count"]: s["drop"] for s in plan["search"] if "count" in s}
    assert tried[plan["of"]] > budget  # every layer in int8 would not fit: the budget chose
    assert 0 < plan["count"] < plan["of"] and plan["task"]["kind"] == "lm" and plan["task"]["seq_len"] == 8
    assert "relative" in plan["max_drop_unit"]
    # re-measured by hand on the validation blocks, with the model reloaded the user's way
    f = lamina.load_model(str(llm / "lm"))
    q = lamina.load_model(res.out)
    task = _task(llm, f)
    val = task.split["val"]
    v = plan["validation"]
    pf, pq = _ppl(f, task, val, v["batch_size"]), _ppl(q, task, val, v["batch_size"])
    assert v["float"] == pytest.approx(pf, rel=1e-6) and v["quantized"] == pytest.approx(pq, rel=1e-5)
    assert pq / pf - 1 <= budget + 1e-9 and v["drop"] == pytest.approx(pq / pf - 1, abs=1e-6)
    assert res.metric_drop == pytest.approx(v["drop"], abs=1e-9)
    assert plan["reload_check"]["ok"] and plan["reload_check"]["max_abs_diff"] == 0.0


def test_cli_end_to_end_and_bench_reports_test_perplexity(llm, tmp_path, capsys):
    from lamina.cli import main
    q = tmp_path / "q"
    assert main(["quantize", str(llm / "lm"), "--data", str(llm / "d.txt"), "--seq-len", "8", "--fraction", "0.5",
                 "--formats", "int8fused,bf16", "--calibration-samples", "8", "--out", str(q)]) == 0
    assert "Linear layers quantized" in capsys.readouterr().out
    plan = json.loads((q / "quant_plan.json").read_text())
    assert plan["count"] == round(0.5 * plan["of"]) and plan["validation"]["metric"] == "perplexity"
    assert isinstance(read_task(str(q)), LMTaskSpec) and read_task(str(q)).seq_len == 8
    assert main(["bench", str(q), "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--decode-tokens", "2",
                 "--no-progress", "--out", str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "b" / "bench.json").read_text())
    lm = lamina.load_model(str(q))
    task = _task(llm, lm)
    assert rec["task"]["kind"] == "lm" and rec["test_rows"] == len(task.split["test"])
    assert rec["models"][0]["perplexity"] == pytest.approx(_ppl(lm, task, task.split["test"], 8), rel=1e-5)
    # lamina.load gives the same quantized module
    b = task.batch(lm, task.split["test"][:2])
    with torch.no_grad():
        assert torch.equal(lamina.load(str(q))(**b).logits, lm.module(**b).logits)


def test_a_budget_nothing_meets_names_the_best_reachable(llm, tmp_path, monkeypatch):
    import importlib
    qq = importlib.import_module("lamina.quantize.quantize")
    # a stand-in perplexity 10% higher per quantized layer: nothing fits +5%
    monkeypatch.setattr(qq, "_metric", lambda lm, task: 20.0 * (1 + 0.1 * sum(
        type(m).__name__ != "Linear" for m in lm.module.modules() if hasattr(m, "in_features"))))
    with pytest.raises(UsageError, match=r"raises validation perplexity by 10%.*best reachable: 0\.1 with 1"):
        quantize(str(llm / "lm"), QuantizeConfig(out=str(tmp_path / "q"), data=str(llm / "d.txt"), seq_len=8,
                                                 max_drop=0.05, formats="int8fused", calibration_samples=4))
    assert not (tmp_path / "q").exists()
    from lamina.cli import main
    assert main(["quantize", str(llm / "lm"), "--max-drop", "0.01", "--out", str(tmp_path / "q2")]) == 2
    assert main(["quantize", str(llm / "lm"), "--data", str(llm / "d.txt"), "--seq-len", "1000", "--fraction",
                 "0.5", "--out", str(tmp_path / "q3")]) == 2
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists()


def test_logits_are_never_built_whole_while_scoring(llm, monkeypatch):
    """The float reference holds hidden states (B, T, d), not logits (B, T, V)."""
    lm = lamina.load_model(str(llm / "lm"))
    task = _task(llm, lm)
    batches = list(task.batches(lm, task.split["train"][:4], 4))
    change = qlm.LogitChange(lm, batches, "lm_head")
    d = lm.module.config.hidden_size
    assert all(h.shape == (4, 8, d) for h in change.ref)
    assert change() == 0.0  # nothing quantized: no change


def test_a_fine_tuned_lm_is_quantized_on_its_own_task_record(llm, tmp_path):
    from lamina.finetune import FinetuneConfig, finetune
    finetune(str(llm / "lm"), str(llm / "d.txt"), FinetuneConfig(out=str(tmp_path / "ft"), full=True, seq_len=6,
                                                                  epochs=1, batch_size=8, lr=1e-3, progress=False))
    res = quantize(str(tmp_path / "ft"), QuantizeConfig(out=str(tmp_path / "q"), max_drop=0.05,
                                                        calibration_samples=4))  # no --data: the record's task
    rec = json.loads((tmp_path / "ft" / "finetune.json").read_text())["task"]
    plan = res.plan
    assert plan["task"] == {k: v for k, v in rec.items() if k not in ("documents", "blocks")}
    assert plan["calibration"]["from"] == "task record (training blocks)" and plan["calibration"]["rows"] == 4
    assert plan["validation"]["drop"] <= 0.05 and read_task(res.out).seq_len == 6
