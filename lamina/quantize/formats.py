"""Which int8 formats ``lamina quantize`` applies, and applying a per-layer plan with torchao.

Measured here (torch 2.13.0+cpu, torchao 0.18, AVX512-VNNI, shared 2-core
machine; the real MiniLM, batch 8 x 64 tokens, one thread, 5 runs after 2
warm-ups): float32 164 ms; torchao ``Int8DynamicActivationInt8WeightConfig``
197 ms (0.83x, last hidden state cosine 0.996); ``Int8WeightOnlyConfig``
169 ms (0.97x, cosine 0.999). So on this CPU neither torchao int8 format is
faster than float32 on MiniLM's small matrices (384 x 384 / 1536): what they
buy today is smaller weights and a per-layer accuracy budget, not speed
(ASSETS.md's earlier run saw 1.1-1.2x for the dynamic format). The speed-up
``torch.ao.quantization.quantize_dynamic`` shows comes from its fbgemm
kernels with one per-tensor activation scale (hence its larger error, cosine
0.936); that API is deprecated, so lamina does not build on it.

``Int4WeightOnlyConfig`` on this CPU left a Linear's outputs bit-identical to
float32 (it did not quantize anything usable here), so ``int4wo`` is refused
on the CPU with a message rather than silently doing nothing.

Quantizing is a pure function of the float weights (dynamic activation scales
are computed per call), so a plan applied twice to the same float weights
gives the same module: the saved form is the float model plus the plan.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from ..errors import UsageError

FORMATS = ("int8dyn", "int8wo")  # what runs on the CPU backend, fastest-intended first
KNOWN = FORMATS + ("int4wo",)
_HELP = {"int8dyn": "int8 weights + int8 activations quantized per token at run time",
         "int8wo": "int8 weights, float activations"}


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


def quantized_linear(linear: nn.Linear, fmt: str) -> nn.Linear:
    """A quantized copy of one Linear (the original is untouched)."""
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


def apply_layers(module: nn.Module, layers: dict[str, str]) -> nn.Module:
    """Quantize, in place, each Linear named in ``layers`` (name -> format) with torchao's ``quantize_`` and a
    per-module filter; every other module is left as it is. Returns ``module``."""
    quantize_ = _torchao().quantize_
    by_fmt: dict[str, set] = {}
    for name, fmt in layers.items():
        by_fmt.setdefault(fmt, set()).add(name)
    with torch.no_grad():
        for fmt, names in by_fmt.items():
            quantize_(module, _torchao_config(fmt),
                      filter_fn=lambda m, fqn, names=names: isinstance(m, nn.Linear) and fqn in names)
    return module
