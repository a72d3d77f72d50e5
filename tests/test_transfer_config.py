"""TransferConfig inherits the training loop's fields from lamina.train.TrainConfig (one declaration, as
finetune, distill and elastic do) with a head's own defaults; its flags and defaults stay what they were."""

import argparse
import dataclasses
import json

import pytest

from lamina import UsageError
from lamina import cli
from lamina._cliargs import as_config, config_from_args
from lamina.train import TrainConfig
from lamina.transfer import TransferConfig

# a head's loop defaults (before the inheritance these were TransferConfig's own fields, with these values)
DEFAULTS = {"epochs": None, "max_steps": None, "lr": None, "batch_size": 64, "weight_decay": 0.01, "patience": 5, "seed": 0,
            "overwrite": False, "progress": False, "resume": False}
FLAGS = ("--head --layers --task --fractions --seed --epochs --max-steps --lr --batch-size --weight-decay --patience --hidden "
         "--l2-cv "
         "--pooling --keep --group-lasso --side-width --side-cache-mb --overwrite --no-overwrite --progress "
         "--no-progress --device --torch-dtype --trust-remote-code --no-trust-remote-code").split()


def _parser():
    p = argparse.ArgumentParser()
    cli._transfer.add_args(p)
    return p


def test_the_loop_fields_come_from_trainconfig_with_a_heads_defaults():
    assert issubclass(TransferConfig, TrainConfig)
    own = {f.name: f for f in dataclasses.fields(TransferConfig)}
    for name in (f.name for f in dataclasses.fields(TrainConfig)):
        assert own[name].kw_only, name
    made = TransferConfig()
    assert {k: getattr(made, k) for k in DEFAULTS} == DEFAULTS
    loop = made.loop()  # the head's defaults resolve here, as before
    assert (loop.epochs, loop.lr, loop.batch_size, loop.patience) == (40, 3e-3, 64, 5)
    side = TransferConfig(head="side").loop()
    assert (side.epochs, side.lr) == (6, 1e-3)
    assert TransferConfig(max_steps=5).loop().max_steps == 5  # reaches fit(), which every trained head runs through
    with pytest.raises(UsageError, match="max.steps must be a positive integer"):
        TransferConfig(max_steps=0)
    assert TransferConfig("select").head == "select"  # head is still the first positional field


def test_cli_flags_are_unchanged_and_build_the_api_defaults():
    p = _parser()
    offered = {s for a in p._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert offered == set(FLAGS)  # in particular no --resume: a head writes no checkpoint
    assert config_from_args(TransferConfig, p.parse_args(["run"])) == TransferConfig()
    ns = p.parse_args(["run", "--head", "side", "--epochs", "5", "--lr", "0.002", "--patience", "1", "--seed", "3",
                       "--batch-size", "16", "--overwrite"])
    assert config_from_args(TransferConfig, ns) == TransferConfig(head="side", epochs=5, lr=0.002, patience=1,
                                                                  seed=3, batch_size=16, overwrite=True)
    ns = p.parse_args(["run", "--head", "last", "--l2-cv", "5"])
    assert config_from_args(TransferConfig, ns) == TransferConfig(head="last", l2_cv=5)


def test_records_read_back():
    made = TransferConfig(head="mix", epochs=4, lr=5e-3, seed=7, patience=None, hidden=32)
    rec = json.loads(json.dumps(dataclasses.asdict(made)))  # what transfer.json holds under "config"
    assert as_config(TransferConfig, rec, "transfer") == made
    old = {k: v for k, v in rec.items() if k != "resume"}  # a record written before the inheritance
    assert as_config(TransferConfig, old, "transfer") == made


@pytest.mark.parametrize("bad,match", [({"epochs": 0}, "^epochs must be"), ({"lr": -1.0}, "^lr must be"),
                                       ({"batch_size": 0}, "^batch_size must be"),
                                       ({"patience": -1}, "^patience must be"),
                                       ({"resume": True}, "nothing to resume")])
def test_bad_loop_settings_are_refused(bad, match):
    with pytest.raises(UsageError, match=match):
        TransferConfig(**bad)
