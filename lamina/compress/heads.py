"""Attention-head pruning for the Llama family (Llama, Qwen2, Mistral), in place.

Only where the Hugging Face config can express the result: these configs carry
``head_dim`` (or their attention reads ``config.head_dim`` when set), so fewer
heads keep the same head size. BERT, GPT-2 and ViT derive the head size as
``hidden_size // num_attention_heads``, so a model with fewer heads cannot be
described by their config: lamina refuses instead of writing a model that
``from_pretrained`` would rebuild wrongly.

With grouped-query attention, query head h reads KV head ``h // g`` (g query
heads per KV head), so every KV group keeps the same number of its own best
query heads and the KV projections are untouched. With plain multi-head
attention (as many KV heads as query heads) a head goes whole: its q, k, v rows
and o columns, and ``num_key_value_heads`` shrinks with ``num_attention_heads``.

Importance (Minitron / Nemotron Elastic): head h scores the sum over calibration
tokens (padding excluded) of the L2 norm of its attention output, the slice of
``o_proj``'s input that belongs to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from ._calib import channel_sums
from .plan import n_removed
from .width import _replace, _select

_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def _attn_blocks(module: nn.Module, blocks: str | None) -> list[nn.Module]:
    bmap = find_blocks(module, blocks)
    mods = [module.get_submodule(p) for p in bmap.block_paths]
    cfg = getattr(module, "config", None)
    ok = cfg is not None and getattr(cfg, "num_key_value_heads", None) and all(
        _has(b, p) for b in mods for p in _PARTS) and all(isinstance(getattr(b.self_attn, "head_dim", None), int)
                                                          for b in mods)
    if not ok:
        raise UsageError("attention heads can only be pruned in Llama-family models (q/k/v/o_proj, explicit "
                         "head_dim); other Hugging Face configs cannot express fewer heads of the same size",
                         value=type(module).__name__, allowed="Llama, Qwen2, Mistral",
                         fix="prune blocks (--drop-blocks) or FFN channels (--ffn) instead")
    return mods


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def head_importance(module: nn.Module, batches: Iterable[Mapping], blocks: str | None = None) -> list[torch.Tensor]:
    """Per-head activation importance: one float64 tensor (H,) per block (see module docstring)."""
    mods = _attn_blocks(module, blocks)
    h = module.config.num_attention_heads

    def per_head(hd):  # (B, T, H * hd) -> (B, T, H): the norm of each head's slice
        return lambda x: torch.linalg.vector_norm(x.reshape(*x.shape[:-1], -1, hd), dim=-1)

    points = [(b.self_attn.o_proj, "input", per_head(b.self_attn.head_dim), h) for b in mods]
    return channel_sums(module, batches, points, "head importance")


def heads_to_keep(scores: list[torch.Tensor], n_kv: int, fraction: float) -> list[torch.Tensor]:
    """Per block, the sorted query heads kept: in every KV group its ``g - n_removed(fraction, g)`` best."""
    h = len(scores[0])
    if n_kv == h:  # plain multi-head attention: KV heads go with their query heads, one group of all
        n_kv = 1
    g = h // n_kv
    keep_g = g - n_removed(fraction, g)
    if keep_g < 1:
        raise UsageError("the plan would remove every attention head (of a KV group)", value=fraction,
                         allowed=f"a fraction that keeps at least 1 of the {g} query heads per KV head",
                         fix=f"lower --heads below {(g - 0.5) / g:.3f}")
    out = []
    for s in scores:
        groups = s.view(n_kv, g)
        best = torch.sort(-groups, dim=1, stable=True).indices[:, :keep_g].sort(dim=1).values
        out.append((best + torch.arange(n_kv).unsqueeze(1) * g).reshape(-1))
    return out


def prune_heads_(module: nn.Module, keep: list[torch.Tensor], blocks: str | None = None) -> dict:
    """Keep query heads ``keep[j]`` (sorted (K,), same K for every block), in place.

    With GQA K must be a multiple of the KV heads (every group keeps K / n_kv);
    with plain MHA the KV heads of the dropped heads go too.
    """
    mods = _attn_blocks(module, blocks)
    cfg = module.config
    n_kv, before = cfg.num_key_value_heads, cfg.num_attention_heads
    mha = n_kv == before
    sizes = {len(k) for k in keep}
    if len(keep) != len(mods) or len(sizes) != 1 or (not mha and sizes.copy().pop() % n_kv):
        raise UsageError("head pruning needs the same number of kept heads in every block, a multiple of the "
                         "KV heads", value=sorted(sizes), allowed=f"a multiple of {n_kv}", fix="use heads_to_keep")
    k = sizes.pop()
    hd = mods[0].self_attn.head_dim
    for b, heads in zip(mods, keep):
        ch = (torch.as_tensor(heads, dtype=torch.long).unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
        att = b.self_attn
        _replace(att, "q_proj", _select(att.q_proj, ch, dim_out=True))
        _replace(att, "o_proj", _select(att.o_proj, ch, dim_out=False))
        if mha:
            _replace(att, "k_proj", _select(att.k_proj, ch, dim_out=True))
            _replace(att, "v_proj", _select(att.v_proj, ch, dim_out=True))
        att.num_key_value_groups = 1 if mha else k // n_kv
    cfg.head_dim = hd  # explicit, so from_pretrained keeps the head size when the head count changes
    cfg.num_attention_heads = k
    if mha:
        cfg.num_key_value_heads = k
    return {"heads_before": before, "heads_after": k, "head_dim": hd,
            "kv_heads_after": cfg.num_key_value_heads}
