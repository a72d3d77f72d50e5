"""The nested family of an ordered parent: each budget's structure, its shared-weight forward, its extraction.

After ordering (:mod:`lamina.elastic.order`) every member keeps *prefixes*
of the parent's width axes and a subset of its blocks, so every tensor of a
member is ``parent_tensor[:k0, :k1, ...]`` (a view) of a tensor of a kept
block. Two uses of that:

- **Training** (:meth:`Family.forward`): the member's *structure* is built
  once per budget (a copy of the parent cut by lamina's own pruning functions
  with prefix indices, then moved to the meta device: shapes only) and run
  with ``torch.func.functional_call`` on views of the parent's parameters.
  The member really computes at its smaller size (no masks), and gradients
  flow into the shared weights.
- **Extraction** (:meth:`Family.extract`): the same cuts on a real copy give a
  standalone model whose config describes it (uniform widths), so it saves
  with ``save_pretrained`` (lamina's format for the channel-pruned CNN).

BatchNorm: a sub-member's forward in training mode normalizes with its own
batch statistics and updates a *copy* of the running statistics, which is
thrown away; only the full member moves the parent's. An extracted member's
statistics are re-estimated on calibration rows (:func:`lamina.models.recalibrate_bn`,
as MatFormer/NetAug do per sub-network) before it is scored or saved.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call

from ..blocks import find_blocks
from ..compress.channels import channel_layout, prune_channels_
from ..compress.depth import drop_blocks_
from ..compress.heads import _attn_blocks, _replace, _select
from ..compress.width import _get, _out_features, ffn_layout, prune_ffn_
from ..errors import UsageError
from .budget import Budget, Grid, kept_count, kept_groups


def keep_groups_(module: nn.Module, n_groups: int, blocks: str | None = None) -> dict:
    """Keep the first ``n_groups`` KV groups (and their query heads) of every attention block, in place.

    Llama family only (its config states ``head_dim``); the config's head counts follow, so
    ``from_pretrained`` rebuilds the result.
    """
    mods = _attn_blocks(module, blocks)
    cfg = module.config
    h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = h // n_kv
    if not 1 <= n_groups <= n_kv:
        raise UsageError("KV groups kept out of range", value=n_groups, allowed=f"1..{n_kv}", fix="check --heads")
    hd = mods[0].self_attn.head_dim
    q, kv = torch.arange(n_groups * g * hd), torch.arange(n_groups * hd)
    for b in mods:
        att = b.self_attn
        _replace(att, "q_proj", _select(att.q_proj, q, dim_out=True))
        _replace(att, "k_proj", _select(att.k_proj, kv, dim_out=True))
        _replace(att, "v_proj", _select(att.v_proj, kv, dim_out=True))
        _replace(att, "o_proj", _select(att.o_proj, q, dim_out=False))
    cfg.head_dim = hd
    cfg.num_attention_heads, cfg.num_key_value_heads = n_groups * g, n_groups
    return {"kv_groups_before": n_kv, "kv_groups_after": n_groups}


class Family:
    """The members of an ordered parent (a LoadedModel), by budget.

    Args:
        parent: the ordered model (its module is shared, not copied).
        order: blocks in the order depth removes them (least important first).
        grid: the trained budgets (:class:`lamina.elastic.budget.Grid`).
    """

    def __init__(self, parent, order: list[int], grid: Grid):
        self.parent = parent
        self.order = list(order)
        self.grid = grid
        self.n = parent.blocks.n_blocks
        self.container = parent.blocks.container or None
        self._skeletons: dict[Budget, tuple[nn.Module, dict]] = {}
        self._taps: dict[Budget, list[tuple[str, str]]] = {}

    # ------------------------------------------------------------------ what a budget keeps
    def removed(self, b: Budget) -> list[int]:
        drop = self.n - b.depth
        if drop > len(self.order):
            raise UsageError("this depth would remove a block that cannot be removed faithfully", value=b.depth,
                             allowed=f"{self.n - len(self.order)}..{self.n}", fix="pick a larger --depth")
        return sorted(self.order[:drop])

    def kept(self, b: Budget) -> list[int]:
        gone = set(self.removed(b))
        return [i for i in range(self.n) if i not in gone]

    def cut_(self, module: nn.Module, b: Budget) -> nn.Module:
        """Apply budget ``b`` to ``module`` (a copy of the parent) in place: prefix widths, then blocks."""
        blocks = self.container
        if b.ffn < 1:
            mods, (firsts, _, _) = ffn_layout(module, blocks)
            k = kept_count(b.ffn, _out_features(_get(mods[0], firsts[0])))
            prune_ffn_(module, [torch.arange(k)] * len(mods), blocks)
        if b.heads < 1:
            keep_groups_(module, kept_groups(b.heads, module.config.num_key_value_heads), blocks)
        if b.channels < 1:
            found = channel_layout(module, blocks)
            prune_channels_(module, {j: torch.arange(kept_count(b.channels, int(m._project_conv.weight.shape[1])))
                                     for j, m in found.items()}, blocks)
        if b.depth < self.n:
            drop_blocks_(module, self.removed(b), blocks)
        return module

    # ------------------------------------------------------------------ shared-weight forward (training)
    def _skeleton(self, b: Budget) -> tuple[nn.Module, dict]:
        if b not in self._skeletons:
            skel = self.cut_(copy.deepcopy(self.parent.module), b).to("meta")
            kept = self.kept(b)
            sub_paths = find_blocks(skel, self.container).block_paths
            par_paths = self.parent.blocks.block_paths
            rename = [(f"{s}.", f"{par_paths[kept[pos]]}.") for pos, s in enumerate(sub_paths)]

            def parent_name(name: str) -> str:
                for s, p in rename:
                    if name.startswith(s):
                        return p + name[len(s):]
                return name

            names = {n: parent_name(n) for n, _ in [*skel.named_parameters(), *skel.named_buffers()]}
            self._skeletons[b] = (skel, names)
            self._taps[b] = [(s, par_paths[kept[pos]]) for pos, s in enumerate(sub_paths)]
        return self._skeletons[b]

    def tensors(self, b: Budget, train_buffers: bool = False) -> dict[str, torch.Tensor]:
        """The member's parameters and buffers as prefix views of the parent's (buffers copied when
        ``train_buffers``: a sub-member's BatchNorm updates must not reach the parent's statistics)."""
        skel, names = self._skeleton(b)
        src = dict(self.parent.module.named_parameters())
        bufs = dict(self.parent.module.named_buffers())
        out = {}
        for name, t in [*skel.named_parameters(), *skel.named_buffers()]:
            p = src.get(names[name])
            is_buf = p is None
            if is_buf:
                p = bufs[names[name]]
            # a kept tensor of full size is the parent's own (no slice: its gradient needs no scatter into zeros)
            v = p if t.shape == p.shape else p[tuple(slice(0, k) for k in t.shape)]
            out[name] = v.clone() if is_buf and train_buffers and b != self.grid.full else v
        return out

    def taps(self, b: Budget) -> list[tuple[str, str]]:
        """(the member's block path, the parent's path of the same block) for every block the member keeps."""
        self._skeleton(b)
        return self._taps[b]

    def module(self, b: Budget) -> nn.Module:
        """The member's structure (meta tensors; run it through :meth:`forward`)."""
        return self._skeleton(b)[0]

    def forward(self, b: Budget, batch: dict):
        """The member's raw output on ``batch`` (a ``LoadedModel.batch`` dict), on the parent's weights.

        The full budget runs the parent itself. Train/eval mode follows the parent's.
        """
        lm = self.parent
        if b == self.grid.full:
            return lm.forward(batch)
        skel = self.module(b)
        for m in skel.modules():  # not skel.train(): transformers would re-kernelize a meta-device model
            m.training = lm.module.training
        tensors = self.tensors(b, train_buffers=lm.module.training)
        if "pixels" in batch:
            if lm.input_name:
                return functional_call(skel, tensors, (), {lm.input_name: batch["pixels"]})
            return functional_call(skel, tensors, (batch["pixels"],))
        return functional_call(skel, tensors, (), dict(batch))

    def parameters(self, b: Budget) -> int:
        return sum(p.numel() for p in self.module(b).parameters())

    # ------------------------------------------------------------------ extraction
    def extract(self, b: Budget):
        """A standalone LoadedModel of budget ``b`` (a cut copy of the parent; the parent is untouched)."""
        self.grid.check(b)
        new = self.cut_(copy.deepcopy(self.parent.module), b)
        new.eval()
        out = copy.copy(self.parent)
        out.module = new
        out.blocks = find_blocks(new, self.container)
        return out
