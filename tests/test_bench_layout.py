"""lamina bench's layout of conv nets: channels_last (NHWC) by default, NCHW on request.

channels_last only changes how a conv net's tensors are laid out in memory, so its outputs equal the NCHW
ones within float rounding (oneDNN's kernels sum in another order); a transformer is left as it is.
"""

import copy

import numpy as np
import pytest
import torch

from lamina import testing as lt
from lamina.bench import BenchConfig, bench
from lamina.bench.bench import to_memory_format_, use_channels_last
from lamina.errors import UsageError
from lamina.models import load_model, wrap_module


def _cnn():
    return wrap_module(lt.tiny_cnn(), name="tiny-cnn", source="lamina.testing:tiny_cnn", modality="image",
                       image_size=16)


def test_channels_last_outputs_equal_nchw_on_the_bundled_efficientnet_and_its_cut():
    from lamina.transfer.deploy import build_deployable
    lm = load_model("efficientnet-lite0")
    dep, _ = build_deployable(lm, torch.nn.Identity(), ["blocks.9"], "mean")
    x = torch.randn(3, 3, 64, 64)
    for m in (lm, dep):
        nhwc = copy.copy(m)
        nhwc.module = copy.deepcopy(m.module)
        assert to_memory_format_(nhwc, "auto") == "channels_last"
        w = next(p for p in nhwc.module.parameters() if p.dim() == 4)
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        run = (lambda mod, t: mod.features(t)[0]) if m is dep else (lambda mod, t: mod(t))  # the cut: its taps
        with torch.inference_mode():
            ref = run(m.module, x)
            got = run(nhwc.module, x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_only_conv_nets_change_layout(tiny_dirs):
    bert = load_model(str(tiny_dirs["bert"]))
    assert not use_channels_last(bert.module) and to_memory_format_(bert) == "contiguous"
    assert use_channels_last(_cnn().module) and not use_channels_last(_cnn().module, "contiguous")


def test_bench_records_the_layout_and_accuracy_does_not_move(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    got = {}
    for fmt in ("auto", "contiguous"):
        r = bench([_cnn(), _cnn()], BenchConfig(data=str(tmp_path / "d.npz"), out=str(tmp_path / fmt),
                                                batch_sizes=(2,), warmup=0, repeats=1, progress=False,
                                                memory_format=fmt))
        got[fmt] = r["models"][0]
        assert r["settings"]["memory_format"] == fmt
    assert got["auto"]["memory_format"] == "channels_last" and got["contiguous"]["memory_format"] == "contiguous"
    assert got["auto"]["accuracy"] == got["contiguous"]["accuracy"]
    with pytest.raises(UsageError, match="memory.format"):
        BenchConfig(memory_format="nhwc")
