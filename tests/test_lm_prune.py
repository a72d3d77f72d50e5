"""A pruned decoder LM (depth, FFN width, GQA heads) reloads with AutoModelForCausalLM and generates the
same tokens with and without its KV cache."""

import pytest
import torch

from lamina.compress import PlanConfig, apply, make_plan
from lamina.models import load_model, model_fingerprint
from lamina.savefmt import save
from lamina.testing import save_tiny_causal_lm


def _scores(lm):
    n = lm.blocks.n_blocks
    return {"model": {"name": "t", "fingerprint": model_fingerprint(lm.module), "parameters": 1},
            "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "paths": list(lm.blocks.block_paths),
                           "skip_nmse": [float(i % 3) for i in range(n)], "block_influence": [1.0] * n,
                           "skippable": [True] * n}}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("budget", [dict(drop_blocks=0.25), dict(ffn=0.5), dict(heads=0.5),
                                    dict(drop_blocks=0.25, method="joint", ffn=0.25, heads=0.5)])
def test_pruned_lm_reloads_and_generates_the_same_with_and_without_cache(tmp_path, arch, budget):
    from transformers import AutoModelForCausalLM
    lm = load_model(str(save_tiny_causal_lm(tmp_path / "src", arch, layers=4)))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 64, (2, 12), generator=g),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    res = apply(lm, make_plan(_scores(lm), PlanConfig(**budget)), batches=batches)
    assert res.parameters_after < res.parameters_before
    assert save(res.model, tmp_path / "out", lm) == "huggingface"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = batches[0]["input_ids"][:1, :5]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, res.model.module(input_ids=x).logits)
        a = back.generate(x, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        b = back.generate(x, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert a.shape == (1, 13) and torch.equal(a, b)
