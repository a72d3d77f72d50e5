"""The language-modelling task: text loading, packing, the split, and perplexity against a hand computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lamina.data.text import load_corpus
from lamina.errors import UsageError
from lamina.lm_task import LMTaskSpec, pack
from lamina.models import load_model
from lamina.task import make_task, spec_from_record
from lamina.testing import save_tiny_causal_lm, tiny_sentences


@pytest.fixture()
def corpus(tmp_path):
    texts, _ = tiny_sentences(60, seed=1)
    p = tmp_path / "docs.txt"
    p.write_text("\n".join(texts) + "\n\n   \n")  # blank lines are not documents
    return p


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_perplexity_is_exp_of_the_mean_token_loss_by_hand(tmp_path, corpus, arch):
    lm = load_model(str(save_tiny_causal_lm(tmp_path / arch, arch)))
    task = make_task(LMTaskSpec(data=str(corpus), seq_len=8, seed=3), lm)
    rows = task.split["test"]
    got = task.evaluate(lm, rows, batch_size=3)
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for r in rows:  # one block at a time, no packing helpers
            ids = task.blocks[r][None]
            z = lm.module(input_ids=ids).logits[0]
            total += float(F.cross_entropy(z[:-1].double(), ids[0, 1:], reduction="sum"))
            correct += int((z[:-1].argmax(-1) == ids[0, 1:]).sum())
            n += ids.shape[1] - 1
    assert got["n"] == n == len(rows) * 7
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert got["next_token_accuracy"] == pytest.approx(correct / n)
    assert got["metric"] == "perplexity" and task.higher_is_better is False


def test_packing_and_document_split(tmp_path, corpus):
    lm = load_model(str(save_tiny_causal_lm(tmp_path / "m")))
    spec = LMTaskSpec(data=str(corpus), seq_len=5, seed=0)
    task = make_task(spec, lm)
    ds, split = task.ds, task.doc_split
    assert len(ds) == 60
    parts = [set(v.tolist()) for v in split.values()]
    assert sum(len(p) for p in parts) == 60 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # the test blocks are exactly the test documents' tokens, concatenated and cut
    docs = [ds.inputs[i] for i in split["test"]]
    flat = [t for d in docs for t in lm.tokenizer(d, add_special_tokens=False)["input_ids"]]
    blocks = task.blocks[task.split["test"]]
    assert blocks.reshape(-1).tolist() == flat[: blocks.numel()] and len(flat) - blocks.numel() < 5
    # the record rebuilds the same task
    again = make_task(spec_from_record(task.record()), lm)
    assert torch.equal(again.blocks, task.blocks)
    assert all(np.array_equal(again.split[k], task.split[k]) for k in task.split)


def test_loss_sum_has_a_gradient_and_matches_counts(tmp_path, corpus):
    lm = load_model(str(save_tiny_causal_lm(tmp_path / "m")))
    task = make_task(LMTaskSpec(data=str(corpus), seq_len=6), lm)
    rows = task.split["train"][:4]
    loss = task.loss_sum(lm.forward(task.batch(lm, rows)), rows)
    loss.backward()
    assert any(p.grad is not None for p in lm.module.parameters())
    assert float(loss.detach()) == pytest.approx(task.counts(lm, rows)[2], rel=1e-5)


def test_pack_appends_eos_between_documents():
    class Tok:
        eos_token_id = 9

        def __call__(self, docs, add_special_tokens=False):
            return {"input_ids": [[len(d)] * len(d) for d in docs]}
    assert pack(Tok(), ["ab", "c", "de"], 3).tolist() == [[2, 2, 9], [1, 9, 2]]


def test_text_sources(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document\nstill first")
    (folder / "sub" / "b.txt").write_text("second")
    ds = load_corpus(str(folder), document_per_file=True)
    assert ds.inputs == ["first document\nstill first", "second"] and ds.meta["unlabelled"]
    (tmp_path / "t.jsonl").write_text('{"body": "hello there"}\n{"body": "general"}\n')
    assert load_corpus(str(tmp_path / "t.jsonl")).inputs == ["hello there", "general"]
    (tmp_path / "l.csv").write_text("text,label\nnice film,1\nbad film,0\n")
    assert load_corpus(str(tmp_path / "l.csv"), text_column="text").inputs == ["nice film", "bad film"]


def test_bad_text_input(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(UsageError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "l.csv").write_text("text,label\nnice film,1\nbad film,0\n")
    with pytest.raises(UsageError, match="label column") as e:
        load_corpus(str(tmp_path / "l.csv"))
    assert "--text-column" in str(e.value.fix)
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match="document.per.file"):
        load_corpus(str(tmp_path / "d"))


def test_seq_len_longer_than_the_context_is_refused(tmp_path, corpus):
    lm = load_model(str(save_tiny_causal_lm(tmp_path / "m")))  # max_position_embeddings 64
    with pytest.raises(UsageError, match="context") as e:
        make_task(LMTaskSpec(data=str(corpus), seq_len=65), lm)
    assert "64" in str(e.value.allowed)
    with pytest.raises(UsageError):
        LMTaskSpec(data=str(corpus), seq_len=1)


@pytest.mark.assets
def test_bundled_texts():
    d = load_corpus("debates")
    assert len(d) > 1000 and d.meta["unlabelled"]
    assert len(load_corpus("rotten-tomatoes")) > 10000


def test_bench_measures_perplexity_of_an_lm_and_its_pruned_copy(tmp_path, corpus):
    import copy

    from lamina.bench import BenchConfig, bench
    from lamina.compress.depth import drop_blocks_
    from lamina.testing import tiny_causal_lm, tiny_tokenizer
    save_tiny_causal_lm(tmp_path / "t", layers=3)
    small = copy.deepcopy(tiny_causal_lm(layers=3))
    drop_blocks_(small, [1])
    small.save_pretrained(tmp_path / "s")
    tiny_tokenizer().save_pretrained(tmp_path / "s")
    res = bench([str(tmp_path / "t"), str(tmp_path / "s")],
                BenchConfig(data=str(corpus), seq_len=8, batch_sizes=(1, 2), warmup=0, repeats=1, progress=False,
                            out=str(tmp_path / "o")))
    assert res["task"]["kind"] == "lm" and res["task"]["seq_len"] == 8
    t, s = res["models"]
    lm = load_model(str(tmp_path / "s"))
    ref = make_task(spec_from_record(res["task"]), lm)
    assert s["perplexity"] == pytest.approx(ref.evaluate(lm, ref.split["test"])["perplexity"], rel=1e-6)
    assert s["blocks"] == 2 and s["vs_first"]["perplexity_ratio"] == pytest.approx(s["perplexity"] / t["perplexity"])


def test_a_datasets_text_column(tmp_path):
    """A save_to_disk folder (one split, or a split of several) is text for the LM task: its text column, by the
    table's rule (a labelled split must name the column)."""
    datasets = pytest.importorskip("datasets")
    docs = ["first document here", "", "second one", "third and last"]
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "one"))
    ds = load_corpus(str(tmp_path / "one"))
    assert ds.inputs == ["first document here", "second one", "third and last"] and ds.meta["unlabelled"]
    assert ds.meta["text_column"] == "body"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs, "label": [0, 1, 0, 1]}),
                               "test": datasets.Dataset.from_dict({"text": ["x"], "label": [0]})})
    dd.save_to_disk(str(tmp_path / "two"))
    assert load_corpus(f"{tmp_path / 'two'}:train", text_column="text").inputs == ds.inputs
    with pytest.raises(UsageError, match="label column") as e:
        load_corpus(f"{tmp_path / 'two'}:train")
    assert "--text-column" in e.value.fix
    with pytest.raises(UsageError, match="text column is not in") as e:
        load_corpus(f"{tmp_path / 'two'}:train", text_column="txt")
    assert "text" in e.value.fix
    with pytest.raises(UsageError, match="several splits"):
        load_corpus(str(tmp_path / "two"), text_column="text")
