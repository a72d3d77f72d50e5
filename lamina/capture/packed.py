"""The rows a causal LM is captured on when its data is text without labels: packed blocks.

A decoder LM is measured on the language-modelling task (``lamina.lm_task``):
documents split train / validation / test by a seeded permutation, tokenized,
packed into blocks of ``seq_len`` tokens. Its capture records the same blocks,
so what analyze scores (importance, geometry) is what the LM task trains and
tests on, and never per-document rows truncated or padded to ``--max-length``.

Design decisions:
- Only the TRAIN split's blocks are captured (``--limit`` of them, chosen by
  ``--seed``, kept in order): they are the calibration text of importance and of
  ``prune --scores``; the validation and test documents stay unseen, so a pruned
  model's test perplexity is on text that chose nothing.
- The task record (spec, documents and blocks per split) and the captured
  block indices go into the manifest (``lm_task``), so analyze and prune rebuild
  exactly these blocks and check them against the store's ids.
- A store row's id is ``block:<i>``, i the block's index in the task's blocks
  (train blocks first): the ids check catches another seq_len, seed or text.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields

import numpy as np
import torch

from ..errors import UsageError


class PackedRows:
    """Blocks ``rows`` of an :class:`~lamina.lm_task.LMTask`, in the shape capture reads a Dataset in."""

    kind = "text"

    def __init__(self, task, rows, name: str, source: str = ""):
        self.classes = ["text"]
        self.meta = {"unlabelled": True, "packed": True}
        self.task = task
        self.rows = np.asarray(rows, dtype=np.int64)
        self.name, self.source = name, source
        self.ids = np.array([f"block:{r}" for r in self.rows]).astype(str)
        self.labels = np.zeros(len(self.rows), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def seq_len(self) -> int:
        return self.task.spec.seq_len

    def take(self, idx) -> PackedRows:
        return PackedRows(self.task, self.rows[np.asarray(idx, dtype=np.int64)], self.name, self.source)

    def batch(self, lm, idx) -> dict:
        """Model inputs of store rows ``idx``: (B, seq_len) token ids, every position real (no padding)."""
        b = self.task.batch(lm, self.rows[np.asarray(idx, dtype=np.int64)])
        return {k: v.to(lm.device) for k, v in b.items()}

    def batches(self, lm, batch_size: int) -> list[dict]:
        return [self.batch(lm, np.arange(s, min(len(self), s + batch_size))) for s in range(0, len(self), batch_size)]

    def tokens_sha256(self) -> str:
        """sha256 of the captured blocks' token ids (int64, row-major): what reloading checks."""
        ids = self.task.blocks[torch.as_tensor(self.rows)].numpy().astype(np.int64)
        return hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "kind": "text", "source": self.source, "n": len(self), "classes": ["text"],
                "class_counts": [len(self)], "unlabelled": True, "packed": True, "seq_len": self.seq_len}

    def record(self) -> dict:
        """The manifest's ``lm_task``: the task (spec, documents and blocks per split) and the rows captured."""
        spec = self.task.spec
        rec = {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "data"}
        return {"data": self.name, **rec,
                "documents": {k: int(len(v)) for k, v in self.task.doc_split.items()},
                "blocks": {k: int(len(v)) for k, v in self.task.split.items()},
                "captured_split": "train", "captured_blocks": int(len(self)), "tokens": int(len(self) * spec.seq_len),
                "tokens_sha256": self.tokens_sha256()}


def is_packed(lm, ds) -> bool:
    """Whether a capture of ``lm`` on ``ds`` records packed blocks: a causal LM on text without labels."""
    from ..task import is_causal_lm
    return isinstance(ds, PackedRows) or (bool(getattr(ds, "meta", {}).get("unlabelled")) and is_causal_lm(lm))


def packed_rows(lm, corpus, *, seq_len: int | None, limit: int | None, seed: int, text_column: str | None = None,
                name: str | None = None) -> PackedRows:
    """The train blocks of the LM task on ``corpus`` (a loaded unlabelled Dataset), ``limit`` of them by ``seed``."""
    from ..lm_task import LMTaskSpec, context_length
    if seq_len is None:  # the LM task's default, or the model's whole context when that is shorter
        seq_len = min(128, context_length(lm.module) or 128)
    spec = LMTaskSpec(data=corpus, seed=seed, seq_len=seq_len, text_column=text_column)
    task = spec.prepare(lm)
    if limit is not None and limit < 0:
        raise UsageError("--limit must be positive", value=limit, allowed="a number of blocks >= 2, or 0 for all",
                         fix="drop --limit to capture every training block")
    rows = task.train_rows(limit or None, seed)
    if limit and limit > len(task.split["train"]):
        raise UsageError("--limit asks for more packed blocks than the training text holds", value=limit,
                         allowed=f"at most {len(task.split['train'])} blocks of {seq_len} tokens",
                         fix=f"--limit {len(task.split['train'])}, a shorter --seq-len, or more text")
    if len(rows) < 2:
        raise UsageError("too little training text for two packed blocks", value=f"{len(rows)} block(s)",
                         allowed=f">= 2 blocks of --seq-len {seq_len} tokens in the train split",
                         fix="lower --seq-len, or use more text")
    return PackedRows(task, rows, name or corpus.name, getattr(corpus, "source", ""))


def reload_packed(lm, man: dict, data=None) -> PackedRows:
    """The packed blocks a store was captured on, rebuilt from its manifest (and checked by the caller)."""
    from ..data.text import load_for_capture
    cap, rec = man.get("config", {}), man["lm_task"]
    if data is None:
        data = man.get("data_spec")
        if not data:
            raise UsageError("this store was captured from an in-memory text, so it cannot be reloaded",
                             value=rec.get("data"), allowed="data=... passed in", fix="pass the same text")
    if isinstance(data, PackedRows):
        return data
    corpus = load_for_capture(data, cap.get("text_column"))
    rows = packed_rows(lm, corpus, seq_len=rec["seq_len"], limit=cap.get("limit"), seed=rec["seed"],
                       text_column=cap.get("text_column"))
    want = rec.get("tokens_sha256")
    if want and rows.tokens_sha256() != want:  # the same recipe gave other tokens: the text changed since
        raise UsageError("the text no longer packs into the blocks the store was captured on", value=str(data),
                         allowed="the text (and --seq-len/--limit/--seed) of the capture",
                         fix="pass the same text, or capture again")
    return rows


def logits_batch_size(requested: int, seq_len: int, vocab: int, budget: int) -> int:
    """Blocks per importance batch so one batch's logits (B x seq_len x vocab floats) stay within ``budget``
    elements: peak memory follows the batch, never the whole calibration set times the vocabulary."""
    return max(1, min(int(requested), budget // max(1, seq_len * vocab)))

