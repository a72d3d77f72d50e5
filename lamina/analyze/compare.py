"""``compare``: CKA layer x layer across two runs on the same samples.

The score is the unbiased minibatch estimator (Nguyen, Raghu & Kornblith
2021), read straight from both stores' memory maps batch by batch, so memory
depends on the batch size, not on N. Each pair also gets a permutation null
(rows of one side shuffled) on a bounded subsample, so a score is read against
what CKA gives by chance for these widths and this N.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._cliargs import as_config
from ..errors import UsageError
from ..models import save_json
from ..runfolder import claim, record, versions
from ..store import FeatureStore
from .metrics import cka_permutation_null, streaming_cka


@dataclass(frozen=True)
class CompareConfig:
    """Settings of ``lamina compare``."""

    out: str | None = field(default=None, metadata={"help": "JSON file to write (default: RUN_A/compare.json)"})
    batch_size: int = field(default=256, metadata={"help": "rows per minibatch of the streaming CKA"})
    epochs: int = field(default=1, metadata={"help": "passes over the samples, each reshuffled"})
    n_perm: int = field(default=20, metadata={"help": "permutations of the null per layer pair (0: no null)"})
    null_samples: int = field(default=1000, metadata={"help": "samples the permutation null runs on"})
    seed: int = field(default=0, metadata={"help": "seed of the minibatch order and the permutations"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})

    def __post_init__(self):
        if self.batch_size < 4:
            raise UsageError("--batch-size must be at least 4 (the unbiased estimator needs 4 samples)",
                             value=self.batch_size, allowed=">= 4", fix="--batch-size 256")
        if self.epochs < 1 or self.n_perm < 0 or self.null_samples < 4:
            raise UsageError("--epochs >= 1, --n-perm >= 0 and --null-samples >= 4 are required",
                             value=(self.epochs, self.n_perm, self.null_samples), allowed="see --help",
                             fix="use the defaults")


@dataclass
class CompareResult:
    path: str
    layers_a: list[str]
    layers_b: list[str]
    cka: list[list[float]]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare(run_a, run_b, config: CompareConfig = CompareConfig()) -> CompareResult:
    """Cross-model CKA (L_A x L_B) of two stores captured on the same samples."""
    config = as_config(CompareConfig, config, "compare")
    t0 = time.perf_counter()
    a, b = FeatureStore.open(run_a), FeatureStore.open(run_b)
    if a.n != b.n or not np.array_equal(a.ids, b.ids):
        raise UsageError("the two runs were captured on different samples", value=f"{a.n} vs {b.n} samples",
                         allowed="stores of the same data, --limit and --seed",
                         fix="capture both models with the same --data, --limit and --seed")
    out = Path(config.out) if config.out else a.root.parent / "compare.json"
    if out.exists() and not config.overwrite:
        raise UsageError("the comparison file already exists", value=str(out), allowed="a new path",
                         fix="pass --overwrite or --out OTHER.json")
    for s in (a, b):
        bad = [n for n in s.layers if len(s.manifest["layers"][n]["shape"]) != 2]
        if bad:
            raise UsageError("compare needs pooled features", value=f"{s.root}: {bad[:3]}",
                             allowed="stores captured with --pooling mean, cls or last", fix="capture again pooled")
    with claim(out.parent, "compare", [out.name], config.overwrite):
        return _compare(a, b, out, config, t0)


def _compare(a: FeatureStore, b: FeatureStore, out: Path, config: CompareConfig, t0: float) -> CompareResult:
    bs = min(config.batch_size, a.n)
    # read_rows, not the memory map: touched pages of a map stay resident, so
    # memory would grow with N (measured: x1.40 at 4N); file reads stay flat.
    cka = streaming_cka(lambda idx: [a.read_rows(n, idx).astype(np.float64) for n in a.layers],
                        lambda idx: [b.read_rows(n, idx).astype(np.float64) for n in b.layers], a.n, batch_size=bs,
                        seed=config.seed, epochs=config.epochs)
    null = None
    if config.n_perm:
        rows = np.sort(np.random.default_rng(config.seed).permutation(a.n)[: config.null_samples])
        null = {"samples": int(len(rows)), "n_perm": config.n_perm, "null_mean": [], "null_std": [], "p_value": []}
        ys = [b.read_rows(n, rows).astype(np.float64) for n in b.layers]
        for name in a.layers:
            xs = a.read_rows(name, rows).astype(np.float64)
            res = [cka_permutation_null(xs, y, config.n_perm, config.seed) for y in ys]
            for k in ("null_mean", "null_std", "p_value"):
                null[k].append([r[k] for r in res])
    result = {"run_a": str(a.root.parent), "run_b": str(b.root.parent),
              "model_a": a.manifest.get("model", {}).get("name"), "model_b": b.manifest.get("model", {}).get("name"),
              "n": a.n, "layers_a": a.layers, "layers_b": b.layers, "cka": cka.tolist(), "null": null,
              "definition": "unbiased minibatch linear CKA (Nguyen et al. 2021; HSIC_1 of Song et al. 2012) "
                            "between layer i of A (rows) and layer j of B (columns); the null permutes B's rows; "
                            "null where CKA is undefined (a layer without variance)",
              "config": asdict(config), "versions": versions()}
    record(out.parent, "compare", [out.name, out.name + ".tmp"])
    save_json(out, result, nulls=("cka", "null"))  # null: CKA undefined (a layer without variance)
    return CompareResult(str(out), a.layers, b.layers, cka.tolist(), time.perf_counter() - t0)
