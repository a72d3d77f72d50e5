"""LM importance against naive recomputations on tiny random Llama / Qwen2 / GPT-2."""

import math

import pytest
import torch
import torch.nn.functional as F

from lamina.analyze.importance import naive_skip_importance
from lamina.analyze.lm_importance import angular_pick, lm_importance
from lamina.blocks import bypass
from lamina.models import wrap_module
from lamina.testing import tiny_causal_lm


def _setup(arch):
    m = tiny_causal_lm(arch, layers=4, seed=5)
    lm = wrap_module(m, modality="text")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(4, 64, (2, 9), generator=g),
                "attention_mask": torch.ones(2, 9, dtype=torch.long)} for _ in range(2)]
    batches[0]["attention_mask"][1, 6:] = 0
    return lm, batches


def _states(lm, b):
    hs = []
    hooks = [lm.module.get_submodule(lm.blocks.block_paths[0]).register_forward_pre_hook(
        lambda _m, a, k: hs.append((a[0] if a else k["hidden_states"]).double()), with_kwargs=True)]
    for p in lm.blocks.block_paths:
        hooks.append(lm.module.get_submodule(p).register_forward_hook(
            lambda _m, _a, o: hs.append((o[0] if isinstance(o, tuple) else o).double())))
    with torch.no_grad():
        lm.forward(b)
    for h in hooks:
        h.remove()
    return hs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lm_importance_equals_naive_recomputation(arch):
    lm, batches = _setup(arch)
    res = lm_importance(lm, batches, spans=(1, 2, 4))
    n = 4
    # skip nMSE: the generic naive reference (one full forward per skipped block)
    naive = naive_skip_importance(lm, batches, progress=False)
    assert res["skip_nmse"] == pytest.approx([naive[f"blocks.{j}"] for j in range(n)], rel=1e-6)
    # perplexity with each block bypassed, and the full one, by hand
    def ppl(remove):
        tot = cnt = 0.0
        for b in batches:
            with torch.no_grad(), bypass(lm.module, remove):
                z = lm.forward(b).logits.double()
            ce = F.cross_entropy(z[:, :-1].transpose(1, 2), b["input_ids"][:, 1:], reduction="none")
            keep = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).double()
            tot += float((ce * keep).sum())
            cnt += float(keep.sum())
        return math.exp(tot / cnt)
    full = ppl([])
    assert res["full_perplexity"] == pytest.approx(full, rel=1e-6)
    for j in range(n):
        assert res["skip_perplexity"][j] == pytest.approx(ppl([j]), rel=1e-6)
        assert res["perplexity_change"][j] == pytest.approx(ppl([j]) - full, abs=1e-6 * full)
    # BI and the angular distance: their formulas over hooked states, token by token
    bi_num = [0.0] * n
    ang = {k: [0.0] * (n - k + 1) for k in (1, 2, 4)}
    tokens = 0
    for b in batches:
        hs = _states(lm, b)
        for bt in range(2):
            for t in range(9):
                if not b["attention_mask"][bt, t]:
                    continue
                tokens += 1
                v = [h[bt, t] for h in hs]
                c = lambda a, z: float(a @ z / (a.norm() * z.norm()))  # noqa: E731
                for j in range(n):
                    bi_num[j] += c(v[j], v[j + 1])
                for k in ang:
                    for s in range(n - k + 1):
                        ang[k][s] += math.acos(max(-1.0, min(1.0, c(v[s], v[s + k])))) / math.pi
    assert res["tokens"] == tokens
    assert res["block_influence"] == pytest.approx([1 - x / tokens for x in bi_num], rel=1e-6)
    for k in ang:
        assert res["angular"][str(k)] == pytest.approx([a / tokens for a in ang[k]], rel=1e-6)
    # one block's angular distance is the arccos of 1 - its BI only token by token; both lie in [0, 1]
    assert all(0 <= a <= 1 for a in res["angular"]["1"]) and res["cost_forwards"] > 1


def test_angular_pick_is_the_span_with_the_smallest_distance():
    assert angular_pick([0.3, 0.1, 0.2], 2) == [1, 2]
    assert angular_pick([0.1, 0.1], 3) == [0, 1, 2]


def test_importance_of_a_union_of_batches_from_per_batch_sums_is_exact():
    """bench/llm_importance_samples.py scores sample sizes by adding per-batch sums: the union of the batches'
    sums must give exactly what lm_importance gives on those batches together."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import llm_importance_samples as S
    lm, batches = _setup("llama")
    batches.append({"input_ids": torch.randint(4, 64, (3, 9), generator=torch.Generator().manual_seed(2)),
                    "attention_mask": torch.ones(3, 9, dtype=torch.long)})
    units = [S._unit_sums(lm, b) for b in batches]
    for pick in ([0, 1, 2], [0, 2], [1]):
        want = lm_importance(lm, [batches[i] for i in pick], spans=(1,))
        got = S.scores_of([units[i] for i in pick])
        for key in ("block_influence", "skip_nmse", "perplexity_change"):
            assert got[key].tolist() == pytest.approx(want[key], rel=1e-9, abs=1e-12)
        assert got["angular_1"].tolist() == pytest.approx(want["angular"]["1"], rel=1e-9, abs=1e-12)
