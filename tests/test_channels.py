"""CNN channel pruning (EfficientNet MBConv expanded channels): pruning zeroed channels is the identity, a
fraction that rounds to nothing changes nothing, the tensors really shrink, a pruned model saved in lamina's
format reloads to identical outputs, and `lamina prune --channels` works end to end from a scores run.
The same on the real EfficientNet-Lite0 in the tests marked `assets`."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lamina
from lamina import UsageError
from lamina import testing as lt
from lamina.blocks import bypass, find_blocks
from lamina.compress import PlanConfig, apply, channel_importance, channel_layout, is_empty, make_plan
from lamina.data import load_data, subsample
from lamina.models import load_model, model_fingerprint
from lamina.savefmt import load_lamina, save_loaded

FACTORY = "test_channels:tiny_mbconv"  # tests/ is on sys.path (pytest's rootdir conftest)


class _MBConv(nn.Module):
    """An MBConv block with EfficientNet's attribute names: expand 1x1 -> depthwise -> [SE] -> project 1x1."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1, se: bool = False):
        super().__init__()
        hidden = cin * expand
        self.expand, self.has_se, self.skip = expand, se, stride == 1 and cin == cout
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden)
        if se:
            self._se_reduce = nn.Conv2d(hidden, max(1, cin // 4), 1)
            self._se_expand = nn.Conv2d(max(1, cin // 4), hidden, 1)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        if self.has_se:
            g = self._se_expand(F.relu6(self._se_reduce(F.adaptive_avg_pool2d(h, 1))))
            h = torch.sigmoid(g) * h
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class TinyMBNet(nn.Module):
    """stem -> MBConv x4 (expand 1; expand 4 stride 2; expand 4 with SE; expand 4) -> pool -> _fc."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        self._blocks = nn.ModuleList([_MBConv(8, 8, 1), _MBConv(8, 12, 4, stride=2), _MBConv(12, 12, 4, se=True),
                                      _MBConv(12, 12, 4)])
        self._fc = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return self._fc(x.mean((2, 3)))


def tiny_mbconv(seed: int = 0) -> TinyMBNet:
    """Seeded, with non-trivial BN statistics; BN shifts keep every expanded channel alive (no ReLU6-dead ones)."""
    torch.manual_seed(seed)
    m = TinyMBNet()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.0)
                bn.bias.uniform_(0.5, 1.0)
    return m.eval()


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _scores(m: nn.Module) -> dict:
    n = find_blocks(m).n_blocks
    return {"model": {"name": "tiny", "fingerprint": model_fingerprint(m), "parameters": 1},
            "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "paths": list(find_blocks(m).block_paths),
                           "skip_nmse": [0.9, None, 0.5, 0.1], "block_influence": [0.5, None, 0.4, 0.3],
                           "skippable": [True, False, True, True]}}


def _zero(m: nn.Module, fraction: float) -> dict[int, list[int]]:
    """Silence every 1/fraction-th expanded channel of each block (bn1 scale and shift zero); returns them."""
    out = {}
    with torch.no_grad():
        for j, b in channel_layout(m).items():
            c = b._bn1.num_features
            chans = list(range(0, c, round(1 / fraction)))
            b._bn1.weight[chans] = 0
            b._bn1.bias[chans] = 0
            out[j] = chans
    return out


def test_layout_and_refusals():
    m = tiny_mbconv()
    assert sorted(channel_layout(m)) == [1, 2, 3]  # block 0 has no expansion conv: its width is its input's
    for other in (lt.tiny_cnn(), lt.tiny_hf_model("bert")):
        with pytest.raises(UsageError, match="MBConv"):
            apply(other, make_plan(_scores(m) | {"model": {"fingerprint": model_fingerprint(other)}},
                                   PlanConfig(channels=0.5)), batches=[{"pixels": _x()}])
    with pytest.raises(UsageError):
        PlanConfig(channels=1.0)
    assert is_empty(make_plan(_scores(m), PlanConfig(channels=0.0)))


def test_pruning_zeroed_channels_is_the_identity_and_shrinks_the_tensors():
    m = tiny_mbconv()
    zeroed = _zero(m, 0.25)
    x = {"pixels": _x()}
    res = apply(m, make_plan(_scores(m), PlanConfig(channels=0.25)), batches=[x])
    assert res.plan["channels"]["remove"] == {f"blocks.{j}": z for j, z in zeroed.items()}
    assert all(max(s) == 0 for s in res.plan["channels"]["removed_scores"].values())
    assert res.plan["channels"]["hidden_after"] == {"blocks.1": 24, "blocks.2": 36, "blocks.3": 36}
    b = res.model._blocks[2]
    assert b._expand_conv.weight.shape == (36, 12, 1, 1) and b._depthwise_conv.weight.shape == (36, 1, 3, 3)
    assert b._depthwise_conv.groups == 36 and b._bn1.running_mean.shape == (36,)
    assert b._se_reduce.weight.shape == (3, 36, 1, 1) and b._se_expand.bias.shape == (36,)
    assert b._project_conv.weight.shape == (12, 36, 1, 1)
    assert res.parameters_after < res.parameters_before
    with torch.no_grad():
        torch.testing.assert_close(res.model(x["pixels"]), m(x["pixels"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.model(_x(seed=5)), m(_x(seed=5)), rtol=1e-5, atol=1e-6)  # any input


def test_a_fraction_that_rounds_to_nothing_changes_nothing():
    m = tiny_mbconv()
    x = {"pixels": _x()}
    res = apply(m, make_plan(_scores(m), PlanConfig(channels=0.01)), batches=[x])  # round(0.32) = 0 per block
    assert all(v == [] for v in res.plan["channels"]["remove"].values())
    assert res.parameters_after == res.parameters_before
    assert model_fingerprint(res.model) == model_fingerprint(m)
    with torch.no_grad():
        assert torch.equal(res.model(x["pixels"]), m(x["pixels"]))


def test_importance_is_the_projection_input_l1():
    m = tiny_mbconv()
    x = _x()
    seen = {}
    h = m._blocks[3]._project_conv.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        m(x)
    h.remove()
    imp = channel_importance(m, [{"pixels": x[:2]}, {"pixels": x[2:]}])
    torch.testing.assert_close(imp[3], seen["x"].double().abs().sum((0, 2, 3)), rtol=1e-6, atol=1e-6)


def test_channels_and_depth_saved_in_lamina_format_reload_identically(tmp_path):
    lm = load_model(FACTORY)
    x = _x()
    res = apply(lm, make_plan(_scores(lm.module), PlanConfig(channels=0.5, drop_blocks=0.25)),
                batches=[{"pixels": x}])
    assert res.plan["depth"]["remove"] == ["blocks.3"] and res.model.blocks.n_blocks == 3
    save_loaded(res.model, tmp_path / "small")
    spec = json.loads((tmp_path / "small" / "lamina.json").read_text())
    assert spec["builder"] == "factory:" + FACTORY and spec["blocks"] == "_blocks" and spec["num_classes"] == 3
    back = load_lamina(tmp_path / "small")
    assert back.blocks.n_blocks == 3 and back.source == str(tmp_path / "small")
    assert sum(p.numel() for p in back.module.parameters()) == res.parameters_after
    with torch.no_grad():
        assert torch.equal(back.module(x), res.model.module(x))
        assert torch.equal(lamina.savefmt.load(tmp_path / "small")(x), res.model.module(x))
    # pruning the reloaded model again keeps the builder
    again = apply(back, make_plan(_scores(back.module) | {"importance": None}, PlanConfig(channels=0.5)),
                  batches=[{"pixels": x}])
    save_loaded(again.model, tmp_path / "smaller")
    with torch.no_grad():
        assert torch.equal(load_lamina(tmp_path / "smaller").module(x), again.model.module(x))


@pytest.fixture(scope="module")
def mb_run(tmp_path_factory):
    """A capture + analyze run of the tiny MBConv net on 24 tiny images (.npz): scores and calibration data."""
    from lamina import CaptureConfig, capture
    from lamina.analyze import AnalyzeConfig, analyze
    root = tmp_path_factory.mktemp("mbrun")
    ds = lt.tiny_image_dataset(24, size=16, classes=3)
    np.savez(root / "imgs.npz", x=ds.inputs, y=ds.labels)
    capture(FACTORY, str(root / "imgs.npz"), CaptureConfig(out=str(root / "run"), batch_size=8, progress=False))
    analyze(root / "run", AnalyzeConfig(progress=False, control=False))
    return root / "run"


def test_cli_prune_channels_iterative_depth_end_to_end(mb_run, tmp_path, capsys):
    from lamina.cli import main
    out = tmp_path / "small"
    rc = main(["prune", FACTORY, "--scores", str(mb_run / "scores.json"), "--channels", "0.5", "--method",
               "iterative", "--drop-blocks", "0.4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["result"]["format"] == "lamina" and plan["channels"]["hidden_after"]["blocks.1"] == 16
    rounds = plan["depth"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and len(plan["depth"]["remove"]) == 2
    assert "blocks.1" not in rounds[0]["scores"]  # the stride-2 block is never a candidate
    assert set(rounds[1]["scores"]) == set(rounds[0]["scores"]) - {rounds[0]["removed"]}
    assert rounds[0]["removed"] in plan["depth"]["remove"] and rounds[1]["removed"] in plan["depth"]["remove"]
    back = lamina.load_model(str(out))
    assert back.blocks.n_blocks == 2
    kept = [i for i in range(4) if f"blocks.{i}" not in plan["depth"]["remove"]]
    assert 1 in kept and back.module._blocks[kept.index(1)]._depthwise_conv.groups == 16
    assert plan["result"]["parameters_after"] == sum(p.numel() for p in back.module.parameters())
    with torch.no_grad():
        assert back.module(_x()).shape == (4, 3)


# ---------------------------------------------------------------- the real EfficientNet-Lite0

@pytest.fixture(scope="module")
def real():
    """The bundled EfficientNet-Lite0 and one batch of 8 MNIST digits at 64 px (each test copies the module)."""
    lm = load_model("efficientnet-lite0")
    return lm, lm.batch(subsample(load_data("mnist-5k"), 8, seed=0), range(8), image_size=64)


def _fresh(lm):
    import copy
    out = copy.copy(lm)
    out.module = copy.deepcopy(lm.module)
    return out


@pytest.mark.assets
def test_real_efficientnet_channels_identity_round_trip_and_finetuned_head(real, tmp_path):
    from lamina.savefmt import save_lamina
    lm, x = _fresh(real[0]), real[1]
    zeroed = _zero(lm.module, 0.25)
    assert sorted(zeroed) == list(range(1, 16))  # every block but the first expands
    res = apply(lm, make_plan({"model": {"fingerprint": lm.fingerprint()}}, PlanConfig(channels=0.25)), batches=[x])
    with torch.no_grad():
        want = lm.module(x["pixels"])
        torch.testing.assert_close(res.model.module(x["pixels"]), want, rtol=1e-4, atol=1e-5)
    assert res.parameters_after < res.parameters_before
    save_loaded(res.model, tmp_path / "pruned")
    back = load_model(str(tmp_path / "pruned"))
    for attr in ("image_size", "image_mean", "image_std", "modality", "in_channels", "blocks"):
        assert getattr(back, attr) == getattr(lm, attr), attr
    with torch.no_grad():
        assert torch.equal(back.module(x["pixels"]), res.model.module(x["pixels"]))

    # what `lamina finetune` saves: the bundled EfficientNet with its _fc replaced by a k-class Linear
    torch.manual_seed(0)
    ft = lm.module
    ft._fc = nn.Linear(1280, 5)
    save_lamina(ft, tmp_path / "ft", builder="efficientnet-lite0",
                preprocess={"modality": "image", "image_size": 224, "image_mean": [0.498] * 3,
                            "image_std": [0.502] * 3, "in_channels": 3}, extra={"num_classes": 5})
    back = load_model(str(tmp_path / "ft"))
    with torch.no_grad():
        assert torch.equal(back.module(x["pixels"]), ft(x["pixels"]))
    assert back.blocks == lm.blocks and json.loads((tmp_path / "ft" / "lamina.json").read_text())["num_classes"] == 5


@pytest.mark.assets
def test_real_efficientnet_depth_and_channels_from_a_lamina_folder(real, tmp_path):
    """A model in lamina's format built on EfficientNet-Lite0: depth + channels pruned, saved, reloaded."""
    save_loaded(real[0], tmp_path / "base")
    base, x = load_model(str(tmp_path / "base")), real[1]
    n = base.blocks.n_blocks
    args = [b._block_args for b in base.module._blocks]
    skippable = [a.stride in (1, [1]) and a.input_filters == a.output_filters for a in args]
    scores = {"model": {"fingerprint": base.fingerprint()},
              "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "skippable": skippable,
                             "skip_nmse": [float(i) for i in range(n)]}}
    res = apply(base, make_plan(scores, PlanConfig(channels=0.5, drop_blocks=0.2)), batches=[x])
    assert res.model.blocks.n_blocks == n - 3
    save_loaded(res.model, tmp_path / "small")
    assert json.loads((tmp_path / "small" / "lamina.json").read_text())["builder"] == "efficientnet-lite0"
    back = load_model(str(tmp_path / "small"))
    assert back.blocks.n_blocks == n - 3
    with torch.no_grad():
        assert torch.equal(back.module(x["pixels"]), res.model.module(x["pixels"]))
    with torch.no_grad(), bypass(base.module, res.plan["depth"]["remove"]):
        ref = base.module(x["pixels"])
    assert ref.shape == back.module(x["pixels"]).shape


def test_prune_recalibrate_bn_matches_the_calibration_statistics(mb_run, tmp_path):
    """--recalibrate-bn: every BatchNorm's running mean is the mean of what it sees on the calibration rows."""
    from lamina.cli import main
    out = tmp_path / "rb"
    assert main(["prune", FACTORY, "--scores", str(mb_run / "scores.json"), "--channels", "0.5",
                 "--recalibrate-bn", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["bn_recalibrated"] is True
    back = lamina.load_model(str(out))
    from lamina.compress.prune import _calibration_batches  # the same rows prune used
    from lamina.compress import PruneConfig
    batches = _calibration_batches(back, json.loads((mb_run / "features" / "manifest.json").read_text()),
                                   json.loads((mb_run / "scores.json").read_text()),
                                   PruneConfig(out=str(out), channels=0.5),
                                   mb_run / "scores.json")
    bn = next(m for m in back.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    h = bn.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().double()) or None)
    with torch.no_grad():
        for b in batches:
            back.forward(b)
    h.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(bn.running_mean.double(), x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
