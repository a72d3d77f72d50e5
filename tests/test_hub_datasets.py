"""Models by Hub id and data from `datasets`, without a network: hub-layout caches built here."""

import hashlib
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from lamina import CaptureConfig, FeatureStore, UsageError, capture, load_data
from lamina import testing as lt
from lamina.cli import main
from lamina.models import load_model
from lamina.runtime import Runtime

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_repo(cache, repo_id: str, files: dict, kind: str = "models") -> None:
    """The layout huggingface_hub writes: blobs by sha256, snapshots/<commit>/ links to them, refs/main."""
    root = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / name).parent), snap / name)
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def hub_cache(tmp_path, tiny_dirs, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    src = tiny_dirs["llama"]
    _hub_repo(cache, "acme/tiny-llama", {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # conftest: no network in tests
    return cache


def test_hub_id_resolves_from_the_cache(hub_cache, tiny_dirs, text_csv, tmp_path):
    lm = load_model("acme/tiny-llama", runtime=Runtime(device="cpu"))
    ref = load_model(str(tiny_dirs["llama"]))
    assert lm.fingerprint() == ref.fingerprint() and lm.name == "acme/tiny-llama"
    assert load_model(f"acme/tiny-llama@{COMMIT}").fingerprint() == ref.fingerprint()
    # through the CLI, and the features equal those of the same model from its folder
    assert main(["capture", "--model", "acme/tiny-llama", "--data", str(text_csv), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    capture(str(tiny_dirs["llama"]), str(text_csv), CaptureConfig(out=str(tmp_path / "b"), progress=False))
    a, b = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")
    assert a.manifest["model_spec"] == "acme/tiny-llama"
    for name in a.layers:
        np.testing.assert_array_equal(a.load(name), b.load(name))


def test_hub_id_not_cached_offline_is_a_clear_message(hub_cache, text_csv, tmp_path, capsys):
    for spec in ("acme/not-there", "acme/tiny-llama@v9"):
        with pytest.raises(UsageError) as e:
            load_model(spec)
        msg = e.value.cli_text()
        assert "no network and not in the cache" in msg and spec in msg and "download it once" in msg
    rc = main(["capture", "--model", "acme/not-there", "--data", str(text_csv), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "no network and not in the cache" in err and "Traceback" not in err


def test_remote_code_needs_trust_remote_code(hub_cache, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PretrainedConfig\n" \
           "class AcmeConfig(PretrainedConfig):\n    model_type = 'acme-custom'\n"
    cfg = {"model_type": "acme-custom", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"},
           "architectures": ["AcmeModel"]}
    _hub_repo(hub_cache, "acme/custom", {"config.json": json.dumps(cfg).encode(),
                                         "configuration_acme.py": code.encode()})
    with pytest.raises(UsageError, match="trust.remote.code"):
        load_model("acme/custom")
    assert not marker.exists()  # the repository's code never ran


# ------------------------------------------------------------------------------------------ datasets

@pytest.fixture
def saved_dict(tmp_path):
    import datasets
    texts, labels = lt.tiny_sentences(40, seed=2)
    feats = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    train = datasets.Dataset.from_dict({"sentence": texts, "idx": list(range(40)), "label": labels},
                                       features=feats)
    test = datasets.Dataset.from_dict({"sentence": texts[:4], "idx": list(range(4)), "label": [-1] * 4},
                                      features=feats)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "single"))
    return tmp_path / "dd", texts, labels


def test_save_to_disk_folders(saved_dict, tmp_path):
    path, texts, labels = saved_dict
    ds = load_data(f"{path}:train")
    assert ds.kind == "text" and ds.inputs == texts and ds.labels.tolist() == list(labels)
    assert ds.classes == ["negative", "positive"]  # ClassLabel names, in their order
    assert ds.meta == {"text_column": "sentence", "label_column": "label"}
    single = load_data(str(tmp_path / "single"))
    assert single.inputs == texts and single.classes == ds.classes
    named = load_data(f"{path}:train", text_column="sentence", label_column="label")
    assert named.inputs == texts


def test_save_to_disk_messages(saved_dict, tmp_path):
    path, _, _ = saved_dict
    with pytest.raises(UsageError, match="several splits") as e:
        load_data(str(path))
    assert "train, test" in e.value.cli_text()
    with pytest.raises(UsageError, match="no such split") as e:
        load_data(f"{path}:validation")
    assert "train, test" in e.value.cli_text()
    with pytest.raises(UsageError, match="no labelled rows"):
        load_data(f"{path}:test")
    with pytest.raises(UsageError, match="text column") as e:
        load_data(f"{path}:train", text_column="review")
    assert "sentence, idx" in e.value.cli_text()
    with pytest.raises(UsageError, match="label column") as e:
        load_data(f"{path}:train", label_column="y")
    with pytest.raises(UsageError, match="single split"):
        load_data(f"{tmp_path / 'single'}:train")


def test_capture_and_finetune_read_a_saved_dataset(saved_dict, tiny_dirs, tmp_path):
    path, texts, _ = saved_dict
    rc = main(["capture", "--model", str(tiny_dirs["bert"]), "--data", f"{path}:train", "--out",
               str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    store = FeatureStore.open(tmp_path / "run")
    assert len(store.ids) == len(texts) and store.manifest["data"]["classes"] == ["negative", "positive"]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """A Hub dataset as `datasets` caches it after one download: HF_DATASETS_CACHE/acme___reviews/default/..."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet
    texts, labels = lt.tiny_sentences(30, seed=4)
    pq = tmp_path / "train.parquet"
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(pq)
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="reviews", data_files={"train": str(pq)},
                      hash=COMMIT)
    builder.download_and_prepare()
    cache = tmp_path / "datasets"
    dest = cache / "acme___reviews" / "default" / "0.0.0" / COMMIT
    dest.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, dest)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return texts, labels


def test_hub_dataset_from_the_cache(datasets_cache):
    texts, labels = datasets_cache
    ds = load_data("acme/reviews:train")
    assert ds.inputs == texts and ds.labels.tolist() == list(labels) and ds.classes == ["0", "1"]
    with pytest.raises(UsageError, match="no such split") as e:
        load_data("acme/reviews:validation")
    assert "train" in e.value.cli_text()


def test_hub_dataset_not_cached_offline(datasets_cache, capsys, tiny_dirs, tmp_path):
    for spec in ("rotten_tomatoes:train", "glue/sst2:validation"):
        with pytest.raises(UsageError) as e:
            load_data(spec)
        assert "no network and not in the cache" in e.value.cli_text() and spec in e.value.cli_text()
    rc = main(["capture", "--model", str(tiny_dirs["bert"]), "--data", "rotten_tomatoes:train", "--out",
               str(tmp_path / "r")])
    assert rc == 2 and "no network and not in the cache" in capsys.readouterr().err


def test_image_column(tmp_path):
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(6)]
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    datasets.Dataset.from_dict({"img": imgs, "label": [0, 1] * 3}, features=feats).save_to_disk(str(tmp_path / "im"))
    ds = load_data(str(tmp_path / "im"))
    assert ds.kind == "image" and ds.classes == ["cat", "dog"]
    x = ds.images([0, 1])
    assert x.shape == (2, 3, 12, 12)
    np.testing.assert_allclose(x[0], np.asarray(imgs[0]).transpose(2, 0, 1) / 255.0, atol=1e-6)
