"""Peak memory of running one model, measured in a fresh child process.

A process that has already loaded other models (as ``bench`` has) cannot say
what one model costs: its peak resident set holds them all. So each model is
loaded in a new Python process (``python -m lamina.bench.memory FOLDER``) that
imports the libraries, notes its resident set, loads the model, runs one
forward on the batch it is given, and reports:

- ``peak_bytes``: on Linux, the peak resident set (``VmHWM``) minus the resident
  set just before loading: weights, activations and allocator slack. Loading
  imports library code lazily (hundreds of MB for transformers and its
  plugins), so the child first loads the model and runs it on one short row,
  frees it and returns the memory to the system (``malloc_trim``; large
  blocks mapped, ``MALLOC_MMAP_THRESHOLD_``), then resets the high-water mark
  (``/proc/self/clear_refs``) and measures a second load; elsewhere
  ``ru_maxrss`` minus the resident set before a single load (library code
  included, said in ``method``). On CUDA, ``torch.cuda.max_memory_allocated``
  (tensors only, no CUDA context);
- ``after_load_bytes``: the same measure after loading, before the forward (it can be below the weights'
  bytes: safetensors weights may stay mapped from the file and count only once the forward touches them);
- ``weight_bytes``: the bytes of the parameters and buffers (shared ones once).

Nothing is pickled either way: the parent writes ``args.json`` (the model's
path or name and plain settings) and one ``.npy`` file per input tensor (read
with ``allow_pickle=False``); the child writes ``memory.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LaminaError

METHOD_CPU = ("fresh child process per model, after an untimed warm-up load (library imports) freed and trimmed: "
              "peak resident set (VmHWM, reset by /proc/self/clear_refs) minus the resident set before loading, "
              "over loading and one forward at the largest timed shape")
METHOD_RUSAGE = ("fresh child process per model: getrusage ru_maxrss minus the resident set before loading, over "
                 "loading and one forward at the largest timed shape (includes library code imported by loading)")
METHOD_CUDA = "fresh child process per model: torch.cuda.max_memory_allocated over loading and one forward"


def measure_memory(model: str, batch: dict, *, device: str = "auto", torch_dtype: str = "auto",
                   trust_remote_code: bool = False, memory_format: str = "auto", threads: int | None = None) -> dict:
    """Peak memory of loading ``model`` (a path or bundled name) and one forward on ``batch`` (CPU tensors)."""
    with tempfile.TemporaryDirectory(prefix="lamina-mem-") as tmp:
        folder = Path(tmp)
        names = []
        for i, (k, v) in enumerate(batch.items()):
            np.save(folder / f"in{i}.npy", v.detach().cpu().contiguous().numpy(), allow_pickle=False)
            names.append(k)
        args = {"model": str(model), "inputs": names, "device": device, "torch_dtype": torch_dtype,
                "trust_remote_code": bool(trust_remote_code), "memory_format": memory_format, "threads": threads}
        (folder / "args.json").write_text(json.dumps(args))
        proc = subprocess.run([sys.executable, "-m", "lamina.bench.memory", str(folder)], capture_output=True,
                              text=True, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"})
        out = folder / "memory.json"
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise LaminaError("the memory measurement of a model failed in its child process", value=str(model),
                              allowed="a model that loads and runs on its own",
                              fix="run without --memory; the child said: " + " | ".join(tail))
        return json.loads(out.read_text())


def _rss_now() -> int | None:
    try:  # Linux: resident pages are the second field of statm
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process to its current resident set (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status("VmHWM") is not None


def _trim() -> None:
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _max_rss() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _child(folder: Path) -> None:
    args = json.loads((folder / "args.json").read_text())
    import torch
    import transformers  # noqa: F401  imported before the baseline: the library is not the model's memory
    from lamina.bench.bench import to_memory_format_
    from lamina.models import load_model
    from lamina.runtime import Runtime
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    batch = {k: torch.from_numpy(np.load(folder / f"in{i}.npy", allow_pickle=False))
             for i, k in enumerate(args["inputs"])}
    rt = Runtime(device=args["device"], torch_dtype=args["torch_dtype"], trust_remote_code=args["trust_remote_code"])
    cuda = rt.device.startswith("cuda") or (rt.device == "auto" and torch.cuda.is_available())
    hwm = False
    if not cuda and sys.platform.startswith("linux"):  # warm-up: the lazy imports of loading, then freed
        lm = load_model(args["model"], runtime=rt)
        lm.module.eval()
        with torch.inference_mode():
            lm.forward({k: v[:1, :2] if v.dim() == 2 and not v.is_floating_point() else v[:1]
                        for k, v in batch.items()})
        del lm
        _trim()
        hwm = _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = _rss_now()
    base = _max_rss() if base is None else base
    peak_now = (lambda: _status("VmHWM") - base) if hwm else (lambda: _max_rss() - base)
    lm = load_model(args["model"], runtime=rt)
    lm.module.eval()
    to_memory_format_(lm, args["memory_format"])
    cuda = lm.device.type == "cuda"
    after_load = torch.cuda.max_memory_allocated(lm.device) if cuda else peak_now()
    batch = {k: v.to(lm.device) for k, v in batch.items()}  # as bench's task.batch gives it, on the device
    with torch.inference_mode():
        lm.forward(batch)
    if cuda:
        torch.cuda.synchronize(lm.device)
    peak = torch.cuda.max_memory_allocated(lm.device) if cuda else peak_now()
    seen, weights = set(), 0
    for t in list(lm.module.parameters()) + list(lm.module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            weights += t.numel() * t.element_size()
    shape = {k: list(v.shape) for k, v in batch.items()}
    (folder / "memory.json").write_text(json.dumps({
        "peak_bytes": int(peak), "after_load_bytes": int(after_load), "weight_bytes": int(weights),
        "input_shape": shape, "device": str(lm.device), "method": METHOD_CUDA if cuda else METHOD_CPU if hwm else METHOD_RUSAGE}))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
