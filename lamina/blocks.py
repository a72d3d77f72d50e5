"""Where a model's blocks are: the one foundation every stage reads.

A *block* is one repeated residual unit (a transformer layer, an MBConv block).
``find_blocks(model)`` returns a :class:`BlockMap`: an ordered list of *taps*,
each a canonical name bound to a module path and to which side of it is read:

    embed          input of blocks.0 (what every block stack is fed; equals
                   ``hidden_states[0]`` of Hugging Face models)
    blocks.0 ...   output of each block, before any final norm
    final_norm     output of the final norm (GPT-2 ``ln_f``, Llama ``norm``,
                   ViT ``layernorm``) when the model has one
    head_conv      EfficientNet: the head convolution's activated output

Discovery is structural, not a table of class names: the block stack is the
container (``ModuleList``/``Sequential``) of at least two modules of one class
holding the most parameters. That finds ``encoder.layer`` (BERT family, ViT),
``h`` (GPT-2), ``model.layers`` (Llama/Qwen2/Mistral) and ``_blocks``
(EfficientNet) alike. When that stack is a list of *stages* whose config
lists ``depths`` (ResNet, ConvNeXt, Swin), the blocks are the units inside the
stages, named by a stage glob (``encoder.stages.*.layers``). A module that one
forward calls k times (ALBERT's shared layer group; the config's
``num_hidden_groups``) is k blocks, in call order (``Tap.call``). For anything
else the user names the blocks: a dotted path to a container, a stage glob (a
glob whose last part is a plain name: containers, whose children are the
blocks), or a glob over module paths (``layer*.*``).

Block *selection* (None = all, n = last n, negative indices, names, globs) is
defined once here, in :func:`select_taps`, so capture, analysis and pruning
cannot disagree about what "the last 3 blocks" means.

Calling blocks: a block's hidden state goes in as its first positional argument
(or ``hidden_states=``) and comes out as a tensor, or first in a tuple / list /
``ModelOutput``. :func:`block_input`, :func:`block_output` and
:func:`with_output` read and replace it whatever the structure, and
:func:`bypass` uses them to make blocks return their input (the model as if
those blocks were deleted), e.g.::

    with bypass(model, ["blocks.1"]):
        y = model(x)          # == the model with block 1 removed
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from .errors import UsageError, suggest

# Names of final norms that follow the block stack, nearest ancestor first.
_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layernorm", "final_layer_norm", "layernorm", "norm_f",
                     "post_layernorm")
# Names of task heads (used by importance to measure output change on logits).
_HEAD_NAMES = ("classifier", "lm_head", "score", "_fc", "fc", "head", "cls")


@dataclass(frozen=True)
class Tap:
    """One recorded point: ``name`` (canonical), ``path`` (module), ``side``.

    ``side`` is ``"output"`` (forward hook) or ``"input"`` (forward pre-hook,
    first positional argument). ``call`` picks one call of a module that one
    forward runs several times (ALBERT's shared layer: blocks.i is its i-th call).
    """

    name: str
    path: str
    side: str = "output"
    call: int | None = None  # k: the k-th call of a module run several times per forward (ALBERT), else None


@dataclass(frozen=True)
class BlockMap:
    """The blocks of one model.

    Attributes:
        block_paths: module path of each block, in forward order.
        taps: embed, blocks.0..N-1, then final_norm/head_conv when present.
        container: path of the block container ('' when given by glob).
        head: path of the task head, or None.
        arch: short family name ('bert', 'gpt2', 'llama', 'vit',
            'efficientnet', or the model's class name).
    """

    block_paths: tuple[str, ...]
    taps: tuple[Tap, ...]
    container: str = ""
    head: str | None = None
    arch: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def n_blocks(self) -> int:
        return len(self.block_paths)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.taps]

    def tap(self, name: str) -> Tap:
        for t in self.taps:
            if t.name == name:
                return t
        raise UsageError(f"no layer named {name!r} in this model", value=name,
                         allowed=", ".join(self.names), fix=suggest(name, self.names) or None)

    def to_dict(self) -> dict:
        return {"arch": self.arch, "container": self.container, "head": self.head,
                "block_paths": list(self.block_paths),
                "taps": [{"name": t.name, "path": t.path, "side": t.side,
                          **({"call": t.call} if t.call is not None else {})} for t in self.taps]}

    @property
    def shared(self) -> bool:
        """True when one module is several blocks (called several times per forward)."""
        return len(set(self.block_paths)) < len(self.block_paths)


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt:
        return {"qwen2": "llama", "mistral": "llama", "llama": "llama"}.get(mt, mt)
    name = type(model).__name__
    return "efficientnet" if name.lower().startswith("efficientnet") else name


def _stack_candidates(model: nn.Module, min_len: int = 2) -> list[tuple[int, str, int, str]]:
    """(parameter count, path, length, child class) of every plausible block stack."""
    found = []
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < min_len:
            continue
        if min_len == 1 and not isinstance(mod, nn.ModuleList):
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        found.append((n_params, path, len(mod), next(iter(kinds)).__name__))
    found.sort(key=lambda t: -t[0])
    return found


def _all_containers(model: nn.Module) -> list[str]:
    out = []
    for path, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1 and path:
            kinds = sorted({type(c).__name__ for c in mod})
            n = sum(p.numel() for p in mod.parameters())
            out.append((n, f"{path} ({len(mod)} x {'/'.join(kinds)}, {n:,} params)"))
    out.sort(key=lambda t: -t[0])
    return [s for _, s in out]


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _find_final(model: nn.Module, container: str, arch: str) -> Tap | None:
    mods = dict(model.named_modules())
    if arch == "efficientnet" and "_avg_pooling" in mods:
        # The head conv + BN + activation is applied inline; the activated map is
        # the input of the global pool, so read that side of it.
        return Tap("head_conv", "_avg_pooling", "input")
    anc = _parent(container) if container else None
    while anc is not None:
        for name in _FINAL_NORM_NAMES:
            p = f"{anc}.{name}" if anc else name
            m = mods.get(p)
            if m is not None and "norm" in type(m).__name__.lower():
                return Tap("final_norm", p, "output")
        anc = _parent(anc) if anc else None
    return None


def _find_head(model: nn.Module) -> str | None:
    for name, _ in model.named_children():
        if name in _HEAD_NAMES:
            return name
    return None


def _is_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def _children(mods: dict, path: str) -> list[str]:
    return [f"{path}.{n}" if path else n for n, _ in mods[path].named_children()]


def stage_containers(model: nn.Module, spec: str) -> list[str]:
    """The containers a stage glob names (``'encoder.stages.*.layers'``), in module order."""
    return [p for p in dict(model.named_modules()) if p and fnmatch.fnmatchcase(p, spec)
            and p.count(".") == spec.count(".")]


def _stages(model: nn.Module, container: str) -> str | None:
    """``'C.*.REL'`` when the stack ``C`` is a list of *stages*, each holding its blocks at ``C.i.REL``
    (ResNet, ConvNeXt, Swin: ``config.depths`` says how many per stage), else None.

    Hierarchical models put their repeated residual units inside stages that
    also downsample; the units, not the stages, are what importance ranks and
    pruning removes. The config's ``depths`` must agree with what is found, so a
    model that merely nests lists is not mistaken for one.
    """
    depths = getattr(getattr(model, "config", None), "depths", None)
    mods = dict(model.named_modules())
    stages = _children(mods, container)
    if not isinstance(depths, (list, tuple)) or len(depths) != len(stages):
        return None
    rels = []
    for stage, depth in zip(stages, depths):
        inner = sorted(((sum(q.numel() for q in m.parameters()), p) for p, m in mods[stage].named_modules()
                        if p and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == depth >= 1
                        and len({type(c) for c in m}) == 1), reverse=True)
        if not inner:
            return None
        rels.append(inner[0][1])  # the largest such list in the stage (a block's own sub-lists are smaller)
    kinds = {type(mods[c]) for s, r in zip(stages, rels) for c in _children(mods, f"{s}.{r}")}
    if len(set(rels)) != 1 or len(kinds) != 1:
        return None
    return f"{container}.*.{rels[0]}"


def _paths_from_spec(model: nn.Module, spec: str) -> tuple[list[str], str]:
    mods = dict(model.named_modules())
    if _is_glob(spec) and not _is_glob(spec.rsplit(".", 1)[-1]):
        # A glob whose last part is a plain name names block *containers*, one per stage
        # ('encoder.stages.*.layers'): the blocks are their children, stage after stage.
        conts = stage_containers(model, spec)
        if not conts:
            raise UsageError("the stage glob matched no module", value=spec,
                             allowed="a glob over containers, e.g. 'encoder.stages.*.layers'",
                             fix="some containers in this model: " + "; ".join(_all_containers(model)[:5]))
        return [c for p in conts for c in _children(mods, p)], spec
    if _is_glob(spec):
        paths = [p for p in mods if p and fnmatch.fnmatchcase(p, spec)]
        # Keep only the outermost matches so 'layer*.*' does not also take sub-modules.
        paths = [p for p in paths if not any(p != q and p.startswith(q + ".") for q in paths)]
        if not paths:
            raise UsageError("the block glob matched no module", value=spec,
                             allowed="a glob over module paths, e.g. 'encoder.layers.*' or 'layer*.*'",
                             fix="some containers in this model: " + "; ".join(_all_containers(model)[:5]))
        return paths, ""
    if spec not in mods:
        raise UsageError("the named block container does not exist in this model", value=spec,
                         allowed="a dotted module path such as 'encoder.layers'",
                         fix=(suggest(spec, [p for p in mods if p]) or "")
                         + " containers seen: " + "; ".join(_all_containers(model)[:5]))
    mod = mods[spec]
    children = [f"{spec}.{n}" for n, _ in mod.named_children()]
    if len(children) < 1:
        raise UsageError("the named block container has no child modules", value=spec,
                         allowed="a ModuleList/Sequential of blocks",
                         fix="name the container itself, e.g. 'encoder.layers', not one block")
    return children, spec


def _groups_of(cfg) -> tuple[int, int, int] | None:
    """(layers N, groups G, layers per group I) of a config whose forward reuses layer groups (ALBERT:
    call i of N runs group ``i * G // N``), else None."""
    n, g = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_hidden_groups", None)
    if not isinstance(n, int) or not isinstance(g, int) or g < 1:
        return None
    return n, g, int(getattr(cfg, "inner_group_num", 1) or 1)


def _shared_calls(model: nn.Module, container: str, paths: list[str]) -> tuple[list[str], list]:
    """Blocks as calls: ``(path of each block, its call index or None)``.

    A block module called k times per forward is k blocks, in call order
    (ALBERT: one layer group called ``num_hidden_layers`` times). Only what
    the config declares is expanded: the list of groups, or the layers of the
    only group.
    """
    plain = (paths, [None] * len(paths))
    groups = _groups_of(getattr(model, "config", None))
    if groups is None or not container or _is_glob(container):
        return plain
    n, g, inner = groups
    if len(paths) == g and n > g and n % g == 0:
        per = n // g
        return [paths[i * g // n] for i in range(n)], [i % per for i in range(n)]
    if g == 1 and len(paths) == inner and n > 1 and _inside_one_group(model, container):
        return [p for _ in range(n) for p in paths], [c for c in range(n) for _ in paths]
    return plain


def _inside_one_group(model: nn.Module, container: str) -> bool:
    """True when ``container`` lies inside a one-element ModuleList (the only layer group)."""
    mods = dict(model.named_modules())
    anc = _parent(container)
    while anc:
        if isinstance(mods.get(anc), nn.ModuleList) and len(mods[anc]) == 1:
            return True
        anc = _parent(anc)
    return False


def find_blocks(model: nn.Module, blocks: str | None = None) -> BlockMap:
    """Find the block stack of ``model`` (or use ``blocks``, a path or glob).

    Raises UsageError listing the best candidate containers when no stack is
    found, so the user can name one with ``--blocks``.
    """
    arch = _arch_name(model)
    if blocks:
        paths, container = _paths_from_spec(model, blocks)
    else:
        cands = _stack_candidates(model)
        cfg = getattr(model, "config", None)
        if not cands and (getattr(cfg, "num_hidden_layers", None) == 1 or _groups_of(cfg)):
            # A model pruned to one block, or one whose layers are shared (ALBERT): its config
            # vouches that a one-element ModuleList is the stack (a lone Sequential could be anything).
            cands = _stack_candidates(model, min_len=1)
        if not cands:
            seen = _all_containers(model)
            raise UsageError(
                f"could not find the blocks of this {type(model).__name__}: no list of two or more "
                "modules of one class", value=type(model).__name__,
                allowed="a model with a ModuleList/Sequential of repeated blocks, or blocks named by the user",
                fix="name them with --blocks PATH or --blocks 'GLOB' (Python: blocks=...). "
                    + ("Candidates seen: " + "; ".join(seen[:5]) if seen else "No module containers seen."))
        _, container, _, _ = cands[0]
        container = _stages(model, container) or container
        paths, container = _paths_from_spec(model, container) if _is_glob(container) else \
            (_children(dict(model.named_modules()), container), container)
    paths, calls = _shared_calls(model, container, paths)
    taps = [Tap("embed", paths[0], "input", calls[0])]
    taps += [Tap(f"blocks.{i}", p, "output", c) for i, (p, c) in enumerate(zip(paths, calls))]
    final = _find_final(model, container, arch)
    if final is not None:
        taps.append(final)
    return BlockMap(tuple(paths), tuple(taps), container=container, head=_find_head(model), arch=arch)


def select_taps(bmap: BlockMap, selection=None) -> list[Tap]:
    """The taps chosen by ``selection``, in forward order.

    ``selection`` may be None (all taps), an int n (the last n blocks), a
    list of ints (block indices, negatives from the end), or names/globs over
    tap names (``"blocks.*"``, ``"embed,blocks.-1"``), as a list or a
    comma-separated string. Unknown names raise UsageError with suggestions.
    """
    if selection is None or selection == "" or selection == "all":
        return list(bmap.taps)
    if isinstance(selection, str):
        parts = [s.strip() for s in selection.split(",") if s.strip()]
        if len(parts) == 1 and parts[0].lstrip("-").isdigit():
            selection = int(parts[0])
        else:
            selection = parts
    n = bmap.n_blocks
    blocks = [t for t in bmap.taps if t.name.startswith("blocks.")]
    if isinstance(selection, int):
        if not 1 <= selection <= n:
            raise UsageError("the number of last blocks to take is out of range", value=selection,
                             allowed=f"1..{n}", fix=f"use a number between 1 and {n}, or 'all'")
        return blocks[n - selection:]
    chosen: list[str] = []
    for item in selection:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            idx = int(item)
            if not -n <= idx < n:
                raise UsageError("block index out of range", value=idx, allowed=f"{-n}..{n - 1}",
                                 fix="negative indices count from the last block")
            chosen.append(f"blocks.{idx % n}")
            continue
        if item.startswith("blocks.") and item[7:].lstrip("-").isdigit():
            idx = int(item[7:])
            if -n <= idx < 0:
                item = f"blocks.{idx % n}"
        matches = [t.name for t in bmap.taps if fnmatch.fnmatchcase(t.name, item)]
        if not matches:
            raise UsageError("unknown layer name", value=item, allowed=", ".join(bmap.names),
                             fix=suggest(item, bmap.names) or "use one of the allowed names or a glob like 'blocks.*'")
        chosen.extend(matches)
    keep = set(chosen)
    return [t for t in bmap.taps if t.name in keep]


# ---------------------------------------------------------------- calling blocks

def block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden state a block was called with: first positional argument, else ``hidden_states=``
    (else the first tensor keyword). (B, T, D) for transformer layers, (B, C, H, W) for CNN blocks."""
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    x = kwargs.get("hidden_states")
    if x is None:
        x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return x


def block_output(out) -> torch.Tensor | None:
    """The hidden state inside a block's output (a tensor, or first in a tuple/list/ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and len(out):
        return block_output(out[0])
    if isinstance(out, Mapping) and len(out):
        return block_output(next(iter(out.values())))
    return None


def with_output(out, x: torch.Tensor):
    """``out`` with its hidden state replaced by ``x``; the rest of its structure (caches, attentions) kept."""
    if isinstance(out, torch.Tensor):
        return x
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
        return type(out)(with_output(out[0], x), *out[1:])
    if isinstance(out, (tuple, list)):
        return type(out)([with_output(out[0], x), *out[1:]])
    if isinstance(out, Mapping):
        new = copy.copy(out)
        key = next(iter(out.keys()))
        new[key] = with_output(out[key], x)
        return new
    raise TypeError(f"unsupported block output type {type(out).__name__}")


@contextlib.contextmanager
def patched_forwards(stubs: dict[nn.Module, object]) -> Iterator[None]:
    """Replace ``forward`` on these module instances (hooks still fire); restore them in ``finally``."""
    saved = []
    try:
        for mod, fn in stubs.items():
            saved.append((mod, mod.__dict__.get("forward", None), "forward" in mod.__dict__))
            mod.forward = fn
        yield
    finally:
        for mod, old, had in reversed(saved):
            if had:
                mod.forward = old
            else:
                del mod.forward


@contextlib.contextmanager
def bypass(module: nn.Module, which, blocks: BlockMap | str | None = None, *,
           like: Mapping[str, object] | None = None) -> Iterator[list[str]]:
    """Inside the ``with``, blocks ``which`` of ``module`` return their input instead of their output.

    The model then computes what it would with those blocks deleted (the
    residual path only): the definition behind skip importance and the
    reference every depth-pruning test compares against.

    Args:
        module: the model (not modified outside the ``with``).
        which: blocks in :func:`select_taps` terms: ``["blocks.1", "blocks.3"]``,
            ``[1, 3]``, ``"blocks.-1"`` (an int alone, ``3``, means the last three,
            as everywhere in lamina).
        blocks: a BlockMap of ``module``, a container path / glob, or None (found).
        like: optional ``{block module path: an earlier output of that block}``;
            those blocks do not run at all: their input is returned in that
            output's structure (cheaper; only for blocks without side effects
            such as KV-cache writes).
    Yields the module paths of the bypassed blocks.

    A bypassed block otherwise still runs (so a KV cache it writes and the
    structure of its output stay valid); only its hidden state (B, T, D) /
    (B, C, H, W) is replaced by its input. A block whose output shape differs from its input
    shape raises UsageError when called: it cannot be bypassed.
    """
    bmap = blocks if isinstance(blocks, BlockMap) else find_blocks(module, blocks)
    taps = select_taps(bmap, which)
    bad = [t.name for t in taps if not t.name.startswith("blocks.")]
    if bad:
        raise UsageError("only blocks can be bypassed", value=bad, allowed="block names such as 'blocks.3'",
                         fix="drop 'embed' / 'final_norm' / 'head_conv' from the selection")
    stubs, shared = {}, {}
    for t in taps:
        mod = module.get_submodule(t.path)
        if t.call is not None:  # one call of a shared block: the other calls still run
            shared.setdefault(t.path, (mod, set()))[1].add(t.call)
            continue
        stubs[mod] = _identity(mod.forward, t.path) if t.path not in (like or {}) \
            else _identity(lambda *_a, _out=like[t.path], **_k: _out, t.path)
    for path, (mod, calls) in shared.items():
        n_calls = sum(1 for p in bmap.block_paths if p == path)
        stubs[mod] = PerCall(mod.forward, [_identity(mod.forward, path) if c in calls else None
                                           for c in range(n_calls)])
    # a shared block counts its calls per model forward: restart the count at each one
    hook = module.register_forward_pre_hook(lambda *_: PerCall.restart(stubs.values())) if shared else None
    try:
        with patched_forwards(stubs):
            yield [t.path for t in taps]
    finally:
        if hook is not None:
            hook.remove()


class PerCall:
    """The forward of a module run several times per model forward (ALBERT's shared layer group).

    Its k-th call goes to ``handlers[k]``, or to the module's own forward when
    that is None (or k is past the list). ``restart`` the count before each
    model forward (a root forward pre-hook), or make a new one per forward.
    """

    def __init__(self, orig, handlers: list):
        self.orig, self.handlers, self.count = orig, handlers, 0

    def __call__(self, *args, **kwargs):
        k, self.count = self.count, self.count + 1
        fn = self.handlers[k] if k < len(self.handlers) else None
        return (fn or self.orig)(*args, **kwargs)

    @staticmethod
    def restart(stubs) -> None:
        for s in stubs:
            if isinstance(s, PerCall):
                s.count = 0


def _identity(orig, path: str):
    def stub(*args, **kwargs):
        x = block_input(args, kwargs)
        out = orig(*args, **kwargs)
        y = block_output(out)
        if x is None or y is None or x.shape != y.shape:
            raise UsageError(f"block {path!r} changes the shape of what it is fed, so it cannot be bypassed",
                             value=f"{None if x is None else tuple(x.shape)} -> "
                                   f"{None if y is None else tuple(y.shape)}",
                             allowed="blocks whose output has the shape of their input (skippable blocks)",
                             fix="bypass only skippable blocks (scores.json: importance.skippable)")
        return with_output(out, x)
    return stub
