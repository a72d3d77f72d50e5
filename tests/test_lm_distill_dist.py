"""An LM distill (Minitron recipe) under torchrun: two ranks follow one rank (issue 13, item 6)."""

import json

import pytest


def test_two_ranks_follow_one_rank_on_a_causal_lm(lm_pair, one_and_two_ranks):
    root = lm_pair(80, 2)  # d.txt, teacher/ (tiny 3-block Llama), student/ (block 1 dropped)
    common = ["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
              "--data", str(root / "d.txt"), "--seq-len", "8", "--epochs", "2", "--batch-size", "8",
              "--lr", "3e-3", "--fsp", "0", "--patience", "5", "--no-progress"]
    one, two = one_and_two_ranks(common, root)
    a = json.loads((one / "distill.json").read_text())
    b = json.loads((two / "distill.json").read_text())
    assert a["history"]["world_size"] == 1 and b["history"]["world_size"] == 2
    assert len(a["history"]["epochs"]) == len(b["history"]["epochs"]) == 2
    for ea, eb in zip(a["history"]["epochs"], b["history"]["epochs"]):
        # the two ranks split each batch of packed blocks; the mean losses are the same up to float sums
        for k in ("loss", "ce", "kd"):
            assert eb["train"][k] == pytest.approx(ea["train"][k], rel=2e-3, abs=1e-5), k
    # validation and test perplexity are evaluated on the whole split in both runs
    assert b["history"]["epochs"][-1]["val_loss"] == pytest.approx(a["history"]["epochs"][-1]["val_loss"], rel=2e-3)
    assert b["test"]["perplexity"] == pytest.approx(a["test"]["perplexity"], rel=2e-3)
