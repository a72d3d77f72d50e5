"""The training stages' configs share one declaration of the loop's settings (``lamina.train.TrainConfig``):
the same fields, keyword-only, with each stage's own defaults and help; the records' keys, the CLI's flags
and the bad-input refusals stay what they were."""

import argparse
import dataclasses
import json

import pytest

from lamina import UsageError
from lamina import cli
from lamina._cliargs import as_config, config_from_args
from lamina.distill import DistillConfig
from lamina.elastic import ElasticConfig
from lamina.finetune import FinetuneConfig
from lamina.runtime import Runtime
from lamina.train import TrainConfig

LOOP = ("epochs", "max_steps", "lr", "batch_size", "weight_decay", "patience", "seed", "resume", "overwrite", "progress")
SHARED = {"epochs": 3, "max_steps": None, "lr": 1e-4, "batch_size": 32, "weight_decay": 0.01, "patience": 2, "seed": 0,
          "resume": False, "overwrite": False, "progress": True}
DEFAULTS = {DistillConfig: SHARED, ElasticConfig: SHARED, FinetuneConfig: {**SHARED, "epochs": 6, "lr": None}}
# the fields whose help a stage words its own way (what its seed seeds, which patience, ...)
OWN_HELP = {DistillConfig: {"seed"}, ElasticConfig: {"seed", "patience"},
            FinetuneConfig: {"epochs", "lr", "seed", "progress"}}
# every key of the configs as the records (distill.json, finetune.json, elastic.json, resume.json) hold them
KEYS = {
    DistillConfig: "device torch_dtype trust_remote_code out width scratch data seq_len ce kd temperature cosine fsp "
                   "center taps layer_map epochs max_steps lr batch_size weight_decay patience train_limit seed "
                   "teacher_correction teacher_correction_lr calibration_samples resume overwrite progress",
    FinetuneConfig: "device torch_dtype trust_remote_code out full epochs max_steps lr batch_size weight_decay patience limit "
                    "seed val test max_length seq_len image_size text_column label_column skip_bad_files "
                    "probe_scores resume overwrite progress",
    ElasticConfig: "device torch_dtype trust_remote_code out data seq_len depths widths heads channels sampled ce kd "
                   "hidden teacher_kd train_full target full_fraction best_on temperature epochs max_steps lr batch_size weight_decay patience train_limit "
                   "seed calibration_samples latency_batch latency_repeats threads resume overwrite progress",
}
CONFIGS = list(DEFAULTS)


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_the_loop_fields_are_declared_once_with_the_stage_defaults(cls):
    assert issubclass(cls, TrainConfig) and issubclass(cls, Runtime)
    base, own = _fields(TrainConfig), _fields(cls)
    assert tuple(n for n in base if n in LOOP) == LOOP
    for name in LOOP:
        f = own[name]
        assert f.kw_only, name  # as Runtime's: the stage's own required field (out) keeps its place
        assert f.default == DEFAULTS[cls][name], name
        assert f.metadata["help"], name
        if name in OWN_HELP[cls]:
            assert f.metadata["help"] != base[name].metadata["help"], name
        else:
            assert f.metadata is base[name].metadata or f.metadata["help"] == base[name].metadata["help"], name
    made = cls(out="x")
    assert {n: getattr(made, n) for n in LOOP} == DEFAULTS[cls]
    assert cls("x").out == "x"  # out is still the first positional field


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_records_keep_their_keys_and_read_back(cls):
    made = cls(out="x", epochs=4, lr=5e-5, seed=7, patience=None)
    rec = json.loads(json.dumps(dataclasses.asdict(made)))  # what a run folder holds under "config"
    assert sorted(rec) == sorted(KEYS[cls].split())
    assert as_config(cls, rec, "test") == made
    # an older record wrote the loop fields after the stage's own: key order does not matter
    assert as_config(cls, dict(reversed(list(rec.items()))), "test") == made


@pytest.mark.parametrize("verb,cls,extra", [("distill", DistillConfig, ["--teacher", "t"]),
                                            ("finetune", FinetuneConfig, ["--model", "m", "--data", "d"]),
                                            ("elastic", ElasticConfig, ["--teacher", "t"])])
def test_cli_flags_build_the_api_defaults(verb, cls, extra):
    p = argparse.ArgumentParser()
    getattr(cli, "_" + verb).add_args(p)
    assert config_from_args(cls, p.parse_args(extra + ["--out", "o"])) == cls(out="o")
    ns = p.parse_args(extra + ["--out", "o", "--epochs", "5", "--lr", "0.002", "--no-progress", "--patience", "1"])
    assert config_from_args(cls, ns) == cls(out="o", epochs=5, lr=0.002, progress=False, patience=1)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [{"epochs": 0}, {"lr": -1.0}, {"batch_size": 0}, {"patience": -1}])
def test_each_stage_still_refuses_bad_loop_settings(cls, bad):
    with pytest.raises(UsageError, match=f"^{next(iter(bad))} must be"):  # named as the API spells it
        cls(out="x", **bad)


def test_loop_carries_the_settings_and_finetunes_lr_default():
    d = DistillConfig(out="x", epochs=4, lr=2e-4, batch_size=8, weight_decay=0.1, patience=None, seed=3,
                      progress=False).loop()
    assert (d.epochs, d.lr, d.batch_size, d.weight_decay, d.patience, d.seed, d.progress) == \
        (4, 2e-4, 8, 0.1, None, 3, False)
    assert ElasticConfig(out="x", seed=5).loop().seed == 5
    assert FinetuneConfig(out="x").loop().lr == 1e-3  # head only
    assert FinetuneConfig(out="x", full=True).loop().lr == 1e-4
    ft = FinetuneConfig(out="x", lr=5e-5, epochs=2, batch_size=4).loop()
    assert (ft.lr, ft.epochs, ft.batch_size) == (5e-5, 2, 4)
