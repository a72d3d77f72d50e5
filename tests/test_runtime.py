"""--device / --torch-dtype: resolution, loading straight in the dtype, capture in bfloat16, training
under autocast, out-of-memory messages, and the flags on every model-running stage."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from lamina import CaptureConfig, FeatureStore, LaminaError, UsageError, capture
from lamina import testing as lt
from lamina.capture.hooks import pool
from lamina.cli import build_parser, main
from lamina.models import load_model
from lamina.runtime import Runtime, describe, oom_message, resolve_device, resolve_dtype


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA or MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("lamina.runtime._mps_available", lambda: False)


def test_resolve_device(no_gpu, monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(UsageError) as e:
            resolve_device(spec)
        assert "no CUDA device on this machine" in e.value.cli_text() and "--device cpu" in e.value.cli_text()
    with pytest.raises(UsageError, match="no MPS"):
        resolve_device("mps")
    with pytest.raises(UsageError, match="unknown (--)?device"):
        resolve_device("gpu")
    # under torchrun with CUDA, each rank takes its LOCAL_RANK GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_device("auto") == torch.device("cuda", 2) == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="does not exist"):
        resolve_device("cuda:7")


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("auto", None) is torch.float32
    assert resolve_dtype("float16", torch.bfloat16) is torch.float16
    with pytest.raises(UsageError, match="unknown (--torch-dtype|torch_dtype)"):
        resolve_dtype("fp8")
    d = describe(torch.device("cpu"), torch.bfloat16)
    assert d["device"] == "cpu" and d["dtype"] == "bfloat16" and d["device_name"]


def test_cuda_on_a_machine_without_one_is_a_usage_error(no_gpu, tiny_dirs, text_csv, tmp_path, capsys):
    rc = main(["capture", "--model", str(tiny_dirs["bert"]), "--data", str(text_csv), "--out", str(tmp_path / "r"),
               "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA device on this machine" in err and "--device cpu" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_every_model_running_stage_has_the_runtime_flags():
    from lamina import AnalyzeConfig, BenchConfig, DistillConfig, FinetuneConfig, PruneConfig
    for cls in (CaptureConfig, AnalyzeConfig, FinetuneConfig, PruneConfig, DistillConfig, BenchConfig):
        assert issubclass(cls, Runtime)
        f = {x.name: x for x in dataclasses.fields(cls)}
        assert f["device"].metadata is dataclasses.fields(Runtime)[0].metadata  # one definition, shared
    sub = build_parser()._subparsers._group_actions[0].choices
    for verb in ("capture", "analyze", "finetune", "prune", "distill", "bench"):
        flags = {o for a in sub[verb]._actions for o in a.option_strings}
        assert {"--device", "--torch-dtype", "--trust-remote-code"} <= flags, verb


def _rows(tiny_dirs, tmp_path, arch="llama", n=24):
    texts, labels = lt.tiny_sentences(n, seed=1)
    csv = tmp_path / "s.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    return csv


def _reference(path, dtype, csv, max_length=128):
    """Mean-pooled output_hidden_states of a model loaded by transformers itself in ``dtype``."""
    from transformers import AutoModel, AutoTokenizer
    m = AutoModel.from_pretrained(path, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = pd.read_csv(csv)["text"].tolist()
    b = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hs = m(**b, output_hidden_states=True).hidden_states
    return [pool(h.float(), "mean", b["attention_mask"]).numpy() for h in hs]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_bfloat16_capture_matches_a_bfloat16_reference_and_float32_is_exact(arch, tiny_dirs, tmp_path):
    csv = _rows(tiny_dirs, tmp_path)
    path = str(tiny_dirs[arch])
    stores = {}
    for dt in ("float32", "bfloat16"):
        capture(path, str(csv), CaptureConfig(out=str(tmp_path / dt), batch_size=64, progress=False, device="cpu",
                                              torch_dtype=dt))
        stores[dt] = FeatureStore.open(tmp_path / dt)
    layers = stores["float32"].layers
    n_blocks = sum(n.startswith("blocks.") for n in layers)
    # HF's hidden states: the embeddings, then each block's output; a decoder's last one is after its
    # final norm, which lamina records as 'final_norm' (its last block is read before it)
    refs = {"embed": 0, **{f"blocks.{i}": i + 1 for i in range(n_blocks)}}
    if "final_norm" in layers:
        refs[f"blocks.{n_blocks - 1}"] = None
        refs["final_norm"] = n_blocks
    checked = 0
    for dt in ("float32", "bfloat16"):
        st = stores[dt]
        assert st.manifest["runtime"]["dtype"] == dt and st.manifest["runtime"]["device"] == "cpu"
        ref = _reference(path, getattr(torch, dt), csv)
        assert len(st.ids) == len(ref[0])  # every row, in file order (no --limit)
        for name in layers:
            got = np.asarray(st.load(name))
            assert got.dtype == np.float32  # stored in float32 whatever the compute dtype
            if refs.get(name) is None:
                continue
            want = ref[refs[name]]
            checked += 1
            if dt == "float32":  # bit-identical: the same forward, the same pooling
                np.testing.assert_array_equal(got, want)
            else:  # bfloat16 keeps 8 bits of mantissa: relative error ~2^-8 per op
                scale = np.abs(want).max()
                np.testing.assert_allclose(got, want, atol=2e-2 * scale, rtol=0)
    assert checked >= 2 * 3
    blocks = [n for n in layers if n.startswith("blocks.")]
    # and bfloat16 really ran in bfloat16 (not a silent float32 run)
    a, b = np.asarray(stores["float32"].load(blocks[-1])), np.asarray(stores["bfloat16"].load(blocks[-1]))
    assert 0 < np.abs(a - b).max() < 0.1 * np.abs(a).max()


def _params_created(fn):
    seen = []
    orig = torch.nn.Module.register_parameter

    def spy(self, name, param):
        if param is not None:
            seen.append(param.dtype)
        return orig(self, name, param)
    torch.nn.Module.register_parameter = spy
    try:
        out = fn()
    finally:
        torch.nn.Module.register_parameter = orig
    return out, Counter(seen)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_loading_in_bfloat16_never_creates_a_float32_parameter(arch, tiny_dirs):
    path = str(tiny_dirs[arch])
    lm, seen = _params_created(lambda: load_model(path, runtime=Runtime(device="cpu", torch_dtype="bfloat16")))
    assert seen and set(seen) == {torch.bfloat16}, seen
    assert {p.dtype for p in lm.module.parameters()} == {torch.bfloat16} and lm.dtype == torch.bfloat16
    # the spy sees float32 parameters when they are made (the float32 checkpoint in float32)
    _, seen32 = _params_created(lambda: load_model(path, runtime=Runtime(device="cpu", torch_dtype="auto")))
    assert torch.float32 in seen32


def test_auto_is_the_checkpoints_own_dtype(tmp_path):
    m = lt.tiny_hf_model("llama").to(torch.bfloat16)
    m.save_pretrained(tmp_path / "m")
    lt.tiny_tokenizer().save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), runtime=Runtime(device="cpu"))
    assert lm.dtype == torch.bfloat16
    lm = load_model(str(tmp_path / "m"), runtime=Runtime(device="cpu", torch_dtype="float32"))
    assert lm.dtype == torch.float32
    lm = load_model(str(tmp_path / "m"), runtime=Runtime(device="cpu"), for_training=True)
    assert lm.dtype == torch.float32 and lm.compute_dtype == torch.bfloat16  # trained in float32, autocast bf16


def test_non_hf_modules_move_to_the_dtype():
    lm = load_model("lamina.testing:tiny_cnn", runtime=Runtime(device="cpu", torch_dtype="bfloat16"))
    assert {p.dtype for p in lm.module.parameters()} == {torch.bfloat16}
    x = lm.batch(_ArrayData(), [0, 1])
    assert x["pixels"].dtype == torch.bfloat16
    assert lm.forward(x).dtype == torch.bfloat16


class _ArrayData:
    kind = "array"
    inputs = np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32)
    name = "arrays"


def test_finetune_autocasts_and_keeps_float32_weights(tiny_dirs, sentences_csv, tmp_path, monkeypatch):
    from lamina.finetune import FinetuneConfig, finetune
    seen = []
    real = torch.autocast.__init__

    def spy(self, device_type, dtype=None, *a, **k):
        seen.append((device_type, dtype))
        return real(self, device_type, dtype, *a, **k)
    monkeypatch.setattr(torch.autocast, "__init__", spy)
    loss = {}
    for dtype in ("float32", "bfloat16", "float16"):
        res = finetune(str(tiny_dirs["bert"]), str(sentences_csv),
                       FinetuneConfig(out=str(tmp_path / dtype), full=True, epochs=1, lr=3e-3, batch_size=16,
                                      patience=None, progress=False, device="cpu", torch_dtype=dtype))
        assert res.record["runtime"]["dtype"] == dtype
        back = load_model(res.model_path)
        assert {p.dtype for p in back.module.parameters()} == {torch.float32}  # optimized in float32
        loss[dtype] = res.record["history"]["epochs"][0]["train"]["loss"]
    assert ("cpu", torch.bfloat16) in seen and ("cpu", torch.float16) in seen
    assert not any(d == torch.float32 for _, d in seen)  # float32 runs without autocast
    for dtype in ("bfloat16", "float16"):  # the same training, in lower precision: close, not identical
        assert loss[dtype] != loss["float32"] and abs(loss[dtype] - loss["float32"]) < 5e-3


def test_out_of_memory_names_the_batch_size_and_the_flag(tiny_dirs, text_csv, tmp_path, monkeypatch, capsys):
    with pytest.raises(LaminaError) as e:
        with oom_message(64):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 123 bytes")
    assert "batch of 64" in e.value.cli_text() and "--batch-size 32" in e.value.cli_text()
    with pytest.raises(ValueError):  # other errors pass through untouched
        with oom_message(64):
            raise ValueError("x")

    from lamina.models import LoadedModel

    def boom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(LoadedModel, "forward", boom)
    rc = main(["capture", "--model", str(tiny_dirs["bert"]), "--data", str(text_csv), "--out", str(tmp_path / "r"),
               "--batch-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "out of memory" in err and "batch of 16" in err and "--batch-size 8" in err
    assert "Traceback" not in err


def test_analyze_uses_the_capture_dtype(tiny_dirs, tmp_path):
    from lamina.analyze import AnalyzeConfig, analyze
    csv = _rows(tiny_dirs, tmp_path, n=40)
    run = tmp_path / "run"
    capture(str(tiny_dirs["bert"]), str(csv), CaptureConfig(out=str(run), progress=False, torch_dtype="bfloat16"))
    res = analyze(run, AnalyzeConfig(progress=False, control=False))
    scores = json.loads(open(res.scores_path).read())
    assert scores["runtime"]["dtype"] == "bfloat16"
    assert all(v is not None and np.isfinite(v) for v in scores["importance"]["skip_nmse"])
    with pytest.raises(UsageError, match="dtype the store was captured in"):
        analyze(run, AnalyzeConfig(progress=False, control=False, overwrite=True, torch_dtype="float16"))


def test_gpu_metric_kernels_match_the_numpy_ones():
    """k-NN and CKA with torch kernels (what analyze runs on a GPU), here on the CPU device."""
    from lamina.analyze.metrics import cka_matrix, knn_accuracy
    from lamina.analyze.metrics.torch_kernels import cka_matrix_torch, knn_accuracy_torch
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    wide = rng.normal(size=(300, 400)) + y[:, None] * 0.3  # N < D: the Gram form
    narrow = rng.normal(size=(300, 20)) + y[:, None] * 0.5  # N > D: the feature form
    zero_row = narrow.copy()
    zero_row[5] = 0.0
    dev = torch.device("cpu")
    for x in (wide, narrow, zero_row):
        for k in (1, 5, 10):
            a = knn_accuracy(x[:200], y[:200], x[200:], y[200:], k=k)
            b = knn_accuracy_torch(x[:200], y[:200], x[200:], y[200:], k, dev)
            assert abs(a - b) <= 1 / 100, (k, a, b)
    feats = [wide, narrow, wide @ rng.normal(size=(400, 50)), narrow * 3 + 1]
    np.testing.assert_allclose(cka_matrix_torch(feats, dev), cka_matrix(feats), rtol=1e-9, atol=1e-12)


def test_analyze_runs_knn_and_cka_on_the_gpu_path(tiny_dirs, tmp_path, monkeypatch):
    """When --device resolves to a GPU, layer_metrics takes the torch kernels (the CPU device stands in)."""
    from lamina.analyze import AnalyzeConfig, analyze
    import importlib
    an = importlib.import_module("lamina.analyze.analyze")  # `lamina.analyze` the attribute is the verb
    tk = importlib.import_module("lamina.analyze.metrics.torch_kernels")
    csv = _rows(tiny_dirs, tmp_path, n=60)
    run = tmp_path / "run"
    capture(str(tiny_dirs["bert"]), str(csv), CaptureConfig(out=str(run), progress=False))
    ref = json.loads(open(analyze(run, AnalyzeConfig(progress=False, control=False, importance=False))
                          .scores_path).read())
    calls = Counter()
    for name in ("knn_accuracy_torch", "cka_matrix_torch"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _r=real, _n=name, **k: calls.update([_n]) or _r(*a, **k))
    monkeypatch.setattr(an, "_metrics_device", lambda cfg: torch.device("cpu"))
    got = json.loads(open(analyze(run, AnalyzeConfig(progress=False, control=False, importance=False,
                                                     overwrite=True)).scores_path).read())
    assert calls["cka_matrix_torch"] == 1 and calls["knn_accuracy_torch"] == len(ref["layers"])
    np.testing.assert_allclose(got["cka"], ref["cka"], rtol=1e-9)
    np.testing.assert_allclose(got["metrics"]["knn_acc"], ref["metrics"]["knn_acc"], atol=0.05)


def test_prune_in_bfloat16_records_its_runtime(tiny_dirs, tmp_path):
    from lamina import PruneConfig, prune
    from lamina.analyze import AnalyzeConfig, analyze
    csv = _rows(tiny_dirs, tmp_path, n=40)
    run = tmp_path / "run"
    capture(str(tiny_dirs["bert"]), str(csv), CaptureConfig(out=str(run), progress=False, torch_dtype="bfloat16"))
    analyze(run, AnalyzeConfig(progress=False, control=False))
    res = prune(str(tiny_dirs["bert"]), str(run / "scores.json"),
                PruneConfig(out=str(tmp_path / "small"), drop_blocks=0.5, device="cpu", torch_dtype="bfloat16"))
    plan = json.loads(open(res.plan_path).read())
    assert plan["runtime"] == {**plan["runtime"], "device": "cpu", "dtype": "bfloat16"}
    back = load_model(res.model_path, runtime=Runtime(device="cpu"))
    assert back.dtype == torch.bfloat16 and back.blocks.n_blocks == 1  # saved as computed, in bfloat16


def test_float16_resume_restores_the_loss_scale(tiny_dirs, sentences_csv, tmp_path, monkeypatch):
    """A float16 run's GradScaler state is checkpointed: the resumed run skips and scales exactly as the
    uninterrupted one. The scale starts at 2^24 so float16 gradients overflow and the scale backs off in
    the first epoch: a resume from a fresh 2^24 would skip steps the run did not."""
    import lamina.runtime
    from conftest import die_in_epoch
    from lamina.finetune import FinetuneConfig, finetune
    real = lamina.runtime.grad_scaler
    monkeypatch.setattr(lamina.runtime, "grad_scaler", lambda d, t: torch.amp.GradScaler(
        d.type, init_scale=2.0 ** 24, enabled=t == torch.float16))

    def cfg(out, **kw):
        return FinetuneConfig(out=str(out), full=True, epochs=2, lr=3e-3, batch_size=16, patience=None,
                              progress=False, device="cpu", torch_dtype="float16", **kw)
    ref = finetune(str(tiny_dirs["bert"]), str(sentences_csv), cfg(tmp_path / "ref"))
    restore = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_dirs["bert"]), str(sentences_csv), cfg(tmp_path / "cut"))
    restore()
    saved = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["grad_scaler"]
    assert 0 < saved["scale"] < 2.0 ** 24  # it backed off: the state carries information
    res = finetune(str(tiny_dirs["bert"]), str(sentences_csv), cfg(tmp_path / "cut", resume=True))
    assert res.record["history"]["resumed_from"] == 0
    a, b = load_model(ref.model_path).module.state_dict(), load_model(res.model_path).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ref_h, res_h = ref.record["history"]["epochs"], res.record["history"]["epochs"]
    assert res_h == [{**e, "seconds": r["seconds"]} for e, r in zip(ref_h, res_h)]  # losses to the last bit
    monkeypatch.setattr(lamina.runtime, "grad_scaler", real)


def _ckpt_parts():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    return lin, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_checkpoint_loss_scale_round_trips_and_bad_ones_are_refused(tmp_path):
    from lamina.checkpoint import load_checkpoint, save_checkpoint
    hist = {"epochs": []}
    lin, opt, sched = _ckpt_parts()
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7})
    save_checkpoint(tmp_path, 0, {"m": lin}, opt, sched, hist, None, {}, scaler)
    back = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path, {"m": lin}, opt, sched, back)
    assert back.state_dict() == scaler.state_dict() and back.get_scale() == 1024.0
    load_checkpoint(tmp_path, {"m": lin}, opt, sched, torch.amp.GradScaler("cpu", enabled=False))  # bf16/fp32
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    for bad in ({**meta["grad_scaler"], "scale": -1.0}, {**meta["grad_scaler"], "_growth_tracker": "7"},
                {"scale": 2.0}, {}):
        (tmp_path / "checkpoint.json").write_text(json.dumps({**meta, "grad_scaler": bad}))
        with pytest.raises(LaminaError, match="loss-scale"):
            load_checkpoint(tmp_path, {"m": lin}, opt, sched, torch.amp.GradScaler("cpu"))


def test_distill_teacher_runs_in_the_compute_dtype(tiny_teacher, tmp_path, monkeypatch):
    """--torch-dtype bfloat16: the frozen teacher is read and runs with bfloat16 weights; the student trains
    float32 weights under autocast; distill.json's runtime says both. Its logits match a bfloat16 reference
    of the teacher. (--width, EfficientNet only, slices its student from the float32 teacher first.)"""
    import importlib
    from lamina import DistillConfig, distill
    dmod = importlib.import_module("lamina.distill.distill")  # lamina.distill is the verb
    seen = []
    real_load = dmod.load_model

    def spy(spec, *a, **k):
        lm = real_load(spec, *a, **k)
        seen.append(lm)
        return lm
    monkeypatch.setattr(dmod, "load_model", spy)
    res = distill(str(tiny_teacher), str(tiny_teacher / "model"),
                  DistillConfig(out=str(tmp_path / "d"), epochs=1, lr=1e-3, batch_size=16,
                                patience=None, progress=False, device="cpu", torch_dtype="bfloat16"))
    teacher = seen[0]
    assert {p.dtype for p in teacher.module.parameters()} == {torch.bfloat16}
    assert res.record["runtime"]["dtype"] == "bfloat16" and res.record["runtime"]["teacher_dtype"] == "bfloat16"
    assert res.record["runtime"]["student_weights_dtype"] == "float32"
    back = load_model(res.model_path)
    assert {p.dtype for p in back.module.parameters()} == {torch.float32}
    ref = load_model(str(tiny_teacher), runtime=Runtime(device="cpu", torch_dtype="bfloat16"))
    b = ref.batch(type("D", (), {"kind": "text", "inputs": ["the film was good", "a dull plot"]})(), [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(teacher.forward(b).logits, ref.forward(b).logits, rtol=0, atol=0)
