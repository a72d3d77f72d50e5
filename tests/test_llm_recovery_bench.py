"""bench/llm.py --part recovery with teacher correction: the corrected teacher is trained on training blocks
only, cached as safetensors and reused only while its checksum holds; the paired summary and the targets."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _llm_recovery as R  # noqa: E402
import llm as bench_llm  # noqa: E402

from lamina.lm_task import LMTaskSpec  # noqa: E402
from lamina.models import load_model  # noqa: E402
from lamina.task import make_task  # noqa: E402
from lamina.testing import save_tiny_causal_lm, tiny_sentences  # noqa: E402


@pytest.fixture()
def setup(tmp_path):
    texts, _ = tiny_sentences(80, seed=2)
    (tmp_path / "d.txt").write_text("\n".join(texts))
    lm = load_model(str(save_tiny_causal_lm(tmp_path / "teacher", layers=2)))
    for p in lm.module.parameters():
        p.requires_grad_(False)
    task = make_task(LMTaskSpec(data=str(tmp_path / "d.txt"), seq_len=8), lm)
    args = SimpleNamespace(teacher_correction=4, recovery_batch=2, recovery_lr=1e-3, seq_len=8,
                           work=str(tmp_path / "work"))
    return lm, task, args


def _corrected(lm, task, args, rows_seen=None):
    eval_rows = task.split["test"][:4]
    start = R._log_ppl(lm, task, eval_rows)
    if rows_seen is not None:  # record every block the training step sees
        step = R.Trainer.step

        def spy(self, rows):
            rows_seen.extend(rows)
            return step(self, rows)
        R.Trainer.step = spy
    try:
        return R.corrected_teacher(args, lm, task, eval_rows, lambda n: [n // 2, n], start), start
    finally:
        if rows_seen is not None:
            R.Trainer.step = step


def test_corrected_teacher_trains_on_training_blocks_only_and_leaves_the_teacher_alone(setup):
    lm, task, args = setup
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    seen: list = []
    (t, rec), start = _corrected(lm, task, args, seen)
    assert len(seen) == 4 * 2 and set(seen) <= set(task.split["train"])
    assert rec["tokens"] == 4 * 2 * 8 and "cached" not in rec
    assert [c["step"] for c in rec["curve"]] == [0, 2, 4] and rec["curve"][0]["log_ppl"] == start
    for k, v in lm.module.state_dict().items():  # the original teacher (the students' source) is untouched
        assert torch.equal(v, before[k])
    moved = [k for k, v in t[False].state_dict().items() if not torch.equal(v, before[k])]
    assert moved and not any("embed" in k for k in moved)  # trained, the tied embedding frozen
    assert t[True].dtype == torch.bfloat16 and not any(p.requires_grad for p in t[False].parameters())


def test_corrected_teacher_is_reused_from_its_cache_and_retrained_when_the_file_changes(setup):
    lm, task, args = setup
    (t1, r1), _ = _corrected(lm, task, args)
    (t2, r2), _ = _corrected(lm, task, args)
    assert "cached" in r2 and r2["log_ppl"] == r1["log_ppl"]
    for k, v in t1[False].state_dict().items():
        assert torch.equal(v, t2[False].state_dict()[k])
    w = Path(args.work) / "teacher-corrected" / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 0xFF  # a changed file fails its sha256 and is retrained, not loaded
    w.write_bytes(bytes(b))
    (_, r3), _ = _corrected(lm, task, args)
    assert "cached" not in r3
    args.teacher_correction = 3  # another setting: another stamp, retrained
    (_, r4), _ = _corrected(lm, task, args)
    assert "cached" not in r4 and r4["tokens"] == 3 * 2 * 8


def test_corrected_teacher_refuses_more_blocks_than_the_training_split(setup):
    lm, task, args = setup
    args.teacher_correction = len(task.split["train"])
    with pytest.raises(SystemExit, match="training split"):
        _corrected(lm, task, args)


def _rec(values: dict) -> dict:
    runs = {f"{n}_seed{s}": {"log_ppl": v} for n, vs in values.items() for s, v in enumerate(vs)}
    return {"runs": runs, "pruned_log_ppl": 4.5, "teacher_log_ppl": 3.7,
            "settings": {"tokens_per_run": 1024}, "teacher_correction": {"tokens": 1024}}


def test_summary_pairs_each_recipe_with_ce_and_the_targets_name_the_corrected_teacher():
    v = {"ce": [3.57, 3.56, 3.58], "kd": [3.61, 3.60, 3.62], "kd_corrected": [3.55, 3.545, 3.56]}
    rec = _rec(v)
    rec["summary"] = s = R.summary(rec)
    for n in ("kd", "kd_corrected"):
        d = np.array(v[n]) - np.array(v["ce"])
        assert s["vs_ce"][n]["mean"] == pytest.approx(d.mean())
        assert s["vs_ce"][n]["std"] == pytest.approx(d.std(ddof=1))
    assert s["vs_ce"]["kd_corrected"]["beats_ce_beyond_spread"] and not s["vs_ce"]["kd"]["beats_ce_beyond_spread"]
    targets: dict = {}
    bench_llm.recovery_targets(rec, targets)
    t = targets["kd_minus_ce_log_ppl"]
    assert t["value"] == pytest.approx(s["vs_ce"]["kd_corrected"]["mean"]) and t["met"]
    assert "corrected teacher" in t["goal"] and t["uncorrected"]["value"] == pytest.approx(s["kd_minus_ce"])
    assert not t["uncorrected"]["met"]
    g = targets["kd_gap_recovered"]
    assert g["value"] == pytest.approx((4.5 - np.mean(v["kd_corrected"])) / (4.5 - 3.7))  # the original teacher's gap
    del rec["teacher_correction"]
    rec["runs"] = {k: r for k, r in rec["runs"].items() if not k.startswith("kd_corrected")}
    rec["summary"] = R.summary(rec)
    targets = {}
    bench_llm.recovery_targets(rec, targets)  # without the corrected recipe: plain CE + KD, no `uncorrected`
    assert targets["kd_minus_ce_log_ppl"]["value"] == pytest.approx(rec["summary"]["kd_minus_ce"])
    assert "uncorrected" not in targets["kd_minus_ce_log_ppl"]
