"""The joint depth choice: sets scored together, against a naive recomputation and on identity blocks."""

import numpy as np
import pytest
import torch

from lamina.blocks import bypass
from lamina.errors import UsageError
from lamina.compress.joint import _Calib, joint_select
from lamina.models import wrap_module
from lamina.testing import tiny_causal_lm, tiny_cnn


def _identity_(block):  # zero what the block adds to its residual stream: output == input
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
                p.zero_()


def _lm(arch="llama", layers=5, identity=()):
    m = tiny_causal_lm(arch, layers=layers, seed=2)
    blocks = m.model.layers if hasattr(m, "model") else m.transformer.h
    for i in identity:
        _identity_(blocks[i])
    lm = wrap_module(m, modality="text")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 64, (3, 10), generator=g),
                "attention_mask": torch.ones(3, 10, dtype=torch.long)} for _ in range(2)]
    batches[1]["attention_mask"][0, 7:] = 0  # padding is excluded
    return lm, batches


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_joint_picks_the_identity_blocks(arch):
    lm, batches = _lm(arch, identity=(1, 3))
    res = joint_select(lm, batches, 2, list(range(5)), objective="nmse")
    assert res["remove"] == [1, 3]
    assert res["score"] == pytest.approx(0.0, abs=1e-10)
    # every candidate of every round is recorded
    assert [len(r["candidates"]) for r in res["rounds"]] == [5, 4]
    assert res["set_evaluations"] == 9 and res["cost_forwards"] > 1


def test_loss_objective_never_worse_than_removing_the_identity_blocks():
    # removing identity blocks leaves the loss as it is; a random model may even gain by losing another block
    lm, batches = _lm("llama", identity=(1, 3))
    res = joint_select(lm, batches, 2, list(range(5)))
    assert res["objective"] == "loss"
    with torch.inference_mode():
        full = _Calib(lm, batches, "loss").score([1, 3])
    assert res["score"] <= full + 1e-9


def test_set_score_equals_a_naive_recomputation():
    lm, batches = _lm("qwen2", layers=4)
    with torch.inference_mode():
        cal = _Calib(lm, batches, "nmse")
        for remove in ([2], [0, 3], [1, 2], [0, 1, 2]):
            num = den = 0.0
            for b in batches:
                full = lm.forward(b).logits.double()
                with bypass(lm.module, remove, lm.blocks):
                    skip = lm.forward(b).logits.double()
                m = b["attention_mask"].double()[..., None]
                num += float(((full - skip) ** 2 * m).sum())
                den += float((full ** 2 * m).sum())
            assert cal.score(remove) == pytest.approx(num / den, rel=1e-6)
        cal = _Calib(lm, batches, "loss")
        for remove in ([1], [0, 2]):
            tot = n = 0.0
            for b in batches:
                with bypass(lm.module, remove, lm.blocks):
                    z = lm.forward(b).logits.double()
                ce = torch.nn.functional.cross_entropy(z[:, :-1].transpose(1, 2), b["input_ids"][:, 1:],
                                                       reduction="none")
                keep = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).double()
                tot += float((ce * keep).sum())
                n += float(keep.sum())
            assert cal.score(remove) == pytest.approx(tot / n, rel=1e-6)


def test_beam_is_never_worse_than_greedy_and_works_on_a_cnn():
    lm, batches = _lm("llama", layers=5)
    g = joint_select(lm, batches, 3, list(range(5)), objective="nmse")
    b = joint_select(lm, batches, 3, list(range(5)), objective="nmse", beam=3)
    assert b["score"] <= g["score"] + 1e-12 and len(b["remove"]) == 3
    cnn = wrap_module(tiny_cnn(seed=0))
    x = [{"pixels": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))}]
    res = joint_select(cnn, x, 2, [0, 2, 3])  # block 1 downsamples: not a candidate
    assert len(res["remove"]) == 2 and set(res["remove"]) <= {0, 2, 3} and np.isfinite(res["score"])
    assert res["objective"] == "nmse"


def test_joint_plan_through_apply_and_a_parameter_target():
    from lamina.compress import PlanConfig, apply, choose_blocks, make_plan, needs_model
    from lamina.models import model_fingerprint
    lm, batches = _lm("llama", layers=5, identity=(0, 2, 4))
    m = lm.module
    n = 5
    scores = {"model": {"name": "t", "fingerprint": model_fingerprint(m), "parameters": 1},
              "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "paths": list(lm.blocks.block_paths),
                             "skip_nmse": [1.0] * n, "block_influence": [1.0] * n, "skippable": [True] * n}}
    plan = make_plan(scores, PlanConfig(drop_blocks=0.4, method="joint", beam=2))
    assert needs_model(plan) and plan["depth"]["beam"] == 2
    with pytest.raises(Exception, match="calibration"):
        apply(m, plan)
    chosen = choose_blocks(m, plan, batches)["depth"]
    assert set(chosen["remove"]) <= {"blocks.0", "blocks.2", "blocks.4"} and len(chosen["remove"]) == 2
    assert chosen["joint"]["objective"] == "loss" and len(chosen["rounds"]) == 2
    res = apply(m, plan, batches=batches)
    b = batches[0]
    with torch.no_grad(), bypass(m, [int(r.split(".")[1]) for r in chosen["remove"]]):
        ref = m(**b).logits
    with torch.no_grad():
        torch.testing.assert_close(res.model(**b).logits, ref, rtol=1e-5, atol=1e-6)
    # a parameter target: blocks go until it fits, chosen jointly
    per_block = sum(p.numel() for p in m.model.layers[0].parameters())
    total = sum(p.numel() for p in m.parameters())
    tp = make_plan(scores, PlanConfig(target_params=float(total - 3 * per_block), method="joint"))
    got = choose_blocks(m, tp, batches)["depth"]
    assert got["n_removed"] == 3 and set(got["remove"]) == {"blocks.0", "blocks.2", "blocks.4"}
    with pytest.raises(UsageError):
        PlanConfig(drop_blocks=0.4, method="joint", beam=0)


def test_shortlist_scores_fewer_sets_and_still_finds_the_identity_blocks():
    lm, batches = _lm("llama", layers=5, identity=(1, 3))
    res = joint_select(lm, batches, 2, list(range(5)), objective="nmse", shortlist=2)
    assert res["remove"] == [1, 3] and [len(r["candidates"]) for r in res["rounds"]] == [5, 2]
    # the list refills from earlier rounds: every round has its full shortlist until the candidates run out
    deep = joint_select(lm, batches, 4, list(range(5)), objective="nmse", shortlist=2)
    assert [len(r["candidates"]) for r in deep["rounds"]] == [5, 2, 2, 2] and len(deep["remove"]) == 4


def test_cli_prune_method_joint_records_every_candidate(tmp_path, tiny_dirs):
    import json

    from conftest import make_text_run

    from lamina.cli import main
    (tmp_path / "run").mkdir()
    run, _ = make_text_run(tmp_path / "run", tiny_dirs["bert"], 40, seed=4, control=False, importance_samples=16)
    out = tmp_path / "small"
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(run / "scores.json"), "--drop-blocks", "0.5",
                 "--method", "joint", "--beam", "2", "--out", str(out)]) == 0
    depth = json.loads((out / "plan.json").read_text())["depth"]
    assert depth["method"] == "joint" and depth["beam"] == 2 and depth["joint"]["objective"] == "nmse"
    (r1,) = depth["rounds"]
    assert {tuple(c["remove"]) for c in r1["candidates"]} == {("blocks.0",), ("blocks.1",)}
    best = min(r1["candidates"], key=lambda c: (c["score"], c["remove"]))
    assert depth["remove"] == best["remove"]


def test_seed_sets_are_scored_and_never_beaten_by_the_returned_set():
    from lamina.compress.plan import even_pick
    lm, batches = _lm("llama", layers=6)
    res = joint_select(lm, batches, 3, list(range(6)), objective="nmse", shortlist=1)
    seeded = {s["name"]: s for s in res["seeded"]}
    assert set(seeded) == {"even", "best_alone"}
    assert seeded["even"]["remove"] == [f"blocks.{i}" for i in even_pick(list(range(6)), 3)]
    alone = sorted(res["rounds"][0]["candidates"], key=lambda c: (c["score"], c["remove"]))[:3]
    assert seeded["best_alone"]["remove"] == sorted((c["remove"][0] for c in alone), key=lambda b: int(b[7:]))
    with torch.inference_mode():
        cal = _Calib(lm, batches, "nmse")
        for s in seeded.values():  # each seed's recorded score is its own set's score
            assert s["score"] == pytest.approx(cal.score([int(b[7:]) for b in s["remove"]]), rel=1e-9)
    assert all(res["score"] <= s["score"] for s in seeded.values())
    chosen = res["chosen_by"]
    if chosen != "search":
        assert [f"blocks.{i}" for i in res["remove"]] == seeded[chosen]["remove"]
    off = joint_select(lm, batches, 3, list(range(6)), objective="nmse", shortlist=1, seeds=False)
    assert off["seeded"] == [] and off["chosen_by"] == "search" and res["score"] <= off["score"]


def test_accuracy_objective_equals_the_error_rate_recomputed_by_hand():
    from lamina.testing import tiny_hf_model
    m = tiny_hf_model("bert", layers=4, seed=3, head=True)
    lm = wrap_module(m, modality="text")
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(4, 64, (6, 8), generator=g),
                "attention_mask": torch.ones(6, 8, dtype=torch.long)} for _ in range(2)]
    labels = [torch.randint(0, 2, (6,), generator=g) for _ in batches]
    res = joint_select(lm, batches, 2, list(range(4)), labels=labels)
    assert res["objective"] == "accuracy"
    m.eval()
    for cand in res["rounds"][1]["candidates"] + res["seeded"]:
        remove = [int(b[7:]) for b in cand["remove"]]
        wrong = ce = 0.0
        with torch.no_grad(), bypass(m, remove, lm.blocks):
            for b, y in zip(batches, labels):
                z = m(**b).logits.double()
                wrong += float((z.argmax(-1) != y).sum())
                ce += float(torch.nn.functional.cross_entropy(z, y, reduction="sum"))
        assert cand["score"] == pytest.approx(wrong / 12, abs=1e-12)
        assert cand["label_loss"] == pytest.approx(ce / 12, rel=1e-5)
    best = min(res["rounds"][1]["candidates"] + res["seeded"], key=lambda c: (c["score"], c["label_loss"]))
    assert (res["score"], res["label_loss"]) == (best["score"], pytest.approx(best["label_loss"]))
    with pytest.raises(UsageError, match="label"):
        joint_select(lm, batches, 2, list(range(4)), labels=labels[:1])
    with pytest.raises(UsageError, match="labels"):
        joint_select(lm, batches, 2, list(range(4)), objective="accuracy")


def test_prune_a_fine_tuned_classifier_jointly_scores_by_error_rate_on_its_rows(tiny_teacher, tmp_path):
    import json

    from lamina.cli import main
    out = tmp_path / "small"
    assert main(["prune", str(tiny_teacher), "--drop-blocks", "0.5", "--method", "joint", "--out", str(out)]) == 0
    depth = json.loads((out / "plan.json").read_text())["depth"]
    assert depth["joint"]["objective"] == "accuracy" and depth["joint"]["chosen_by"] in ("search", "even", "best_alone")
    assert all(0 <= c["score"] <= 1 and "label_loss" in c for c in depth["rounds"][0]["candidates"])
    assert {s["name"] for s in depth["joint"]["seeded"]} == {"even", "best_alone"}
