"""``quantize`` on a causal LM: next-token-logit sensitivity in bounded memory, and the perplexity budget.

A causal LM's main output is its logits (B, T, V); with SmolLM2's vocabulary of
49,152, one block of 64 tokens is 12.6 MB of logits, so keeping the float
model's logits of every calibration block for 211 layer swaps is what would
not fit. Instead the float model's *final hidden states* (B, T, d) are kept
(d = 576: 85x smaller), every forward is stopped just before the output head
(a pre-hook on it raises, so the full logits are never built), and the logits
nMSE

    sum over calibration tokens of ||head_q(h_q) - head_f(h_f)||^2 / sum ||head_f(h_f)||^2

is summed over chunks of vocabulary rows, each chunk's (positions x rows)
logits at most ``LOGIT_BYTES``. When the head itself is the layer scored, each
chunk of its rows is quantized on its own: every format here quantizes a
weight row by row (one scale per output channel, or an elementwise bf16
rounding) and an activation from the whole input (one scale per call, or per
token), and the chunk sees the whole input, so its logits are exactly those
rows of the quantized head's. (Chunks of positions would not be: int8fused's
one activation scale per call would then be taken per chunk.)

The budget: ``--max-drop`` on an LM is the largest *relative* increase of
validation perplexity allowed (0.02 = +2%): perplexity levels differ by
model and text (SmolLM2 on the debates: 39; a fine-tuned LM: 10), so a
relative bound means the same on each, and log(ppl_q / ppl_f) is the
increase of the mean token loss, which is what the loss-based literature
reports. (An absolute 0.02 perplexity would be below bf16's own rounding,
+0.03 on SmolLM2.)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LOGIT_BYTES = 64 * 2 ** 20  # one chunk of float32 logits (positions x vocabulary)
REF_LOGIT_BYTES = 256 * 2 ** 20  # the float logits of all calibration blocks are kept when they fit this
EVAL_LOGIT_BYTES = 256 * 2 ** 20  # one batch of full logits when perplexity is evaluated


class _Stop(Exception):
    """Raised by the head's pre-hook: the forward has reached the head, nothing after it is needed."""


def head_name(lm) -> str | None:
    """The name of the causal LM's output head (a Linear), or None (not a causal LM / no such head)."""
    from ..task import is_causal_lm
    if not is_causal_lm(lm):
        return None
    get = getattr(lm.module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    return next((n for n, m in lm.module.named_modules() if m is head and n), None)


def final_hidden(lm, batch: dict, head: str) -> torch.Tensor:
    """The input of the module at ``head`` (the final hidden states, (B, T, d)) when ``lm`` runs on ``batch``.

    The forward is stopped there, so the full logits are never computed."""
    got = {}

    def hook(_module, args, kwargs):
        got["h"] = (args[0] if args else next(iter(kwargs.values()))).detach()
        raise _Stop

    handle = lm.module.get_submodule(head).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        lm.forward(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "h" not in got:  # the forward did not reach the head: a model lamina cannot read this way
        raise RuntimeError(f"the forward never called the output head {head!r}")
    return got["h"]


def _row_chunks(rows: int, positions: int):
    step = max(1, LOGIT_BYTES // (4 * max(1, positions)))
    return [(s, min(rows, s + step)) for s in range(0, rows, step)]


def _sliced(head: nn.Linear, lo: int, hi: int) -> nn.Linear:
    """Rows lo:hi of ``head`` as a Linear of its own (views of its weights, no copy)."""
    out = nn.Linear(head.in_features, hi - lo, bias=head.bias is not None, device="meta")
    out.weight = nn.Parameter(head.weight[lo:hi].detach(), requires_grad=False)
    if head.bias is not None:
        out.bias = nn.Parameter(head.bias[lo:hi].detach(), requires_grad=False)
    return out


class LogitChange:
    """nMSE of the next-token logits of ``lm`` as it is now against the float model captured at construction,
    on ``batches`` (see the module doc: final hidden states kept, logits recomputed chunk by chunk).

    Call it with ``head_format`` when the output head is the layer quantized (its rows are then quantized chunk
    by chunk in that format); the module found at the head is not called."""

    def __init__(self, lm, batches, head: str):
        self.lm, self.batches, self.head = lm, list(batches), head
        self.float_head = lm.module.get_submodule(head)
        self.vocab = int(self.float_head.out_features)
        self._quantized: dict[tuple, nn.Module] = {}
        with torch.inference_mode():
            self.ref = [final_hidden(lm, b, head) for b in self.batches]
            # the float logits are kept when they are small (each later call then runs the head once, not twice)
            keep = 4 * self.vocab * sum(h.numel() // h.shape[-1] for h in self.ref) <= REF_LOGIT_BYTES
            self.kept = [[self._logits(h, lo, hi, None) for lo, hi in self._chunks(h)] for h in self.ref] if keep \
                else None
            self.den = sum(float((self._ref(i, j, lo, hi) ** 2).sum())
                           for i, h in enumerate(self.ref) for j, (lo, hi) in enumerate(self._chunks(h)))

    def _ref(self, i: int, j: int, lo: int, hi: int) -> torch.Tensor:
        return self.kept[i][j] if self.kept is not None else self._logits(self.ref[i], lo, hi, None)

    def _chunks(self, h: torch.Tensor):
        return _row_chunks(self.vocab, h.numel() // h.shape[-1])

    def _logits(self, h: torch.Tensor, lo: int, hi: int, fmt: str | None) -> torch.Tensor:
        if fmt is None:
            w = self.float_head.weight[lo:hi]
            b = None if self.float_head.bias is None else self.float_head.bias[lo:hi]
            return nn.functional.linear(h.to(w.dtype), w, b).float()
        key = (fmt, lo, hi)
        if key not in self._quantized:
            from .formats import quantized_linear
            self._quantized[key] = quantized_linear(_sliced(self.float_head, lo, hi), fmt)
        return self._quantized[key](h).float()

    def __call__(self, head_format: str | None = None, around=None) -> float:
        """``around(i)``: a context the i-th batch's forward runs in (cached blocks' stubs), or None."""
        num = 0.0
        with torch.inference_mode():
            for i, b in enumerate(self.batches):
                with around(i) if around is not None else contextlib.nullcontext():
                    h = final_hidden(self.lm, b, self.head)
                for j, (lo, hi) in enumerate(self._chunks(h)):
                    num += float(((self._logits(h, lo, hi, head_format) - self._ref(i, j, lo, hi)) ** 2).sum())
        return num / self.den if self.den > 0 else num

    def forget(self, fmt: str) -> None:
        """Drop the quantized head chunks of ``fmt`` (kept only while that head is scored)."""
        self._quantized = {k: v for k, v in self._quantized.items() if k[0] != fmt}


def eval_batch_size(requested: int, seq_len: int, vocab: int) -> int:
    """Blocks per perplexity batch so one batch's float32 logits stay within ``EVAL_LOGIT_BYTES``."""
    return max(1, min(int(requested), EVAL_LOGIT_BYTES // max(1, 4 * seq_len * vocab)))


def relative_increase(base: float, value: float) -> float:
    """The budget unit of ``--max-drop`` on an LM: value / base - 1 (0.02 = perplexity +2%)."""
    return value / base - 1.0
