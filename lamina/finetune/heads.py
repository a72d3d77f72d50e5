"""A classification head on a backbone, and which parameters it owns (saving: ``lamina.savefmt.save``).

- Hugging Face backbones get the library's own ``*ForSequenceClassification``
  / ``*ForImageClassification`` class (built from the backbone's config, the
  backbone module moved in), so the result saves with ``save_pretrained`` and
  loads with ``AutoModelFor*.from_pretrained``: standard tools, no lamina.
- The bundled EfficientNet keeps its own classifier slot (``_fc``), resized to
  the task's classes; it is saved in lamina's format (``lamina.load``).
- "The head" is found by execution order, not by name: every module whose
  first call comes after the last block has returned (BERT's pooler and
  classifier, GPT-2's ln_f and score, EfficientNet's head conv and _fc).
  Freezing everything else is "frozen backbone" for any architecture.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import UsageError
from ..models import LoadedModel
from ..task import num_classes


def attach_head(lm: LoadedModel, classes: list[str]) -> LoadedModel:
    """A copy of ``lm`` that outputs one score per class (kept as is when it already does)."""
    k = len(classes)
    have = num_classes(lm)
    if have == k:
        return lm
    mod = lm.module
    cfg = getattr(mod, "config", None)
    if cfg is not None and hasattr(mod, "base_model_prefix"):
        return _hf_head(lm, classes)
    if hasattr(mod, "_fc") and isinstance(mod._fc, nn.Linear):  # EfficientNet (lukemelas layout)
        new = copy.deepcopy(mod)
        torch.manual_seed(0)
        new._fc = nn.Linear(mod._fc.in_features, k)
        out = copy.copy(lm)
        out.module, out.blocks = new, find_blocks(new, lm.blocks.container or None)
        return out
    raise UsageError("lamina cannot put a classification head on this model", value=type(mod).__name__,
                     allowed="Hugging Face text or vision models (BERT family, GPT-2, Llama family, ViT, ...), "
                             "efficientnet-lite0, or a model in lamina's format",
                     fix="train the head yourself, or use one of those models")


def _hf_head(lm: LoadedModel, classes: list[str]) -> LoadedModel:
    import transformers
    mod = lm.module
    cfg = copy.deepcopy(mod.config)
    cfg.num_labels = len(classes)
    cfg.id2label = {i: c for i, c in enumerate(classes)}
    cfg.label2id = {c: i for i, c in enumerate(classes)}
    if lm.modality == "text" and getattr(cfg, "pad_token_id", None) is None and lm.tokenizer is not None:
        cfg.pad_token_id = lm.tokenizer.pad_token_id  # decoders find the last real token with it
    auto = (transformers.AutoModelForSequenceClassification if lm.modality == "text"
            else transformers.AutoModelForImageClassification)
    try:
        torch.manual_seed(0)
        new = auto.from_config(cfg)
    except ValueError as e:
        raise UsageError(f"transformers has no classification class for {type(mod).__name__}", value=cfg.model_type,
                         allowed="architectures with an AutoModelFor{Sequence,Image}Classification entry",
                         fix="use another model") from e
    base = mod if not hasattr(mod, mod.base_model_prefix) else getattr(mod, mod.base_model_prefix)
    mine = getattr(new, new.base_model_prefix)
    missing, _ = mine.load_state_dict(base.state_dict(), strict=False)
    # a backbone without a pooler (or the reverse) differs only in head-side modules;
    # anything else missing means the weights did not transfer
    bad = [m for m in missing if "pooler" not in m]
    if bad:
        raise UsageError("the backbone's weights do not fit the classification model", value=bad[:3],
                         allowed="a backbone of the same architecture", fix="report this model as unsupported")
    new.eval()
    out = copy.copy(lm)
    out.module, out.blocks = new, find_blocks(new)
    return out


def head_parameters(lm: LoadedModel, batch: dict) -> list[str]:
    """Names of the parameters used only after the last block (the head), found by running ``batch``."""
    order, done = {}, {"last": False}
    last = lm.module.get_submodule(lm.blocks.block_paths[-1])
    hooks = []

    def seen(name):
        def hook(_m, _i):
            if done["last"] and name not in order:
                order[name] = len(order)
            elif not done["last"]:
                order.setdefault(name, None)
        return hook

    def after_last(_m, _i, _o):
        done["last"] = True

    for name, m in lm.module.named_modules():
        if not list(m.children()) and list(m.parameters(recurse=False)):
            hooks.append(m.register_forward_pre_hook(seen(name)))
    hooks.append(last.register_forward_hook(after_last))
    try:
        with torch.no_grad():
            lm.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    head = {n for n, v in order.items() if v is not None}
    return [pn for pn, _ in lm.module.named_parameters() if pn.rsplit(".", 1)[0] in head]
