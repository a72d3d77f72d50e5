"""``record``: the outputs of named submodules during a forward pass, with autograd.

Distillation compares teacher and student at several taps. Unlike
:mod:`lamina.capture` (which pools and detaches for storage), the student's
tapped outputs must stay in the autograd graph so the losses can train it, so
nothing here is detached or pooled.

Example::

    with record(teacher, ["encoder.layer.0", "encoder.layer.1"]) as t_out, torch.no_grad():
        t_logits = teacher(**batch).last_hidden_state
    with record(student, ["encoder.layer.0"]) as s_out:
        s_logits = student(**batch).last_hidden_state
    t_out["encoder.layer.1"]   # (B, T, C), no grad; s_out[...] carries grad

Shapes: whatever the module returns; for Hugging Face blocks (which return a
tuple, or a ModelOutput) the first element, the hidden states (B, T, C).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from ..errors import UsageError, suggest


def _first(output, name: str) -> torch.Tensor:
    # Hugging Face blocks return (hidden_states, attn_weights, ...) or a
    # ModelOutput; the hidden states always come first.
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif hasattr(output, "to_tuple"):
        output = output.to_tuple()[0]
    if not isinstance(output, torch.Tensor):
        raise UsageError(f"tap {name!r} does not return a tensor (nor a tuple starting with one)",
                         value=type(output).__name__, allowed="a module whose output (or first output) is a tensor",
                         fix="tap the block itself, or a submodule that returns its hidden states")
    return output


def _resolve(module: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    found = {}
    for name in names:
        try:
            found[name] = module.get_submodule(name)
        except AttributeError:
            paths = [n for n, _ in module.named_modules() if n]
            raise UsageError(f"{type(module).__name__} has no submodule {name!r}", value=name,
                             allowed="module paths as in module.get_submodule(path), e.g. "
                                     + ", ".join(repr(p) for p in paths[:3]),
                             fix=suggest(name, paths) or "list them with [n for n, _ in model.named_modules()]") \
                from None
    return found


@contextlib.contextmanager
def record(module: nn.Module, names: str | Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of ``module``'s submodules ``names`` during each forward.

    Yields a dict ``name -> tensor``, filled in the order the forward reaches
    the taps. It is cleared when ``module`` itself starts a forward, so it holds
    the latest pass only; a submodule called twice in one pass keeps its last
    output. Outputs keep their autograd graph (run the teacher under
    ``torch.no_grad()`` to get plain tensors). Hooks are removed on exit, also
    when the body raises.
    """
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    subs = _resolve(module, names)
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        # The pre-hook on the root clears before the tap hooks can fill it.
        handles.append(module.register_forward_pre_hook(lambda _m, _a: out.clear()))
        for name, sub in subs.items():
            def keep(_m, _args, output, _name=name):
                out[_name] = _first(output, _name)
            handles.append(sub.register_forward_hook(keep))
        yield out
    finally:
        for h in handles:
            h.remove()
