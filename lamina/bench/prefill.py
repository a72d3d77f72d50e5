"""Prefill inputs of several sequence lengths for ``lamina bench`` on causal LMs.

The task packs the test text into blocks of ``--seq-len`` tokens; a prefill of
another length reads the same text as one token stream (the test blocks in
order) cut into windows of that length, so length ``--seq-len`` gives exactly
the test blocks. When the stream is shorter than ``batch x length`` tokens it
is repeated from its start, and the record says so (``repeated``).
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..lm_task import context_length


def check_lengths(lengths, lms) -> None:
    """Refuse a prefill length above any model's context (the models are known only after loading)."""
    for lm in lms:
        ctx = context_length(lm.module)
        over = [n for n in lengths if ctx is not None and n > ctx]
        if over:
            raise UsageError("--prefill-lens has a length longer than the model's context", value=over,
                             allowed=f"1 to {ctx} ({lm.name}'s max_position_embeddings)",
                             fix=f"--prefill-lens {' '.join(str(n) for n in sorted(set(lengths)) if n <= ctx) or ctx}")


def prefill_batch(stream: torch.Tensor, length: int, batch: int) -> tuple[dict, bool]:
    """``batch`` consecutive windows of ``length`` tokens of ``stream`` (1-D ids), and whether it was repeated."""
    need = length * batch
    repeated = need > stream.numel()
    ids = stream.repeat(-(-need // stream.numel()))[:need] if repeated else stream[:need]
    ids = ids.reshape(batch, length).clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, repeated
