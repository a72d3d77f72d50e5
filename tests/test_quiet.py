"""lamina's CLI drops the known no-CUDA start-up lines of torchao (imported by transformers), and only those."""

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lamina import testing as lt
from lamina._quiet import quiet_known_noise

NOISE = ("Failed to load", "Detected no triton", "is an Enum subclass")
ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd)


def test_model_loading_command_prints_none_of_the_known_lines(tmp_path):
    import pandas as pd
    model = lt.save_tiny_text_model(tmp_path / "bert", "bert")
    texts, labels = lt.tiny_sentences(8)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "d.csv", index=False)
    r = _run(["-m", "lamina", "capture", "--model", str(model), "--data", str(tmp_path / "d.csv"), "--out",
              str(tmp_path / "run"), "--no-progress", "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not [line for line in r.stderr.splitlines() if any(n in line for n in NOISE)], r.stderr
    h = _run(["-m", "lamina", "--help"], tmp_path)
    assert h.returncode == 0 and "capture" in h.stdout
    assert not any(n in h.stderr for n in NOISE), h.stderr


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="the noise comes from torchao")
def test_without_lamina_the_same_imports_are_noisy(tmp_path):
    """The control: the lines are real here (so the test above can fail), printed by importing transformers'
    model code with torchao installed and no CUDA."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("with CUDA torchao's kernels load and print nothing")
    r = _run(["-c", "import transformers.modeling_utils"], tmp_path)
    assert any(n in r.stderr for n in NOISE), r.stderr


def test_only_the_known_messages_are_dropped():
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    assert sum(type(f).__name__ == "_DropKnown" for f in logging.getLogger("torchao").filters) == 1
    loggers = [logging.getLogger(n) for n in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    h = Keep()
    for lg in loggers:
        lg.addHandler(h)
    try:
        ao, intmm, pytree = loggers
        ao.warning("Failed to load /v/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not "
                   "load this library")
        ao.warning("Failed to load /v/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library")
        intmm.warning("Warning: Detected no triton, on systems without Triton certain kernels will not work")
        pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value "
                       "type.", "<enum 'KernelPreference'>")
        # Real problems from the same loggers still show.
        ao.warning("Failed to load /home/me/my_kernels.so: bad ELF")
        ao.error("quantization of layer 3 failed")
        pytree.warning("some other pytree warning")
    finally:
        for lg in loggers:
            lg.removeHandler(h)
    import torch
    if torch.cuda.is_available():  # there the CUDA kernels should load: their failure is news
        assert len(seen) == 6
    else:
        assert seen == ["Failed to load /home/me/my_kernels.so: bad ELF", "quantization of layer 3 failed",
                        "some other pytree warning"]
