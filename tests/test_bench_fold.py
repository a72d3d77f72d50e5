"""lamina bench --fold-batchnorm: an eval BatchNorm folded into the convolution that feeds it leaves the
outputs equal (float rounding); pairs come from the forward pass (the BatchNorm reads the conv's output
tensor), never from module order; a fold that would change the outputs is put back."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from lamina import testing as lt
from lamina.bench import BenchConfig, bench
from lamina.bench.fold import fold_batchnorm, fold_batchnorm_
from lamina.cli import main
from lamina.models import load_model, wrap_module


def _random_stats_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms (a fresh BatchNorm is the identity map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return module.eval()


def _bns(module):
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_bundled_efficientnet_and_its_cut_fold_every_batchnorm_with_equal_outputs():
    from lamina.transfer.deploy import build_deployable
    lm = load_model("efficientnet-lite0")
    dep, _ = build_deployable(lm, nn.Identity(), ["blocks.9"], "mean")
    x = torch.randn(3, 3, 64, 64)
    for mod, run in ((lm.module, lambda m: m(x)), (dep.module, lambda m: m.features(x)[0])):
        m = copy.deepcopy(mod).eval()
        n_bn = _bns(m)
        with torch.inference_mode():
            ref = run(m)
        folded = fold_batchnorm_(m, lambda: run(m))
        assert folded == n_bn > 0 and _bns(m) == 0  # every BatchNorm of Lite0 follows a convolution
        with torch.inference_mode():
            got = run(m)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max())))
    # the cut holds the stem's and blocks 0..9's BatchNorms only: 1 + 2 (block 0 has no expansion) + 9 x 3
    assert _bns(dep.module) == 1 + 2 + 9 * 3


class _Shared(nn.Module):
    """The conv's output feeds its BatchNorm and, unnormalised, a residual: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return (self.bn(y) + y).mean((2, 3))


class _NotAfterConv(nn.Module):
    """A BatchNorm after a ReLU (and a conv declared right before it): nothing to fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x))).mean((2, 3))


class _LM:
    """What fold_batchnorm uses of a LoadedModel (a one-conv net has no block stack to wrap)."""

    name = "shared"

    def __init__(self, module):
        self.module = module

    def forward(self, batch):
        return self.module(batch["pixels"])


def test_a_fold_that_would_change_the_outputs_is_put_back():
    torch.manual_seed(0)
    lm = _LM(_random_stats_(_Shared()))
    batch = {"pixels": torch.randn(4, 3, 8, 8)}
    with torch.inference_mode():
        ref = lm.forward(batch)
    rec = fold_batchnorm(lm, batch)
    assert rec["folded"] is False and rec["pairs"] == 0 and rec["refused_pairs"] == 1
    assert rec["max_abs_difference"] > rec["tolerance"]
    assert _bns(lm.module) == 1
    with torch.inference_mode():
        assert torch.equal(lm.forward(batch), ref)


def test_only_a_batchnorm_reading_a_convs_output_is_folded():
    torch.manual_seed(0)
    m = _random_stats_(_NotAfterConv())
    x = torch.randn(2, 3, 8, 8)
    assert fold_batchnorm_(m, lambda: m(x)) == 0 and _bns(m) == 1
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm_(_NotAfterConv().train(), lambda: None)


def _cnn():
    return wrap_module(_random_stats_(lt.tiny_cnn()), name="tiny-cnn", source="lamina.testing:tiny_cnn",
                       modality="image", image_size=16)


def test_bench_folds_every_model_alike_and_records_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 16, 16)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    got = {}
    for fold in (False, True):
        r = bench([_cnn(), _cnn()], BenchConfig(data=str(tmp_path / "d.npz"), out=str(tmp_path / str(fold)),
                                                batch_sizes=(2,), warmup=0, repeats=1, progress=False,
                                                fold_batchnorm=fold))
        assert r["settings"]["fold_batchnorm"] is fold
        got[fold] = r["models"]
    for rec in got[True]:  # TinyCNN: conv1-bn1 and conv2-bn2 in each of its 4 blocks
        f = rec["batchnorm_folded"]
        assert f["folded"] and f["pairs"] == 8 and f["max_abs_difference"] <= f["tolerance"]
    assert all(rec["batchnorm_folded"] is None for rec in got[False])
    # the same predictions, the same parameter count (as saved: the folded biases are not counted)
    assert [r["accuracy"] for r in got[True]] == [r["accuracy"] for r in got[False]]
    assert [r["parameters"] for r in got[True]] == [r["parameters"] for r in got[False]]
    assert [r["flops_per_sample"] for r in got[True]] == [r["flops_per_sample"] for r in got[False]]


def test_the_flag_is_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--fold-batchnorm" in capsys.readouterr().out
    assert BenchConfig().fold_batchnorm is False  # off by default: earlier benchmarks stay comparable
    assert json.dumps(BenchConfig(fold_batchnorm=True).fold_batchnorm) == "true"
