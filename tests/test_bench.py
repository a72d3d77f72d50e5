"""`lamina bench`: FLOPs against a hand count, accuracy against scikit-learn on the teacher's own test
rows, ratios of a model against itself equal 1, a depth-pruned copy has fewer FLOPs, refusals exit 2."""

import json

import pytest
import torch
import torch.nn as nn

from lamina import UsageError
from lamina.bench import BenchConfig, bench, flops_per_sample
from lamina.cli import main
from lamina.compress import drop_blocks_
from lamina.models import load_model, wrap_module
from lamina.task import logits_of, read_task


def test_flops_match_a_hand_count():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 5))
    lm = wrap_module(net)
    assert flops_per_sample(lm, {"pixels": torch.randn(4, 12)}) == 2 * (12 * 20 + 20 * 20 + 20 * 5)


def _small_copy(teacher, dest):
    lm = load_model(str(teacher))
    drop_blocks_(lm.module, [1])
    lm.module.save_pretrained(dest)
    lm.tokenizer.save_pretrained(dest)
    return dest


def test_bench_teacher_and_pruned_copy(tiny_teacher, tmp_path, capsys):
    small = _small_copy(tiny_teacher, tmp_path / "small")
    out = tmp_path / "b"
    assert main(["bench", str(tiny_teacher), str(tiny_teacher), str(small), "--data",
                 str(read_task(tiny_teacher).data), "--out", str(out), "--repeats", "3", "--warmup", "1",
                 "--batch-sizes", "1", "4", "--no-progress"]) == 0
    assert "bench:" in capsys.readouterr().out
    res = json.loads((out / "bench.json").read_text())
    same, pruned = res["models"][1], res["models"][2]
    assert same["vs_first"]["parameter_ratio"] == 1 and same["vs_first"]["flop_ratio"] == 1
    assert same["vs_first"]["accuracy_retained"] == 1
    assert set(same["latency"]) == {"1", "4"} and same["latency"]["4"]["repeats"] == 3
    assert pruned["blocks"] == 1 and pruned["vs_first"]["flop_ratio"] < 0.8
    assert pruned["parameters"] < same["parameters"]

    # accuracy: the teacher's own test rows, checked with scikit-learn
    from sklearn.metrics import accuracy_score
    spec = read_task(tiny_teacher)
    ds, split = spec.load()
    lm = load_model(str(tiny_teacher))
    with torch.no_grad():
        b = lm.batch(ds, split["test"], spec.max_length)
        pred = logits_of(lm.forward(b)).argmax(-1).numpy()
    assert res["test_rows"] == len(split["test"])
    assert res["models"][0]["accuracy"] == pytest.approx(accuracy_score(ds.labels[split["test"]], pred))

    # the data comes from finetune.json when --data is not given; an existing bench.json is kept
    assert main(["bench", str(tiny_teacher), "--out", str(out), "--repeats", "1", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    r2 = bench([str(tiny_teacher)], BenchConfig(out=str(tmp_path / "c"), repeats=1, batch_sizes=(2,),
                                                progress=False, accuracy=False))
    assert r2["task"]["data"] == spec.data and "accuracy" not in r2["models"][0]


def test_bench_refuses_bad_settings(capsys):
    assert main(["bench", "minilm", "--batch-sizes", "0"]) == 2
    assert main(["bench", "minilm", "--repeats", "0"]) == 2
    with pytest.raises(UsageError, match="no data"):
        bench([wrap_module(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))], BenchConfig(progress=False))
