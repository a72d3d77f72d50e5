"""One behaviour for the Python API and the CLI: configs as dicts, errors naming arguments, negative layer
indices, one way to load a saved model, compact reprs, --help without repeated defaults."""

import pytest
import torch

import lamina
from lamina import UsageError
from lamina.analyze import AnalyzeConfig, CompareConfig, analyze, compare
from lamina.bench import BenchConfig, bench
from lamina.capture import CaptureConfig, capture
from lamina.cli import build_parser, main
from lamina.compress import PruneConfig, prune
from lamina.distill import DistillConfig, distill
from lamina.errors import api_text
from lamina.finetune import FinetuneConfig, finetune
from lamina.report import ReportConfig, report
from lamina.store import FeatureStore
from conftest import make_text_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dirs):
    r, _ = make_text_run(tmp_path_factory.mktemp("api"), tiny_dirs["bert"], 40, seed=2, control=False,
                         importance_samples=8)
    return r


def test_a_dict_config_works_like_the_dataclass(run, tiny_dirs, tmp_path):
    out = tmp_path / "small"
    res = prune(str(tiny_dirs["bert"]), str(run / "scores.json"), {"out": str(out), "drop_blocks": 0.5})
    assert res.blocks_after == 1 and (out / "model").is_dir()
    assert "lamina_plan" not in repr(res) and "blocks_after=1" in repr(res)  # compact: the plan is in res.plan
    r = report(str(run), {"out": str(tmp_path / "r.html")})
    assert r.plots > 0


@pytest.mark.parametrize("verb,call", [
    ("capture", lambda: capture("x", "y", [1])), ("analyze", lambda: analyze("x", 3)),
    ("compare", lambda: compare("a", "b", "fast")), ("report", lambda: report("x", object())),
    ("prune", lambda: prune("m", None, 0.5)), ("finetune", lambda: finetune("m", "d", ["out"])),
    ("bench", lambda: bench(["m"], 1)), ("distill", lambda: distill("teacher/")),
])
def test_anything_else_is_a_type_error_naming_the_config_class(verb, call):
    with pytest.raises(TypeError, match=rf"{verb}\(\) takes its settings as a \w+Config"):
        call()


def test_unknown_dict_keys_are_refused_with_the_fields(tmp_path):
    with pytest.raises(UsageError, match="PruneConfig has no setting 'drop'") as e:
        prune("m", None, {"out": str(tmp_path), "drop": 0.5})
    assert "drop_blocks" in str(e.value)
    with pytest.raises(UsageError, match="needs out"):
        finetune("m", "d", {"epochs": 2})


def test_api_errors_name_the_argument_and_the_cli_the_flag(run, tmp_path, capsys):
    with pytest.raises(UsageError) as e:
        analyze(str(run), AnalyzeConfig(control=False))
    assert "overwrite=True" in str(e.value) and "--overwrite" not in str(e.value)
    assert "--overwrite" in e.value.cli_text()
    with pytest.raises(UsageError) as e:
        FinetuneConfig(out="x", epochs=0)
    assert str(e.value).startswith("epochs must be") and "e.g. epochs=3" in str(e.value)
    assert main(["analyze", str(run), "--no-control"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    # commands stay as a user types them
    assert api_text("run `lamina analyze RUN --overwrite`") == "run `lamina analyze RUN --overwrite`"
    assert api_text("use --no-control or --width 0.5") == "use control=False or width=0.5"


def test_negative_layer_indices_everywhere(run):
    store = FeatureStore.open(run)
    last = store.layers[-1]
    assert last.startswith("blocks.")
    assert (store.load("blocks.-1") == store.load(last)).all()
    assert (store.load(-1) == store.load(last)).all()
    with pytest.raises(UsageError, match="blocks.-9"):
        store.load("blocks.-9")


def test_compact_repr(run):
    store = FeatureStore.open(run)
    r = repr(store)
    assert r.startswith("FeatureStore(") and "sha256" not in r and len(r) < 300
    assert str(store.n) in r and "blocks.1" in r


def test_one_documented_way_to_load_a_model_for_use(run, tiny_dirs, tmp_path):
    m = lamina.load(str(tiny_dirs["bert"]))
    assert isinstance(m, torch.nn.Module)
    lm = lamina.load_model(str(tiny_dirs["bert"]))
    assert lm.module.__class__ is m.__class__


def test_help_never_repeats_a_default(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for name, p in sub.choices.items():
        flat = " ".join(p.format_help().split())
        for a in p._actions:
            if a.help and a.help.lower().count("default") > 1:
                pytest.fail(f"lamina {name} {a.option_strings}: {a.help}")
        if name == "distill":
            assert "(default: from plan.json)" in flat and "(default: from plan.json) (default" not in flat


def test_info_shows_classes_and_compare_names_rows_and_columns(run, tiny_dirs, tmp_path, capsys):
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "classes" in out
    man = FeatureStore.open(run).manifest
    for c in man["data"]["classes"]:
        assert str(c) in out
    assert main(["compare", str(run), str(run), "--n-perm", "0", "--out", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "rows:" in out and "columns:" in out


def test_a_fine_tuned_model_is_named_after_its_folder(tiny_teacher, tmp_path):
    lm = lamina.load_model(str(tiny_teacher / "model"))
    assert lm.name == tiny_teacher.name != "model"
    assert lamina.load_model(str(tiny_teacher)).name == tiny_teacher.name
    run = tmp_path / "run"
    from lamina.task import read_task
    capture(str(tiny_teacher), read_task(tiny_teacher).data, CaptureConfig(out=str(run), limit=30, progress=False))
    assert FeatureStore.open(run).manifest["model"]["name"] == tiny_teacher.name
