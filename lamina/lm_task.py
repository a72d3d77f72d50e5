"""The language-modelling task: next-token prediction on packed blocks of text.

Documents (``lamina.data.text.load_corpus``) are split train / validation /
test by a seeded permutation of whole documents, so no test document is ever
seen in training or calibration. Each split's documents are tokenized (no
special tokens; the tokenizer's EOS id appended to each document as its
separator, when it has one), concatenated in split order, and cut into blocks
of ``seq_len`` tokens; the tail shorter than a block is dropped. A "row" of
this task is one block: the training loop shuffles blocks, and the held-out
sets are the val / test blocks.

Metric: over every predicted position (position t predicts token t+1, so a
block gives ``seq_len - 1`` predictions),

    loss       = sum of token cross-entropies / number of predictions  (nats)
    perplexity = exp(loss)
    next-token accuracy = share of predictions whose argmax is the next token

one global mean over all tokens of all blocks (never a mean of per-block means).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError


@dataclass(frozen=True)
class LMTaskSpec:
    """Which text an LM is trained and tested on (all of it is recorded).

    Attributes:
        data: bundled text name or path.
        limit: at most this many documents, chosen by ``seed`` (None: all).
        seed: seed of the subsample and of the document split.
        val, test: fractions of the documents held out.
        seq_len: tokens per packed block.
        text_column: text column of a table.
        document_per_file: a folder holds one document per .txt file.
        kind: always 'lm' (how a record tells the two task kinds apart).
    """

    data: str
    limit: int | None = None
    seed: int = 0
    val: float = 0.1
    test: float = 0.2
    seq_len: int = 128
    text_column: str | None = None
    document_per_file: bool = False
    kind: str = "lm"

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise UsageError("--seq-len must be an integer >= 2", value=self.seq_len,
                             allowed="tokens per block, e.g. 128", fix="--seq-len 128")

    def to_dict(self) -> dict:
        return asdict(self)

    def documents(self):
        """(dataset of documents, {'train','val','test'} -> document indices)."""
        from .data.text import load_corpus
        ds = load_corpus(self.data, self.text_column, self.document_per_file)
        n = len(ds)
        rng = np.random.default_rng(self.seed)
        if self.limit:
            if self.limit < 3 or self.limit > n:
                raise UsageError("--limit must be between 3 and the number of documents", value=self.limit,
                                 allowed=f"3..{n}", fix=f"use --limit {min(n, 1000)} or drop it")
            ds = ds.take(np.sort(rng.permutation(n)[: self.limit]))
            n = len(ds)
        if n < 3:
            raise UsageError("language modelling needs at least 3 documents (train, validation, test)",
                             value=n, allowed=">= 3 documents", fix="add text, or one document per line")
        perm = np.random.default_rng([self.seed, 1]).permutation(n)
        n_test = max(1, int(round(self.test * n)))
        n_val = max(1, int(round(self.val * n)))
        split = {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
                 "train": np.sort(perm[n_test + n_val:])}
        return ds, split

    def prepare(self, lm) -> LMTask:
        """Tokenize and pack for ``lm`` (a LoadedModel with a tokenizer)."""
        return LMTask(self, lm)


def context_length(module) -> int | None:
    cfg = getattr(module, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Blocks (N, seq_len) of the documents' tokens, each document followed by EOS; the tail is dropped."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.extend(e)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


class LMTask:
    """The LM task on one model's tokenizer: packed blocks, loss and perplexity (see the module doc)."""

    kind = "lm"
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, spec: LMTaskSpec, lm):
        if lm.tokenizer is None:
            raise UsageError("the language-modelling task needs a model with a tokenizer", value=lm.name,
                             allowed="a causal LM folder with tokenizer files, smollm2, or a .gguf file",
                             fix="save the tokenizer next to the model")
        ctx = context_length(lm.module)
        if ctx is not None and spec.seq_len > ctx:
            raise UsageError("--seq-len is longer than the model's context", value=spec.seq_len,
                             allowed=f"at most {ctx} (the model's max_position_embeddings)",
                             fix=f"--seq-len {min(ctx, 128)}")
        self.spec = spec
        self.ds, self.doc_split = spec.documents()
        parts = {k: pack(lm.tokenizer, [self.ds.inputs[i] for i in v], spec.seq_len)
                 for k, v in self.doc_split.items()}
        empty = [k for k, v in parts.items() if len(v) == 0]
        if empty:
            raise UsageError("too little text for one block of --seq-len tokens in every split", value=spec.seq_len,
                             allowed=f"a shorter --seq-len (splits without a block: {', '.join(empty)})",
                             fix="lower --seq-len, or use more text")
        order = ("train", "val", "test")
        self.blocks = torch.cat([parts[k] for k in order])
        starts = np.cumsum([0] + [len(parts[k]) for k in order])
        self.split = {k: np.arange(starts[i], starts[i + 1]) for i, k in enumerate(order)}
        self.units_per_row = spec.seq_len - 1

    def record(self) -> dict:
        """The task section of a record: the spec, plus document and block counts per split."""
        return self.spec.to_dict() | {"documents": {k: int(len(v)) for k, v in self.doc_split.items()},
                                      "blocks": {k: int(len(v)) for k, v in self.split.items()}}

    def batch(self, lm, rows) -> dict:
        ids = self.blocks[torch.as_tensor(np.asarray(rows), dtype=torch.long)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batches(self, lm, rows, batch_size: int):
        rows = np.asarray(rows)
        for s in range(0, len(rows), batch_size):
            yield self.batch(lm, rows[s:s + batch_size])

    @staticmethod
    def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B, T-1) of each next-token prediction, in float32."""
        z = logits[:, :-1].float()
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(
            ids.shape[0], -1)

    def loss_sum(self, out, rows) -> torch.Tensor:
        """Summed token cross-entropy of the model output ``out`` for blocks ``rows`` (with gradient)."""
        from .task import logits_of
        return self.token_losses(logits_of(out), self.blocks[torch.as_tensor(np.asarray(rows))]).sum()

    def train_rows(self, limit: int | None, seed: int) -> np.ndarray:
        """The training blocks, or ``limit`` of them chosen by ``seed`` (kept in order)."""
        rows = np.asarray(self.split["train"])
        if not limit or limit >= len(rows):
            return rows
        return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))

    def align(self, logits: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, targets): logits (B, T-1, V) of positions 0..T-2 and the next tokens (B, T-1)."""
        ids = self.blocks[torch.as_tensor(np.asarray(rows))]
        return logits[:, :-1], ids[:, 1:]

    @torch.no_grad()
    def counts(self, lm, rows, batch_size: int = 8) -> tuple[int, int, float]:
        """(correct next tokens, predictions, summed cross-entropy) on blocks ``rows``."""
        from .task import logits_of
        correct, n, loss = 0, 0, 0.0
        for b in self.batches(lm, rows, batch_size):
            z = logits_of(lm.forward(b))
            ids = b["input_ids"]
            loss += float(self.token_losses(z, ids).double().sum())
            correct += int((z[:, :-1].argmax(-1) == ids[:, 1:]).sum())
            n += ids[:, 1:].numel()
        return correct, n, loss

    def summarize(self, correct: int, n: int, loss: float) -> dict:
        mean = loss / max(n, 1)
        return {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "loss": mean,
                "next_token_accuracy": correct / max(n, 1), "accuracy": correct / max(n, 1), "n": n,
                "metric": self.metric}

    def evaluate(self, lm, rows, batch_size: int = 8) -> dict:
        """Perplexity, mean token loss and next-token accuracy of ``lm`` on blocks ``rows`` (eval mode)."""
        was = lm.module.training
        lm.module.eval()
        try:
            return self.summarize(*self.counts(lm, rows, batch_size))
        finally:
            lm.module.train(was)
