"""Which formats ``lamina quantize`` applies, and applying a per-layer plan.

Measured here (torch 2.13.0+cpu, torchao 0.18, a Sapphire Rapids Xeon with
AVX512-VNNI, AVX512-BF16 and AMX; shared 2-core machine under load 7-21; the
fine-tuned MiniLM, batch 8 x 64 tokens, one thread, interleaved medians; the
probe script and every number are in BENCHMARKS.md "quantize"):

- ``int8fused`` (:class:`Int8FusedLinear`: ``torch.ops.quantized.linear_dynamic``
  on a weight packed for the ``onednn`` engine; int8 weights with one scale
  per output channel, uint8 activations with one scale and zero point per
  call, computed and applied inside oneDNN's kernel, float32 in and out):
  the fastest Linear kernel here: one GEMM of 256 x 384 x 1536 took 0.45 ms
  against 0.68 ms bf16 and 2.0 ms float32 (quiet machine). In the model the
  gain shrinks: every Linear of MiniLM in int8fused ran 2.0-2.3x float32 at
  batch 8 (one thread, load 9) against 1.9-2.0x with every Linear in bf16 and
  2.5-2.8x for the whole model cast to bf16 (1.7x vs 1.2x at batch 1), because the float32 attention, LayerNorm
  and GELU stay, and a ``--max-drop`` plan keeps the sensitive (and largest)
  FFN layers in bf16, so it measured no faster than all-bf16. The same op on
  the ``fbgemm`` / ``x86`` engines was 1.5-2x slower, so the weight is packed for
  ``onednn`` (AVX512-VNNI / AMX); ``reduce_range`` (7-bit activations, for
  fbgemm on CPUs without VNNI) is not needed there and stays off. One
  activation scale per tensor is what makes it lossy: an outlier channel (BERT
  has them) stretches the scale for every token; logits cosine 0.998 with
  every Linear in int8fused. That is what the per-layer choice is for:
  ``--formats int8fused,bf16`` puts a layer in int8 only where its measured
  sensitivity allows, bf16 elsewhere. The packing API still takes a
  ``torch.qint8`` tensor, a dtype torch 2.13 deprecates (pytorch#184982); the
  format is refused with a UsageError where the engine or op is missing.
- ``bf16`` (the Linear's weights in bfloat16, its GEMM run by oneDNN on AMX,
  the output cast back to float32): the whole model in bf16 runs 2.3-2.6x
  faster than float32, eager or compiled, logits cosine 0.99999; every Linear
  alone in bf16 (the rest float32, casts around each layer) 1.7-1.9x under
  load (2.1x on a quiet machine). It needs no compile and no calibration and
  changed none of 2,000 held-out predictions, so it is the default format.
  A block whose every Linear is bf16 is wrapped in :class:`BF16Block` and runs
  whole in bf16 (attention, LayerNorm, GELU too; two casts per block instead
  of two per Linear): that recovers most of the whole-model gain (2.2x vs
  2.4x whole model) and changed 5 of the 2,000 held-out predictions.
- torchao ``Int8DynamicActivationInt8WeightConfig`` (``int8dyn``): 0.8x in
  eager. The int8 GEMM itself is fast here (``torch._int_mm`` on AMX: 1 ms
  against 17 ms float32 for 512 x 384 x 1536), but the per-token activation
  quantization before it (``quantize_affine``: divide, round, add the zero
  point, clamp, cast: separate eager kernels through a tensor subclass) costs
  about 10x the GEMM; the profile shows one ``aten::add`` alone at half the
  layer's time. ``torch.compile`` with inductor freezing, after importing
  ``torchao.quantization.pt2e.quantizer.x86_inductor_quantizer`` (which
  registers the x86 lowering passes), fuses that quantization and rewrites
  all 38 int8 GEMMs to oneDNN ``qlinear_pointwise`` with prepacked weights:
  2.0-2.1x, still below bf16 eager in the same run (2.3-2.6x), after 4 min of
  compiling per input shape on this machine; plain ``torch.compile`` without
  freezing stays at 0.6-0.7x. So int8dyn stays, eager, as the format for 4x
  smaller weights, not for speed.
- torchao ``Int8WeightOnlyConfig`` (``int8wo``): 0.85-1.05x (the weight is
  cast back to float on every call).
- ``torch.ao.quantization.quantize_dynamic`` (fbgemm, one activation scale
  per tensor): 1.4-1.6x under load (3.5-4.9x on a quiet machine), logits
  cosine 0.990: fast because fbgemm fuses the activation quantization into
  its kernel; its Python front end is deprecated, so ``int8fused`` calls the
  same kind of kernel (on oneDNN) directly.

On an AVX2-only CPU (AMD EPYC Zen 3, no VNNI / AMX / AVX512-BF16; BENCHMARKS.md "quantize" round 4) the
picture differs: bf16 is emulated (one 256 x 384 x 1536 GEMM 200 ms against 16 ms float32), so ``bf16`` is
only for the weights' size there, and the int8 GEMM is 1.5-1.8x float32 (thread CPU time, all three engines
alike), with 7-bit activations (:func:`int8_reduce_range`) because 8-bit ones saturate.

``Int4WeightOnlyConfig`` on this CPU left a Linear's outputs bit-identical to
float32 (it did not quantize anything usable here), so ``int4wo`` is refused
on the CPU with a message rather than silently doing nothing.

Every format is a pure function of the float weights (dynamic activation
scales are computed per call; bf16 is a rounding; int8fused rounds the weight
the same way every time), so a plan applied twice
to the same float weights gives the same module: the saved form is the
float model plus the plan.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from ..errors import UsageError

FORMATS = ("int8fused", "bf16", "int8dyn", "int8wo")  # what runs on the CPU backend, fastest here first
KNOWN = FORMATS + ("int4wo",)
FUSED_ENGINE = "onednn"  # the engine whose packed int8 GEMM ran fastest here (fbgemm 2.0x, x86 1.7x, onednn 3.9x)
_HELP = {"int8fused": "int8 weights per channel + int8 activations per tensor, quantized inside oneDNN's kernel",
         "bf16": "bfloat16 weights and GEMM (AMX / AVX512-BF16), float32 output",
         "int8dyn": "int8 weights + int8 activations quantized per token at run time",
         "int8wo": "int8 weights, float activations"}
log = logging.getLogger(__name__)


class BF16Linear(nn.Linear):
    """A Linear whose weights are bfloat16 and whose GEMM runs in bfloat16; it takes and returns the caller's
    dtype, so it drops into a float32 model layer by layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Int8FusedLinear(nn.Module):
    """A Linear run by oneDNN's dynamic int8 GEMM (``torch.ops.quantized.linear_dynamic``): weights int8 with one
    symmetric scale per output channel, quantized once here; the activations quantized to uint8 with one scale
    and zero point per call, from their min / max, inside the kernel (one pass, no separate quantize kernels).
    Takes and returns float32, so it drops into a float32 model layer by layer.

    ``weight`` (int8) and ``weight_scale`` are kept for inspection and parameter counts; the forward uses only the
    packed copy. Built deterministically from the float Linear, so the saved form is the float model + plan."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                  requires_grad=False)
        self._packed = _prepack(q, scale, self.bias)
        self.reduce_range = int8_reduce_range()  # 7-bit activations where the int8 GEMM would saturate (see there)
        self._group = self._index = None  # set by fuse.fuse_int8 when siblings share one fused GEMM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is not None:
            return self._group(x, self._index)
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range).to(x.dtype)

    def __deepcopy__(self, memo):
        # The packed weight's own copy goes through torch's pickling of packed params, which re-packs it for the
        # *global* quantized engine (x86 here), not onednn: such a copy computed different outputs (measured). So a
        # copy re-packs from the int8 weight and scales for onednn, exactly as built; a fused group is copied once
        # (memo) and re-packed the same way, so the copy's members share their own group.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k != "_packed"}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._packed = _prepack(new.weight.detach(), new.weight_scale, new.bias)
        return new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, engine={FUSED_ENGINE}, "
                f"reduce_range={self.reduce_range}")


def int8_reduce_range() -> bool:
    """Whether int8fused must quantize activations to 7 bits (0..127) on this CPU.

    Without VNNI (AVX512-VNNI, AVX-VNNI) or AMX-INT8, x86 int8 GEMMs multiply uint8 by int8 and add pairs of
    products into int16 (``vpmaddubsw``), which saturates once two products exceed 32767 (255 x 127 x 2 = 64770).
    Measured on an AVX2-only AMD EPYC (torch 2.13, onednn, fbgemm and x86 engines alike): 72 of 840 outputs of a
    48 -> 40 layer were off by up to 40 quantization steps against an exact integer reference; with 7-bit
    activations (``reduce_range``, 127 x 127 x 2 < 32767) every output matched the 7-bit reference to 3e-7. So
    the format is exact integer arithmetic on every CPU, 8-bit activations where the hardware sums in 32 bits."""
    try:
        caps = torch.cpu.get_capabilities()
    except AttributeError:  # a torch without the probe: the safe choice
        return True
    return not any(caps.get(k) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _prepack(q: torch.Tensor, scale: torch.Tensor, bias) -> object:
    """oneDNN's packed weight. ``linear_prepack`` still takes a ``torch.qint8`` tensor, a dtype torch 2.13
    deprecates (pytorch#184982: the one-time UserWarning on creating it); the qint8 tensor lives only for this
    call, and the warning is silenced here because nothing the user does can act on it. The engine is set for
    the packing only (the packed object remembers it) and restored, so no global setting leaks."""
    prev = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long),
                                                      0)
        torch.backends.quantized.engine = FUSED_ENGINE
        try:
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach())
        finally:
            torch.backends.quantized.engine = prev


def fused_engines() -> list[str]:
    """The quantized engines this torch build has (a seam for tests)."""
    return list(torch.backends.quantized.supported_engines)


def _check_fused() -> None:
    if FUSED_ENGINE not in fused_engines() or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise UsageError(f"int8fused needs torch's '{FUSED_ENGINE}' quantized engine, which this torch build does "
                         f"not have", value=f"engines: {', '.join(fused_engines()) or 'none'}",
                         allowed=", ".join(f for f in FORMATS if f != "int8fused"),
                         fix="use --formats bf16 (or int8dyn), or a torch build with oneDNN (the x86-64 wheels)")


def _cast(x, dtype):
    """Floating tensors in ``x`` (nested tuples / lists / dicts) to ``dtype``; everything else as it is."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
        return type(x)(*(_cast(v, dtype) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):  # keeps the type (a transformers ModelOutput is a dict)
        y = copy.copy(x)
        for k, v in x.items():
            y[k] = _cast(v, dtype)
        return y
    return x


class BF16Block(nn.Module):
    """A whole block (attention, LayerNorm, GELU and its Linears) run in bfloat16, wrapped where the block was:
    floating inputs are cast to bf16 once on the way in and the outputs back to the caller's dtype on the way out.

    Used when every Linear of a block is chosen bf16: instead of two casts around each of its Linears and the
    attention / LayerNorm / GELU left in float32, a block costs two casts, and those ops run in bf16 too
    (MiniLM, batch 8, one thread: 2.2x float32 against 1.7x with per-Linear bf16, whole model cast 2.4x, same run).
    The block's Linears stay :class:`BF16Linear` (same names, same parameters), so a plan still names them."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block.to(torch.bfloat16)

    def forward(self, *args, **kwargs):
        floats = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.is_floating_point()]
        dtype = floats[0].dtype if floats else torch.float32
        return _cast(self.block(*_cast(args, torch.bfloat16), **_cast(kwargs, torch.bfloat16)), dtype)


def bf16_is_fast() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX512-BF16); without them oneDNN emulates
    bf16 and the format is slower than float32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def parse_formats(spec) -> tuple[str, ...]:
    """``'int8dyn,int8wo'`` (or a sequence) -> checked tuple; refuses formats the CPU backend cannot run."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not items:
        raise UsageError("--formats is empty", value=spec, allowed=", ".join(FORMATS), fix="e.g. --formats int8dyn")
    for f in items:
        if f == "int4wo":
            raise UsageError("int4 weight-only quantization does not run on torchao's CPU backend here (it leaves "
                             "the layer unquantized)", value=f, allowed=", ".join(FORMATS),
                             fix="use --formats int8dyn or int8wo on the CPU")
        if f not in FORMATS:
            raise UsageError("unknown quantization format", value=f,
                             allowed="; ".join(f"{k} ({v})" for k, v in _HELP.items()), fix="e.g. --formats int8dyn")
    if "int8fused" in items:
        _check_fused()
    if "bf16" in items and not bf16_is_fast():
        log.warning("this CPU has no AMX / AVX512-BF16: bf16 layers will run, but slower than float32")
    if len(set(items)) != len(items):
        raise UsageError("--formats names a format twice", value=spec, allowed=", ".join(FORMATS),
                         fix="name each format once")
    return tuple(items)


def _torchao():
    """``torchao.quantization``, imported without its import-time noise on a CPU build (GPU kernel libraries
    it cannot load, no triton, torch.compile deprecation notes): none of it concerns the int8 CPU path."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tq
    except ImportError as e:
        raise UsageError("lamina quantize needs the package 'torchao'", value=str(e), allowed="torchao 0.18",
                         fix="run `make install`, or `pip install 'lamina[quantize]'`") from e
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    return tq


def _torchao_config(fmt: str):
    tq = _torchao()
    Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig = (tq.Int8DynamicActivationInt8WeightConfig,
                                                                  tq.Int8WeightOnlyConfig)
    if fmt == "int8dyn":
        return Int8DynamicActivationInt8WeightConfig()
    if fmt == "int8wo":
        return Int8WeightOnlyConfig()
    raise UsageError("unknown quantization format", value=fmt, allowed=", ".join(FORMATS), fix="see --formats")


def linear_names(module: nn.Module) -> list[str]:
    """The names of the module's nn.Linear layers, in module order (what quantize can choose from)."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n]


def _bf16(linear: nn.Linear) -> BF16Linear:
    q = copy.deepcopy(linear).to(torch.bfloat16)
    q.__class__ = BF16Linear  # same parameters and names, bf16 forward
    return q


def quantized_linear(linear: nn.Linear, fmt: str) -> nn.Module:
    """A quantized copy of one Linear (the original is untouched)."""
    if fmt == "bf16":
        return _bf16(linear)
    if fmt == "int8fused":
        return Int8FusedLinear(linear)
    quantize_ = _torchao().quantize_
    q = copy.deepcopy(linear)
    with torch.no_grad():
        quantize_(q, _torchao_config(fmt))
    return q


def swap(module: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``module``; returns what was there."""
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


def apply_layers(module: nn.Module, layers: dict[str, str], block_paths=(), fuse: bool = True) -> nn.Module:
    """Quantize, in place, each Linear named in ``layers`` (name -> format): bf16 and int8fused layers are swapped
    for :class:`BF16Linear` / :class:`Int8FusedLinear` copies, int8dyn / int8wo ones go through torchao's
    ``quantize_`` with a per-module filter; every other module is left as it is. A block (of ``block_paths``)
    whose every Linear is bf16 is then wrapped in :class:`BF16Block`. With ``fuse``, sibling int8fused layers that
    read the same input (query / key / value, ...) run as one GEMM (:mod:`.fuse`; exact: the same outputs).
    Returns ``module``."""
    names = linear_names(module)
    by_fmt: dict[str, set] = {}
    for name, fmt in layers.items():
        by_fmt.setdefault(fmt, set()).add(name)
    bf16 = set(by_fmt.get("bf16", ()))
    for fmt in ("bf16", "int8fused"):
        for name in sorted(by_fmt.pop(fmt, ())):
            swap(module, name, quantized_linear(module.get_submodule(name), fmt))
    if fuse:
        from .fuse import fuse_int8
        fuse_int8(module)
    if by_fmt:
        quantize_ = _torchao().quantize_
        with torch.no_grad():
            for fmt, chosen in by_fmt.items():
                quantize_(module, _torchao_config(fmt),
                          filter_fn=lambda m, fqn, chosen=chosen: isinstance(m, nn.Linear) and fqn in chosen)
    for path in bf16_blocks(names, bf16, block_paths):
        swap(module, path, BF16Block(module.get_submodule(path)))
    return module


def bf16_blocks(names, bf16, block_paths) -> list[str]:
    """The blocks whose Linears (at least one) are all in ``bf16``."""
    out = []
    for path in block_paths:
        inside = [n for n in names if n.startswith(path + ".")]
        if inside and all(n in bf16 for n in inside):
            out.append(path)
    return out
