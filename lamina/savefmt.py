"""lamina's own save format, for models a standard config cannot express.

A channel-pruned EfficientNet (every MBConv block keeps its own number of
expanded channels) or a Hugging Face model with a different FFN width per
layer has no ``from_pretrained`` that rebuilds it. lamina saves the weights
with safetensors plus a small spec of how to rebuild the architecture, and
loads it back exactly.

Signatures::

    save_lamina(module: nn.Module, path, builder: str, preprocess: dict,
                extra: dict | None = None, *, tokenizer=None) -> Path
        builder     "efficientnet-lite0" (any efficientnet_lite_pytorch name:
                    "efficientnet-lite0".."-lite4", "efficientnet-b0"..)
                    | "hf:<ArchitectureClass>"  (e.g. "hf:BertModel"; config.json is saved too)
                    | "factory:<module>:<function>"  (any importable function returning the base module;
                      loading imports it only when the user names it or trusts code: lamina.trust)
        preprocess  {"modality": "image" | "text" | "array", "image_size": int | None,
                     "image_mean": [3 floats], "image_std": [3 floats], "in_channels": int}
                    (optional "input_name": "pixel_values" for Hugging Face vision models)
        extra       more keys for lamina.json; "num_classes" there wins over the
                    one read from the module (EfficientNet ``_fc``, HF ``num_labels``)
        tokenizer   saved next to the weights (text models)
    save_loaded(lm: LoadedModel, path, extra=None) -> Path
        the same, with builder, preprocess and tokenizer taken from a LoadedModel
    load_lamina(path, blocks: str | None = None, *, factory=None, trust_code=None) -> LoadedModel
    load(path, *, factory=None, trust_code=None) -> nn.Module

Folder::

    model.safetensors   the state dict (safetensors.torch.save_model: a tensor
                        shared by several names, such as tied embeddings, is stored once)
    lamina.json         {"lamina_format": 1, "builder", "num_classes", "preprocess",
                         "blocks": the block container path or null,
                         "block_signatures": one per block,
                         "base_blocks": positions of the kept blocks in the builder's
                                        architecture (depth-pruned models) or null,
                         "cut": module paths of a tail cut off (lamina.tail) or null, ...extra}
    config.json         "hf:" builders only
    tokenizer files     text models

Loading (generic, whatever pruning produced the model):
1. build the base architecture from the builder (random init, no weights read);
2. depth: when the saved block signatures differ from the base's, keep the
   base blocks at ``base_blocks`` (recorded by pruning), else those they match, in order (EfficientNet: each block's ``_block_args``,
   i.e. kernel, stride, filters; other blocks: class and parameter shapes).
   Hugging Face configs already say their depth;
3. width: every Conv2d / Linear / BatchNorm / LayerNorm (and GPT-2 Conv1D,
   Embedding) whose saved tensors have other shapes gets tensors of the saved
   shapes, its size attributes fixed (a depthwise conv keeps groups = channels);
4. ``load_state_dict(strict=True)``: every saved tensor lands, nothing stays random.
The write is atomic: a temp folder, renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .errors import LaminaError, UsageError

FORMAT = 1
WEIGHTS, SPEC = "model.safetensors", "lamina.json"
_RESERVED = ("lamina_format", "builder", "num_classes", "preprocess", "blocks", "block_signatures", "base_blocks",
             "cut")
_EFFICIENTNET = re.compile(r"^efficientnet-(lite[0-4]|b[0-8]|l2)$")


# ---------------------------------------------------------------- builders: the base architecture, no weights

def _check_builder(builder) -> None:
    ok = isinstance(builder, str) and (bool(_EFFICIENTNET.match(builder)) or (builder.startswith("hf:") and len(
        builder) > 3) or (builder.startswith("factory:") and builder.count(":") >= 2))
    if not ok:
        raise UsageError("unknown lamina builder", value=builder,
                         allowed="'efficientnet-lite0' (any efficientnet_lite_pytorch name), 'hf:<ArchitectureClass>', "
                                 "'factory:<module>:<function>'",
                         fix="e.g. builder='efficientnet-lite0' or builder='hf:BertModel'")


_IDENT = re.compile(r"^[A-Za-z_]\w*$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _build(spec: dict, path: Path, factory: str | None = None, trust_code: bool | None = None) -> nn.Module:
    builder = spec["builder"]
    _check_builder(builder)
    if builder.startswith("hf:"):
        return _build_hf(builder[3:], path)
    if builder.startswith("factory:"):
        return _build_factory(builder[len("factory:"):], path, factory, trust_code)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise UsageError("this model needs the package 'efficientnet-lite-pytorch', which is not installed",
                         value=builder, allowed="installed asset packages",
                         fix="run `make install`, or `pip install --no-deps efficientnet-lite-pytorch`") from e
    pre = spec.get("preprocess") or {}
    return EfficientNet.from_name(builder, in_channels=int(pre.get("in_channels") or 3),
                                  num_classes=int(spec.get("num_classes") or 1000))


def _build_hf(name: str, path: Path) -> nn.Module:
    """A transformers model class by its plain name (never a module path), from the folder's config.json."""
    import transformers
    cls = getattr(transformers, name, None) if _IDENT.match(name) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LaminaError("the saved model's class is not a model class of the installed transformers",
                          value=name, allowed="a class name such as 'BertModel' (an nn.Module in transformers)",
                          fix="upgrade transformers, or check that the folder was written by lamina")
    from .trust import inside
    inside(path, "config.json", "the model folder's config.json")
    try:  # never trust_remote_code: a config naming custom code is refused by transformers
        cfg = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LaminaError(f"the model folder's config.json cannot be read: {str(e)[:300]}", value=str(path),
                          allowed=f"a config.json written by save_pretrained for {name}",
                          fix="save the model again") from e
    return cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)


def _build_factory(named: str, path: Path, factory: str | None, trust_code: bool | None) -> nn.Module:
    """Import the factory a saved folder names only when the user allows it (see lamina.trust)."""
    from .trust import factory_allowed
    mod_name, _, fn_name = named.rpartition(":")
    if not (_MODULE.match(mod_name) and _IDENT.match(fn_name)):
        raise LaminaError("the saved model's factory is not a module:function name", value=named,
                          allowed="'package.module:function'", fix="the folder was altered: do not use it")
    if not factory_allowed(named, factory, trust_code):
        other = f" (you named {factory!r})" if factory else ""
        raise UsageError(f"this model folder is rebuilt by running code it names, factory {named!r}; lamina "
                         f"imports code only when you name it{other}", value=str(path),
                         allowed=f"name the same factory yourself: --model {named}@{path} (Python: "
                                 f"load_model({str(path)!r}, factory={named!r})), or pass --trust-code "
                                 "(trust_code=True) if you trust this folder's author",
                         fix=f"if {mod_name!r} is your own code, pass --model {named}@{path}; do not run code "
                             "that came with a downloaded folder")
    from .trust import import_named
    try:
        fn = getattr(import_named(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise LaminaError(f"cannot rebuild the model: {e}", value=named, allowed="an importable factory",
                          fix=f"install the package that provides {mod_name!r}") from e
    return fn()


def _efficientnet_name(module: nn.Module) -> str | None:
    """The efficientnet_lite_pytorch name whose global parameters ``module`` has, else None."""
    gp = getattr(module, "_global_params", None)
    if type(module).__name__ != "EfficientNet" or gp is None:
        return None
    from efficientnet_lite_pytorch.utils import efficientnet_params
    lite = gp.relu_fn == "relu6"
    for name in [f"efficientnet-lite{i}" for i in range(5)] if lite else [f"efficientnet-b{i}" for i in range(9)]:
        if efficientnet_params(name) == (gp.width_coefficient, gp.depth_coefficient, gp.image_size, gp.dropout_rate):
            return name
    return None


def builder_for(lm) -> str:
    """How to rebuild the architecture of a LoadedModel: see the module docstring for the builders."""
    src = Path(str(lm.source))
    if src.is_dir() and (src / SPEC).exists():
        return json.loads((src / SPEC).read_text())["builder"]
    mod = lm.module
    name = _efficientnet_name(mod)
    if name:
        return name
    if hasattr(mod, "config") and hasattr(mod, "save_pretrained"):
        return "hf:" + type(mod).__name__
    spec = str(lm.source)
    if ":" in spec and not src.exists() and not spec.startswith(("random-init:", "python")):
        return "factory:" + spec
    raise UsageError("lamina does not know how to rebuild this model's architecture, so it cannot save it",
                     value=type(mod).__name__,
                     allowed="Hugging Face models, EfficientNet (efficientnet_lite_pytorch), models loaded as "
                             "module:factory, and folders in lamina's format",
                     fix="load it as 'package.module:factory' (the factory returns the unpruned model), or call "
                         "save_lamina(module, path, builder='factory:package.module:factory', ...)")


def config_describes(module: nn.Module) -> bool:
    """True when a Hugging Face ``module``'s own config rebuilds tensors of its shapes (so ``save_pretrained`` /
    ``from_pretrained`` round-trip); False for per-layer widths, or a module without a config."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return False
    import copy
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization cost
            ref = type(module)(copy.deepcopy(cfg))
    except Exception:  # noqa: BLE001 - cannot tell: keep the standard format, as before this check existed
        return True
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    return want == {k: tuple(v.shape) for k, v in module.state_dict().items()}


def preprocess_of(lm) -> dict:
    """The ``preprocess`` entry of lamina.json for a LoadedModel."""
    out = {"modality": lm.modality, "image_size": lm.image_size, "image_mean": [float(v) for v in lm.image_mean],
           "image_std": [float(v) for v in lm.image_std], "in_channels": int(lm.in_channels)}
    if lm.input_name:
        out["input_name"] = lm.input_name
    return out


# ---------------------------------------------------------------- depth: block signatures

def _signature(block: nn.Module) -> dict:
    args = getattr(block, "_block_args", None)
    if args is not None and hasattr(args, "_asdict"):  # EfficientNet MBConv: kernel, stride, filters, ...
        return json.loads(json.dumps(args._asdict()))
    return {"class": type(block).__name__,
            "shapes": {n: list(t.shape) for n, t in block.state_dict().items()}}


def _signatures(module: nn.Module, container: str | None) -> list[dict] | None:
    if not container:
        return None
    from .blocks import find_blocks  # a container path, or a stage glob ('encoder.stages.*.layers')
    return [_signature(module.get_submodule(p)) for p in find_blocks(module, container).block_paths]


def _coarse(sig: dict) -> dict:
    """A signature without parameter shapes (width pruning changes them)."""
    return {k: (sorted(v) if k == "shapes" else v) for k, v in sig.items()}


def _subsequence(base: list, saved: list) -> list[int] | None:
    """Leftmost positions of ``saved`` inside ``base`` (identical blocks are interchangeable before their
    weights load), or None."""
    keep, i = [], 0
    for sig in saved:
        while i < len(base) and base[i] != sig:
            i += 1
        if i == len(base):
            return None
        keep.append(i)
        i += 1
    return keep


def _base_blocks(spec: dict, base: list, saved: list) -> list[int] | None:
    """The kept positions recorded at pruning (``base_blocks``) when they fit the base, else None."""
    keep = spec.get("base_blocks")
    if not isinstance(keep, list) or len(keep) != len(saved) or not all(isinstance(i, int) for i in keep) \
            or keep != sorted(set(keep)) or not all(0 <= i < len(base) for i in keep):
        return None
    if any(_coarse(base[i]) != _coarse(s) for i, s in zip(keep, saved)):
        return None
    return keep


def _match_depth_(module: nn.Module, spec: dict) -> None:
    """Keep the base blocks that the saved signatures name, in order (a depth-pruned model).

    Also for ``hf:`` builders: a config that states its depth (``num_hidden_layers``,
    ``depths``) already rebuilt the right number of blocks, but one that does not
    (MobileNetV2's blocks come from a fixed table) rebuilds them all.
    """
    saved, container = spec.get("block_signatures"), spec.get("blocks")
    if not saved or not container:
        return
    from .blocks import find_blocks
    try:
        find_blocks(module, container)
    except UsageError:
        raise LaminaError("the saved weights do not fit the rebuilt architecture: it has no block container "
                          f"{container!r}", value=container, allowed=f"a model built by {spec['builder']}",
                          fix="save the model again with save_lamina and the right builder") from None
    base = _signatures(module, container)
    if len(base) == len(saved):
        return  # no block removed (width pruning may have changed shapes: step 3 handles it)
    keep = _base_blocks(spec, base, saved)
    if keep is None:
        keep = _subsequence(base, saved)
    if keep is None:  # blocks pruned in width too: match by class and parameter names only
        keep = _subsequence([_coarse(b) for b in base], [_coarse(b) for b in saved])
    if keep is None:
        raise LaminaError("the saved blocks do not match the base architecture of the builder", value=container,
                          allowed=f"a subsequence of the {len(base)} blocks of {spec['builder']}",
                          fix="the folder was written by another lamina or model version: save it again")
    from .compress.depth import drop_blocks_
    drop_blocks_(module, [j for j in range(len(base)) if j not in keep], container)


# ---------------------------------------------------------------- width: tensors of the saved shapes

def _fix_sizes(mod: nn.Module, depthwise: bool) -> None:
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.conv._ConvNd):
        mod.out_channels = w.shape[0]
        if depthwise:
            mod.groups = mod.in_channels = w.shape[0]
        else:
            mod.in_channels = w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = (w if w is not None else mod.running_mean).shape[0]
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = tuple(w.shape)
    elif isinstance(mod, nn.GroupNorm):
        mod.num_channels = w.shape[0]
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = w.shape
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers' GPT-2 linear, weight (in, out)
        mod.nx, mod.nf = w.shape


def _resize_(module: nn.Module, shapes: dict[str, tuple]) -> list[str]:
    """Give every submodule whose saved tensors have other shapes new tensors of those shapes; their paths."""
    changed = []
    for path, mod in module.named_modules():
        own = [(n, t) for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]]
        diff = {}
        for n, t in own:
            key = f"{path}.{n}" if path else n
            if key in shapes and tuple(t.shape) != shapes[key]:
                diff[n] = shapes[key]
        if not diff:
            continue
        depthwise = isinstance(mod, nn.Conv2d) and 1 < mod.groups == mod.in_channels == mod.out_channels
        for n, shape in diff.items():
            old = getattr(mod, n)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(mod, n, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                mod._buffers[n] = new
        _fix_sizes(mod, depthwise)
        changed.append(path)
    return changed


# ---------------------------------------------------------------- save / load

def _num_classes(module: nn.Module, builder: str) -> int | None:
    fc = getattr(module, "_fc", None)
    if isinstance(fc, nn.Linear):
        return int(fc.out_features)
    cfg = getattr(module, "config", None)
    if cfg is not None and "Classification" in builder:
        return int(cfg.num_labels)
    return None


def save_lamina(module: nn.Module, path, builder: str, preprocess: dict, extra: dict | None = None, *,
                tokenizer=None) -> Path:
    """Save ``module`` in lamina's format to folder ``path`` (atomically); see the module docstring.

    ``path`` must be new, empty, or an earlier lamina-format folder (replaced).
    Returns ``path``.
    """
    from safetensors.torch import save_model
    _check_builder(builder)
    if not isinstance(preprocess, dict) or "modality" not in preprocess:
        raise UsageError("preprocess must be a dict with at least 'modality'", value=preprocess,
                         allowed="{'modality', 'image_size', 'image_mean', 'image_std', 'in_channels'}",
                         fix="use lamina.savefmt.preprocess_of(loaded_model)")
    from .jsonio import write_json
    from .runfolder import SCRATCH, swap_in, unknown_files
    path = Path(path)
    if path.exists() and (not path.is_dir() or unknown_files(path.parent, path.name)):
        raise UsageError("the folder exists and holds files lamina did not write (not a lamina model folder), so "
                         "it is not replaced",
                         value=str(path), allowed="a new or empty folder, or one written by save_lamina",
                         fix="pick another path, or move those files away")
    extra = dict(extra or {})
    container = extra.pop("blocks", None)
    if container is None:
        from .blocks import find_blocks
        try:
            container = find_blocks(module).container or None
        except UsageError:
            container = None
    spec = {"lamina_format": FORMAT, "builder": builder,
            "num_classes": extra.pop("num_classes", None) or _num_classes(module, builder),
            "preprocess": dict(preprocess), "blocks": container,
            "block_signatures": _signatures(module, container),
            "base_blocks": getattr(module, "lamina_base_blocks", None),
            "cut": getattr(module, "lamina_cut", None), **extra}  # tail modules cut off (lamina.tail)
    tmp = path.with_name(f".{path.name}{SCRATCH}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_model(module, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if builder.startswith("hf:"):
            module.config.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        write_json(tmp / SPEC, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path, "save_lamina")  # replaces only what lamina recorded there
    return path


def save_loaded(lm, path, extra: dict | None = None) -> Path:
    """:func:`save_lamina` for a LoadedModel: its builder (:func:`builder_for`), preprocessing, tokenizer.

    A model loaded from a lamina folder keeps that folder's extra keys (labels, ...).
    """
    builder = builder_for(lm)
    src = Path(str(lm.source))
    carried = {}
    if src.is_dir() and (src / SPEC).exists():
        carried = {k: v for k, v in json.loads((src / SPEC).read_text()).items() if k not in _RESERVED}
    carried["blocks"] = lm.blocks.container or None
    return save_lamina(lm.module, path, builder, preprocess_of(lm), {**carried, **(extra or {})},
                       tokenizer=lm.tokenizer)


def save_format(lm) -> str:
    """'huggingface' when ``save_pretrained`` can hold ``lm`` (and it did not come from a lamina folder), else
    'lamina'; UsageError (before anything is written) when lamina cannot rebuild the architecture."""
    src = Path(str(lm.source))
    if hasattr(lm.module, "save_pretrained") and not (src.is_dir() and (src / SPEC).exists()):
        return "huggingface"
    builder_for(lm)  # raises when lamina cannot rebuild the architecture
    return "lamina"


def save(lm, dest, source=None, stage: str = "save") -> str:
    """Save a LoadedModel to ``dest`` the standard way when its config still describes it (save_pretrained +
    tokenizer + image preprocessor of ``source``), in lamina's format otherwise; written to a temp folder
    and swapped in. ``source``: the model it was derived from (default ``lm``). Returns the format.

    The one saver of every stage (finetune, prune, distill). An existing ``dest`` is replaced only when
    everything in it is recorded as lamina's (``.lamina-files.json`` of its parent, see
    :mod:`lamina.runfolder`); ``stage`` is the name recorded there.
    """
    from .runfolder import SCRATCH, swap_in
    source = source or lm
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}{SCRATCH}")  # a lamina-reserved name: never a user's folder
    if tmp.exists():
        shutil.rmtree(tmp)
    if save_format(source) == "huggingface" and config_describes(lm.module):
        import transformers
        transformers.utils.logging.disable_progress_bar()  # lamina prints its own summary
        lm.module.save_pretrained(tmp)
        tok = lm.tokenizer if lm.tokenizer is not None else source.tokenizer
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
        src = Path(str(source.source))
        pre = src / "preprocessor_config.json"
        if src.is_dir() and pre.exists():
            shutil.copy2(pre, tmp / pre.name)
        fmt = "huggingface"
    else:
        save_loaded(lm, tmp)
        fmt = "lamina"
    swap_in(tmp, dest, stage)
    return fmt


def read_spec(path) -> dict:
    """lamina.json of a lamina-format folder (UsageError when it is not one)."""
    path = Path(path)
    if not (path / SPEC).exists():
        raise UsageError("not a lamina model folder (no lamina.json)", value=str(path),
                         allowed="a folder written by save_lamina / `lamina prune`",
                         fix="for a Hugging Face folder use lamina.load_model or from_pretrained")
    from .trust import inside
    try:
        spec = json.loads(inside(path, SPEC, "lamina.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LaminaError(f"lamina.json is not valid JSON ({e})", value=str(path / SPEC),
                          allowed="a lamina.json written by save_lamina", fix="save the model again") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("builder"), str):
        raise LaminaError("lamina.json is not a lamina model spec", value=str(path / SPEC),
                          allowed="a JSON object with 'lamina_format' and 'builder'", fix="save the model again")
    if spec.get("lamina_format") != FORMAT:
        raise UsageError("unsupported lamina format version", value=spec.get("lamina_format"), allowed=FORMAT,
                         fix="save the model again with this lamina")
    return spec


def load_lamina(path, blocks: str | None = None, *, factory: str | None = None, trust_code: bool | None = None):
    """Rebuild a model saved by :func:`save_lamina`; returns a :class:`lamina.models.LoadedModel`.

    ``blocks`` overrides the saved block container. Outputs equal the saved
    module's exactly (same tensors, same architecture). A ``factory:`` builder
    is imported only when ``factory`` names the same ``module:function``, the
    user named it earlier in this process, or ``trust_code`` (None: the CLI's
    ``--trust-code``) is true; see :mod:`lamina.trust`.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model as st_load

    from .blocks import find_blocks
    from .models import LoadedModel
    path = Path(path)
    spec = read_spec(path)
    module = _build(spec, path, factory, trust_code)
    _match_depth_(module, spec)
    if spec.get("cut"):  # a model cut after its blocks (lamina.tail): the tail it never runs was not saved
        from .tail import cut_tail_
        cut_tail_(module, spec["cut"] if isinstance(spec["cut"], list) else [spec["cut"]])
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    _resize_(module, shapes)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    try:
        st_load(module, str(path / WEIGHTS), strict=True)
    except RuntimeError as e:
        raise LaminaError(f"the saved weights do not fit the rebuilt architecture: {str(e)[:500]}", value=str(path),
                          allowed=f"weights saved from a model built by {spec['builder']}",
                          fix="save the model again with save_lamina") from e
    module.eval()
    pre = spec.get("preprocess") or {}
    tok = None
    if pre.get("modality") == "text":
        from transformers import AutoTokenizer
        try:  # never trust_remote_code: a tokenizer config naming custom code is refused by transformers
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError) as e:
            raise LaminaError(f"the model folder's tokenizer cannot be loaded: {str(e)[:300]}", value=str(path),
                              allowed="tokenizer files saved by tokenizer.save_pretrained",
                              fix="save the model again with its tokenizer") from e
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    name = path.parent.name if path.name == "model" and path.parent.name else path.name
    return LoadedModel(module, name, str(path), pre.get("modality", "array"),
                       find_blocks(module, blocks or spec.get("blocks")), tokenizer=tok,
                       image_size=pre.get("image_size"), image_mean=tuple(pre.get("image_mean") or (0.5,) * 3),
                       image_std=tuple(pre.get("image_std") or (0.5,) * 3),
                       in_channels=int(pre.get("in_channels") or 3),
                       input_name=pre.get("input_name"))


def load(path, *, factory: str | None = None, trust_code: bool | None = None) -> nn.Module:
    """The ``nn.Module`` of a saved model folder: lamina's format, a Hugging Face folder, or the OUT folder
    of a lamina stage (``lamina prune`` / ``finetune``), in eval mode. ``factory`` / ``trust_code``: see
    :func:`load_lamina`."""
    from .models import load_model
    p = Path(path)
    if not p.is_dir():
        raise UsageError("no model folder there", value=str(path),
                         allowed="a folder written by save_lamina, save_pretrained or a lamina stage",
                         fix="check the path")
    return load_model(str(p), factory=factory, trust_code=trust_code).module
