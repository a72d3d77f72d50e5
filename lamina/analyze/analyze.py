"""``analyze``: every per-layer metric of a captured run, written to ``scores.json``.

Design decisions:
- One split for everything (stratified train/val/test, seeded), so the probe,
  k-NN and nearest-centre accuracies of every layer and of the control are
  read on the same test samples.
- Geometry (effective rank, separability, CKA) uses all captured samples: it
  fits nothing, so there is nothing to hold out.
- Importance and the random-init control need the model and the data, not
  just the store: they are reloaded from the specs the capture recorded (or
  passed in by a Python caller), and the reloaded sample ids are checked
  against the store so no metric mixes two different subsets.
- The control is a real capture (``RUN/control/features``) of the same
  architecture with random weights on the same samples, analyzed with the
  same split and settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .._cliargs import as_config
from ..capture import CaptureConfig, capture
from ..data import Dataset, subsample
from ..errors import UsageError
from ..runtime import Runtime, describe, oom_message
from ..models import LoadedModel, load_model, random_init, save_json
from ..runfolder import claim, record, update_run_config, versions
from ..store import FeatureStore
from .importance import block_importance
from .metrics import (DEFAULT_CS, cka_matrix, effective_rank, knn_accuracy, ncc_accuracy, probe_layers,
                      separability, stratified_split)

log = logging.getLogger(__name__)

DEFINITIONS = {
    "probe_acc": "test accuracy of an L2 logistic-regression probe (binary for two classes, multinomial for more; "
                 "scikit-learn's objective) on standardized features; C chosen on the validation split from the "
                 "grid in 'settings.Cs'; 95% Wilson interval in probe_ci_low/high",
    "knn_acc": "test accuracy of cosine k-nearest-neighbours (k in settings) fitted on the train split",
    "ncc_acc": "test accuracy of the nearest class centre (Euclidean) with centres from the train split",
    "effective_rank": "exp(entropy of the normalized singular values) of the centered features, all samples "
                      "(Roy & Vetterli 2007); at most min(N, D)",
    "within_between_ratio": "tr(S_within) / tr(S_between) over all samples; lower means tighter, better separated "
                            "classes",
    "cdnv": "class-distance normalized variance: mean over class pairs of (var_i + var_j) / (2 ||mu_i - mu_j||^2) "
            "(Galanti et al. 2022); lower is more separable",
    "cka_to_last": "linear CKA between this layer and the last captured layer, all samples (Kornblith et al. 2019)",
    "cka": "linear CKA layer x layer, all samples; 1 on the diagonal, symmetric",
}


@dataclass(frozen=True)
class AnalyzeConfig(Runtime):
    """Settings of ``lamina analyze``."""

    fractions: tuple[float, ...] = field(default=(0.6, 0.2, 0.2), metadata={
        "help": "train/validation/test fractions of the one split every metric uses"})
    seed: int = field(default=0, metadata={"help": "seed of the split (and of the control's random weights)"})
    knn_k: int = field(default=10, metadata={"help": "neighbours of the k-NN accuracy"})
    cs: tuple[float, ...] = field(default=DEFAULT_CS, metadata={
        "help": "inverse L2 strengths (sklearn's C) tried by the probe; the best on validation is used"})
    probe_workers: int = field(default=0, metadata={
        "help": "layers the probe solves side by side, one thread each (0: one per CPU this process may use); "
                "the scores do not depend on it"})
    importance: bool = field(default=True, metadata={
        "help": "score every block (Block Influence, skip nMSE); needs the model"})
    importance_samples: int | None = field(default=None, metadata={
        "help": "samples the importance sums run over (a subset of the store's samples, stratified for a "
                "classifier; 0 = all); default 512 samples, or 64 packed blocks for a causal LM, whose importance "
                "runs about 26 forward passes over them (64 blocks already rank SmolLM2's blocks as 512 would: "
                "BENCHMARKS.md, llm)"})
    spans: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={
        "help": "a causal LM captured on packed text: the n of the angular distance between the input of block l "
                "and the output of block l+n-1 (removing n consecutive blocks, Gromov et al.); spans longer "
                "than the model are left out"})
    control: bool = field(default=True, metadata={
        "help": "also analyze the same architecture with random weights on the same samples"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing RUN/scores.json"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise UsageError("--fractions must be three positive numbers that sum to 1", value=self.fractions,
                             allowed="e.g. 0.6 0.2 0.2", fix="--fractions 0.6 0.2 0.2")
        if self.knn_k < 1:
            raise UsageError("--knn-k must be at least 1", value=self.knn_k, allowed=">= 1", fix="--knn-k 10")
        if self.probe_workers < 0:
            raise UsageError("--probe-workers must be >= 0", value=self.probe_workers,
                             allowed="0 (one per CPU) or a positive count", fix="--probe-workers 1")
        if not self.spans or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.spans):
            raise UsageError("--spans must be positive block counts", value=self.spans,
                             allowed="integers >= 1 (blocks removed together)", fix="--spans 1 2 4 8")
        if self.importance_samples is not None and (isinstance(self.importance_samples, bool)
                                                    or not isinstance(self.importance_samples, int)
                                                    or self.importance_samples < 0):
            raise UsageError("--importance-samples must be >= 0", value=self.importance_samples,
                             allowed="0 (all) or a positive count",
                             fix="--importance-samples 64, or leave it out for the default")


@dataclass
class AnalyzeResult:
    """Where the scores went and the headline numbers."""

    scores_path: str
    layers: list[str]
    probe_acc: list[float]
    seconds: float
    control: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _features(store: FeatureStore) -> list[np.ndarray]:
    feats = []
    for name in store.layers:
        x = store.load(name)
        if x.ndim != 2:
            raise UsageError("analyze needs pooled features, one vector per sample", value=f"{name}: {x.shape}",
                             allowed="a store captured with --pooling mean, cls or last",
                             fix="capture again with --pooling mean")
        feats.append(np.asarray(x, dtype=np.float32))
    return feats


def layer_metrics(feats: list[np.ndarray], labels: np.ndarray, split: dict, cfg: AnalyzeConfig,
                  device=None) -> tuple[dict, list]:
    """Every per-layer metric of ``feats`` (L arrays (N, D)) and the (L, L) CKA matrix.

    ``device`` (a torch.device): k-NN and CKA run there with torch kernels (analyze passes the GPU when
    ``--device`` resolves to one), and so does the probe's solver on a CUDA device (it needs float64, which
    MPS lacks); None keeps the CPU versions (the default on the CPU).
    """
    if device is not None:
        from .metrics.torch_kernels import cka_matrix_torch, knn_accuracy_torch
    out: dict[str, list] = {k: [] for k in ("probe_acc", "probe_ci_low", "probe_ci_high", "probe_C", "knn_acc",
                                            "ncc_acc", "effective_rank", "within_between_ratio", "cdnv")}
    if labels is None:  # unlabelled text: only the label-free metrics (effective rank, CKA)
        for k in out:
            out[k] = [effective_rank(x) for x in feats] if k == "effective_rank" else [None] * len(feats)
        cka = cka_matrix(feats) if device is None else cka_matrix_torch(feats, device)
        out["cka_to_last"] = [float(v) for v in cka[:, -1]]
        return {k: [None if v is None else _num(v) for v in vals] for k, vals in out.items()}, \
            [[_num(v) for v in row] for row in cka]
    probes = probe_layers(feats, labels, split, Cs=cfg.cs, seed=cfg.seed, workers=cfg.probe_workers or None,
                          device=_probe_device(device))
    tr, te = split["train"], split["test"]
    for x, p in zip(feats, probes):
        out["probe_acc"].append(p.test_accuracy)
        out["probe_ci_low"].append(p.ci_low)
        out["probe_ci_high"].append(p.ci_high)
        out["probe_C"].append(p.C)
        out["knn_acc"].append(knn_accuracy(x[tr], labels[tr], x[te], labels[te], k=cfg.knn_k) if device is None
                              else knn_accuracy_torch(x[tr], labels[tr], x[te], labels[te], cfg.knn_k, device))
        out["ncc_acc"].append(ncc_accuracy(x[tr], labels[tr], x[te], labels[te]))
        out["effective_rank"].append(effective_rank(x))
        sep = separability(x, labels)
        out["within_between_ratio"].append(sep["within_between_ratio"])
        out["cdnv"].append(sep["cdnv"])
    cka = cka_matrix(feats) if device is None else cka_matrix_torch(feats, device)
    out["cka_to_last"] = [float(v) for v in cka[:, -1]]
    return {k: [_num(v) for v in vals] for k, vals in out.items()}, [[_num(v) for v in row] for row in cka]


UNLABELLED_NOTE = ("the data has no labels (text read as a corpus: a .txt file or 'debates'), so the "
                   "label-dependent metrics (probe, k-NN and nearest-centre accuracy, separability) are not "
                   "computed; effective rank, CKA and block importance are")


def _plain_split(n: int, config) -> dict:
    """A seeded train/val/test split of ``n`` unlabelled samples (recorded like the stratified one)."""
    perm = np.random.default_rng(config.seed).permutation(n)
    a = int(round(config.fractions[0] * n))
    b = a + int(round(config.fractions[1] * n))
    return {"train": np.sort(perm[:a]), "val": np.sort(perm[a:b]), "test": np.sort(perm[b:])}


def _num(v):
    v = float(v)
    return v if np.isfinite(v) else None


def _importance_dict(res) -> dict:
    opt = lambda v: None if v is None else _num(v)  # noqa: E731  (NaN from a degenerate model -> null)
    return {"blocks": [b.name for b in res.blocks], "paths": [b.path for b in res.blocks],
            "block_influence": [opt(b.block_influence) for b in res.blocks],
            "skip_nmse": [opt(b.skip_importance) for b in res.blocks],
            "skippable": [b.skippable for b in res.blocks], "notes": [b.note for b in res.blocks],
            "target": res.target, "n_samples": res.n_samples}


def _probe_device(device):
    """Where the probe's solver runs: a CUDA device, else None (the CPU; MPS has no float64)."""
    return device if device is not None and device.type == "cuda" else None


def _metrics_device(config: AnalyzeConfig):
    """The GPU that k-NN and CKA run on, or None (the CPU: NumPy)."""
    from ..runtime import resolve_device
    dev = resolve_device(config.device)
    return dev if dev.type in ("cuda", "mps") else None


def _runtime(store: FeatureStore, config: AnalyzeConfig):
    """The config's runtime, in the dtype the store was captured in (the fingerprint check needs the same
    weights); an explicit other dtype is refused."""
    rt = config.runtime()
    captured = (store.manifest.get("runtime") or {}).get("dtype")
    if captured and rt.torch_dtype not in ("auto", captured):
        raise UsageError("analyze runs the model in the dtype the store was captured in", value=rt.torch_dtype,
                         allowed=f"auto or {captured}", fix=f"--torch-dtype {captured} (or capture again)")
    return replace(rt, torch_dtype=captured or rt.torch_dtype)


def _reload(store: FeatureStore, model, data, runtime=None) -> tuple[LoadedModel, Dataset]:
    """The model and the exact samples of the store, from the capture's specs or the caller."""
    man = store.manifest
    cap = man.get("config", {})
    if model is None:
        if not man.get("model_spec"):
            raise UsageError("this store was captured from a Python model object, so analyze cannot reload it",
                             value=man.get("model", {}).get("name"), allowed="model=... passed to analyze()",
                             fix="pass the model to lamina.analyze(store, config, model=...), or disable "
                                 "importance and control (--no-importance --no-control)")
        model = man["model_spec"]
        from ..trust import check_spec_from_file
        check_spec_from_file(model, "the store's manifest.json (model_spec)")  # never import what a file names
    lm = load_model(model, blocks=cap.get("blocks"), runtime=runtime)
    if lm.fingerprint() != man.get("capture_key", {}).get("model"):
        raise UsageError("the model given is not the one the store was captured from (fingerprints differ)",
                         value=lm.name, allowed=man.get("model", {}).get("name"),
                         fix="pass the model used for the capture")
    if man.get("lm_task"):  # a causal LM on packed text: the same training blocks, rebuilt from the task record
        from ..capture.packed import reload_packed
        ds = reload_packed(lm, man, data)
    elif data is None:
        if not man.get("data_spec"):
            raise UsageError("this store was captured from an in-memory dataset, so analyze cannot reload it",
                             value=man.get("data", {}).get("name"), allowed="data=... passed to analyze()",
                             fix="pass the dataset to lamina.analyze(..., data=...), or --no-importance --no-control")
        data = man["data_spec"]
    if not man.get("lm_task"):
        from ..data.text import load_for_capture
        ds = subsample(load_for_capture(data, cap.get("text_column"), cap.get("label_column"),
                                        cap.get("skip_bad_files", False)), cap.get("limit"), cap.get("seed", 0))
    if list(ds.ids) != list(store.ids):
        raise UsageError("the reloaded data are not the samples in the store", value=ds.name,
                         allowed="the dataset (and --limit/--seed) used for the capture",
                         fix="pass the same data, or capture again")
    return lm, ds



def importance_samples(config: AnalyzeConfig, packed: bool) -> int:
    """--importance-samples, or its default: 512 samples of a classifier, ``LM_IMPORTANCE_SAMPLES`` packed blocks
    of a causal LM (its importance costs ~26 forwards over them; see ``_lm``)."""
    if config.importance_samples is not None:
        return config.importance_samples
    from ._lm import LM_IMPORTANCE_SAMPLES
    return LM_IMPORTANCE_SAMPLES if packed else 512

def analyze(run, config: AnalyzeConfig = AnalyzeConfig(), *, model=None, data=None) -> AnalyzeResult:
    """Compute every per-layer metric of the run's store and write RUN/scores.json.

    Args:
        run: a run folder (or FeatureStore) written by :func:`lamina.capture`.
        config: an :class:`AnalyzeConfig`.
        model, data: only needed when the store was captured from Python
            objects (a module or an in-memory Dataset) and importance or the
            control is on.
    """
    config = as_config(AnalyzeConfig, config, "analyze")
    t0 = time.perf_counter()
    store = run if isinstance(run, FeatureStore) else FeatureStore.open(run)
    run_dir = store.root.parent
    path = run_dir / "scores.json"
    if path.exists() and not config.overwrite:
        raise UsageError("scores.json already exists in the run folder", value=str(path),
                         allowed="a run without scores.json", fix="pass --overwrite to recompute it")
    with claim(run_dir, "analyze", writes(config), config.overwrite, merge=("config.json", "control")):
        return _analyze(store, run_dir, path, config, model, data, t0)


def writes(config: AnalyzeConfig) -> list[str]:
    """What ``analyze`` writes in the run folder (the control's capture goes to RUN/control)."""
    return ["scores.json", "config.json"] + (["control"] if config.control else [])


def _analyze(store: FeatureStore, run_dir: Path, path: Path, config: AnalyzeConfig, model, data,
             t0: float) -> AnalyzeResult:
    from ..data.text import is_unlabelled
    labels = store.labels
    unlabelled = is_unlabelled(labels)
    split = _plain_split(len(labels), config) if unlabelled else stratified_split(labels, config.fractions,
                                                                                   seed=config.seed)
    feats = _features(store)
    log.info("analyze: %d layers x %d samples", len(feats), len(labels))
    mdev = _metrics_device(config)
    metrics, cka = layer_metrics(feats, None if unlabelled else labels, split, config, mdev)
    notes = [UNLABELLED_NOTE] if unlabelled else []
    if unlabelled:
        log.warning("analyze: %s", UNLABELLED_NOTE)
    del feats
    man = store.manifest
    scores = {"lamina_version": man.get("lamina_version"), "model": man.get("model", {}),
              "data": man.get("data", {}), "pooling": man.get("pooling"), "seed": config.seed,
              "split": {"fractions": list(config.fractions), "seed": config.seed,
                        **{f"n_{k}": int(len(v)) for k, v in split.items()}},
              "layers": store.layers, "settings": {"knn_k": config.knn_k, "Cs": list(config.cs),
                                                   "importance_samples": config.importance_samples,
                                                   "metrics_device": {"probe": str(_probe_device(mdev) or "cpu"),
                                                                      "knn_cka": str(mdev or "cpu")}},
              "definitions": dict(DEFINITIONS), "metrics": metrics, "cka": cka, "importance": None,
              "control": None, "versions": versions(), "notes": notes}
    if config.importance or config.control:
        lm, ds = _reload(store, model, data, _runtime(store, config))
        scores["runtime"] = describe(lm.device, lm.dtype)
        cap = man.get("config", {})
        kw = dict(batch_size=cap.get("batch_size", 32), max_length=cap.get("max_length", 128),
                  image_size=cap.get("image_size"), progress=config.progress)
        packed = bool(man.get("lm_task"))
        n_imp = importance_samples(config, packed)
        scores["settings"]["importance_samples"] = n_imp
        if packed:
            from ._lm import importance_rows
            few = importance_rows(ds, n_imp, config.seed)
        else:
            few = ds if not n_imp or n_imp >= len(ds) else subsample(ds, n_imp, config.seed, min_per_class=0)
        if config.importance and packed:
            with oom_message(kw["batch_size"], "--batch-size of the capture (or --importance-samples)", lm.device):
                scores["importance"] = _lm_importance(lm, few, config, kw)
            scores["definitions"].update(_lm_definitions())
        elif config.importance:
            with oom_message(kw["batch_size"], "--batch-size of the capture (or --importance-samples)", lm.device):
                imp = block_importance(lm, few, **kw)
            scores["importance"] = _importance_dict(imp)
            scores["definitions"].update({"block_influence": _imp_def("block_influence"),
                                          "skip_nmse": _imp_def("skip_importance")})
        if config.control:
            scores["control"] = _control(lm, ds, few, store, run_dir, split, config, kw)
    record(run_dir, "analyze", ["scores.json", "scores.json.tmp"])
    save_json(path, scores, nulls=("metrics", "cka", "importance", "control"))  # null: not computable
    update_run_config(run_dir, "analyze", {"config": asdict(config), "scores": str(path)})
    return AnalyzeResult(str(path), store.layers, metrics["probe_acc"], time.perf_counter() - t0, config.control)


def _lm_importance(lm, rows, config: AnalyzeConfig, kw) -> dict:
    from ._lm import lm_block_scores
    return lm_block_scores(lm, rows, config.spans, kw["batch_size"])


def _lm_definitions() -> dict:
    from ._lm import DEFINITIONS as LM
    return {"block_influence": _imp_def("block_influence"), **LM}


def _imp_def(key: str) -> str:
    from .importance import DEFINITIONS as IMP
    return IMP[key]


def _control(lm, ds, few, store, run_dir: Path, split, config: AnalyzeConfig, kw) -> dict:
    """Capture and analyze the same architecture with random weights on the same samples."""
    rand = random_init(lm, config.seed)
    cap = dict(store.manifest.get("config", {}))
    ccfg = replace(CaptureConfig(out=str(run_dir / "control"), device=str(lm.device),
                                 torch_dtype=str(lm.dtype).replace("torch.", "")),
                   **{k: cap[k] for k in ("layers", "pooling", "batch_size", "max_length", "image_size", "dtype",
                                          "seq_len")
                      if k in cap}, overwrite=True, progress=config.progress)
    res = capture(rand, ds, ccfg)
    cstore = FeatureStore.open(res.store)
    from ..data.text import is_unlabelled
    y = None if is_unlabelled(cstore.labels) else cstore.labels
    metrics, cka = layer_metrics(_features(cstore), y, split, config, _metrics_device(config))
    out = {"model": rand.name, "seed": config.seed, "metrics": metrics, "cka": cka, "importance": None}
    if config.importance:
        out["importance"] = _lm_importance(rand, few, config, kw) if store.manifest.get("lm_task") else \
            _importance_dict(block_importance(rand, few, **kw))
    return out
