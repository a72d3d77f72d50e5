"""Early stopping in ``lamina.train.fit`` against scripted validation curves."""

import pytest
import torch

from lamina.train import Loop, fit


def _run(curve, patience, epochs):
    """fit() on a 1-weight model whose validation accuracy follows ``curve`` (one value per epoch)."""
    lin = torch.nn.Linear(1, 1)
    seen = []

    def step(rows, gbs):
        return (lin(torch.ones(len(rows), 1)) ** 2).sum() / gbs, {}

    def validate(rows):
        acc = curve[len(seen)]
        seen.append(acc)
        return acc * 100, 100, 0.0

    loop = Loop(epochs=epochs, lr=1e-3, batch_size=4, patience=patience, progress=False)
    hist = fit({"m": lin}, list(lin.parameters()), step, list(range(8)), list(range(4)), validate, loop, None)
    return hist, len(seen)


@pytest.mark.parametrize("curve,patience,epochs,ran,stopped,best", [
    # the case: best at epoch 3, patience 2 -> epochs 4 and 5 run, 6 does not
    ([0.5, 0.6, 0.7, 0.65, 0.69, 0.7, 0.9, 0.9], 2, 8, 5, True, 3),
    ([0.5, 0.6, 0.7, 0.65, 0.69, 0.7], 2, 6, 5, True, 3),
    # the last requested epoch ends the run: nothing skipped, so not "stopped early"
    ([0.5, 0.6, 0.7, 0.65, 0.69], 2, 5, 5, False, 3),
    ([0.5, 0.6, 0.7, 0.8], 2, 4, 4, False, 4),
    # patience 0: the first epoch without a gain stops
    ([0.5, 0.4, 0.9], 0, 3, 2, True, 1),
    # a tie is no gain
    ([0.5, 0.5, 0.5, 0.9], 1, 4, 2, True, 1),
    # None: every epoch runs
    ([0.9, 0.1, 0.1, 0.1], None, 4, 4, False, 1),
    # a gain resets the count
    ([0.5, 0.4, 0.6, 0.55, 0.5, 0.9], 2, 6, 5, True, 3),
])
def test_stops_after_exactly_patience_epochs_without_gain(curve, patience, epochs, ran, stopped, best):
    hist, n = _run(curve, patience, epochs)
    assert n == ran == len(hist["epochs"])
    assert hist["stopped_early"] is stopped
    assert hist["best_epoch"] == best
    assert hist["best_val_accuracy"] == pytest.approx(curve[best - 1])
