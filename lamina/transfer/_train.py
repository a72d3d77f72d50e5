"""Training a head with the shared loop (``lamina.train.fit``): features in, class scores out.

``rows_input(rows) -> (feats, mask)`` gives the head's inputs for store rows
(pooled features in memory for ``last/best/mix/select``; token-level block
outputs for ``side``); the head is trained with AdamW, warm-up and decay,
early stopping on validation accuracy, the best epoch kept: the loop
``finetune`` and ``distill`` use. The head trains on ``device`` (``--device``;
its inputs are moved there batch by batch) under autocast in ``dtype``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..analyze.metrics.probe import wilson_interval
from ..train import Loop, fit


def on(device: torch.device, feats, mask):
    """The head's inputs on ``device`` (a no-op on the CPU)."""
    return [f.to(device) for f in feats], (mask.to(device) if mask is not None else None)


def train_head(head, params, rows_input, labels: np.ndarray, split: dict, loop: Loop, penalty=None,
               device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Train ``params`` of ``head`` on ``device``; returns fit's history. ``penalty()`` adds a term per row
    (scaled). The head is left on ``device``."""
    device = device or torch.device("cpu")
    head.to(device)
    y = torch.as_tensor(labels, dtype=torch.long).to(device)

    def step(rows, gbs):
        feats, mask = on(device, *rows_input(rows))
        z = head(feats, mask)
        loss = F.cross_entropy(z.float(), y[rows], reduction="sum") / gbs
        parts = {}
        if penalty is not None:
            pen = penalty() * (len(rows) / gbs)
            parts["penalty"] = pen.detach()
            loss = loss + pen
        return loss, parts

    @torch.no_grad()
    def validate(rows):
        return counts(head, rows_input, y, rows)

    torch.manual_seed(loop.seed)
    return fit({"head": head}, params, step, split["train"], split["val"], validate, loop, None, desc="transfer",
               device=device, dtype=dtype)


@torch.no_grad()
def counts(head, rows_input, y, rows, batch: int = 256) -> tuple[int, int, float]:
    """(correct, n, summed cross-entropy) of ``head`` on ``rows``."""
    correct, n, loss = 0, 0, 0.0
    rows = np.asarray(rows)
    p = next(head.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    y = y.to(device)
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        feats, mask = on(device, *rows_input(r))
        z = head(feats, mask).float()
        correct += int((z.argmax(-1) == y[r]).sum())
        loss += float(F.cross_entropy(z, y[r], reduction="sum"))
        n += len(r)
    return correct, n, loss


def test_record(head, rows_input, labels, rows) -> dict:
    """Test accuracy with its 95% Wilson interval."""
    was = head.training
    head.eval()
    try:
        c, n, loss = counts(head, rows_input, torch.as_tensor(labels, dtype=torch.long), rows)
    finally:
        head.train(was)
    lo, hi = wilson_interval(c, n)
    return {"accuracy": c / n, "ci_low": lo, "ci_high": hi, "n": n, "correct": c, "loss": loss / n}
