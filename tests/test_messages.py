"""Bad files, bad folders, bad sizes: each is a message through the CLI, never a traceback.

Every case runs ``lamina.cli.main`` and checks the exit code (2 for what the
user asked, 1 for what went wrong at run time), that stderr names the file or
value, carries a ``fix:`` line, and holds no traceback.
"""

import builtins
import errno
import io
import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from lamina import testing as lt
from lamina.cli import main

CNN = "lamina.testing:tiny_cnn"


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(args, capsys, code, *needles):
    got, out, err = run(args, capsys)
    assert got == code, (got, out, err)
    assert "Traceback" not in err + out
    assert "fix:" in err, err
    for n in needles:
        assert str(n).lower() in err.lower(), (n, err)
    return err


# ----------------------------------------------------------------- fixtures ----
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return lt.save_tiny_text_model(tmp_path_factory.mktemp("m") / "bert", "bert")


@pytest.fixture
def broken(bert, tmp_path):
    """A copy of the tiny BERT folder, to damage."""
    return shutil.copytree(bert, tmp_path / "broken")


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    texts, labels = lt.tiny_sentences(40)
    path = tmp_path_factory.mktemp("d") / "s.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, bert, csv):
    """A captured and analyzed run of the tiny BERT (for prune and report)."""
    run_dir = tmp_path_factory.mktemp("r") / "run"
    assert main(["capture", "--model", str(bert), "--data", str(csv), "--out", str(run_dir), "--no-progress",
                 "--batch-size", "16"]) == 0
    assert main(["analyze", str(run_dir), "--no-progress", "--no-control"]) == 0
    return run_dir


def image_folder(root, n=8, sizes=((16, 16),)):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def deny_writes(monkeypatch, root, err=errno.EACCES):
    """Make every write under ``root`` fail as a read-only folder (or a full disk) does.

    Tests run as root, whom chmod does not stop, so the OS's answer is imitated
    at the calls that create folders and open files for writing.
    """
    root = str(root)
    under = lambda p: os.path.abspath(str(p)).startswith(os.path.abspath(root))  # noqa: E731

    def fail(p):
        raise OSError(err, os.strerror(err), str(p))

    real_open, real_mkdir = builtins.open, os.mkdir

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            fail(file)
        return real_open(file, mode, *a, **k)

    def fake_mkdir(p, *a, **k):
        if under(p):
            fail(p)
        return real_mkdir(p, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


# ------------------------------------------------------------- model files ----
def test_truncated_safetensors_names_the_file(broken, csv, tmp_path, capsys):
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "model.safetensors", broken, "save the model")


def test_config_json_that_is_not_json_names_the_file(broken, csv, tmp_path, capsys):
    (broken / "config.json").write_text("{not json")
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "config.json", "not valid JSON", "line 1")


def test_tokenizer_json_that_is_not_json_names_the_file(broken, csv, tmp_path, capsys):
    (broken / "tokenizer.json").write_text('{"version": ')
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1, "tokenizer.json")


def test_model_folder_without_weights(broken, csv, tmp_path, capsys):
    (broken / "model.safetensors").unlink()
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "holds no weights", broken, "config.json")


def test_finetune_out_folder_with_damaged_model_is_named(broken, csv, tmp_path, capsys):
    out = tmp_path / "teacher"
    (out / "model").mkdir(parents=True)
    shutil.copytree(broken, out / "model", dirs_exist_ok=True)
    (out / "model" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    refused(["bench", out, "--data", csv, "--out", tmp_path / "b"], capsys, 1, "model.safetensors")


@pytest.fixture
def lamina_folder(tmp_path):
    from lamina.savefmt import save_lamina
    path = tmp_path / "lam"
    save_lamina(lt.tiny_cnn(), path, "factory:lamina.testing:tiny_cnn",
                {"modality": "array", "image_size": None, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                 "in_channels": 3})
    return path


def test_lamina_format_truncated_weights(lamina_folder, tmp_path, capsys):
    w = lamina_folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    refused(["capture", "--model", lamina_folder, "--data", "digits", "--limit", "20", "--out", tmp_path / "o"],
            capsys, 1, "model.safetensors", lamina_folder)


def test_lamina_json_that_is_not_json(lamina_folder, tmp_path, capsys):
    (lamina_folder / "lamina.json").write_text("builder = factory")
    refused(["capture", "--model", lamina_folder, "--data", "digits", "--limit", "20", "--out", tmp_path / "o"],
            capsys, 1, "lamina.json", "not valid JSON")


# ------------------------------------------------------------------ images ----
def test_corrupt_png_is_named_and_skip_bad_files_counts_it(tmp_path, capsys, caplog):
    folder = image_folder(tmp_path / "img", n=16)
    (folder / "cat" / "bad.png").write_bytes(b"not a png")
    good = (folder / "dog" / "0.png").read_bytes()
    (folder / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    refused(["capture", "--model", CNN, "--data", folder, "--out", tmp_path / "o"], capsys, 2,
            "bad.png", "dog/cut.png", "--skip-bad-files")
    assert not (tmp_path / "o" / "features").exists()  # refused before anything was written

    with caplog.at_level(logging.WARNING):
        code, out, err = run(["capture", "--model", CNN, "--data", folder, "--out", tmp_path / "s", "--no-progress",
                              "--skip-bad-files"], capsys)
    assert code == 0, err
    assert "left out 2 unreadable image files of 34" in caplog.text
    man = json.loads((tmp_path / "s" / "features" / "manifest.json").read_text())
    assert man["data"]["n"] == 32 and man["data"]["dropped"] == {"unreadable image": 2}
    assert sorted(man["data"]["dropped_files"]) == ["cat/bad.png", "dog/cut.png"]
    # later stages reload the same rows (the flag is part of the capture's record)
    assert main(["analyze", str(tmp_path / "s"), "--no-progress", "--no-control"]) == 0


def test_image_that_fails_only_when_decoded_is_named_at_read(tmp_path, capsys):
    from lamina import CaptureConfig, capture, load_data
    from lamina.errors import UsageError
    folder = image_folder(tmp_path / "img")
    ds = load_data(str(folder))  # passes the up-front check; the file is damaged afterwards
    (folder / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(UsageError, match="dog/3.png") as e:
        capture(CNN, ds, CaptureConfig(out=str(tmp_path / "o"), progress=False))
    assert "--skip-bad-files" in e.value.cli_text()


def test_image_folder_of_mixed_sizes_is_captured(tmp_path, capsys):
    folder = image_folder(tmp_path / "img", sizes=((16, 16), (20, 12)))
    code, out, err = run(["capture", "--model", CNN, "--data", folder, "--out", tmp_path / "o", "--image-size", "16",
                          "--no-progress"], capsys)
    assert code == 0, err


def test_flat_and_empty_image_folders(tmp_path, capsys):
    flat = tmp_path / "flat"
    image_folder(tmp_path / "tmp")
    flat.mkdir()
    for f in (tmp_path / "tmp" / "cat").iterdir():
        shutil.copy(f, flat / f.name)
    refused(["capture", "--model", CNN, "--data", flat, "--out", tmp_path / "o"], capsys, 2, "no class sub-folders")
    (tmp_path / "empty").mkdir()
    refused(["capture", "--model", CNN, "--data", tmp_path / "empty", "--out", tmp_path / "o"], capsys, 2,
            "no images found")


# ---------------------------------------------------------- output folders ----
def test_capture_out_is_a_file(csv, bert, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    refused(["capture", "--model", bert, "--data", csv, "--out", f], capsys, 2, "--out is a file", f)
    assert f.read_text() == "mine"


def test_capture_resume_with_nothing_to_resume(csv, bert, tmp_path, capsys):
    refused(["capture", "--model", bert, "--data", csv, "--out", tmp_path / "o", "--resume"], capsys, 2,
            "nothing to resume", tmp_path / "o")


def test_read_only_out_capture(csv, bert, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    deny_writes(monkeypatch, out)
    refused(["capture", "--model", bert, "--data", csv, "--out", out, "--no-progress"], capsys, 1,
            "permission denied", out)


def test_read_only_out_finetune(csv, bert, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    deny_writes(monkeypatch, out, errno.EROFS)
    refused(["finetune", "--model", bert, "--data", csv, "--out", out, "--epochs", "1", "--no-progress"], capsys, 1,
            "read-only", out)


def test_read_only_out_prune(scored_run, bert, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    deny_writes(monkeypatch, out)
    refused(["prune", bert, "--scores", scored_run / "scores.json", "--drop-blocks", "0.5", "--out", out], capsys, 1,
            "permission denied", out)


def test_read_only_run_report(scored_run, capsys, monkeypatch):
    deny_writes(monkeypatch, scored_run)
    refused(["report", scored_run], capsys, 1, "permission denied", scored_run)


def test_full_disk_during_capture_says_how_far_and_resume_continues(csv, bert, tmp_path, capsys, monkeypatch):
    from lamina.store.store import StoreWriter
    real, calls = StoreWriter.write_batch, {"n": 0}

    def write_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.root / "layers"))
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_batch", write_batch)
    args = ["capture", "--model", bert, "--data", csv, "--out", tmp_path / "o", "--batch-size", "8", "--no-progress"]
    refused(args, capsys, 1, "2 of 5 batches", "--resume", "no space left")
    monkeypatch.setattr(StoreWriter, "write_batch", real)
    code, out, err = run(args + ["--resume"], capsys)
    assert code == 0, err
    from lamina.store import FeatureStore
    store = FeatureStore.open(tmp_path / "o")
    assert store.n == 40 and not store.verify()


def test_full_disk_elsewhere_is_a_message(scored_run, capsys, monkeypatch):
    deny_writes(monkeypatch, scored_run, errno.ENOSPC)
    refused(["report", scored_run], capsys, 1, "no space left", "MB free")


def test_run_config_json_that_is_not_json(scored_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(scored_run, run)
    (run / "config.json").write_text("{oops")  # lamina's own config.json, damaged
    refused(["analyze", run, "--overwrite", "--no-control"], capsys, 1, "config.json", "not")


# -------------------------------------------------------------------- rows ----
def test_dropped_rows_are_counted_on_screen_and_in_the_record(bert, tmp_path, capsys, caplog):
    texts, labels = lt.tiny_sentences(40)
    df = pd.DataFrame({"text": texts, "label": labels.astype(object)})
    df.loc[[1, 5], "label"] = None
    df.loc[7, "text"] = "   "
    df.loc[9, "text"] = None
    path = tmp_path / "holes.csv"
    df.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        code, out, err = run(["capture", "--model", bert, "--data", path, "--out", tmp_path / "o", "--no-progress"],
                             capsys)
    assert code == 0, err
    assert "left out 4 of 40 rows: 2 with no label, 2 with an empty text" in caplog.text
    man = json.loads((tmp_path / "o" / "features" / "manifest.json").read_text())
    assert man["data"]["n"] == 36 and man["data"]["dropped"] == {"missing label": 2, "empty text": 2}

    code, out, err = run(["finetune", "--model", bert, "--data", path, "--out", tmp_path / "f", "--epochs", "1",
                          "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "f" / "finetune.json").read_text())
    assert rec["data"]["dropped"] == {"missing label": 2, "empty text": 2}


def test_text_column_that_is_all_empty(bert, tmp_path, capsys):
    path = tmp_path / "empty_text.csv"
    pd.DataFrame({"text": [""] * 6, "label": [0, 1] * 3}).to_csv(path, index=False)
    refused(["capture", "--model", bert, "--data", path, "--out", tmp_path / "o"], capsys, 2,
            "every row of empty_text.csv", "6 with an empty text")


def test_limit_zero_means_all_rows_and_is_in_help(bert, csv, tmp_path, capsys):
    for verb in ("capture", "finetune"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "0 or unset: all rows" in " ".join(capsys.readouterr().out.split())
    code, out, err = run(["capture", "--model", bert, "--data", csv, "--out", tmp_path / "o", "--limit", "0",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "features" / "manifest.json").read_text())["data"]["n"] == 40


@pytest.mark.parametrize("verb,limit,need", [("capture", 1, 2), ("finetune", 4, 6)])
def test_limit_too_small_is_a_size_problem(verb, limit, need, bert, csv, tmp_path, capsys):
    flags = ["--model", bert, "--data", csv] if verb in ("capture", "finetune") else []
    err = refused([verb, *flags, "--out", tmp_path / "o", "--limit", limit], capsys, 2,
                  "too small", f"--limit {need}")
    assert "constant" not in err


def test_bench_missing_folder_is_named(tmp_path, capsys):
    refused(["bench", tmp_path / "no-such-model", "--data", "digits"], capsys, 2, "no-such-model")


# ------------------------------------------------------------- data files ----
def _binary_csv(p):
    p.write_bytes(bytes(range(256)) * 4)


def _npz_without_xy(p):
    np.savez(p, a=np.zeros(3))


def _jsonl_bad_line(p):
    p.write_text('{"text": "a fine film", "label": 1}\n{"text": broken\n')


def _empty_csv(p):
    p.write_text("")


def _header_only_csv(p):
    p.write_text("text,label\n")


def _npz_pickled(p):
    np.savez(p, x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))


@pytest.mark.parametrize("name,make,needle", [
    ("bin.csv", _binary_csv, "bin.csv"),
    ("a.npz", _npz_without_xy, "lacks the arrays"),
    ("bad.jsonl", _jsonl_bad_line, "line 2 is not valid JSON"),
    ("empty.csv", _empty_csv, "empty.csv"),
    ("head.csv", _header_only_csv, "head.csv"),
    ("obj.npz", _npz_pickled, "obj.npz"),
    ("data.xyz", lambda p: p.write_text("hi"), "unsupported data file type"),
    ("one.txt", lambda p: p.write_text("hi\n"), "too small"),  # text without labels: one document is not enough
])
def test_bad_data_files(name, make, needle, bert, tmp_path, capsys):
    path = tmp_path / name
    make(path)
    refused(["capture", "--model", bert, "--data", path, "--out", tmp_path / "o"], capsys, 2, needle)


# ------------------------------------------------------ run folders' JSON ----
def test_store_manifest_that_is_not_json(scored_run, tmp_path, capsys):
    run_dir = shutil.copytree(scored_run, tmp_path / "run")
    (run_dir / "features" / "manifest.json").write_text('{"complete": tru')
    refused(["info", run_dir], capsys, 1, "manifest.json is not valid JSON", "line 1")


def test_task_record_that_is_not_json(bert, csv, tmp_path, capsys):
    out = tmp_path / "teacher"
    shutil.copytree(bert, out / "model")
    (out / "finetune.json").write_text("[1, 2")
    refused(["bench", out, "--data", csv, "--out", tmp_path / "b"], capsys, 1, "finetune.json is not valid JSON")


def test_plan_that_is_not_json(tmp_path, capsys):
    from lamina.compress.plan import load_plan
    from lamina.errors import LaminaError
    (tmp_path / "plan.json").write_text("\x00\x01")
    with pytest.raises(LaminaError, match="plan.json is not valid JSON"):
        load_plan(tmp_path)


def test_unknown_model_type_and_odd_config(broken, csv, tmp_path, capsys):
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(cfg | {"model_type": "nosuchmodel", "architectures": ["NoSuch"]}))
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "does not know this model's type", "nosuchmodel")
    (broken / "config.json").write_text("[1, 2]")
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "config.json holds a JSON list")


def test_model_given_as_a_file_points_at_its_folder(bert, csv, tmp_path, capsys):
    refused(["capture", "--model", bert / "model.safetensors", "--data", csv, "--out", tmp_path / "o"], capsys, 2,
            "is a file", f"--model {bert}")


def test_finetune_skip_bad_files_records_the_count(tiny_vit_dir, tmp_path, capsys):
    folder = image_folder(tmp_path / "img", n=12)
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    refused(["finetune", "--model", tiny_vit_dir, "--data", folder, "--out", tmp_path / "f"], capsys, 2,
            "broken.png", "--skip-bad-files")
    code, out, err = run(["finetune", "--model", tiny_vit_dir, "--data", folder, "--out", tmp_path / "f",
                          "--epochs", "1", "--no-progress", "--skip-bad-files"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "f" / "finetune.json").read_text())
    assert rec["data"]["dropped"] == {"unreadable image": 1} and rec["task"]["skip_bad_files"] is True
    assert rec["data"]["n"] == 24


def test_full_disk_inside_a_library_error_is_a_message(scored_run, bert, tmp_path, capsys, monkeypatch):
    """safetensors writes from Rust: a full disk arrives as a SafetensorError carrying 'os error 28'."""
    import importlib

    from safetensors import SafetensorError
    prune_mod = importlib.import_module("lamina.savefmt")  # what save_checked calls to write the model

    def save(lm, dest, source=None, **kw):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{dest}/model.safetensors"')

    monkeypatch.setattr(prune_mod, "save", save)
    out = tmp_path / "p"
    refused(["prune", bert, "--scores", scored_run / "scores.json", "--drop-blocks", "0.5", "--out", out], capsys,
            1, "no space left", f"{out}/model/model.safetensors", "MB free")


def test_weights_of_another_model_are_refused_not_random_initialized(broken, csv, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    save_file({"foo": torch.zeros(2)}, str(broken / "model.safetensors"), metadata={"format": "pt"})
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "do not fit its config", "tensors are missing")
    assert not (tmp_path / "o" / "features").exists()


def test_out_below_a_file_is_a_message(csv, bert, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    refused(["capture", "--model", bert, "--data", csv, "--out", tmp_path / "notes.txt" / "run", "--no-progress"],
            capsys, 1, "not a directory", "notes.txt")


@pytest.mark.parametrize("code,needle", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
                                         (errno.ENOSPC, "no space left"), (errno.EEXIST, "already exists"),
                                         (errno.ENOTDIR, "not a folder")])
def test_os_errors_map_to_messages(code, needle, tmp_path):
    from lamina.files import os_error
    err = os_error(OSError(code, os.strerror(code), str(tmp_path / "x")), resumable=True)
    assert needle in err.what and str(tmp_path / "x") in err.what and err.exit_code == 1
    assert ("--resume" in err.fix) == (code == errno.ENOSPC)
    assert os_error(OSError(errno.ENOENT, "gone", "y")) is None and os_error(ValueError("no")) is None


def test_truncated_pytorch_model_bin_is_named(broken, csv, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(str(broken / "model.safetensors")), broken / "pytorch_model.bin")
    (broken / "model.safetensors").unlink()
    b = (broken / "pytorch_model.bin").read_bytes()
    (broken / "pytorch_model.bin").write_bytes(b[: len(b) // 2])
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "cannot be loaded", "pytorch_model.bin", broken)


def test_data_folder_holding_a_table_points_at_the_file(csv, bert, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(csv, folder / "s.csv")
    refused(["capture", "--model", bert, "--data", folder, "--out", tmp_path / "o"], capsys, 2,
            f"--data {folder / 's.csv'}")


def test_lamina_format_without_weights(lamina_folder, tmp_path, capsys):
    (lamina_folder / "model.safetensors").unlink()
    refused(["capture", "--model", lamina_folder, "--data", "digits", "--limit", "20", "--out", tmp_path / "o"],
            capsys, 1, "holds no weights", "next to lamina.json")


def test_interrupt_hint_matches_the_verb(scored_run, capsys, monkeypatch):
    import importlib
    rep = importlib.import_module("lamina.report")

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rep, "report", stop)
    assert main(["report", str(scored_run)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


def test_sharded_weights_with_a_missing_shard(broken, csv, tmp_path, capsys):
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
                                        "pooler.dense.bias": "model-00002-of-00002.safetensors"}}))
    refused(["capture", "--model", broken, "--data", csv, "--out", tmp_path / "o"], capsys, 1,
            "model.safetensors.index.json", "model-00002-of-00002.safetensors")


def test_small_limit_that_keeps_two_classes_still_works(tmp_path, capsys):
    """--limit 8 on 10-class digits keeps 8 classes: enough for capture (a quick look), so not refused."""
    code, out, err = run(["capture", "--model", CNN, "--data", "digits", "--limit", "8", "--out", tmp_path / "o",
                          "--no-progress"], capsys)
    assert code == 0, err
