"""bench/quantize.py's targets come only from the measurements its record holds, so re-running one part keeps the
others' keys and nothing carried in by hand survives; its latency loop records thread CPU time beside wall time."""

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quantize as qb  # noqa: E402


def _lat(ms: dict, load=2.0) -> dict:
    """A latency record as _latency writes it: median, quartiles at +-10%, CPU time 0.9 of wall."""
    return {**{m: {"median_ms": v, "q1_ms": 0.9 * v, "q3_ms": 1.1 * v, "min_ms": 0.8 * v, "max_ms": 1.2 * v,
                   "cpu_median_ms": 0.9 * v, "cpu_q1_ms": 0.85 * v, "cpu_q3_ms": 0.95 * v} for m, v in ms.items()},
            "load_average": [load, load, load]}


@pytest.fixture
def record():
    acc = {"fp32": (0.80, 0.75), "mixed": (0.80, 0.745), "composed": (0.78, 0.735), "student_fp32": (0.79, 0.74)}
    sweep = {"fp32": {"heldout_accuracy": 0.75, "heldout_changed": 0, "heldout_logit_nmse": 0.0}}
    for k, imp, rand in ((4, 0.75, (0.75, 0.75, 0.75)), (8, 0.748, (0.74, 0.742, 0.741))):
        sweep[f"importance_{k}"] = {"heldout_accuracy": imp, "heldout_changed": 5, "heldout_logit_nmse": 1e-3}
        for s, a in enumerate(rand):
            sweep[f"random_{k}_s{s}"] = {"heldout_accuracy": a, "heldout_changed": 9 + s, "heldout_logit_nmse": 4e-3}
    return {"version": 3, "heldout_rows": 2000,
            "scores": {m: {"test_accuracy": t, "heldout_accuracy": h} for m, (t, h) in acc.items()},
            "sweep": {"counts": [4, 8], "seeds": 3, "fast": "int8fused", "fallback": "float32", "scores": sweep},
            "latency_ms": {"b8_t1": _lat({"fp32": 100.0, "all_int8fused": 60.0, "mixed": 80.0, "composed": 25.0}),
                           "b8_t2": _lat({"fp32": 60.0, "all_int8fused": 40.0, "mixed": 50.0, "composed": 20.0})},
            "previous_rounds": {"round3": {"targets": {"minilm_composed_speedup_b8": {"value": 3.83, "met": False}}}}}


def test_every_target_is_recomputed_from_the_measurements(record):
    t = qb._targets(record)
    assert t["minilm_mixed_drop"]["value"] == pytest.approx(0.005) and t["minilm_mixed_drop"]["met"]
    assert t["minilm_composed_drop"]["value"] == pytest.approx(0.015) and t["minilm_composed_drop"]["met"]
    assert t["minilm_mixed_speedup_b8"]["value"] == pytest.approx(100 / 80)
    assert t["minilm_mixed_speedup_b8"]["cpu_time_ratio"] == pytest.approx(90 / 72)
    assert t["minilm_mixed_speedup_b8"]["two_threads"] == pytest.approx(60 / 50)
    assert t["minilm_mixed_speedup_b8"]["upper_bound_all_int8fused"] == pytest.approx(100 / 60, abs=1e-3)
    assert t["minilm_composed_speedup_b8"]["value"] == pytest.approx(4.0) and not t["minilm_composed_speedup_b8"]["met"]
    # compared where random loses most (8 layers); importance 0.748 against the random mean 0.741
    imp = t["importance_minus_random"]
    assert imp["count"] == 8 and imp["value"] == pytest.approx(0.007) and imp["met"]
    assert qb._missing(t) == []


def test_a_previous_rounds_value_stays_beside_the_measured_one(record):
    t = qb._targets(record)
    assert t["minilm_composed_speedup_b8"]["value"] == pytest.approx(4.0)
    assert t["minilm_composed_speedup_b8"]["previous"] == {"round3": {"value": 3.83, "met": False}}


def test_a_key_without_its_measurement_is_missing_not_carried_over(record):
    """A target written into the record by hand (as round 4 had to) is never read back: the key exists only while
    its measurement does, and _missing names it otherwise."""
    rec = copy.deepcopy(record)
    rec["targets"] = {"minilm_composed_drop": {"value": 0.0, "met": True}}
    del rec["scores"]["composed"]
    del rec["latency_ms"]["b8_t1"]["composed"]
    t = qb._targets(rec)
    assert "minilm_composed_drop" not in t and "minilm_composed_speedup_b8" not in t
    assert qb._missing(t) == ["minilm_composed_drop", "minilm_composed_speedup_b8"]
    assert t["minilm_mixed_speedup_b8"]["value"] == pytest.approx(1.25)  # the other keys unaffected


def test_rerunning_one_part_keeps_the_other_parts_keys(record, tmp_path):
    """_merge writes only what a part changed over the file: a sweep re-run leaves the latency and scores, so every
    key is recomputed from them."""
    import json
    path = tmp_path / "quantize.json"
    path.write_text(json.dumps(record))
    before = json.loads(json.dumps(record))
    res = json.loads(json.dumps(record))
    res["sweep"]["scores"]["importance_8"]["heldout_accuracy"] = 0.745  # the sweep part measured again
    merged = qb._merge(path, before, res)
    t = qb._targets(merged)
    assert set(qb.ISSUE_KEYS) <= set(t)
    assert t["importance_minus_random"]["value"] == pytest.approx(0.004)
    before, res = json.loads(json.dumps(merged)), json.loads(json.dumps(merged))
    path.write_text(json.dumps(merged | {"composed_not_measured": "a note"}))
    before["composed_not_measured"] = "a note"
    assert "composed_not_measured" not in qb._merge(path, before, res)  # a key the part removed goes


class _Tiny:
    """A model with lamina's forward(batch) call, for the timing loop."""

    def __init__(self, n):
        self.w = torch.randn(n, n)

    def forward(self, batch):
        return batch["x"] @ self.w


def test_latency_records_wall_and_thread_cpu_time_for_one_thread():
    threads = torch.get_num_threads()
    lat = qb._latency({"a": _Tiny(64), "b": _Tiny(64)}, {"x": torch.randn(32, 64)}, 1, 5)
    for m in ("a", "b"):
        r = lat[m]
        assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
        assert r["cpu_min_ms"] <= r["cpu_median_ms"] <= r["cpu_max_ms"]
        assert 0 < r["cpu_median_ms"]
    two = qb._latency({"a": _Tiny(64)}, {"x": torch.randn(32, 64)}, 2, 3)
    torch.set_num_threads(threads)
    assert "cpu_median_ms" not in two["a"]  # the calling thread's CPU time is not the forward's with two threads


def test_proxy_targets_come_from_every_record_and_pool_the_retimes():
    """bench/quantize_proxy.py: the shape proxy, the distilled alternatives and every re-time live side by side; an
    alternative's value is the median of its runs (the --student run first), met only with the drop inside 0.02."""
    import quantize_proxy as qp
    sp = lambda w, c: {"wall": w, "cpu": c}  # noqa: E731
    rec = {"proxy": {"speedup_vs_fp32_teacher": {"all_int8fused": sp(1.6, 1.58), "a_fp32": sp(2.0, 2.0),
                                                 "a_int8fused": sp(5.4, 5.1), "b_int8fused": sp(4.0, 4.2)}},
           "students": {"load_average_start": [3.0], "max_drop": 0.02, "models": {
               "a": {"composed": "/q/a", "heldout_drop": 0.011, "speedup_b8": sp(5.19, 4.97)},
               "b": {"composed": "/q/b", "heldout_drop": 0.03, "speedup_b8": sp(6.0, 6.0)}}},
           "retimes": [{"models": {"a_composed": "/q/a"}, "speedup_vs_fp32_teacher": {"a_composed": sp(5.34, 5.3)}},
                       {"models": {"a_composed": "/elsewhere"}, "speedup_vs_fp32_teacher": {"a_composed": sp(1, 1)}},
                       {"models": {"a_composed": "/q/a"}, "speedup_vs_fp32_teacher": {"a_composed": sp(4.9, 5.4)}}]}
    t = qp._targets(rec)
    assert t["composed_shape_proxy_best_b8"]["shape"] == "a_int8fused" and t["composed_shape_proxy_best_b8"]["met"]
    assert t["mixed_upper_bound_b8"]["value"] == 1.58 and not t["mixed_upper_bound_b8"]["met"]
    a = t["composed_alternative_a"]
    assert a["runs_wall"] == [5.19, 5.34, 4.9]  # the run of another saved model is not pooled
    assert a["value"] == 5.19 and a["cpu_time_ratio"] == 5.3 and a["met"]
    assert not t["composed_alternative_b"]["met"]  # 6x, but 3 points of held-out accuracy lost
