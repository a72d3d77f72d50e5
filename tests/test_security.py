"""Issue 11, security items 1-4: every file read from a run or model folder is untrusted input.

Each payload only writes a marker file; every test asserts the marker is absent and the refusal is a
message (exit 1 or 2, no traceback).
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lamina
from lamina import LaminaError, UsageError
from lamina import testing as lt
from lamina.checkpoint import load_checkpoint, save_checkpoint
from lamina.cli import main
from lamina.finetune import FinetuneConfig, finetune
from lamina.savefmt import save_lamina
from lamina.store import FeatureStore
from conftest import die_in_epoch

ROOT = Path(__file__).resolve().parents[1]


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code, err, *needles, exit_code=1):
    assert code == exit_code, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


class Payload:
    """Unpickling this touches ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ---------------------------------------------------------------- 1. checkpoints: tensors and plain data only

def _cut_finetune(tmp_path, tiny_dirs, sentences_csv, monkeypatch) -> tuple[Path, list]:
    out = tmp_path / "cut"
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_dirs["bert"]), str(sentences_csv), FinetuneConfig(
            out=str(out), full=True, epochs=3, lr=3e-3, batch_size=16, patience=2, progress=False))
    restore()
    args = ["finetune", "--model", tiny_dirs["bert"], "--data", sentences_csv, "--out", out, "--full",
            "--epochs", "3", "--lr", "3e-3", "--batch-size", "16", "--no-progress", "--resume"]
    return out, args


def test_a_crafted_checkpoint_is_refused_on_resume(tmp_path, tiny_dirs, sentences_csv, monkeypatch, capsys):
    out, args = _cut_finetune(tmp_path, tiny_dirs, sentences_csv, monkeypatch)
    meta = json.loads((out / "checkpoint.json").read_text())
    tensors = out / meta["tensors"]
    marker = tmp_path / "pwned"
    # a pickle where the tensors were, its size and sha256 recorded so only the format can refuse it
    blob = pickle.dumps(Payload(marker))
    tensors.write_bytes(blob)
    import hashlib
    meta.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (out / "checkpoint.json").write_text(json.dumps(meta))
    (out / "checkpoint.pt").write_bytes(blob)  # the old format's name: never read
    code, _, err = run(args, capsys)
    refused(code, err, "checkpoint cannot be resumed", "without --resume")
    assert not marker.exists()
    # the pickle alone (no checkpoint.json) is not a checkpoint at all
    (out / "checkpoint.json").unlink()
    code, _, err = run(args, capsys)
    refused(code, err, "nothing to resume", exit_code=2)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "escape", "modules"])
def test_a_damaged_checkpoint_is_refused_and_an_intact_one_resumes(tmp_path, damage):
    def model():
        n = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        n[1].weight = n[0].weight  # tied: one storage under two names, as tied embeddings are
        return n

    torch.manual_seed(0)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    net(torch.ones(3, 4)).sum().backward()
    opt.step()
    sched.step()
    hist = {"epochs": [{"val_loss": float("nan"), "val_accuracy": 0.5}], "best_epoch": 1}
    best = {"net": {k: v.clone() for k, v in net.state_dict().items()}}
    save_checkpoint(tmp_path, 0, {"net": net}, opt, sched, hist, best, {"loop": {"lr": 1e-2}})
    # strict JSON: the NaN in the history is tagged, not a bare NaN
    json.loads((tmp_path / "checkpoint.json").read_text(), parse_constant=lambda c: pytest.fail(c))

    def fresh():
        n2 = model()
        o2 = torch.optim.AdamW(n2.parameters(), lr=1e-2)
        return n2, o2, torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 1.0 / (s + 1))

    n2, o2, s2 = fresh()
    h2, b2, epoch = load_checkpoint(tmp_path, {"net": n2}, o2, s2)
    assert epoch == 0 and np.isnan(h2["epochs"][0]["val_loss"]) and s2.last_epoch == sched.last_epoch
    for k, v in net.state_dict().items():
        assert torch.equal(n2.state_dict()[k], v) and torch.equal(b2["net"][k], v)
    for p, q in zip(opt.state_dict()["state"].values(), o2.state_dict()["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)

    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    tensors = tmp_path / meta["tensors"]
    if damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-8])
    elif damage == "json":
        (tmp_path / "checkpoint.json").write_text("{not json")
    elif damage == "escape":
        meta["tensors"] = "../victim.safetensors"
        (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    else:
        meta["index"]["modules"] = {"other": []}
        (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    n3, o3, s3 = fresh()
    with pytest.raises(LaminaError, match="checkpoint cannot be resumed") as e:
        load_checkpoint(tmp_path, {"net": n3}, o3, s3)
    assert "--resume" in e.value.cli_text()


# ---------------------------------------------------------------- 2. no code imported because a file names it

FACTORY_SRC = """
import pathlib
pathlib.Path({marker!r}).touch()
from lamina.testing import tiny_cnn as build
"""


def _factory_folder(tmp_path, modname):
    """A lamina-format model folder whose lamina.json names ``modname:build``, with that module beside it
    (a downloaded folder that brings its own code): importing the module touches a marker."""
    folder = tmp_path / "downloaded"
    marker = tmp_path / f"{modname}-imported"
    save_lamina(lt.tiny_cnn(), folder, f"factory:{modname}:build", {"modality": "array"})
    (folder / f"{modname}.py").write_text(FACTORY_SRC.format(marker=str(marker)))
    return folder, marker


def test_a_saved_factory_is_not_imported_unless_the_user_names_it(tmp_path, monkeypatch, capsys):
    folder, marker = _factory_folder(tmp_path, "evil_factory_a")
    monkeypatch.syspath_prepend(str(folder))  # even importable, it is not imported
    monkeypatch.chdir(folder)
    with pytest.raises(UsageError) as e:
        lamina.load(folder)
    msg = e.value.cli_text()
    assert not marker.exists()
    assert "evil_factory_a:build" in msg and "--trust-code" in msg and "PYTHONPATH" not in msg
    code, _, err = run(["capture", "--model", folder, "--data", "digits", "--limit", "20", "--out",
                        tmp_path / "run", "--no-progress"], capsys)
    refused(code, err, "imports code only when you name it", exit_code=2)
    assert "PYTHONPATH" not in err and not marker.exists()
    # another factory named by the user does not unlock this one
    with pytest.raises(UsageError, match="you named 'lamina.testing:tiny_cnn'"):
        lamina.load(folder, factory="lamina.testing:tiny_cnn")
    assert not marker.exists()
    # naming the same factory (API or module:function@FOLDER) is consent: it builds and loads exactly
    net = lamina.load(folder, factory="evil_factory_a:build")
    assert marker.exists()
    x = torch.randn(2, 3, 16, 16)
    ref = lt.tiny_cnn().eval()
    from safetensors.torch import load_model as st_load
    st_load(ref, str(folder / "model.safetensors"))
    assert torch.equal(net(x), ref(x))


def test_trust_code_flag_and_at_form(tmp_path, monkeypatch, capsys):
    folder, marker = _factory_folder(tmp_path, "evil_factory_b")
    monkeypatch.syspath_prepend(str(folder))
    base = ["capture", "--data", "digits", "--limit", "20", "--image-size", "16", "--no-progress"]
    code, _, err = run(base + ["--model", folder, "--out", tmp_path / "r0"], capsys)
    refused(code, err, "--trust-code", exit_code=2)
    assert not marker.exists()
    code, _, err = run(base + ["--model", folder, "--out", tmp_path / "r1", "--trust-code"], capsys)
    assert code == 0, err
    assert marker.exists()
    marker.unlink()
    code, _, err = run(base + ["--model", f"evil_factory_b:build@{folder}", "--out", tmp_path / "r2"], capsys)
    assert code == 0, err
    assert (tmp_path / "r2" / "features" / "manifest.json").exists()


def test_python_m_lamina_inside_a_downloaded_folder_imports_nothing_from_it(tmp_path):
    folder, marker = _factory_folder(tmp_path, "evil_factory_c")
    # a module shadowing a library lamina imports later, too
    (folder / "safetensors.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "lamina", "capture", "--model", ".", "--data", "digits", "--limit",
                        "20", "--out", str(tmp_path / "run"), "--no-progress"], cwd=folder, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "imports code only when you name it" in r.stderr and "Traceback" not in r.stderr
    assert "PYTHONPATH" not in r.stderr
    assert not marker.exists()


def test_a_store_manifest_naming_a_factory_is_not_imported_by_analyze(cnn_run, tmp_path, monkeypatch, capsys):
    """analyze reloads the captured model (control, importance) from the manifest's model_spec: a downloaded
    run whose manifest names a module:function must not make lamina import it."""
    marker = tmp_path / "evil_factory_d-imported"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "evil_factory_d.py").write_text(FACTORY_SRC.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(code_dir))
    monkeypatch.chdir(code_dir)
    path = cnn_run / "features" / "manifest.json"
    man = json.loads(path.read_text())
    man["model_spec"] = "evil_factory_d:build"
    path.write_text(json.dumps(man))
    code, _, err = run(["analyze", cnn_run, "--no-progress"], capsys)
    refused(code, err, "evil_factory_d:build", "imports code only when you name it", "--trust-code", exit_code=2)
    assert not marker.exists()
    code, _, err = run(["analyze", cnn_run, "--no-progress", "--no-control", "--no-importance"], capsys)
    assert code == 0, err  # nothing to reload: the store alone is analyzed
    assert not marker.exists()


@pytest.mark.parametrize("builder", ["hf:PretrainedConfig", "hf:os.system", "hf:AutoModel", "hf:__class__"])
def test_hf_builder_names_only_model_classes_of_transformers(tmp_path, builder):
    folder = tmp_path / "m"
    save_lamina(lt.tiny_cnn(), folder, "factory:lamina.testing:tiny_cnn", {"modality": "array"})
    spec = json.loads((folder / "lamina.json").read_text())
    spec["builder"] = builder
    (folder / "lamina.json").write_text(json.dumps(spec))
    with pytest.raises(LaminaError, match="not a model class of the installed transformers"):
        lamina.load(folder)


# ---------------------------------------------------------------- 3. no path out of a folder

@pytest.fixture
def cnn_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(["capture", "--model", "lamina.testing:tiny_cnn", "--data", "digits", "--limit", "200",
                        "--image-size", "16", "--out", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    return run_dir


def _layer(run_dir, i=0):
    man = json.loads((run_dir / "features" / "manifest.json").read_text())
    name = list(man["layers"])[i]
    return man, name, run_dir / "features" / man["layers"][name]["file"]


def test_a_manifest_path_out_of_the_store_is_refused(cnn_run, tmp_path, capsys):
    man, name, path = _layer(cnn_run)
    victim = tmp_path / "victim.npy"
    np.save(victim, np.zeros(man["layers"][name]["shape"], np.float32))
    before = victim.read_bytes()
    man["layers"][name]["file"] = "../../victim.npy"
    man["checksums"]["../../victim.npy"] = man["checksums"].pop(f"layers/{path.name}")
    (cnn_run / "features" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(LaminaError, match="points outside its folder") as e:
        FeatureStore.open(cnn_run)
    assert "../../victim.npy" in e.value.cli_text() and name in e.value.cli_text()
    code, _, err = run(["analyze", cnn_run, "--no-control", "--no-importance", "--no-progress"], capsys)
    refused(code, err, "points outside its folder")
    # an interrupted store being resumed: refused before anything is written
    man["complete"] = False
    del man["checksums"]
    (cnn_run / "features" / "manifest.json").write_text(json.dumps(man))
    code, _, err = run(["capture", "--model", "lamina.testing:tiny_cnn", "--data", "digits", "--limit", "200",
                        "--image-size", "16", "--out", cnn_run, "--no-progress", "--resume"], capsys)
    refused(code, err, "points outside its folder")
    assert victim.read_bytes() == before


@pytest.mark.parametrize("where", ["layer", "labels", "features"])
def test_a_symlink_out_of_the_store_is_refused(cnn_run, tmp_path, where):
    _, _, path = _layer(cnn_run)
    feats = cnn_run / "features"
    target = {"layer": path, "labels": feats / "labels.npy", "features": feats}[where]
    outside = tmp_path / f"outside-{where}"
    os.replace(target, outside)
    target.symlink_to(outside, target_is_directory=target is feats)
    with pytest.raises(LaminaError, match="points outside its folder"):
        FeatureStore.open(cnn_run)


def test_a_model_folder_with_a_symlink_out_is_refused(tmp_path):
    folder = tmp_path / "m"
    save_lamina(lt.tiny_cnn(), folder, "factory:lamina.testing:tiny_cnn", {"modality": "array"})
    os.replace(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(LaminaError, match="points outside its folder"):
        lamina.load(folder)
    out = tmp_path / "out"  # an OUT folder whose model/ leads elsewhere
    out.mkdir()
    (out / "model").symlink_to(tmp_path / "m", target_is_directory=True)
    with pytest.raises(LaminaError, match="points outside its folder"):
        lamina.load(out)


def test_a_hugging_face_shard_index_naming_a_file_outside_is_refused(tmp_path, tiny_dirs):
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dirs["bert"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "../../victim.safetensors"}}))
    with pytest.raises(LaminaError, match="points outside its folder") as e:
        lamina.load(folder)
    assert "weight_map" in str(e.value) and "../../victim.safetensors" in str(e.value)


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs_only(tmp_path):
    from lamina.trust import check_folder
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "1").write_text("{}")
    (repo / "blobs" / "2").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    (repo / "blobs" / "3").write_bytes(b"x")
    for name, blob in (("config.json", "1"), ("model.safetensors.index.json", "2"), ("model-1.safetensors", "3")):
        (snap / name).symlink_to(Path("../../blobs") / blob)
    check_folder(snap)  # the cache's own layout is accepted
    (tmp_path / "secret").write_text("x")
    (snap / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(LaminaError, match="points outside its folder"):
        check_folder(snap)


# ---------------------------------------------------------------- 4. sizes on open, checksums on read

def test_plausible_floats_written_into_a_layer_are_caught(cnn_run, capsys):
    _, name, path = _layer(cnn_run, 1)
    rng = np.random.default_rng(0)
    assert path.stat().st_size > 4096 + 256
    with open(path, "r+b") as f:  # 4 KiB of floats like the ones there, inside the data (size unchanged)
        f.seek(256)
        f.write(rng.normal(0, 1, 1024).astype(np.float32).tobytes())
    store = FeatureStore.open(cnn_run)  # the size is right: opening is cheap and succeeds
    with pytest.raises(LaminaError, match="does not match its checksum") as e:
        store.load(name)
    assert name in e.value.cli_text() and "--overwrite" in e.value.cli_text()
    with pytest.raises(LaminaError, match="does not match its checksum"):
        store.load(name, mmap=False)
    with pytest.raises(LaminaError, match="does not match its checksum"):
        store.read_rows(name, [0, 1])
    code, _, err = run(["analyze", cnn_run, "--no-control", "--no-importance", "--no-progress"], capsys)
    refused(code, err, f"layer {name!r}", "does not match its checksum", "--overwrite")
    assert not (cnn_run / "scores.json").exists()
    code, _, err = run(["compare", cnn_run, cnn_run, "--out", cnn_run / "cmp.json"], capsys)
    refused(code, err, "does not match its checksum")


def test_intact_layers_load_the_same_verified(cnn_run):
    store = FeatureStore.open(cnn_run)
    for name in store.layers:
        mm = store.load(name)
        assert np.array_equal(mm, store.load(name, mmap=False))
        assert np.array_equal(store.read_rows(name, [5, 2, 3]), np.asarray(mm)[[5, 2, 3]])
    assert len(store.labels) == store.n == len(store.ids)


@pytest.mark.parametrize("damage", ["truncate", "missing", "longer", "labels"])
def test_truncated_or_missing_files_name_the_layer(cnn_run, capsys, damage):
    _, name, path = _layer(cnn_run, 2)
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        path.unlink()
    elif damage == "longer":
        with open(path, "ab") as f:
            f.write(b"\0" * 64)
    else:
        path = cnn_run / "features" / "labels.npy"
        path.write_bytes(path.read_bytes()[:-8])
    want = {"truncate": "truncated", "missing": "missing its file", "longer": "longer than recorded",
            "labels": "the labels of the store is truncated"}[damage]
    with pytest.raises(LaminaError, match=want) as e:
        FeatureStore.open(cnn_run)
    if damage != "labels":
        assert f"layer {name!r}" in e.value.cli_text()
    code, _, err = run(["info", cnn_run], capsys)
    refused(code, err, want)
