"""Depth pruning: remove whole blocks from the block container, in place.

Works on any model whose blocks live in one ``nn.ModuleList`` / ``nn.Sequential``
(BERT family, GPT-2, Llama/Qwen2/Mistral, ViT, CNN stacks). For Hugging Face
models the config is made to say so: ``num_hidden_layers`` (GPT-2's ``n_layer``
through the config's attribute map), ``layer_types`` when the config has one,
and every kept block's ``layer_idx`` (the key of its KV-cache slot) set to its
new position, so generation with a cache still works and ``from_pretrained``
rebuilds exactly the same model.
"""

from __future__ import annotations

import logging

import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError

log = logging.getLogger(__name__)


def _container(module: nn.Module, bmap) -> nn.Module:
    if not bmap.container:
        raise UsageError("blocks given by a glob cannot be removed: lamina needs their container", value="(glob)",
                         allowed="blocks in one ModuleList/Sequential",
                         fix="name the container, e.g. --blocks encoder.layer")
    return module.get_submodule(bmap.container)


def _set_layer_idx(block: nn.Module, new: int) -> None:
    for m in block.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = new


def drop_blocks_(module: nn.Module, remove: list[int], blocks: str | None = None) -> dict:
    """Remove blocks ``remove`` (indices into the block stack) from ``module``, in place.

    Returns what it did: ``{"removed": [...], "kept": [...], "n_blocks_before", "n_blocks_after"}``.
    """
    bmap = find_blocks(module, blocks)
    cont = _container(module, bmap)
    n = len(cont)
    bad = [i for i in remove if not 0 <= i < n]
    if bad:
        raise UsageError("block index out of range", value=bad, allowed=f"0..{n - 1}",
                         fix="make the plan for this model")
    if len(set(remove)) >= n:
        raise UsageError("the plan would remove every block", value=sorted(remove), allowed=f"fewer than {n}",
                         fix="keep at least one block")
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and remove:
        # GPT-2 with this flag scales attention by 1/(layer_idx+1): renumbering changes the math, and not
        # renumbering breaks the cache and from_pretrained. Neither is a faithful smaller model.
        raise UsageError("this GPT-2 scales attention by its layer index, so blocks cannot be removed faithfully",
                         value="scale_attn_by_inverse_layer_idx=True", allowed="models without it",
                         fix="prune width (--ffn) instead")
    drop = set(remove)
    kept = [i for i in range(n) if i not in drop]
    children = list(cont)
    new = nn.ModuleList([children[i] for i in kept]) if isinstance(cont, nn.ModuleList) \
        else type(cont)(*[children[i] for i in kept])
    parent_path, _, attr = bmap.container.rpartition(".")
    setattr(module.get_submodule(parent_path) if parent_path else module, attr, new)
    if cfg is not None:
        for pos, block in enumerate(new):
            _set_layer_idx(block, pos)
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(kept)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == n:
            cfg.layer_types = [types[i] for i in kept]
        elif types is not None:
            log.warning("config.layer_types has %d entries for %d blocks; left as is", len(types), n)
    return {"removed": sorted(drop), "kept": kept, "n_blocks_before": n, "n_blocks_after": len(kept)}
