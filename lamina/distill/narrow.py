"""An SKT-style narrow student: the teacher with a fraction of its channels, the most important ones.

SKT's quarter-width students keep 1/4 of every layer's channels. Here the
copy keeps ``round(width * C)`` channels of every *channel space* of the
bundled EfficientNet(-Lite) layout, chosen by activation importance on
calibration batches, and starts from the teacher's weights for them:

- a channel space is a set of channels several tensors share: the stem output
  is the first block's input; a block with a residual (same width in and out,
  stride 1) writes into the space it reads; every other block opens a new one;
  every block's expanded (hidden) channels are their own space, and so are the
  head conv's 1280 channels;
- a channel's importance is the mean |activation| over calibration samples and
  positions, summed over every tensor of its space (stem output, block
  outputs; the depthwise BN output for hidden channels; the head BN output),
  the activation-magnitude criterion of Nemotron Elastic's width pruning;
- BatchNorm running statistics are re-estimated on the calibration batches
  afterwards (the sliced ones describe the wide network's activations);
- each conv / batch-norm / linear is sliced in place (same module classes, so
  the static "same" padding and the block's residual test are unchanged: a
  block keeps its original in/out filter counts in its arguments, which only
  decide whether the residual is added, and that decision does not change).

The copy saves with lamina's format (``lamina.load``) like any pruned EfficientNet.
Transformer students come from ``lamina prune`` (depth, FFN, heads); a narrow
copy of a transformer's hidden width is not built here.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import UsageError
from ..compress._calib import channel_sums
from ..compress.channels import keep_bn_, keep_conv_
from ..models import LoadedModel


def _is_effnet(module: nn.Module) -> bool:
    blocks = getattr(module, "_blocks", None)
    return (blocks is not None and hasattr(module, "_conv_stem") and hasattr(module, "_conv_head")
            and all(hasattr(b, "_depthwise_conv") and hasattr(b, "_project_conv") for b in blocks))


def _spaces(net: nn.Module) -> dict:
    """The channel spaces and which tensors write / read each (see the module doc)."""
    stem = "stem"
    sizes = {stem: net._conv_stem.out_channels}
    block_io = []
    cur = stem
    for i, b in enumerate(net._blocks):
        a = b._block_args
        stride = a.stride if isinstance(a.stride, int) else a.stride[0]
        skip = a.id_skip and stride == 1 and a.input_filters == a.output_filters
        hidden = f"hidden.{i}" if a.expand_ratio != 1 else cur
        if hidden != cur:
            sizes[hidden] = b._expand_conv.out_channels
        out = cur if skip else f"out.{i}"
        if out != cur:
            sizes[out] = b._project_conv.out_channels
        block_io.append((cur, hidden, out))
        cur = out
    sizes["head"] = net._conv_head.out_channels
    return {"sizes": sizes, "blocks": block_io, "last": cur}


def _importance(net: nn.Module, sp: dict, batches: list) -> dict:
    """Per space, the summed per-sample mean |activation| of every tensor in it (see the module doc)."""
    per_sample = lambda x: x.abs().mean(dim=(2, 3))  # noqa: E731  (B, C, H, W) -> (B, C)
    points, spaces = [(net._bn0, "output", per_sample, sp["sizes"]["stem"])], ["stem"]
    for b, (_inp, hidden, out) in zip(net._blocks, sp["blocks"]):
        points.append((b, "output", per_sample, sp["sizes"][out]))
        spaces.append(out)
        if hidden.startswith("hidden"):
            points.append((b._bn1, "output", per_sample, sp["sizes"][hidden]))
            spaces.append(hidden)
    points.append((net._bn1, "output", per_sample, sp["sizes"]["head"]))
    spaces.append("head")
    score = {k: torch.zeros(n, dtype=torch.float64) for k, n in sp["sizes"].items()}
    for space, sums in zip(spaces, channel_sums(net, batches, points, "a narrow copy")):
        score[space] += sums
    return score


def narrow_(net: nn.Module, keep: dict) -> None:
    """Slice ``net`` in place to the channels ``keep[space]`` (sorted index tensors)."""
    sp = _spaces(net)
    keep_conv_(net._conv_stem, out_idx=keep["stem"])
    keep_bn_(net._bn0, keep["stem"])
    for b, (inp, hidden, out) in zip(net._blocks, sp["blocks"]):
        if getattr(b, "has_se", False):
            raise UsageError("narrow copies of EfficientNets with squeeze-excitation are not supported",
                             value="has_se", allowed="EfficientNet-Lite (no SE)", fix="use efficientnet-lite0")
        if hidden != inp:
            keep_conv_(b._expand_conv, keep[hidden], keep[inp])
            keep_bn_(b._bn0, keep[hidden])
        keep_conv_(b._depthwise_conv, out_idx=keep[hidden])
        keep_bn_(b._bn1, keep[hidden])
        keep_conv_(b._project_conv, keep[out], keep[hidden])
        keep_bn_(b._bn2, keep[out])
    keep_conv_(net._conv_head, keep["head"], keep[sp["last"]])
    keep_bn_(net._bn1, keep["head"])
    fc = net._fc
    fc.weight = nn.Parameter(fc.weight.data[:, keep["head"]].clone())
    fc.in_features = len(keep["head"])


def narrow_copy(teacher: LoadedModel, width: float, batches: list, recalibrate: bool = True) -> LoadedModel:
    """A copy of ``teacher`` with ``width`` of the channels of every space, the most important ones.

    ``batches``: model inputs (``teacher.batch(...)``) that rank the channels and,
    with ``recalibrate``, re-estimate the BatchNorm running statistics.
    """
    net = teacher.module
    if not _is_effnet(net):
        raise UsageError("a narrow copy (--width) can be made only of the bundled EfficientNet layout",
                         value=type(net).__name__,
                         allowed="efficientnet-lite0 or its fine-tuned / pruned copies",
                         fix="for a transformer, make the student with `lamina prune` (--drop-blocks, --ffn, "
                             "--heads) and pass it as --student")
    sp = _spaces(net)
    score = _importance(net, sp, batches)
    keep = {}
    for space, s in score.items():
        k = max(1, int(round(width * len(s))))
        keep[space] = torch.sort(torch.argsort(s, descending=True)[:k]).values
    new = copy.deepcopy(net)
    narrow_(new, keep)
    new.eval()
    from ..blocks import find_blocks
    from ..models import recalibrate_bn
    out = copy.copy(teacher)
    out.module, out.blocks = new, find_blocks(new, teacher.blocks.container or None)
    if recalibrate:
        recalibrate_bn(out, batches)  # the sliced running statistics describe the wide network
    return out
