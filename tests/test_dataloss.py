"""Issue 11, data loss (items 5-10): lamina never deletes or rewrites a file it did not write, decides before
writing, lets one writer at a time into a folder, resumes only the same run, and writes strict JSON.

Each test goes through the CLI (exit code, the user's file byte-identical) and, where it helps, the API."""

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lamina import UsageError
from lamina.cli import main
from lamina.errors import LaminaError
from lamina.jsonio import read_json
from lamina.resume import check_resume
from lamina.runfolder import RECORD, claim, lock, read_record, remove_owned, update_run_config
from conftest import die_in_epoch, make_text_run

CAPTURE = ["capture", "--model", "lamina.testing:tiny_cnn", "--data", "digits", "--limit", "60", "--image-size",
           "16", "--no-progress"]


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` and its bytes: 'nothing changed' is equality of two of these."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _capture(out, capsys, *extra) -> int:
    code = main(CAPTURE + ["--out", str(out), *extra])
    capsys.readouterr()
    return code


# ---------------------------------------------------------------- 5: --overwrite removes only lamina's files

def test_capture_overwrite_removes_only_what_lamina_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert _capture(out, capsys) == 0
    assert "features/manifest.json" in read_record(out) and "config.json" in read_record(out)
    (out / "features" / "mine.txt").write_bytes(b"my notes")
    (out / "features" / "layers" / "mine.npy").write_bytes(b"not lamina's")
    before = _tree(out)
    assert main(CAPTURE + ["--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "features/mine.txt" in err and "features/layers/mine.npy" in err and "did not write" in err
    assert _tree(out) == before  # nothing removed, nothing rewritten
    (out / "features" / "mine.txt").unlink()
    (out / "features" / "layers" / "mine.npy").unlink()
    assert _capture(out, capsys, "--overwrite") == 0  # lamina's own store is replaced
    # the API refuses the same way, deleting nothing
    (out / "features" / "mine.txt").write_bytes(b"mine")
    with pytest.raises(UsageError, match="did not write"):
        remove_owned(out, "features")
    assert (out / "features" / "manifest.json").exists() and (out / "features" / "mine.txt").exists()


def test_model_overwrite_keeps_the_users_files(tmp_path, tiny_dirs, sentences_csv, capsys):
    from lamina.models import load_model
    from lamina.savefmt import save, save_lamina, preprocess_of
    lm = load_model(str(tiny_dirs["bert"]))
    save(lm, tmp_path / "model")
    save(lm, tmp_path / "model")  # lamina's own save is replaced
    (tmp_path / "model" / "mine.txt").write_text("mine")
    before = _tree(tmp_path / "model")
    with pytest.raises(UsageError, match="model: mine.txt|model/mine.txt"):
        save(lm, tmp_path / "model")
    assert _tree(tmp_path / "model") == before and not list(tmp_path.glob(".*lamina-tmp"))
    with pytest.raises(UsageError, match="did not write"):
        save_lamina(lm.module, tmp_path / "model", "hf:BertModel", preprocess_of(lm))
    assert _tree(tmp_path / "model") == before
    # finetune --overwrite (and prune, distill: the same claim) refuses before training
    out = tmp_path / "ft"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"\x00user")
    assert main(["finetune", "--model", str(tiny_dirs["bert"]), "--data", str(sentences_csv), "--out", str(out),
                 "--overwrite", "--no-progress"]) == 2
    assert "model/weights.bin" in capsys.readouterr().err
    assert _tree(out) == {"model/weights.bin": b"\x00user"}


# ---------------------------------------------------------------- 6: decide before writing (demo too)

def test_demo_refuses_a_users_folder_before_writing_anything(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scores.json").write_text('{"my": "scores"}')
    (mine / "config.json").write_text('{"my": "config"}')
    before = _tree(mine)
    assert main(["demo", "--out", str(mine)]) == 2  # overwrite is on by default for demo
    err = capsys.readouterr().err
    assert "scores.json" in err and "config.json" in err
    assert _tree(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.json", "scores.json"]


def test_demo_checks_all_three_stages_before_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    assert _capture(run, capsys) == 0
    (run / "report.html").write_text("<p>my page</p>")  # only the third stage would meet it
    before = _tree(run)
    assert main(["demo", "--out", str(run)]) == 2
    assert "report.html" in capsys.readouterr().err
    assert _tree(run) == before  # capture did not run: features and config.json untouched


def test_prune_refused_late_leaves_no_folder(tmp_path, tiny_dirs):
    from lamina.compress import PruneConfig, prune
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"model": {"name": "x"}, "importance": None}))
    out = tmp_path / "small"
    with pytest.raises(UsageError):
        prune(str(tiny_dirs["bert"]), str(scores), PruneConfig(out=str(out), drop_blocks=0.5))
    assert not out.exists()


# ---------------------------------------------------------------- 7: a folder lamina did not make is not a run

def test_capture_refuses_a_users_config_json(tmp_path, capsys):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "config.json").write_text('{"learning_rate": 0.1}\n')
    before = _tree(out)
    for extra in ([], ["--overwrite"]):
        assert main(CAPTURE + ["--out", str(out), *extra]) == 2
        assert "config.json" in capsys.readouterr().err
        assert _tree(out) == before and not (out / "features").exists()
    with pytest.raises(UsageError, match="lamina did not write"):
        update_run_config(out, "capture", {"n": 1})
    assert _tree(out) == before


def test_lamina_config_json_is_marked_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert _capture(out, capsys) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lamina_run"] == 1 and "capture" in cfg
    update_run_config(out, "extra", {"k": 1})  # lamina's own config.json is merged into
    assert set(json.loads((out / "config.json").read_text())) >= {"capture", "extra", "lamina_run"}
    # a config.json recorded but rewritten without the mark is not trusted either
    (out / "config.json").write_text('{"capture": {}}')
    with pytest.raises(UsageError, match="lamina_run"):
        update_run_config(out, "extra", {"k": 1})


# ---------------------------------------------------------------- 8: one writer at a time

_HOLD = """
import sys
from lamina.runfolder import lock
with lock(sys.argv[1], "test-holder"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    assert _capture(out, capsys) == 0
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        before = _tree(out)
        assert main(CAPTURE + ["--out", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert f"pid {child.pid}" in err and "lamina test-holder" in err and "another lamina process" in err
        assert main(["analyze", str(out), "--no-progress", "--no-control", "--no-importance"]) == 1
        assert f"pid {child.pid}" in capsys.readouterr().err
        assert main(["info", str(out)]) == 0  # read-only: no lock
        with claim(out, "capture", ["features"], True, rank=1):  # another rank of rank 0's torchrun job
            pass
        assert {k: v for k, v in _tree(out).items() if not k.startswith(".lamina.lock")} == \
            {k: v for k, v in before.items() if not k.startswith(".lamina.lock")}
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert _capture(out, capsys, "--overwrite") == 0  # the holder is gone: the OS released its lock


def test_two_captures_into_one_folder_leave_one_good_store(tmp_path, capsys):
    import os
    import time
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    first = subprocess.Popen([sys.executable, "-m", "lamina", "capture", "--model", "lamina.testing:slow_tiny_cnn",
                              "--data", "digits", "--limit", "120", "--batch-size", "4", "--image-size", "16",
                              "--no-progress", "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "features" / "progress" / "rank0.txt").exists():
            time.sleep(0.05)
        assert first.poll() is None, "the first capture must still be running"
        assert main(CAPTURE + ["--out", str(out), "--overwrite"]) == 1  # a second writer, even with --overwrite
        err = capsys.readouterr().err
        assert f"pid {first.pid}" in err and "`lamina capture`" in err
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()
    assert main(["info", str(out), "--verify"]) == 0  # the first capture's store is whole


def _lock_is_free(folder) -> bool:
    """Whether another thread can take the lock now (the same thread could re-enter it)."""
    got = []

    def take():
        try:
            with lock(folder, "probe"):
                got.append(True)
        except LaminaError:
            got.append(False)

    t = threading.Thread(target=take)
    t.start()
    t.join()
    return got == [True]


def test_lock_is_released_on_error_and_ctrl_c(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(KeyboardInterrupt):
        with claim(out, "capture", ["features"], False):
            assert not _lock_is_free(out)  # held against other threads too
            raise KeyboardInterrupt
    assert _lock_is_free(out) and not (out / ".lamina.lock.json").exists()
    # a stage that fails inside its claim releases it too (another capture's settings, found under the lock)
    assert _capture(out, capsys) == 0
    assert main(CAPTURE + ["--out", str(out), "--resume", "--limit", "50"]) == 2
    assert "refusing to mix" in capsys.readouterr().err
    assert _lock_is_free(out)
    # a folder the failed stage created is removed again, bookkeeping included (NaN in the first batch)
    import lamina
    from lamina import CaptureConfig, capture
    ds = lamina.Dataset("v", "array", np.ones((4, 4), np.float32), [0, 1, 0, 1], ["a", "b"], ["s0", "s1", "s2", "s3"])
    with pytest.raises(LaminaError, match="non-finite"):
        capture("lamina.testing:nan_model", ds, CaptureConfig(out=str(tmp_path / "new"), progress=False))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- 9: resume only the same run

def test_finetune_resume_with_other_settings_is_refused(tmp_path, tiny_dirs, sentences_csv, monkeypatch, capsys):
    from lamina.finetune import FinetuneConfig, finetune
    out = tmp_path / "cut"
    kw = dict(full=True, epochs=2, lr=3e-3, batch_size=16, limit=160, progress=False)
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_dirs["bert"]), str(sentences_csv), FinetuneConfig(out=str(out), **kw))
    restore()
    assert (out / "checkpoint.json").exists() and (out / "resume.json").exists()
    base = ["finetune", "--model", str(tiny_dirs["bert"]), "--data", str(sentences_csv), "--out", str(out),
            "--full", "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--resume"]
    before = _tree(out)
    for extra, name in ((["--limit", "120"], "limit"), (["--limit", "160", "--epochs", "3"], "epochs"),
                        (["--limit", "160", "--seed", "1"], "seed"), (["--limit", "160", "--test", "0.3"], "test")):
        args = [a for a in base if a not in ("--epochs", "2")] + extra if "--epochs" in extra else base + extra
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert name in err.split("differs in: ")[1].split(")")[0].split(", "), err
        assert _tree(out) == before
    with pytest.raises(UsageError, match="model_fingerprint"):  # another model of the same architecture
        finetune(str(tiny_dirs["gpt2"]), str(sentences_csv), FinetuneConfig(out=str(out), resume=True, **kw))
    assert main(base + ["--limit", "160"]) == 0  # the same settings resume
    rec = json.loads((out / "finetune.json").read_text())
    assert rec["history"]["resumed_from"] == 0 and not (out / "checkpoint.json").exists()


def test_distill_resume_with_other_settings_is_refused(tmp_path, tiny_teacher, monkeypatch, capsys):
    from lamina.distill import DistillConfig, distill
    out = tmp_path / "d"
    kw = dict(epochs=2, lr=1e-3, batch_size=32, train_limit=64, progress=False)
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        distill(str(tiny_teacher), str(tiny_teacher / "model"), DistillConfig(out=str(out), **kw))
    restore()
    before = _tree(out)
    base = ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_teacher / "model"), "--out", str(out),
            "--lr", "1e-3", "--batch-size", "32", "--no-progress", "--resume"]
    assert main(base + ["--epochs", "3", "--train-limit", "64"]) == 2
    assert "differs in: epochs" in capsys.readouterr().err
    assert main(base + ["--epochs", "2", "--train-limit", "64", "--kd", "0.5"]) == 2
    assert "differs in: kd" in capsys.readouterr().err
    assert _tree(out) == before
    assert main(base + ["--epochs", "2", "--train-limit", "64"]) == 0
    assert json.loads((out / "distill.json").read_text())["history"]["resumed_from"] == 0


def test_resume_record_is_compared_key_by_key(tmp_path):
    check_resume(tmp_path, "distill", {"teacher": "t", "lr": 1e-3, "out": "a", "progress": True}, resume=False)
    check_resume(tmp_path, "distill", {"teacher": "t", "lr": 1e-3, "out": "b", "progress": False}, resume=True)
    with pytest.raises(UsageError, match="differs in: lr, teacher"):
        check_resume(tmp_path, "distill", {"teacher": "u", "lr": 2e-3}, resume=True)
    with pytest.raises(UsageError, match="no readable record"):
        check_resume(tmp_path, "finetune", {"teacher": "t", "lr": 1e-3}, resume=True)  # another stage's record


def test_resume_of_a_run_recorded_before_a_setting_existed(tmp_path):
    """A record written by an older lamina lacks a newer config field: resuming matches it while the field is
    at its default (what the older lamina did), and refuses, naming it, once it is not."""
    from dataclasses import asdict, replace

    from lamina import DistillConfig
    cfg = DistillConfig(out=str(tmp_path), epochs=2)
    check_resume(tmp_path, "distill", asdict(cfg), resume=False, config=cfg)
    rec = json.loads((tmp_path / "resume.json").read_text())
    del rec["settings"]["teacher_correction"]  # as a run recorded before --teacher-correction existed
    (tmp_path / "resume.json").write_text(json.dumps(rec))
    check_resume(tmp_path, "distill", asdict(cfg), resume=True, config=replace(cfg, resume=True))
    later = replace(cfg, teacher_correction=5)
    with pytest.raises(UsageError, match="differs in: teacher_correction"):
        check_resume(tmp_path, "distill", asdict(later), resume=True, config=later)
    with pytest.raises(UsageError, match="differs in: teacher_correction"):  # without the config: no defaults known
        check_resume(tmp_path, "distill", asdict(cfg), resume=True)


# ---------------------------------------------------------------- 10: non-finite scores, strict JSON

def _scores(skip):
    n = len(skip)
    return {"model": {"name": "tiny", "fingerprint": "x", "parameters": 10},
            "importance": {"blocks": [f"blocks.{i}" for i in range(n)], "paths": [f"l.{i}" for i in range(n)],
                           "skippable": [True] * n, "skip_nmse": skip, "block_influence": [0.5] * n}}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1", True])
def test_non_finite_scores_are_refused_naming_the_block(bad):
    from lamina.compress.plan import PlanConfig, make_plan
    with pytest.raises(UsageError, match=r"skip_nmse for block blocks\.1"):
        make_plan(_scores([0.3, bad, 0.2]), PlanConfig(drop_blocks=0.34))
    assert make_plan(_scores([0.3, None, 0.2]), PlanConfig(drop_blocks=0.34))["depth"]["remove"] == ["blocks.2"]


def test_prune_cli_refuses_a_nan_score_and_writes_nothing(tmp_path, tiny_dirs, capsys):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(_scores([0.3, float("nan")])))  # json.dumps writes a bare NaN
    assert "NaN" in path.read_text()
    out = tmp_path / "small"
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(path), "--out", str(out), "--drop-blocks",
                 "0.5"]) == 2
    err = capsys.readouterr().err
    assert "blocks.1" in err and "skip_nmse" in err and not out.exists()


def test_the_one_json_writer_is_strict(tmp_path):
    from lamina.models import save_json
    with pytest.raises(LaminaError, match=r"a\.b\[1\]"):
        save_json(tmp_path / "x.json", {"a": {"b": [1.0, float("nan")]}})
    assert not (tmp_path / "x.json").exists()
    save_json(tmp_path / "x.json", {"cka": [[1.0, np.float32("nan")]], "f": np.float32(0.5), "n": np.int64(3),
                                    "arr": np.arange(2), "p": tmp_path}, nulls=("cka",))
    got = read_json(tmp_path / "x.json")
    assert got["cka"] == [[1.0, None]] and got["f"] == 0.5 and got["n"] == 3 and got["arr"] == [0, 1]
    assert got["p"] == str(tmp_path)
    (tmp_path / "y.json").write_text('{"a": NaN}')
    with pytest.raises(ValueError, match="NaN"):
        read_json(tmp_path / "y.json")


def test_every_json_a_run_writes_is_strict(tmp_path, tiny_dirs, capsys):
    run, _ = make_text_run(tmp_path, tiny_dirs["bert"], 40, seed=1, importance_samples=16)
    assert main(["report", str(run)]) == 0
    assert main(["prune", str(tiny_dirs["bert"]), "--scores", str(run / "scores.json"), "--out",
                 str(tmp_path / "small"), "--drop-blocks", "0.5"]) == 0
    capsys.readouterr()
    files = [p for p in tmp_path.rglob("*.json")]
    assert len(files) >= 6
    for p in files:
        read_json(p)  # raises on NaN / Infinity
    owned = read_record(run)
    assert {"scores.json", "config.json", "report.html", "features/manifest.json"} <= set(owned)
    assert (run / "control" / RECORD).exists()  # the control capture is a lamina folder of its own
    assert not math.isnan(json.loads((run / "scores.json").read_text())["metrics"]["probe_acc"][0])
