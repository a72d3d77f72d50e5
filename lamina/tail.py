"""The tail of a model: the modules that only run after its block stack (final conv, pooler, classifier).

A model cut after block k (``lamina transfer``'s deployable) never runs them, so it should neither carry
nor save them. They are found from the :class:`lamina.blocks.BlockMap`, not by family names: walking up
from the block container to the root, every sibling registered after the branch that holds the stack
and owning parameters of its own is tail, and so is the BlockMap's task head. A module whose
parameters are shared with the kept part (a tied embedding) is never tail.

:func:`cut_tail_` replaces them with :class:`CutOff`, which holds nothing and raises if it is ever
called, so a module wrongly taken for tail fails loudly rather than changing outputs. The cut paths
are kept on the module as ``lamina_cut`` (recorded in lamina.json by :mod:`lamina.savefmt`, which
cuts the rebuilt model the same way before loading its weights).
"""

from __future__ import annotations

import torch.nn as nn

from .blocks import BlockMap
from .errors import LaminaError


class CutOff(nn.Module):
    """Stands where a tail module was cut off; holds no tensors and must never run."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, *args, **kwargs):
        raise LaminaError("a part of the model that was cut off was called", value=self.path,
                          allowed="only the layers before the cut", fix="use the full model for this output")

    def extra_repr(self) -> str:
        return f"cut: {self.path}"


def _parent(path: str) -> str | None:
    return None if not path else (path.rsplit(".", 1)[0] if "." in path else "")


def tail_modules(model: nn.Module, bmap: BlockMap, head_only: bool = False) -> list[str]:
    """Paths of the modules of ``model`` that run only after its block stack, in registration order.

    ``head_only``: only the BlockMap's task head, which runs after the final tap too (a model read up to
    its final norm or head conv still never runs its classifier).
    """
    if not bmap.container or any(ch in bmap.container for ch in "*?["):
        return []  # blocks named by a glob: no single branch whose later siblings are known to follow it
    mods = dict(model.named_modules())
    found: list[str] = []
    child = bmap.container
    anc = _parent(child)
    while anc is not None and not head_only:
        prefix = f"{anc}." if anc else ""
        after = False
        for name, mod in mods[anc].named_children():
            path = prefix + name
            if path == child:
                after = True
            elif after and next(mod.parameters(recurse=True), None) is not None:
                found.append(path)
        child, anc = anc, _parent(anc)
    if bmap.head and bmap.head not in found and bmap.head in mods:
        found.append(bmap.head)
    tap_paths = {t.path for t in bmap.taps}
    found = [p for p in found if not any(t == p or t.startswith(p + ".") for t in tap_paths)]
    cut_ids = {id(t) for p in found for t in mods[p].parameters()}
    kept_ids = {id(t) for n, t in model.named_parameters(remove_duplicate=False)
                if not any(n.startswith(p + ".") for p in found)}
    return [] if cut_ids & kept_ids else found  # tied to a kept tensor: cutting would lose it


def cut_tail_(model: nn.Module, paths: list[str]) -> list[str]:
    """Replace the modules at ``paths`` with :class:`CutOff` in place; records them on ``model.lamina_cut``."""
    mods = dict(model.named_modules())
    bad = [p for p in paths if not isinstance(p, str) or not p or p not in mods]
    if bad:
        raise LaminaError("the model has no module at a path recorded as cut off", value=bad,
                          allowed="module paths of the rebuilt architecture", fix="save the model again")
    for p in paths:
        parent = mods[_parent(p)]
        setattr(parent, p.rsplit(".", 1)[-1], CutOff(p))
    model.lamina_cut = list(getattr(model, "lamina_cut", None) or []) + list(paths)
    return list(paths)
