"""Loaders, subsampling and the bad-input messages of the data layer."""

import numpy as np
import pandas as pd
import pytest

from lamina import UsageError
from lamina import testing as lt
from lamina.data import check_labels, load_data, subsample


def test_table_formats_and_columns(tmp_path, text_csv):
    ds = load_data(text_csv, text_column="review", label_column="sentiment")
    assert ds.kind == "text" and len(ds) == 40 and ds.classes == ["neg", "pos"]
    df = pd.read_csv(text_csv)
    df.to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "r.parquet")
    for p in ("r.jsonl", "r.parquet"):
        other = load_data(tmp_path / p, "review", "sentiment")
        assert other.inputs == ds.inputs and (other.labels == ds.labels).all()


def test_unknown_column_lists_columns(text_csv, tmp_path):
    with pytest.raises(UsageError) as e:
        load_data(text_csv, text_column="reveiw", label_column="sentiment")
    assert "review, sentiment" in str(e.value) and "did you mean 'review'" in str(e.value)
    assert load_data(text_csv).meta == {"text_column": "review", "label_column": "sentiment"}  # guessed
    odd = tmp_path / "odd.csv"
    pd.DataFrame({"words": ["a b", "c"], "verdict": [0, 1]}).to_csv(odd, index=False)
    with pytest.raises(UsageError, match="could not guess the text column"):
        load_data(odd)


def test_constant_label_column(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "x"]}).to_csv(path, index=False)
    with pytest.raises(UsageError, match="constant"):
        check_labels(load_data(path))


def test_empty_dataset(tmp_path):
    path = tmp_path / "e.csv"
    pd.DataFrame({"text": [], "label": []}).to_csv(path, index=False)
    with pytest.raises(UsageError, match="empty"):
        check_labels(load_data(path))


def test_image_folder_and_npz(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    ds = load_data(tmp_path / "imgs")
    assert ds.kind == "image" and ds.classes == ["cat", "dog"] and len(ds) == 6
    assert ds.images([0, 4]).shape == (2, 3, 10, 12)
    np.savez(tmp_path / "a.npz", x=np.random.rand(6, 5).astype(np.float32), y=[0, 1, 2, 0, 1, 2])
    arr = load_data(tmp_path / "a.npz")
    assert arr.kind == "array" and arr.classes == ["0", "1", "2"]
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    with pytest.raises(UsageError, match="'x'"):
        load_data(tmp_path / "bad.npz")


def test_unknown_names_suggest():
    with pytest.raises(UsageError, match="did you mean 'rotten-tomatoes'"):
        load_data("rotten-tomatos")


def test_subsample_stratified_deterministic():
    ds = lt.tiny_image_dataset(100, classes=4)
    a, b = subsample(ds, 20, seed=1), subsample(ds, 20, seed=1)
    assert list(a.ids) == list(b.ids)
    assert np.bincount(a.labels).tolist() == [5, 5, 5, 5]
    assert list(subsample(ds, 20, seed=2).ids) != list(a.ids)
    assert (np.diff(a.ids.astype(int)) > 0).all()  # original order kept
    with pytest.raises(UsageError, match="larger than the dataset"):
        subsample(ds, 101)


def test_subsample_keeps_rare_classes():
    ds = lt.tiny_image_dataset(10, classes=2).take([0, 2, 4, 6, 8, 1])  # 5 of class 0, 1 of class 1
    small = subsample(ds, 3)
    assert sorted(np.bincount(small.labels).tolist()) == [1, 2]


@pytest.mark.assets
def test_bundled_sets_load():
    rt = load_data("rotten-tomatoes")
    assert len(rt) == 12808 and rt.classes == ["rotten", "fresh"] and np.bincount(rt.labels).tolist() == [5405, 7403]
    mn = load_data("mnist-5k")
    assert mn.inputs.shape == (5000, 28, 28) and np.bincount(mn.labels).tolist() == [500] * 10
    dg = load_data("digits")
    assert len(dg) == 1797 and dg.images([0]).shape == (1, 1, 8, 8)


def test_column_options_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(UsageError, match="fixed columns"):
        load_data("digits", text_column="txt")
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 3)), y=[0, 1, 0, 1])
    with pytest.raises(UsageError, match="table files only"):
        load_data(tmp_path / "a.npz", label_column="y")
