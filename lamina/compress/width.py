"""Width pruning of FFN channels: activation importance, then shrink the tensors in place.

FFN layouts (relative to one block), found structurally by attribute names:

    bert         intermediate.dense (Linear D->I)        -> output.dense (Linear I->D)
    vit (tf 5)   mlp.fc1 (Linear D->I)                   -> mlp.fc2 (Linear I->D)
    gpt2         mlp.c_fc (Conv1D, weight (D, I))        -> mlp.c_proj (Conv1D, weight (I, D))
    llama family mlp.gate_proj, mlp.up_proj (Linear D->I) -> mlp.down_proj (Linear I->D)

Importance (Nemotron Elastic): channel i of a block scores sum |x W1_i^T + b1_i|
over every calibration token, padding excluded, W1 the *first* FFN linear: the
one whose output goes through the activation (``gate_proj`` for gated MLPs).
Every block keeps the same number of channels (its own best ones), so the
Hugging Face config's ``intermediate_size`` (GPT-2: ``n_inner``) describes the
pruned model and ``from_pretrained`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from ._calib import channel_sums

# (first linears, last linear, config key) per layout; the first of `firsts` is the scored one.
_LAYOUTS = (
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size"),
    (("intermediate.dense",), "output.dense", "intermediate_size"),
    (("mlp.c_fc",), "mlp.c_proj", "n_inner"),
    (("mlp.fc1",), "mlp.fc2", "intermediate_size"),
)


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def ffn_layout(module: nn.Module, blocks: str | None = None) -> tuple[list[nn.Module], tuple]:
    """(the blocks, the FFN layout they share); UsageError when no known FFN is found."""
    bmap = find_blocks(module, blocks)
    mods = [module.get_submodule(p) for p in bmap.block_paths]
    for layout in _LAYOUTS:
        firsts, last, _ = layout
        if all(_get(b, p) is not None for b in mods for p in (*firsts, last)):
            return mods, layout
    raise UsageError("no FFN of a known layout in these blocks, so FFN channels cannot be pruned",
                     value=type(module).__name__,
                     allowed="BERT (intermediate.dense, output.dense), ViT (mlp.fc1, mlp.fc2), "
                             "GPT-2 (mlp.c_fc, mlp.c_proj), Llama/Qwen2/Mistral (mlp.gate_proj, up_proj, down_proj)",
                     fix="prune blocks (--drop-blocks) instead")


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1]  # Conv1D: (in, out)


@torch.no_grad()
def ffn_importance(module: nn.Module, batches: Iterable[Mapping], blocks: str | None = None) -> list[torch.Tensor]:
    """Activation importance of every FFN channel: one float64 tensor (I,) per block.

    ``batches`` are model input dicts (``input_ids`` (B, T), ``attention_mask``
    (B, T), ... or ``pixel_values``); ``attention_mask`` excludes padding. The
    model runs in eval mode without gradients; hooks are removed on exit.
    """
    mods, (firsts, _, _) = ffn_layout(module, blocks)
    points = [(_get(b, firsts[0]), "output", torch.abs, _out_features(_get(b, firsts[0]))) for b in mods]
    return channel_sums(module, batches, points, "FFN importance")


def _select(m: nn.Module, keep: torch.Tensor, dim_out: bool) -> nn.Module:
    """A copy of Linear/Conv1D ``m`` keeping output (``dim_out``) or input channels ``keep``."""
    w = m.weight.detach()
    if isinstance(m, nn.Linear):
        w = w[keep] if dim_out else w[:, keep]
        new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    else:  # transformers' Conv1D: weight (in, out), y = x W + b
        w = w[:, keep] if dim_out else w[keep]
        new = type(m)(w.shape[1], w.shape[0]).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            new.bias.copy_(m.bias.detach()[keep] if dim_out else m.bias.detach())
    return new


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, new)


def prune_ffn_(module: nn.Module, keep: list[torch.Tensor], blocks: str | None = None) -> dict:
    """Keep FFN channels ``keep[j]`` (sorted LongTensor (K,), same K for every block j), in place.

    Returns ``{"intermediate_size_before", "intermediate_size_after", "config_key"}``.
    """
    mods, (firsts, last, key) = ffn_layout(module, blocks)
    sizes = {len(k) for k in keep}
    if len(keep) != len(mods) or len(sizes) != 1:
        raise UsageError("FFN pruning needs the same number of kept channels in every block",
                         value=sorted(sizes), allowed="one size", fix="prune uniformly")
    before = _out_features(_get(mods[0], firsts[0]))
    k = sizes.pop()
    if k < 1:
        raise UsageError("the plan would remove every FFN channel", value=0, allowed=f"1..{before}",
                         fix="lower --ffn")
    for b, idx in zip(mods, keep):
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        for p in firsts:
            _replace(b, p, _select(_get(b, p), idx, dim_out=True))
        _replace(b, last, _select(_get(b, last), idx, dim_out=False))
        mlp = _get(b, firsts[0].rpartition(".")[0]) if "." in firsts[0] else None
        if mlp is not None and isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = k  # Llama's MLP keeps a copy of the config value
    cfg = getattr(module, "config", None)
    if cfg is not None:
        setattr(cfg, key, k)
    return {"intermediate_size_before": before, "intermediate_size_after": k, "config_key": key}
