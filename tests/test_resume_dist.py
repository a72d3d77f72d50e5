"""A killed capture resumes to the same bytes; two ranks write the same store as one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lamina import CaptureConfig, FeatureStore, capture
from lamina import testing as lt

from conftest import _free_port


@pytest.fixture
def images_npz(tmp_path):
    ds = lt.tiny_image_dataset(40, size=16)
    path = tmp_path / "imgs.npz"
    np.savez(path, x=ds.inputs, y=ds.labels)
    return path


def _env(threads=1, tmp=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(Path(__file__).parents[1]))
    if tmp is not None:  # torchrun's agent leaves a torchelastic_* folder in the temp dir: keep it in the test's own
        env["TMPDIR"] = str(tmp)
    return env


def _checksums(out):
    man = json.loads((Path(out) / "features" / "manifest.json").read_text())
    assert man["complete"]
    return man["checksums"]


def test_resume_after_kill_is_bit_identical(tmp_path, images_npz):
    args = ["--data", str(images_npz), "--batch-size", "4", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "capture", "--model", "lamina.testing:slow_tiny_cnn",
                             "--out", str(killed), *args], env=_env(), stderr=subprocess.PIPE)
    progress = killed / "features" / "progress" / "rank0.txt"
    deadline = time.time() + 60
    while time.time() < deadline:
        if progress.exists() and len(progress.read_text().split()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(progress.read_text().split())
    assert 3 <= written < 10, "the capture must be killed halfway"
    with pytest.raises(Exception, match="incomplete"):
        FeatureStore.open(killed)
    res = capture("lamina.testing:tiny_cnn", str(images_npz),
                  CaptureConfig(out=str(killed), batch_size=4, resume=True, progress=False))
    assert res.resumed and res.batches_run == 10 - written
    whole = tmp_path / "whole"
    capture("lamina.testing:tiny_cnn", str(images_npz), CaptureConfig(out=str(whole), batch_size=4, progress=False))
    assert _checksums(killed) == _checksums(whole)
    assert FeatureStore.open(killed).verify() == []


def test_resume_of_complete_store_does_nothing(tmp_path, images_npz):
    cfg = CaptureConfig(out=str(tmp_path), batch_size=8, progress=False)
    capture("lamina.testing:tiny_cnn", str(images_npz), cfg)
    res = capture("lamina.testing:tiny_cnn", str(images_npz),
                  CaptureConfig(out=str(tmp_path), batch_size=8, resume=True, progress=False))
    assert res.batches_run == 0


@pytest.mark.parametrize("model", ["lamina.testing:tiny_cnn", "bert"])
def test_two_ranks_equal_one(tmp_path, images_npz, text_csv, tiny_dirs, model):
    if model == "bert":
        model, data = str(tiny_dirs["bert"]), str(text_csv)
    else:
        data = str(images_npz)
    common = ["capture", "--model", model, "--data", data, "--batch-size", "4", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "lamina", *common, "--out", str(tmp_path / "one")],
                         env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), "-m", "lamina", *common,
                          "--out", str(tmp_path / "two")], env=_env(tmp=tmp_path), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _checksums(tmp_path / "one") == _checksums(tmp_path / "two")
