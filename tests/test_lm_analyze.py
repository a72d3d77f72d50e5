"""A causal LM through capture (packed text) and analyze (LM importance), checked against the model itself.

References: output_hidden_states (and a hook for the last block, whose entry
there is after the final norm), and truly pruned copies of the model.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lamina.testing import save_tiny_causal_lm, tiny_sentences

SEQ, LIMIT, SPANS = 8, 12, (1, 2, 3)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from lamina.cli import main
    tmp = tmp_path_factory.mktemp("lmrun")
    texts, _ = tiny_sentences(80, seed=3)
    (tmp / "d.txt").write_text("\n".join(texts) + "\n")
    model = save_tiny_causal_lm(tmp / "tl", layers=4, seed=1)
    run = tmp / "R"
    assert main(["capture", "--model", str(model), "--data", str(tmp / "d.txt"), "--pooling", "last",
                 "--seq-len", str(SEQ), "--limit", str(LIMIT), "--batch-size", "5", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["analyze", str(run), "--no-progress", "--no-control", "--spans", *map(str, SPANS)]) == 0
    return model, tmp / "d.txt", run


def _reference(model_dir, txt):
    """The model, its task's blocks (as the capture chose them), and per-layer states from the model itself."""
    from lamina.lm_task import LMTaskSpec
    from lamina.models import load_model
    lm = load_model(str(model_dir))
    task = LMTaskSpec(data=str(txt), seq_len=SEQ).prepare(lm)
    rows = task.train_rows(LIMIT, 0)
    ids = task.blocks[torch.as_tensor(rows)]
    return lm, task, rows, ids


def _states(module, ids):
    """h_0 .. h_N: hidden_states for the embeddings and blocks 0..N-2, a hook for the last block (its
    hidden_states entry is after the final norm)."""
    last = []
    h = module.model.layers[-1].register_forward_hook(lambda _m, _a, o: last.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            out = module(input_ids=ids, output_hidden_states=True)
    finally:
        h.remove()
    return [x.double() for x in out.hidden_states[:-1]] + [last[0].double()], out.logits.double()


def _cos(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)


def _ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_capture_records_the_lm_tasks_packed_training_blocks(lm_run):
    from lamina.store import FeatureStore
    model, txt, run = lm_run
    lm, task, rows, ids = _reference(model, txt)
    store = FeatureStore.open(run / "features")
    rec = store.manifest["lm_task"]
    assert rec["seq_len"] == SEQ and rec["captured_split"] == "train" and rec["captured_blocks"] == LIMIT
    assert rec["blocks"] == task.record()["blocks"] and rec["documents"] == task.record()["documents"]
    assert list(store.ids) == [f"block:{r}" for r in rows] and set(rows) <= set(task.split["train"])
    # --pooling last over a packed block is the state of its last token, from the model itself
    h, _ = _states(lm.module, ids)
    for j in range(4):
        np.testing.assert_allclose(store.load(f"blocks.{j}"), h[j + 1][:, -1].float().numpy(), rtol=1e-4, atol=1e-5)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["capture"]["lm_task"]["seq_len"] == SEQ


def test_lm_importance_equals_the_model_computed_by_hand(lm_run):
    from lamina.compress.depth import drop_blocks_
    model, txt, run = lm_run
    imp = json.loads((run / "scores.json").read_text())["importance"]
    lm, task, rows, ids = _reference(model, txt)
    h, z = _states(lm.module, ids)
    n = 4
    assert imp["kind"] == "lm" and imp["n_samples"] == LIMIT and imp["tokens"] == LIMIT * SEQ
    assert imp["predictions"] == LIMIT * (SEQ - 1)
    assert imp["full_perplexity"] == pytest.approx(math.exp(float(_ce(z, ids))), rel=1e-5)
    for j in range(n):
        assert imp["block_influence"][j] == pytest.approx(1 - float(_cos(h[j], h[j + 1]).mean()), rel=1e-5, abs=1e-7)
        small = copy.deepcopy(lm.module)
        drop_blocks_(small, [j])  # a truly pruned copy: block j gone, config rewritten
        with torch.no_grad():
            zj = small(input_ids=ids).logits.double()
        assert imp["skip_perplexity"][j] == pytest.approx(math.exp(float(_ce(zj, ids))), rel=1e-4)
        assert imp["perplexity_change"][j] == pytest.approx(imp["skip_perplexity"][j] - imp["full_perplexity"],
                                                            rel=1e-9, abs=1e-9)
        nmse = float(((z - zj) ** 2).sum() / (z ** 2).sum())
        assert imp["skip_nmse"][j] == pytest.approx(nmse, rel=1e-4)
    assert sorted(imp["angular"]) == ["1", "2", "3"]
    for s in SPANS:
        want = [float((torch.arccos(_cos(h[l], h[l + s]).clamp(-1, 1)) / math.pi).mean()) for l in range(n - s + 1)]
        assert imp["angular"][str(s)] == pytest.approx(want, rel=1e-5, abs=1e-7)
    # the cost is recorded: wall seconds, as forward passes, and the block evaluations
    assert imp["seconds"] > 0 and imp["forward_seconds"] > 0 and imp["seconds_as_forwards"] > 0
    assert imp["cost_forwards"] == pytest.approx(1 + sum(n - j - 1 for j in range(n)) / n)


def test_logits_memory_follows_the_batch_cap_and_scores_do_not(lm_run):
    """One batch's logits are capped at the budget (B x T x V elements); the scores do not depend on it."""
    from lamina.analyze._lm import lm_block_scores
    from lamina.capture.packed import logits_batch_size
    from lamina.models import load_model
    from lamina.store import FeatureStore
    from lamina.capture.packed import reload_packed
    model, txt, run = lm_run
    lm = load_model(str(model))
    rows = reload_packed(lm, FeatureStore.open(run / "features").manifest)
    vocab = lm.module.config.vocab_size
    assert logits_batch_size(32, SEQ, vocab, 3 * SEQ * vocab + 1) == 3
    assert logits_batch_size(32, SEQ, 49152, 1 << 25) * SEQ * 49152 <= 1 << 25
    assert logits_batch_size(32, 4096, 49152, 1 << 25) == 1  # never below one block
    seen = []
    orig = lm.forward
    lm.forward = lambda b: seen.append(tuple(b["input_ids"].shape)) or orig(b)  # record every batch run
    small = lm_block_scores(lm, rows, SPANS, batch_size=32, budget=2 * SEQ * vocab)
    assert small["batch_size"] == 2 and max(s[0] for s in seen) * SEQ * vocab <= 2 * SEQ * vocab
    lm.forward = orig
    full = lm_block_scores(lm, rows, SPANS, batch_size=32)
    assert full["batch_size"] == LIMIT
    for k in ("block_influence", "skip_nmse", "skip_perplexity"):
        assert small[k] == pytest.approx(full[k], rel=1e-5)
    assert small["angular"]["2"] == pytest.approx(full["angular"]["2"], rel=1e-5)


def test_report_and_prune_read_the_lm_scores(lm_run, tmp_path, capsys):
    from lamina.cli import main
    model, txt, run = lm_run
    imp = json.loads((run / "scores.json").read_text())["importance"]
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    from lamina.report._context import layer_table
    from lamina.report._scores import parse_scores
    s = parse_scores(json.loads((run / "scores.json").read_text()), run / "scores.json")
    table = layer_table(s.layers, s.main)
    titles = [c["name"] for c in table["columns"]]
    assert titles[-2:] == ["ppl change", "angular n=1"]
    row = {r["layer"]: r["cells"] for r in table["rows"]}["blocks.2"]
    from lamina.report._context import fmt
    assert [c["text"] for c in row[-2:]] == [fmt(imp["perplexity_change"][2]), fmt(imp["angular"]["1"][2])]
    text = " ".join(html.split())
    assert "Perplexity change when skipped (lower is better" in text and "packed blocks of 8" in text
    assert "least needed blocks (perplexity)" in text
    for method, key in (("perplexity", "perplexity_change"), ("block_influence", "block_influence"),
                        ("skip_nmse", "skip_nmse")):
        out = tmp_path / method
        assert main(["prune", str(model), "--scores", str(run / "scores.json"), "--drop-blocks", "0.25",
                     "--method", method, "--out", str(out)]) == 0
        depth = json.loads((out / "plan.json").read_text())["depth"]
        assert depth["remove"] == [f"blocks.{int(np.argmin(imp[key]))}"]
        # the report marks the same set for this method at the same budget (prune's own rule, no second copy)
        assert f"{method} would remove" in text and f"--method {method} --drop-blocks 0.25" in text
        from lamina.report._context import highlights
        shown = {h["label"]: h["value"] for h in highlights(s)}
        assert shown[f"{method} would remove"] == ", ".join(depth["remove"])
    _marks_are_prunes_plans(main, model, run, s, html, tmp_path)
    out = tmp_path / "angular"
    assert main(["prune", str(model), "--scores", str(run / "scores.json"), "--drop-blocks", "0.5",
                 "--method", "angular", "--out", str(out)]) == 0
    start = int(np.argmin(imp["angular"]["2"]))
    assert json.loads((out / "plan.json").read_text())["depth"]["remove"] == [f"blocks.{start}", f"blocks.{start + 1}"]
    # a span analyze did not measure: a clear message naming the fix, not a guess
    from lamina.compress.plan import PlanConfig, make_plan
    from lamina.errors import UsageError
    scores = json.loads((run / "scores.json").read_text())
    del scores["importance"]["angular"]["3"]
    with pytest.raises(UsageError, match="angular distance") as e:
        make_plan(scores, PlanConfig(drop_blocks=0.75, method="angular"))
    assert "--spans" in e.value.fix


def _marks_are_prunes_plans(main, model, run, s, html, tmp_path):
    """The markers on the importance bars: per method, exactly the blocks `lamina prune --method M --drop-blocks
    0.25` removes, in every panel, with a legend entry; and they are in the page."""
    from lamina.report import _plots as plots
    from lamina.report._context import SET_FRACTION, SET_METHODS
    from lamina.report.report import importance_marks
    marks = importance_marks(s)
    assert set(marks) == set(SET_METHODS)  # every score-based method can serve a quarter of 4 blocks
    fig = plots.importance_figure(s.main.importance, None, marks)
    for method in SET_METHODS:
        out = tmp_path / f"q-{method}"
        assert main(["prune", str(model), "--scores", str(run / "scores.json"), "--drop-blocks", str(SET_FRACTION),
                     "--method", method, "--out", str(out)]) == 0
        plan = json.loads((out / "plan.json").read_text())["depth"]["remove"]
        assert [s.main.importance.blocks[i] for i in marks[method]] == plan
        drawn = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == f"remove-{method}"]
        assert len(drawn) == 3  # Block Influence, skip nMSE and perplexity-change panels
        for ln in drawn:
            assert [f"blocks.{round(x)}" for x in ln.get_xdata()] == plan
        assert f'id="remove-{method}' in html
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert all(any(f"--method {m} removes" in t for t in labels) for m in SET_METHODS)
    # the classifier's report draws no marks (its scores are not an LM's)
    assert importance_marks(type(s)(raw={}, layers=s.layers, main=type(s.main)(), control=None,
                                    definitions={})) == {}


def test_transfer_refuses_text_without_labels(lm_run, tmp_path, capsys):
    """A packed LM run, a per-row text run of an encoder, text given as data, an LM task: UsageError, nothing written."""
    from lamina.cli import main
    from lamina.errors import UsageError
    from lamina.testing import save_tiny_text_model
    from lamina.transfer import TransferConfig, transfer
    model, txt, run = lm_run
    capsys.readouterr()
    assert main(["transfer", str(run), "--head", "last"]) == 2
    err = capsys.readouterr().err
    assert "text without labels" in err and "rotten-tomatoes" in err and "Traceback" not in err
    assert not (run / "transfer").exists() and not (run / "transfer.json").exists()
    enc = save_tiny_text_model(tmp_path / "enc")
    r2 = tmp_path / "R2"
    assert main(["capture", "--model", str(enc), "--data", str(txt), "--limit", "20", "--out", str(r2),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["transfer", str(r2)]) == 2
    assert "text without labels" in capsys.readouterr().err
    with pytest.raises(UsageError, match="text without labels"):
        transfer(r2, TransferConfig(), data=str(txt))
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "finetune.json").write_text(json.dumps({"task": {"kind": "lm", "data": str(txt), "seq_len": 8}}))
    from lamina.transfer._rows import split_rows
    from lamina.store import FeatureStore
    with pytest.raises(UsageError, match="language-modelling task"):
        split_rows(FeatureStore.open(r2), str(ft), (0.6, 0.2, 0.2), 0)


def test_capture_seq_len_default_and_bad_values(lm_run, tmp_path, capsys):
    """Without --seq-len: 128, or the model's context when shorter (64 here); longer than the context: refused."""
    from lamina.cli import main
    from lamina.store import FeatureStore
    model, _, _ = lm_run
    texts, _ = tiny_sentences(500, seed=4)
    txt = tmp_path / "long.txt"
    txt.write_text("\n".join(texts))
    assert main(["capture", "--model", str(model), "--data", str(txt), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    man = FeatureStore.open(tmp_path / "d" / "features").manifest
    assert man["lm_task"]["seq_len"] == 64 and man["data"]["seq_len"] == 64
    assert len(FeatureStore.open(tmp_path / "d" / "features").ids) == man["lm_task"]["blocks"]["train"]
    capsys.readouterr()
    assert main(["capture", "--model", str(model), "--data", str(txt), "--seq-len", "65", "--out",
                 str(tmp_path / "e"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "longer than the model's context" in err and "--seq-len 64" in err
    assert main(["capture", "--model", str(model), "--data", str(txt), "--seq-len", "8", "--limit", "9999",
                 "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert "more packed blocks than the training text holds" in capsys.readouterr().err


def test_bad_spans_and_lm_methods_on_classifier_scores_are_refused():
    from lamina.analyze import AnalyzeConfig
    from lamina.compress.plan import PlanConfig, make_plan
    from lamina.errors import UsageError
    with pytest.raises(UsageError, match="spans must be positive"):
        AnalyzeConfig(spans=(0, 2))
    scores = {"model": {}, "importance": {"blocks": ["blocks.0", "blocks.1"], "skip_nmse": [0.1, 0.2],
                                          "block_influence": [0.1, 0.2], "skippable": [True, True]}}
    for method in ("perplexity", "angular"):
        with pytest.raises(UsageError, match="causal LM") as e:
            make_plan(scores, PlanConfig(drop_blocks=0.5, method=method))
        assert "skip_nmse" in e.value.fix


def test_analyze_refuses_text_that_changed_since_the_capture(lm_run, tmp_path, capsys):
    """Same length, one word changed: the blocks' token hash (recorded at capture) no longer matches."""
    from lamina.cli import main
    model, txt, _ = lm_run
    mine = tmp_path / "t.txt"
    mine.write_text(txt.read_text())
    run = tmp_path / "R"
    assert main(["capture", "--model", str(model), "--data", str(mine), "--seq-len", str(SEQ), "--limit", "6",
                 "--out", str(run), "--no-progress"]) == 0
    lines = mine.read_text().splitlines()
    mine.write_text("\n".join(" ".join("plot" if w == "movie" else "movie" if w == "plot" else w for w in ln.split())
                              for ln in lines) + "\n")
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-control", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no longer packs into the blocks" in err and "capture again" in err


def test_importance_samples_default_is_64_blocks_for_an_lm_and_512_samples_otherwise(lm_run):
    from lamina.analyze import AnalyzeConfig
    from lamina.analyze.analyze import importance_samples
    from lamina.errors import UsageError
    assert importance_samples(AnalyzeConfig(), packed=True) == 64
    assert importance_samples(AnalyzeConfig(), packed=False) == 512
    assert importance_samples(AnalyzeConfig(importance_samples=0), packed=True) == 0  # 0: all, as asked
    with pytest.raises(UsageError, match="importance.samples"):
        AnalyzeConfig(importance_samples=-1)
    _, _, run = lm_run
    scores = json.loads((run / "scores.json").read_text())
    assert scores["settings"]["importance_samples"] == 64  # the resolved default is recorded
    assert scores["importance"]["n_samples"] == LIMIT  # fewer captured blocks than that: all of them
