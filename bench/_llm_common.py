"""What bench/llm.py and its recovery part (bench/_llm_recovery.py) share: the model and task, calibration batches,
pruned copies, held-out evaluation, block indices of a recorded set."""

from __future__ import annotations

import copy

from lamina.blocks import find_blocks
from lamina.compress.depth import drop_blocks_
from lamina.lm_task import LMTaskSpec
from lamina.models import load_model


def smollm2_task(seq_len: int):
    """The bundled SmolLM2-135M and its `debates` LM task (documents split by seed 0, blocks of ``seq_len``)."""
    lm = load_model("smollm2")
    return lm, LMTaskSpec(data="debates", seq_len=seq_len, seed=0).prepare(lm)


def calib_batches(lm, task, n_blocks: int) -> list[dict]:
    """The first ``n_blocks`` training blocks in batches of 4: the calibration set of every depth method."""
    rows = task.split["train"][:n_blocks]
    return [task.batch(lm, rows[s:s + 4]) for s in range(0, len(rows), 4)]


def pruned(lm, remove: list[int]):
    """A copy of ``lm`` (a LoadedModel) without blocks ``remove``; ``lm`` is untouched."""
    m = copy.deepcopy(lm.module)
    drop_blocks_(m, remove)
    out = copy.copy(lm)
    out.module, out.blocks = m, find_blocks(m)
    return out


def evaluate(lm, task, rows) -> dict:
    """Held-out perplexity, mean token loss and next-token accuracy on blocks ``rows`` (batches of 8)."""
    return task.evaluate(lm, rows, batch_size=8)


def indices(names) -> list[int]:
    """['blocks.3', 'blocks.1'] -> [1, 3]."""
    return sorted(int(b.split(".")[1]) for b in names)
