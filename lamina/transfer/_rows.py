"""Which store rows a head trains, validates and is tested on, and the model and data behind the store.

Two sources, recorded in transfer.json:
- ``task`` (a ``lamina finetune`` OUT folder, or any model folder whose task
  lamina can read): that task's own train / validation / test rows, mapped onto
  the store's rows by sample id. Heads and ``lamina finetune`` (frozen head or
  ``--full``) are then compared on the very same test rows. Every row of the
  task must be in the store: capture with the finetune's --data, --limit and
  --seed (then the store holds exactly the task's rows).
- otherwise ``analyze``'s split of the store's rows (stratified, ``fractions``
  and ``seed``), the one split every per-layer metric uses.

The two agree on the test rows when the store holds the task's rows and the
test fractions are equal: both split each class's rows with the same seeded
permutation and take its last ``round(n * test)`` rows as test. They differ in
validation (analyze holds out 0.2, finetune 0.1 by default).
"""

from __future__ import annotations

import numpy as np

from ..analyze.metrics.split import stratified_split
from ..data import load_data, subsample
from ..errors import UsageError
from ..models import load_model
from ..task import read_task


def refuse_unlabelled(store, data=None) -> None:
    """A head is trained on class labels: refuse a run captured on text without labels (a .txt, 'debates', a
    causal LM's packed blocks), or such text passed as ``data``, with what to do instead."""
    from ..data import Dataset
    from ..data.text import is_text_spec
    man = store.manifest
    info = man.get("data") or {}
    if data is not None:
        text = (isinstance(data, Dataset) and data.meta.get("unlabelled")) or \
            (not isinstance(data, Dataset) and is_text_spec(data))
        what, value = "the data given", getattr(data, "name", str(data))
    else:
        text = bool(info.get("unlabelled") or man.get("lm_task") or is_text_spec(man.get("data_spec") or ""))
        what, value = "this run", f"{info.get('name')} ({man.get('data_spec') or 'in-memory data'})"
    if text:
        raise UsageError(f"transfer trains a classification head on labels, and {what} is text without labels",
                         value=value, allowed="a run captured on labelled data: a table with a label column, a "
                                              "labelled bundled set such as rotten-tomatoes, an image folder",
                         fix="capture the model on labelled data (lamina capture --model M --data rotten-tomatoes "
                             "--out R2) and run transfer on that run; a language model's text runs go to analyze "
                             "and prune --scores")


def split_rows(store, task: str | None, fractions, seed: int) -> tuple[dict, dict]:
    """(``{"train","val","test"}`` -> int64 store rows, description of where the split came from)."""
    if task is None:
        split = stratified_split(store.labels, fractions, seed)
        return split, {"source": "analyze", "fractions": list(fractions), "seed": seed}
    spec = read_task(task)
    if spec is None:
        raise UsageError("no task record in that folder", value=task,
                         allowed="the OUT folder of `lamina finetune` (finetune.json), prune or distill",
                         fix="pass --task teacher/ (a finetune OUT folder), or leave --task out for analyze's split")
    if getattr(spec, "kind", None) == "lm":
        raise UsageError("--task names a language-modelling task (next-token text), which has no class labels",
                         value=task, allowed="the OUT folder of a classifier's `lamina finetune`",
                         fix="leave --task out (analyze's split of the run's labelled rows), or name a classifier's "
                             "finetune folder")
    ds, split = spec.load()
    where = {str(i): r for r, i in enumerate(store.ids)}
    rows, lost = {}, []
    for part, idx in split.items():
        ids = [str(i) for i in ds.ids[idx]]
        lost += [i for i in ids if i not in where]
        rows[part] = np.array([where[i] for i in ids if i in where], dtype=np.int64)
    if lost:
        raise UsageError("the store does not hold every row of the task", value=f"{len(lost)} rows missing "
                         f"(first {lost[:3]})", allowed="a store captured on the task's rows",
                         fix=f"capture with --data {spec.data} --limit {spec.limit} --seed {spec.seed}")
    labels = store.labels
    bad = [p for p, r in rows.items() if np.any(labels[r] != ds.labels[split[p]])]
    if bad:
        raise UsageError("the store's labels differ from the task's for the same sample ids", value=bad,
                         allowed="the same data for the capture and the task", fix="capture the task's data")
    return rows, {"source": "task", "task": str(task), **spec.to_dict()}


def reload_model_and_data(store, model=None, data=None, trust_remote_code: bool = False):
    """The model the store was captured from (fingerprint checked) and the store's samples, in store order.

    The model loads on the CPU in the capture's dtype (so its fingerprint is the capture's); ``transfer``
    moves what runs on ``--device`` itself."""
    man = store.manifest
    cap = man.get("config", {})
    if model is None:
        model = man.get("model_spec")
        if not model:
            raise UsageError("this store was captured from a Python model object, so transfer cannot reload it",
                             value=man.get("model", {}).get("name"), allowed="model=... passed to transfer()",
                             fix="pass the model: lamina.transfer(run, config, model=...)")
    from ..runtime import Runtime
    lm = load_model(model, blocks=cap.get("blocks"), runtime=Runtime(
        device="cpu", torch_dtype=cap.get("torch_dtype", "auto"), trust_remote_code=trust_remote_code))
    if lm.fingerprint() != man.get("capture_key", {}).get("model"):
        raise UsageError("the model is not the one the store was captured from (fingerprints differ)",
                         value=lm.name, allowed=man.get("model", {}).get("name"),
                         fix="pass the model used for the capture, or capture this model")
    if data is None:
        data = man.get("data_spec")
        if not data:
            raise UsageError("this store was captured from an in-memory dataset, so transfer cannot reload it",
                             value=man.get("data", {}).get("name"), allowed="data=... passed to transfer()",
                             fix="pass the dataset: lamina.transfer(run, config, data=...)")
    ds = subsample(load_data(data, cap.get("text_column"), cap.get("label_column")), cap.get("limit"),
                   cap.get("seed", 0))
    if [str(i) for i in ds.ids] != [str(i) for i in store.ids]:
        raise UsageError("the reloaded data are not the samples in the store", value=ds.name,
                         allowed="the dataset (and --limit/--seed) of the capture", fix="pass the same data")
    return lm, ds
