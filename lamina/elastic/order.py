"""Order a model by importance, in place, so that every prefix of a width axis is its best subset.

A permutation of FFN neurons (rows of the first FFN linears, columns of the
last), of attention KV groups (their q/k/v rows and o columns; with grouped-
query attention the g query heads of a group move with it, so query head
``h`` still reads KV head ``h // g``) or of EfficientNet's expanded channels
(expansion rows, both BatchNorms, depthwise filters, SE gate, projection
columns) only renumbers units that are summed over afterwards: the permuted
model computes the same function, to float rounding (tests check it for
BERT, a GQA Llama and an MBConv CNN).

Importances are lamina's pruning scores (:func:`lamina.compress.ffn_importance`,
:func:`~lamina.compress.head_importance`, :func:`~lamina.compress.channel_importance`),
measured on calibration batches of the unpermuted model. A KV group scores the
sum of its query heads' scores. Blocks are ranked for depth by skip importance
(Nemotron Elastic's normalized MSE of the output when the block is bypassed,
:func:`lamina.analyze.importance.block_importance`); a block whose removal
the config cannot express (a stride or width change) never leaves.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..compress.channels import channel_importance, channel_layout
from ..compress.heads import _attn_blocks, head_importance
from ..compress.width import _get, ffn_importance, ffn_layout
from ..errors import UsageError


def _take_(p: torch.Tensor | None, perm: torch.Tensor, dim: int) -> None:
    if p is not None:
        with torch.no_grad():
            p.copy_(p.index_select(dim, perm.to(p.device)))


def _rows_(m: nn.Module, perm: torch.Tensor, out: bool) -> None:
    """Permute a Linear/Conv1D/Conv2d's output (``out``) or input channels."""
    conv1d = not isinstance(m, (nn.Linear, nn.Conv2d))  # transformers' Conv1D: weight (in, out)
    dim = (1 if conv1d else 0) if out else (0 if conv1d else 1)
    _take_(m.weight, perm, dim)
    if out:
        _take_(getattr(m, "bias", None), perm, 0)


def permute_ffn_(module: nn.Module, perms: list[torch.Tensor], blocks: str | None = None) -> None:
    """New FFN neuron i of block j is old neuron ``perms[j][i]``; the function is unchanged."""
    mods, (firsts, last, _) = ffn_layout(module, blocks)
    for b, perm in zip(mods, perms):
        for p in firsts:
            _rows_(_get(b, p), perm, out=True)
        _rows_(_get(b, last), perm, out=False)


def permute_groups_(module: nn.Module, perms: list[torch.Tensor], blocks: str | None = None) -> None:
    """New KV group i of block j is old group ``perms[j][i]`` (its query heads with it); Llama family."""
    mods = _attn_blocks(module, blocks)
    cfg = module.config
    h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    g = h // n_kv
    for b, perm in zip(mods, perms):
        att = b.self_attn
        hd = att.head_dim
        q = (perm.unsqueeze(1) * g * hd + torch.arange(g * hd)).reshape(-1)
        kv = (perm.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
        _rows_(att.q_proj, q, out=True)
        _rows_(att.k_proj, kv, out=True)
        _rows_(att.v_proj, kv, out=True)
        _rows_(att.o_proj, q, out=False)


def permute_channels_(module: nn.Module, perms: dict[int, torch.Tensor], blocks: str | None = None) -> None:
    """New expanded channel i of MBConv block j is old channel ``perms[j][i]``, along its whole path."""
    found = channel_layout(module, blocks)
    for j, perm in perms.items():
        b = found[j]
        _rows_(b._expand_conv, perm, out=True)
        _rows_(b._depthwise_conv, perm, out=True)  # depthwise: one filter per channel, dim 0
        for bn in (b._bn0, b._bn1):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                _take_(t, perm, 0)
        if getattr(b, "has_se", False):
            _rows_(b._se_reduce, perm, out=False)
            _rows_(b._se_expand, perm, out=True)
        _rows_(b._project_conv, perm, out=False)


def _best_first(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(-scores.double(), stable=True).indices  # ties: the earlier unit first


def group_scores(head_scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(H,) per-head importance -> (n_kv,) per KV group (the sum of its query heads)."""
    return head_scores.view(n_kv, -1).sum(1)


def order_(module: nn.Module, batches: list, axes: set[str], blocks: str | None = None) -> dict:
    """Permute the width axes in ``axes`` ('ffn', 'heads', 'channels') best first, in place.

    ``batches``: calibration model inputs ({'input_ids', 'attention_mask'} or {'pixels'}).
    Returns what was ordered: ``{axis: [[old index of new unit i, ...] per block]}``.
    """
    done: dict = {}
    if "ffn" in axes:
        perms = [_best_first(s) for s in ffn_importance(module, batches, blocks)]
        permute_ffn_(module, perms, blocks)
        done["ffn"] = [p.tolist() for p in perms]
    if "heads" in axes:
        _attn_blocks(module, blocks)  # a UsageError for models whose config cannot express fewer heads
        n_kv = module.config.num_key_value_heads
        perms = [_best_first(group_scores(s, n_kv)) for s in head_importance(module, batches, blocks)]
        permute_groups_(module, perms, blocks)
        done["heads"] = [p.tolist() for p in perms]
    if "channels" in axes:
        perms = {j: _best_first(s) for j, s in channel_importance(module, batches, blocks).items()}
        permute_channels_(module, perms, blocks)
        done["channels"] = {str(j): p.tolist() for j, p in perms.items()}
    return done


def block_order(lm, batches: list) -> tuple[list[int], dict]:
    """The skippable blocks, least important first (the order depth removes them), and their scores.

    Skip importance s_j = sum (M_full - M_-j)^2 / sum M_full^2 on ``batches``; blocks that
    cannot be removed faithfully (shape change, config) are left out.
    """
    from ..analyze.importance import block_importance
    res = block_importance(lm, batches, progress=False)
    scored = [(b.skip_importance, j) for j, b in enumerate(res.blocks)
              if b.skippable and b.skip_importance is not None and math.isfinite(b.skip_importance)]
    scored.sort()
    return [j for _, j in scored], {b.name: b.skip_importance for b in res.blocks}


def check_depths(depths, order: list[int], n: int) -> None:
    """UsageError when a depth would need to remove a block that cannot go."""
    low = n - len(order)
    bad = [d for d in depths if d < low]
    if bad:
        raise UsageError("--depths asks to remove more blocks than can be removed faithfully (blocks that change "
                         "the width or resolution stay)", value=bad, allowed=f"{low}..{n}",
                         fix=f"--depths {n},{max(low, (n + low) // 2)},{low}")
