"""The CLI mirrors the API; usage errors exit 2 with a message, never a traceback."""

import subprocess
import sys

import pytest

from lamina.cli import main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_capture_setting(capsys):
    with pytest.raises(SystemExit) as e:
        main(["capture", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    from dataclasses import fields

    from lamina import CaptureConfig
    for f in fields(CaptureConfig):
        assert "--" + f.name.replace("_", "-") in text


@pytest.mark.parametrize("args,needle", [
    (["capture", "--model", "/no/such/model", "--data", "digits", "--out", "{tmp}"], "neither a bundled name"),
    (["capture", "--model", "minilmm", "--data", "digits", "--out", "{tmp}"], "did you mean 'minilm'"),
    (["capture", "--model", "lamina.testing:tiny_cnn", "--data", "nope.csv", "--out", "{tmp}"], "bundled set"),
    (["capture", "--model", "lamina.testing:no_stack", "--data", "digits", "--out", "{tmp}"], "--blocks"),
    (["capture", "--model", "lamina.testing:tiny_cnn", "--data", "digits", "--limit", "5000", "--out", "{tmp}"],
     "at most 1797"),
    (["capture", "--model", "lamina.testing:tiny_cnn", "--data", "digits", "--pooling", "max", "--out", "{tmp}"],
     "mean, cls, last, none"),
    (["info", "{tmp}"], "no feature store"),
])
def test_usage_errors_exit_2(args, needle, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path / "run")) for a in args]
    code, _, err = run(args, capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert "given:" in err and ("allowed:" in err or "fix:" in err)


def test_capture_then_info_and_existing_output(tmp_path, capsys, text_csv):
    args = ["capture", "--model", "lamina.testing:tiny_cnn", "--data", "digits", "--limit", "60",
            "--image-size", "16", "--out", str(tmp_path), "--no-progress"]
    code, out, _ = run(args, capsys)
    assert code == 0 and "blocks.3" in out
    code, _, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err
    code, out, _ = run(["info", str(tmp_path), "--json", "--verify"], capsys)
    assert code == 0 and '"n": 60' in out
    code, out, _ = run(args + ["--overwrite"], capsys)
    assert code == 0


def test_text_columns_via_cli(tmp_path, capsys, text_csv, tiny_dirs):
    base = ["capture", "--model", str(tiny_dirs["bert"]), "--data", str(text_csv), "--out", str(tmp_path),
            "--no-progress"]
    code, _, err = run(base + ["--text-column", "body", "--label-column", "sentiment"], capsys)
    assert code == 2 and "review, sentiment" in err
    code, out, _ = run(base + ["--text-column", "review", "--label-column", "sentiment"], capsys)
    assert code == 0


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "lamina", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "lamina" in r.stdout
