"""Depth pruning: remove whole blocks from the block container, in place.

Works on any model whose blocks live in one ``nn.ModuleList`` / ``nn.Sequential``
(BERT family, GPT-2, Llama/Qwen2/Mistral, ViT, CNN stacks). For Hugging Face
models the config is made to say so: ``num_hidden_layers`` (GPT-2's ``n_layer``
through the config's attribute map), ``layer_types`` when the config has one,
and every kept block's ``layer_idx`` (the key of its KV-cache slot) set to its
new position, so generation with a cache still works and ``from_pretrained``
rebuilds exactly the same model. Hierarchical models (ResNet, ConvNeXt, Swin:
blocks inside stages, found as ``'encoder.stages.*.layers'``) lose blocks from
their own stage, and ``config.depths`` follows. A removal the config cannot
express (a Swin block whose window shift depends on its position, T5's first
block that owns the relative-position bias) is refused before anything changes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..blocks import _is_glob, find_blocks, stage_containers
from ..errors import UsageError



def _check_container(bmap) -> None:
    if not bmap.container:
        raise UsageError("blocks given by a glob cannot be removed: lamina needs their container", value="(glob)",
                         allowed="blocks in one ModuleList/Sequential, or a stage glob such as "
                                 "'encoder.stages.*.layers'",
                         fix="name the container, e.g. --blocks encoder.layer")


def _set_layer_idx(block: nn.Module, new: int) -> None:
    for m in block.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = new


def _groups(module: nn.Module, bmap) -> list[tuple[str, int]]:
    """(container path, number of blocks) of each container the blocks live in, in forward order."""
    if bmap.shared:  # one module, called once per block: the config's call count is the depth
        return [(bmap.container, bmap.n_blocks)]
    if not _is_glob(bmap.container):
        return [(bmap.container, len(module.get_submodule(bmap.container)))]
    return [(c, len(module.get_submodule(c))) for c in stage_containers(module, bmap.container)]


def _rewrite_(cfg, groups: list[tuple[str, int]], kept: list[int]):
    """Make ``cfg`` describe the model that keeps blocks ``kept`` (indices over all groups); returns it.

    One container: ``num_hidden_layers`` (and per-block ``layer_types``). Several
    (stages): ``depths[s]``, the number of blocks of stage s. A field is only
    rewritten when it is per-block: ResNet's ``layer_types`` lists the allowed
    layer kinds, not one entry per block, and ConvNeXt's ``num_hidden_layers``
    counts stages.
    """
    n = sum(k for _, k in groups)
    if len(groups) > 1:
        depths, start = [], 0
        for _, k in groups:
            depths.append(sum(1 for i in kept if start <= i < start + k))
            start += k
        cfg.depths = depths
        return cfg
    if getattr(cfg, "num_hidden_layers", None) != n:
        return cfg
    cfg.num_hidden_layers = len(kept)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        cfg.layer_types = [types[i] for i in kept]
    return cfg


# Attributes a rebuilt block may differ in without computing anything else in eval mode.
_IGNORED_ATTRS = ("training", "layer_idx")


def _attrs(block: nn.Module) -> dict:
    out = {}
    for path, m in block.named_modules():
        for k, v in vars(m).items():
            if k.startswith("_") or k in _IGNORED_ATTRS or "drop" in k or isinstance(m, nn.Dropout):
                continue
            if isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(
                    isinstance(x, (bool, int, float, str)) for x in v)):
                out[f"{path}.{k}" if path else k] = v
        for k, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            out[f"{path}.{k}:shape" if path else f"{k}:shape"] = tuple(t.shape)
    return out


def _meta(module: nn.Module, cfg) -> nn.Module:
    with torch.device("meta"):  # shapes and attributes only: no memory, no initialization cost
        return type(module)(cfg)


def config_mismatch(module: nn.Module, remove: list[int], blocks: str | None = None, *,
                    _base: nn.Module | None = None) -> str | None:
    """Why a saved model without blocks ``remove`` would not be ``module`` without them, or None.

    Stages: every stage keeps a block (a stage's first block changes its
    resolution and width). Hugging Face models: the architecture rebuilt from
    the new config must hold, at each new position, a block built like the kept
    one was: equal plain attributes (window shift, stride, whether it owns a
    relative-position bias ...) and parameter shapes. Both sides are built from
    a config on the meta device, so attributes a forward pass adjusts (Swin
    clamps its window to small inputs) compare as the config sets them. Models
    whose config does not state their depth at all (MobileNetV2) are saved in
    lamina's format, which keeps the blocks themselves.
    """
    bmap = find_blocks(module, blocks)
    groups = _groups(module, bmap)
    drop = set(remove)
    kept = [i for i in range(bmap.n_blocks) if i not in drop]
    start = 0
    for s, (_, k) in enumerate(groups):
        if len(groups) > 1 and not any(start <= i < start + k for i in kept):
            return f"it would empty stage {s} (a stage keeps at least one block: its first changes resolution/width)"
        start += k
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(module, "save_pretrained"):
        return None
    if bmap.shared and (getattr(cfg, "num_hidden_groups", 1) != 1 or cfg.num_hidden_layers != bmap.n_blocks):
        # ALBERT: call i runs group i * G // N, so fewer calls re-assign groups (G > 1); with the layers of a
        # group named one by one, a layer cannot be dropped from some calls only.
        return ("its blocks are calls of shared layers, and the config can only lower the number of calls of "
                "one shared layer group (num_hidden_groups == 1, blocks = the group's calls)")
    if len(groups) == 1 and getattr(cfg, "num_hidden_layers", None) != bmap.n_blocks:
        return None  # depth not in the config: lamina's format rebuilds it from the saved blocks
    if len(groups) > 1 and list(getattr(cfg, "depths", None) or []) != [k for _, k in groups]:
        return f"config.depths does not list the {len(groups)} stages' block counts"
    try:
        base = _base if _base is not None else _meta(module, copy.deepcopy(cfg))
    except Exception:  # noqa: BLE001 - its own config does not build it: nothing to tell here (the reload check will)
        return None
    try:
        ref = _meta(module, _rewrite_(copy.deepcopy(cfg), groups, kept))
    except Exception as e:  # noqa: BLE001 - the config refuses the new depth: that is the answer
        return f"the config does not accept the new depth ({type(e).__name__}: {str(e)[:200]})"
    bmap0, rmap = find_blocks(base, bmap.container), find_blocks(ref, bmap.container)
    if rmap.n_blocks != len(kept) or bmap0.n_blocks != bmap.n_blocks:
        return f"a model built from the new config has {rmap.n_blocks} blocks, not {len(kept)}"
    for pos, i in enumerate(kept):
        a = _attrs(base.get_submodule(bmap0.block_paths[i]))
        b = _attrs(ref.get_submodule(rmap.block_paths[pos]))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            return (f"blocks.{i} would be rebuilt at position {pos} as another block: {k} "
                    f"{a.get(k, '(absent)')} -> {b.get(k, '(absent)')}")
    return None


def base_for_checks(module: nn.Module) -> nn.Module | None:
    """The meta-device build of ``module``'s own config, to pass as ``_base`` to many :func:`config_mismatch` calls."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(module, "save_pretrained"):
        return None
    try:
        return _meta(module, copy.deepcopy(cfg))
    except Exception:  # noqa: BLE001 - each call then finds the same
        return None


def drop_blocks_(module: nn.Module, remove: list[int], blocks: str | None = None) -> dict:
    """Remove blocks ``remove`` (indices into the block stack) from ``module``, in place.

    Blocks in stages (``blocks`` a stage glob such as ``'encoder.stages.*.layers'``) are
    removed from their own stage, and ``config.depths`` says how many each keeps;
    every stage keeps at least one. Refused (UsageError, nothing changed) when
    the model's config could not rebuild the result (:func:`config_mismatch`).

    Returns what it did: ``{"removed": [...], "kept": [...], "n_blocks_before", "n_blocks_after"}``.
    """
    bmap = find_blocks(module, blocks)
    _check_container(bmap)
    groups = _groups(module, bmap)
    n = bmap.n_blocks
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
    why = config_mismatch(module, remove, blocks)
    if why:
        raise UsageError(f"removing these blocks gives a model its config cannot describe: {why}",
                         value=[f"blocks.{i}" for i in sorted(drop)],
                         allowed="blocks whose removal a rebuilt model reproduces",
                         fix="remove other blocks (their scores.json entry says skippable: false when removing "
                             "them alone is not faithful), or prune width instead")
    start, index = 0, []
    for path, k in ([] if bmap.shared else groups):  # shared blocks: only the config's call count changes
        cont = module.get_submodule(path)
        children = list(cont)
        keep_here = [children[i - start] for i in kept if start <= i < start + k]
        new = nn.ModuleList(keep_here) if isinstance(cont, nn.ModuleList) else type(cont)(*keep_here)
        parent_path, _, attr = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, attr, new)
        index.extend(new)
        start += k
    # Which blocks of the unpruned architecture remain, for lamina's format when the config cannot say it
    # (MobileNetV2: blocks of equal shapes but other strides cannot be told apart by their tensors).
    prev = getattr(module, "lamina_base_blocks", None)
    module.lamina_base_blocks = [prev[i] for i in kept] if isinstance(prev, list) and len(prev) == n else kept
    if cfg is not None:
        for pos, block in enumerate(index):
            _set_layer_idx(block, pos)
        _rewrite_(cfg, groups, kept)
    return {"removed": sorted(drop), "kept": kept, "n_blocks_before": n, "n_blocks_after": len(kept)}
