"""The deployable model: a head on the backbone cut after the deepest block it reads.

:class:`TransferModel` wraps the (truncated) backbone and a head. Its
``forward`` takes the backbone's own inputs (``input_ids`` / ``attention_mask``
..., or an image tensor), records the taps the head reads (pooled as the store
was, one way or several side by side, or token-level for ``side``), stops the backbone right after the deepest
of them (so nothing after it runs: no later block, no final norm, no original
classifier) and returns the head's (B, K) class scores. When every tap is a block, the
modules after the stack (final conv, classifier: :mod:`lamina.tail`) are cut off too
(the classifier alone when a tap follows the stack),
so they are neither carried nor saved: a Hugging Face backbone without its pooler is saved in
lamina's format, which records the cut (``from_pretrained`` of the standard class loads it too, with
``add_pooling_layer=False`` where the class has that switch).

Truncation is real: the blocks after the deepest one read are removed from
the block container, as depth pruning does (``drop_blocks_``), and a Hugging
Face backbone's config says so (``num_hidden_layers``).

Folder (``save_transfer``)::

    lamina_head.json     {"lamina_head": 1, "head": head spec (plain JSON), "taps": [names], "pooling",
                          "stop": tap name, "classes", "checksums": {file: sha256} of every other file}
    head.safetensors     the head's tensors
    backbone/            the truncated backbone: save_pretrained (AutoModel.from_pretrained loads it), or
                         lamina's format when a tail was cut off (EfficientNet; BERT's pooler: config.json
                         and model.safetensors still load with from_pretrained)

``lamina.load(folder)`` / ``load_model(folder)`` rebuild it (checksums checked,
the head built from its spec, never from code a file names).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from ..blocks import Tap, find_blocks
from ..capture.hooks import POOLINGS, _block_input, _first_tensor, pool
from ..errors import LaminaError, UsageError
from ..store.store import sha256_file
from ..tail import cut_tail_, tail_modules
from ._pools import parse, pool_many

SPEC = "lamina_head.json"
HEAD_WEIGHTS = "head.safetensors"
FORMAT = 1


class _Stop(Exception):
    """Raised by the hook after the deepest tap: the rest of the backbone is not run."""


class TransferModel(nn.Module):
    """``backbone`` + ``head`` reading ``taps`` (Tap objects on the backbone) pooled with ``pooling``.

    Shapes: forward(**backbone inputs) -> (B, K); :meth:`features` -> list of (B, D) pooled,
    or (B, T, D) / (B, C, H, W) when ``pooling`` is 'none'.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, taps: list[Tap], pooling: str):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.tap_names = [t.name for t in taps]
        self._taps = list(taps)
        self.pooling = pooling

    def features(self, *args, **kwargs) -> list[torch.Tensor]:
        mask = kwargs.get("attention_mask")
        out: dict[str, torch.Tensor] = {}
        mods = dict(self.backbone.named_modules())
        last = self._taps[-1].name
        handles = []

        def keep(name, x):
            out[name] = pool(x.detach(), self.pooling, mask) if self.pooling in POOLINGS \
                else pool_many(x.detach(), parse(self.pooling), mask)  # several ways: 'mean+max' (_pools)
            if name == last:
                raise _Stop

        try:
            for t in self._taps:
                if t.side == "input":
                    handles.append(mods[t.path].register_forward_pre_hook(
                        lambda _m, a, kw, _n=t.name: keep(_n, _block_input(a, kw, _n)), with_kwargs=True))
                else:
                    handles.append(mods[t.path].register_forward_hook(
                        lambda _m, _a, o, _n=t.name: keep(_n, _first_tensor(o))))
            try:
                self.backbone(*args, **kwargs)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.tap_names if n not in out]
        if missing:
            raise LaminaError("the backbone never ran the layers the head reads", value=missing,
                              allowed=self.tap_names, fix="check that the backbone's blocks are called in order")
        return [out[n] for n in self.tap_names]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        feats = self.features(*args, **kwargs)
        mask = kwargs.get("attention_mask")
        return self.head(feats, mask)


def _backbone_of(lm):
    """The feature part of a loaded model: a Hugging Face task model's base model (its head never runs), else
    the module itself. Returns (LoadedModel, blocks spec)."""
    mod = lm.module
    prefix = getattr(mod, "base_model_prefix", None)
    if prefix and hasattr(mod, prefix) and isinstance(getattr(mod, prefix), nn.Module) and \
            getattr(mod, prefix) is not mod:
        base = getattr(mod, prefix)
        out = copy.copy(lm)
        out.module, out.blocks = base, find_blocks(base)
        return out
    return lm


def build_deployable(lm, head: nn.Module, tap_names: list[str], pooling: str):
    """(LoadedModel of a :class:`TransferModel`, info): ``lm`` copied, cut after the deepest tap, ``head`` on top.

    info: {"deepest_block": index or -1 (embed only), "n_blocks", "removed": [...],
    "cut": [paths of the tail modules cut off (:mod:`lamina.tail`): all of them when every tap is a
    block, else the classifier]}.
    """
    from ..compress.depth import drop_blocks_
    base = _backbone_of(lm)
    module = copy.deepcopy(base.module)
    bmap = find_blocks(module, base.blocks.container or None)
    names = [t.name for t in bmap.taps]
    order = {n: i for i, n in enumerate(names)}
    missing = [n for n in tap_names if n not in order]
    if missing:
        raise UsageError("the model has no such layers", value=missing, allowed=", ".join(names),
                         fix="capture and train on this model's layers")
    tap_names = sorted(tap_names, key=order.__getitem__)
    n = bmap.n_blocks
    deepest = max(_block_index(name, n) for name in tap_names)
    removed = list(range(max(deepest, 0) + 1, n))
    if removed:
        drop_blocks_(module, removed, bmap.container or None)
        bmap = find_blocks(module, bmap.container or None)
    # every tap a block: the whole tail never runs (EfficientNet's head conv and classifier, BERT's or
    # ViT's pooler, a final norm), so it goes; a tap after the stack (head_conv, final_norm): still the
    # classifier. A Hugging Face backbone without its tail is then saved in lamina's format, which records
    # the cut (from_pretrained would rebuild the pooler at random; see save_transfer).
    blocks_only = all(t == "embed" or t.startswith("blocks.") for t in tap_names)
    cut = cut_tail_(module, tail_modules(module, bmap, head_only=not blocks_only))
    bmap = find_blocks(module, bmap.container or None)
    taps = [bmap.tap(name) for name in tap_names]  # later blocks went; earlier paths are unchanged
    model = TransferModel(module, head, taps, pooling).eval()
    out = copy.copy(base)
    out.module, out.blocks = model, find_blocks(model, "backbone." + bmap.container if bmap.container else None)
    return out, {"deepest_block": deepest, "n_blocks": n, "removed": removed, "cut": cut, "backbone": base}


def _block_index(name: str, n: int) -> int:
    """Index of the deepest block a tap needs: embed -1, blocks.i i, anything after the stack n-1."""
    if name == "embed":
        return -1
    if name.startswith("blocks.") and name[7:].lstrip("-").isdigit():
        i = int(name[7:])
        return i if i >= 0 else n + i
    return n - 1  # final_norm, head_conv: after the last block


def save_transfer(dep, path, classes: list[str], extra: dict | None = None) -> Path:
    """Save a deployable LoadedModel (from :func:`build_deployable`) to folder ``path`` (replaced atomically)."""
    from safetensors.torch import save_model

    from ..savefmt import save
    model: TransferModel = dep.module
    path = Path(path)
    from ..runfolder import SCRATCH, swap_in
    tmp = path.with_name(f".{path.name}{SCRATCH}")  # a lamina-reserved name: never a user's folder
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        bb = copy.copy(dep)
        bb.module = model.backbone
        bb.blocks = find_blocks(model.backbone, dep.blocks.container[len("backbone."):] or None) \
            if dep.blocks.container.startswith("backbone.") else find_blocks(model.backbone)
        if getattr(model.backbone, "lamina_cut", None) and hasattr(model.backbone, "save_pretrained"):
            # a Hugging Face backbone cut before its tail (BERT's pooler): lamina's format records the cut; the
            # builder is the backbone's own class (the source may be a task model, whose base this is)
            from ..savefmt import preprocess_of, save_lamina
            save_lamina(model.backbone, tmp / "backbone", "hf:" + type(model.backbone).__name__, preprocess_of(bb),
                        {"blocks": bb.blocks.container or None}, tokenizer=bb.tokenizer)
            fmt = "lamina"
        else:
            fmt = save(bb, tmp / "backbone")
        save_model(model.head, str(tmp / HEAD_WEIGHTS), metadata={"format": "pt"})
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        spec = {"lamina_head": FORMAT, "head": model.head.spec(), "taps": model.tap_names,
                "pooling": model.pooling, "classes": list(classes), "backbone_format": fmt,
                "checksums": sums, **(extra or {})}
        (tmp / SPEC).write_text(json.dumps(spec, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path, "transfer")  # replaces only what lamina recorded there
    return path


def load_transfer(path):
    """Rebuild a folder written by :func:`save_transfer`; returns a LoadedModel whose module is a TransferModel."""
    from safetensors.torch import load_model as st_load

    from ..models import load_model
    from .heads import build_head
    path = Path(path)
    try:
        spec = json.loads((path / SPEC).read_text())
    except (OSError, ValueError) as e:
        raise LaminaError(f"cannot read {SPEC}: {e}", value=str(path), allowed="a folder written by lamina transfer",
                          fix="save the model again") from e
    if spec.get("lamina_head") != FORMAT:
        raise UsageError("unsupported transfer-model format", value=spec.get("lamina_head"), allowed=FORMAT,
                         fix="save the model again with this lamina")
    root = path.resolve()
    for rel, digest in (spec.get("checksums") or {}).items():
        f = (path / rel).resolve()
        if root not in f.parents:  # never follow a path out of the folder
            raise LaminaError("a checksum entry points outside the model folder", value=rel,
                              allowed="files inside it", fix="the folder was tampered with; save it again")
        if not f.is_file() or sha256_file(f) != digest:
            raise LaminaError("a file of the model folder is missing or differs from its recorded checksum",
                              value=rel, allowed="the bytes lamina wrote", fix="copy the folder again or re-run")
    for need in (HEAD_WEIGHTS, "backbone"):
        if need not in {r.split("/")[0] for r in spec.get("checksums") or {}}:
            raise LaminaError("the model folder records no checksum for a file it needs", value=need,
                              allowed="a folder written by lamina transfer", fix="save the model again")
    if spec.get("pooling") not in POOLINGS:
        parse(str(spec.get("pooling")))  # several ways ('mean+max'), each one lamina knows, or a clear refusal
    base = load_model(str(path / "backbone"))
    head = build_head(spec["head"])
    try:
        st_load(head, str(path / HEAD_WEIGHTS), strict=True)
    except RuntimeError as e:
        raise LaminaError(f"the head's weights do not fit its spec: {str(e)[:300]}", value=str(path),
                          allowed="weights saved with this spec", fix="save the model again") from e
    taps = [base.blocks.tap(n) for n in spec["taps"]]
    model = TransferModel(base.module, head, taps, spec["pooling"]).eval()
    out = copy.copy(base)
    out.module = model
    out.blocks = find_blocks(model, "backbone." + base.blocks.container if base.blocks.container else None)
    out.source = str(path)
    return out


@torch.no_grad()
def max_difference(a, b, batch: dict) -> float:
    """Largest absolute difference of two LoadedModels' outputs on ``batch``."""
    return float((a.forward(batch).float() - b.forward(batch).float()).abs().max())
