"""Width pruning of CNN channels: the expanded (hidden) channels of EfficientNet's MBConv blocks, in place.

Layout (one block, attribute names of efficientnet_lite_pytorch / EfficientNet-PyTorch)::

    x (C_in) -> _expand_conv 1x1 -> _bn0 -> act -> _depthwise_conv kxk (groups = hidden) -> _bn1 -> act
             -> [SE: _se_reduce, _se_expand, a per-channel gate] -> _project_conv 1x1 -> _bn2 (C_out) (+ x)

Each hidden channel is one path through the block: its row of the expansion,
its BN entries, its own depthwise filter, its SE gate and its column of the
projection. Removing a channel removes that path; the block's input and output
widths stay, so residuals and the next block are untouched. Blocks without an
expansion conv (expand ratio 1: the depthwise conv runs on the block input)
are left alone.

Importance (activation importance, as Nemotron Elastic scores FFN neurons):
hidden channel c of a block scores the sum over calibration images and pixels
of |input of _project_conv at c|. That tensor is everything the channel sends
to the block output: the projection is linear, so a channel whose projection
input is zero contributes exactly nothing, and one that ReLU6 clips to zero on
every calibration pixel (a dead channel) scores 0 and goes first. The
expansion output (the literal analogue of ``x W1``) would rank channels before
BN, the activation and the depthwise filter reshape them; what reaches the
projection is the honest measure.

Every block loses the same fraction of its hidden channels (rounded half up,
at least one kept): uniform, as for FFN channels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from ._calib import channel_sums

_PATH = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv")


def channel_layout(module: nn.Module, blocks: str | None = None) -> dict[int, nn.Module]:
    """{block index: block} of the MBConv blocks with an expansion conv; UsageError when there is none."""
    bmap = find_blocks(module, blocks)
    found = {}
    for i, p in enumerate(bmap.block_paths):
        b = module.get_submodule(p)
        if all(isinstance(getattr(b, a, None), nn.Module) for a in _PATH):
            found[i] = b
    if not found:
        raise UsageError("no MBConv blocks with an expansion conv in this model, so CNN channels cannot be pruned",
                         value=type(module).__name__,
                         allowed="EfficientNet / EfficientNet-Lite (the bundled efficientnet-lite0, or a model in "
                                 "lamina's format built on it): blocks with _expand_conv, _bn0, _depthwise_conv, "
                                 "_bn1, _project_conv",
                         fix="prune blocks (--drop-blocks) instead; transformers: --ffn / --heads")
    return found


def _hidden(block: nn.Module) -> int:
    return int(block._project_conv.weight.shape[1])


@torch.no_grad()
def channel_importance(module: nn.Module, batches: Iterable[Mapping],
                       blocks: str | None = None) -> dict[int, torch.Tensor]:
    """{block index: float64 (hidden,)} activation importance of every expanded channel (module docstring).

    ``batches`` are model input dicts ({'pixels': (B, C, H, W)}, as ``LoadedModel.batch`` gives).
    Runs in eval mode without gradients; hooks are removed on exit.
    """
    found = channel_layout(module, blocks)
    points = [(b._project_conv, "input", lambda x: x.abs().sum(dim=(2, 3)), _hidden(b)) for b in found.values()]
    sums = channel_sums(module, batches, points, "channel importance")
    return dict(zip(found, sums))


def keep_conv_(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Shrink ``conv`` in place (its class, padding module and stride kept): output channels ``out_idx``,
    input channels ``in_idx``; a depthwise conv (groups = channels) keeps ``out_idx`` as its groups."""
    depthwise = 1 < conv.groups == conv.in_channels == conv.out_channels
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None and not depthwise:
        w = w[:, in_idx]
    conv.weight = nn.Parameter(w.clone(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None and out_idx is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[out_idx].clone(), requires_grad=conv.bias.requires_grad)
    conv.out_channels = w.shape[0]
    if depthwise:
        conv.groups = conv.in_channels = w.shape[0]
    else:
        conv.in_channels = w.shape[1] * conv.groups


def keep_bn_(bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            setattr(bn, name, nn.Parameter(p.detach()[idx].clone(), requires_grad=p.requires_grad))
    for name in ("running_mean", "running_var"):
        b = getattr(bn, name)
        if b is not None:
            bn._buffers[name] = b[idx].clone()
    bn.num_features = len(idx)


def prune_channels_(module: nn.Module, keep: Mapping[int, torch.Tensor], blocks: str | None = None) -> dict:
    """Keep hidden channels ``keep[j]`` (sorted LongTensor) in each MBConv block j, in place.

    Returns ``{"hidden_before": {"blocks.j": C}, "hidden_after": {"blocks.j": K}}``.
    """
    found = channel_layout(module, blocks)
    bad = sorted(set(keep) - set(found))
    if bad:
        raise UsageError("channel pruning names blocks without an expansion conv", value=bad,
                         allowed=sorted(found), fix="make the plan for this model")
    before, after = {}, {}
    for j, idx in keep.items():
        b = found[j]
        c = _hidden(b)
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        if len(idx) < 1 or int(idx.max()) >= c or len(idx.unique()) != len(idx):
            raise UsageError("kept channels out of range or empty", value=f"blocks.{j}: {len(idx)} of {c}",
                             allowed=f"1..{c} distinct indices below {c}", fix="lower --channels")
        keep_conv_(b._expand_conv, out_idx=idx)
        keep_bn_(b._bn0, idx)
        keep_conv_(b._depthwise_conv, out_idx=idx)
        keep_bn_(b._bn1, idx)
        if getattr(b, "has_se", False):
            keep_conv_(b._se_reduce, in_idx=idx)
            keep_conv_(b._se_expand, out_idx=idx)
        keep_conv_(b._project_conv, in_idx=idx)
        before[f"blocks.{j}"], after[f"blocks.{j}"] = c, len(idx)
    return {"hidden_before": before, "hidden_after": after}
