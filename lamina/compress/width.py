"""Width pruning of FFN channels: activation importance, then shrink the tensors in place.

FFN layouts (relative to one block), found structurally by attribute names:

    bert         intermediate.dense (Linear D->I)        -> output.dense (Linear I->D)
    vit (tf 5)   mlp.fc1 (Linear D->I)                   -> mlp.fc2 (Linear I->D)
    gpt2         mlp.c_fc (Conv1D, weight (D, I))        -> mlp.c_proj (Conv1D, weight (I, D))
    llama family mlp.gate_proj, mlp.up_proj (Linear D->I) -> mlp.down_proj (Linear I->D)

Importance (Nemotron Elastic): channel i of a block scores sum |x W1_i^T + b1_i|
over every calibration token, padding excluded, W1 the *first* FFN linear: the
one whose output goes through the activation (``gate_proj`` for gated MLPs).
By default every block keeps the same number of channels (its own best ones),
so the Hugging Face config's ``intermediate_size`` (GPT-2: ``n_inner``)
describes the pruned model and ``from_pretrained`` rebuilds it.

Per layer (``PlanConfig(ffn_per_layer=True)``): the channels of all blocks are
ranked together and the fraction is removed from the whole model, so a block
whose channels matter less loses more. Raw sums are not comparable across
blocks (activation scales differ), so each block's scores are divided by
their mean first: a channel goes when it is weak *for its block*, relative to
how weak the other blocks' channels are for theirs. Every block keeps at least
one channel. The config cannot say this (one ``intermediate_size``), so such
a model is saved in lamina's format (:mod:`lamina.savefmt`, "hf:" builder).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from ._calib import channel_sums
from .plan import n_removed

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


def ffn_keep_per_layer(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Per block, the sorted FFN channels kept when ``fraction`` of all channels go, ranked across blocks by
    score / the block's mean score (module docstring); every block keeps at least one."""
    norm = [s.double() / s.double().mean().clamp_min(1e-30) for s in scores]
    owner = torch.cat([torch.full((len(s),), j) for j, s in enumerate(scores)])
    local = torch.cat([torch.arange(len(s)) for s in scores])
    total = len(owner)
    k_total = total - n_removed(fraction, total)
    if k_total < len(scores):
        raise UsageError("the plan would remove every FFN channel of a block", value=fraction,
                         allowed=f"a fraction that keeps at least one channel per block ({len(scores)} of {total})",
                         fix="lower --ffn")
    order = torch.sort(-torch.cat(norm), stable=True).indices.tolist()  # best first; ties: earlier block/channel
    chosen, rest = order[:k_total], order[k_total:]
    counts = torch.bincount(owner[chosen], minlength=len(scores)).tolist()
    for j in [j for j, c in enumerate(counts) if c == 0]:  # a block left empty takes back its best channel
        best = next(i for i in rest if int(owner[i]) == j)
        drop = next(i for i in reversed(chosen) if counts[int(owner[i])] > 1)
        chosen.remove(drop)
        counts[int(owner[drop])] -= 1
        chosen.append(best)
        counts[j] += 1
    chosen_t = torch.tensor(chosen)
    return [local[chosen_t[owner[chosen_t] == j]].sort().values for j in range(len(scores))]


def prune_ffn_(module: nn.Module, keep: list[torch.Tensor], blocks: str | None = None, uniform: bool = True) -> dict:
    """Keep FFN channels ``keep[j]`` (sorted LongTensor (K_j,)) in block j, in place.

    ``uniform`` (default) requires the same K in every block and writes it to the
    config; otherwise each block keeps its own K_j and the config is left as is
    (it cannot describe the model: save it with :func:`lamina.savefmt.save_loaded`).
    Returns ``{"intermediate_size_before", "intermediate_size_after" (an int, or
    {"blocks.j": K_j}), "config_key"}``.
    """
    mods, (firsts, last, key) = ffn_layout(module, blocks)
    sizes = [len(k) for k in keep]
    if len(keep) != len(mods) or (uniform and len(set(sizes)) != 1):
        raise UsageError("FFN pruning needs the same number of kept channels in every block",
                         value=sorted(set(sizes)), allowed="one size", fix="prune uniformly, or pass uniform=False")
    before = _out_features(_get(mods[0], firsts[0]))
    if min(sizes) < 1:
        raise UsageError("the plan would remove every FFN channel", value=0, allowed=f"1..{before}",
                         fix="lower --ffn")
    for b, idx in zip(mods, keep):
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        for p in firsts:
            _replace(b, p, _select(_get(b, p), idx, dim_out=True))
        _replace(b, last, _select(_get(b, last), idx, dim_out=False))
        mlp = _get(b, firsts[0].rpartition(".")[0]) if "." in firsts[0] else None
        if mlp is not None and isinstance(getattr(mlp, "intermediate_size", None), int):
            mlp.intermediate_size = len(idx)  # Llama's MLP keeps a copy of the config value
    cfg = getattr(module, "config", None)
    if uniform and cfg is not None:
        setattr(cfg, key, sizes[0])
    after = sizes[0] if uniform else {f"blocks.{j}": k for j, k in enumerate(sizes)}
    return {"intermediate_size_before": before, "intermediate_size_after": after, "config_key": key}
