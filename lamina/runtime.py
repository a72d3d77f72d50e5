"""Where and in what precision a model runs: ``--device`` and ``--torch-dtype``, defined once.

Every config of a stage that runs a model (capture, analyze, finetune, prune,
distill, bench) inherits :class:`Runtime`, so the two flags, their help and
their checks are the same everywhere, in the CLI and in the Python API.

- ``device``: ``auto`` (CUDA if available, else Apple MPS, else CPU), ``cpu``,
  ``cuda``, ``cuda:N``, ``mps``. Under torchrun (``LOCAL_RANK`` set) ``auto``
  and ``cuda`` mean the rank's own GPU, ``cuda:LOCAL_RANK``.
- ``torch_dtype``: ``auto`` (the checkpoint's own, from its config's
  ``dtype``/``torch_dtype``; float32 when it records none), ``float32``,
  ``bfloat16``, ``float16``. Inference stages load the weights straight in
  that dtype; training stages keep float32 weights and run the forward under
  autocast in that dtype (float16 with a gradient scaler), the usual
  mixed-precision recipe: optimizing bfloat16 weights directly loses small
  updates to rounding.

Whatever the compute dtype, captured features are pooled and stored in
float32 (or the store's ``--dtype``) and importance sums accumulate in float64.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import LaminaError, UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Runtime:
    """The device and compute dtype of a stage; every model-running config inherits these two fields.

    They are keyword-only, so a config's own required fields keep their place.
    """

    device: str = field(default="auto", kw_only=True, metadata={
        "help": "where the model runs: auto (CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N, mps; "
                "under torchrun each rank takes its LOCAL_RANK GPU"})
    torch_dtype: str = field(default="auto", kw_only=True, metadata={
        "choices": DTYPES,
        "help": "compute dtype: auto (the checkpoint's own), float32, bfloat16, float16; training stages keep "
                "float32 weights and use autocast in this dtype"})
    trust_remote_code: bool = field(default=False, kw_only=True, metadata={
        "help": "allow a Hub model to run the Python code its repository ships (off: only architectures "
                "transformers itself knows load)"})

    def runtime(self) -> "Runtime":
        """Just the runtime fields (what :func:`resolve` and ``load_model`` take)."""
        return Runtime(device=self.device, torch_dtype=self.torch_dtype, trust_remote_code=self.trust_remote_code)


def check_runtime(rt: Runtime) -> None:
    """Refuse an unknown device or dtype spelling (before anything runs)."""
    if not isinstance(rt.device, str) or not _DEVICE_RE.match(rt.device):
        raise UsageError("unknown --device", value=rt.device, allowed="auto, cpu, cuda, cuda:N, mps",
                         fix="--device auto picks CUDA, then MPS, then the CPU")
    if rt.torch_dtype not in DTYPES:
        raise UsageError("unknown --torch-dtype", value=rt.torch_dtype, allowed=", ".join(DTYPES),
                         fix="--torch-dtype auto uses the checkpoint's own dtype")


def _local_rank() -> int | None:
    v = os.environ.get("LOCAL_RANK")
    return int(v) if v is not None and v.isdigit() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """``spec`` -> a torch.device that exists on this machine; UsageError when it does not."""
    check_runtime(Runtime(device=spec))
    rank = _local_rank()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank if rank is not None else 0)
        return torch.device("mps") if _mps_available() and rank is None else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise UsageError("no MPS (Apple GPU) device on this machine", value=spec,
                             allowed="auto, cpu" + (", cuda" if torch.cuda.is_available() else ""),
                             fix="--device cpu (or --device auto)")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device on this machine", value=spec,
                         allowed="auto, cpu" + (", mps" if _mps_available() else ""),
                         fix="--device cpu (or --device auto, which falls back to the CPU)")
    index = int(spec.split(":")[1]) if ":" in spec else (rank if rank is not None else 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError("that CUDA device does not exist", value=spec,
                         allowed=", ".join(f"cuda:{i}" for i in range(count)), fix="--device cuda:0")
    return torch.device("cuda", index)


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a Hugging Face config records (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    # transformers 5 maps torch_dtype onto dtype (reading torch_dtype there warns); older ones have only it
    names = ("dtype", "torch_dtype") if isinstance(config, dict) or not hasattr(config, "dtype") else ("dtype",)
    for name in names:
        v = getattr(config, name, None) if not isinstance(config, dict) else config.get(name)
        if isinstance(v, torch.dtype):
            return v
        if isinstance(v, str) and v.replace("torch.", "") in _TORCH_DTYPES:
            return _TORCH_DTYPES[v.replace("torch.", "")]
    return None


def resolve_dtype(spec: str = "auto", checkpoint: torch.dtype | None = None) -> torch.dtype:
    """``spec`` -> a torch dtype; ``auto`` is the checkpoint's own (float32 when unknown)."""
    check_runtime(Runtime(torch_dtype=spec))
    if spec == "auto":
        return checkpoint if checkpoint in _TORCH_DTYPES.values() else torch.float32
    return _TORCH_DTYPES[spec]


def dist_backend(device: torch.device) -> str:
    """NCCL for CUDA ranks, gloo otherwise (CPU, MPS)."""
    return "nccl" if device.type == "cuda" else "gloo"


def describe(device: torch.device, dtype: torch.dtype) -> dict:
    """{device, device_name, dtype}: what every result file records."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    else:
        import platform
        name = platform.processor() or platform.machine() or "cpu"
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", "")}


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` for a training forward; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype):
    """A gradient scaler for float16 training (its gradients underflow without one); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("not enough memory" in msg or "DefaultCPUAllocator" in msg
                                            or "out of memory" in msg.lower())


@contextlib.contextmanager
def oom_message(batch_size: int, flag: str = "--batch-size", device: torch.device | str | None = None):
    """Turn an out-of-memory error inside the block into a LaminaError naming the batch size and the flag."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        where = f" on {device}" if device is not None else ""
        raise LaminaError(f"out of memory{where} with a batch of {batch_size}", value=batch_size,
                          allowed="a batch that fits in memory",
                          fix=f"lower {flag} (e.g. {flag} {max(1, batch_size // 2)}), or use --torch-dtype "
                              "bfloat16 to halve the activations") from e
