"""``--max-steps`` in ``lamina.train.fit``: optimizer steps in all, overriding the epochs (transformers'
``max_steps``), the last epoch part-way; at a whole number of epochs it changes nothing."""

import pytest
import torch

from lamina import UsageError
from lamina.train import Loop, TrainConfig, fit


def _run(epochs, max_steps, rows=10, batch=4):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x = torch.randn(rows, 3)
    calls, lrs, vals = [], [], []

    def step(idx, gbs):
        calls.append(list(idx))
        return ((lin(x[idx]) - 1.0) ** 2).sum() / gbs, {}

    def validate(idx):
        vals.append(1)
        return len(vals), 100, 0.0  # rising: no early stop

    loop = Loop(epochs=epochs, lr=1e-2, batch_size=batch, max_steps=max_steps, patience=1, progress=False)
    hist = fit({"m": lin}, list(lin.parameters()), step, list(range(rows)), list(range(4)), validate, loop, None)
    return hist, calls, vals, lin.weight.detach().clone()


def test_max_steps_runs_that_many_steps_and_validates_the_partial_last_epoch():
    hist, calls, vals, _ = _run(epochs=1, max_steps=7)  # 10 rows / 4 = 3 steps an epoch: 3 + 3 + 1
    assert len(calls) == 7 and len(vals) == 3
    assert [e["steps"] for e in hist["epochs"]] == [3, 3, 1]
    assert [e["rows"] for e in hist["epochs"]] == [10, 10, 4]
    assert sum(len(c) for c in calls) == 24
    assert hist["total_steps"] == 7
    # the schedule is laid over the 7 steps: it has decayed to zero at the last one
    assert hist["epochs"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert hist["epochs"][0]["lr"] > 0


def test_max_steps_overrides_more_epochs_and_equals_epochs_at_a_whole_number():
    hist, calls, _, _ = _run(epochs=10, max_steps=4)
    assert len(calls) == 4 and len(hist["epochs"]) == 2
    a, ca, _, wa = _run(epochs=2, max_steps=None)
    b, cb, _, wb = _run(epochs=5, max_steps=6)  # 2 whole epochs of 3 steps
    assert ca == cb and torch.equal(wa, wb)
    assert [e["rows"] for e in a["epochs"]] == [e["rows"] for e in b["epochs"]] == [10, 10]


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "7"])
def test_a_bad_max_steps_is_refused(bad):
    with pytest.raises(UsageError, match="max.steps must be a positive integer"):
        TrainConfig(max_steps=bad)
