"""Minitron's teacher correction: fine-tune a copy of a causal LM teacher on the distillation text first.

Sreenivas et al. 2024 (LLM Pruning and Distillation in Practice: the Minitron
approach): a teacher that never saw the distillation data is a poor KD
target on it; a short next-token CE fine-tune of the teacher on that data
("correction") fixes its distribution before the student learns from it. On
SmolLM2 / debates (BENCHMARKS.md "llm") KD toward the original teacher lost to
CE only; toward a corrected one it won.

What ``corrected_teacher`` does (``lamina distill --teacher-correction N``):

- trains a copy of the teacher for N AdamW steps of ``--batch-size`` training
  blocks (drawn by ``--seed``, cycling through the training split; never a
  validation or test block), peak ``--teacher-correction-lr`` (default
  ``--lr``) with a 10% linear warm-up and a linear decay, gradients clipped
  at 1, in float32; the input embedding (the output head too when tied, as
  in SmolLM2) stays frozen, as in the bench.
- keeps it in ``OUT/corrected-teacher/``: ``model.safetensors`` (weights only;
  never a pickle) and ``correction.json`` (the settings it was trained with,
  the teacher's fingerprint, the file's sha256, validation loss before and
  after). A later run into the same OUT (``--overwrite`` or ``--resume``)
  reuses it when the settings and the teacher match; a weight file whose
  sha256 differs from the recorded one is refused (never loaded), and so is
  one whose tensors do not match the teacher's.
- the student is still made from (or given as) the original model; only the
  KD / feature targets change. distill.json records which teacher was used.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LaminaError
from ..jsonio import write_json
from ..runfolder import record as record_files
from ..task import logits_of
from ..train import warmup_linear_decay
from ..trust import inside, sha256_of

log = logging.getLogger(__name__)
FOLDER = "corrected-teacher"
WEIGHTS, META = "model.safetensors", "correction.json"
SEED_OFFSET = 1000  # the teacher's own draw of training blocks, apart from the student's order (seed)


def files() -> list[str]:
    """What the correction writes in OUT (for the stage's ownership record)."""
    return [f"{FOLDER}/{WEIGHTS}", f"{FOLDER}/{META}", f"{FOLDER}/{WEIGHTS}.tmp"]


def _stamp(config, teacher, task) -> dict:
    return {"steps": config.teacher_correction, "batch_size": config.batch_size, "lr": _lr(config),
            "weight_decay": config.weight_decay, "seed": config.seed + SEED_OFFSET, "task": task.record(),
            "teacher_fingerprint": teacher.fingerprint(), "schedule": "linear warm-up (10%), linear decay",
            "frozen": "input embedding"}


def _lr(config) -> float:
    return config.teacher_correction_lr if config.teacher_correction_lr is not None else config.lr


def _rows(train: np.ndarray, steps: int, batch: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of training blocks: shuffled passes over the split, one after another."""
    rng = np.random.default_rng(seed)
    need = steps * batch
    order = np.concatenate([rng.permutation(train) for _ in range(math.ceil(need / len(train)))])[:need]
    return [order[s * batch:(s + 1) * batch] for s in range(steps)]


def _train(module, teacher, task, config, stamp) -> dict:
    """Next-token CE on a float32 copy (``module``, trained in place); returns the per-step losses and time."""
    emb = module.get_input_embeddings().weight if hasattr(module, "get_input_embeddings") else None
    params = [p for p in module.parameters() if p is not emb]
    for p in module.parameters():
        p.requires_grad_(p is not emb)
    steps = config.teacher_correction
    warm = max(1, steps // 10)
    opt = torch.optim.AdamW(params, lr=_lr(config), weight_decay=config.weight_decay)
    sched = warmup_linear_decay(opt, steps, warm)
    lm = copy.copy(teacher)
    lm.module = module
    torch.manual_seed(stamp["seed"])
    module.train()
    losses, t0 = [], time.perf_counter()
    for rows in _rows(np.asarray(task.split["train"]), steps, config.batch_size, stamp["seed"]):
        pred, tgt = task.align(logits_of(lm.forward(task.batch(lm, rows))), rows)
        loss = F.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), tgt.reshape(-1).to(pred.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1], "train_seconds": time.perf_counter() - t0}


def _load(module, path: Path, meta: dict, where: Path) -> None:
    """The recorded weights into ``module``: refused unless the file's sha256 is the recorded one."""
    from safetensors.torch import load_model
    got = sha256_of(path)
    if got != meta.get("sha256"):
        raise LaminaError("the cached corrected teacher's weights do not match the sha256 recorded when they were "
                          "written (changed or truncated since); refusing to load them", value=f"{path}: {got}",
                          allowed=f"sha256 {meta.get('sha256')} (from {where / META})",
                          fix=f"delete {where} so distill trains the corrected teacher again")
    try:
        load_model(module, str(path), strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise LaminaError("the cached corrected teacher's tensors do not fit the teacher", value=str(path),
                          allowed="the weights written for this teacher", fix=f"delete {where}") from e


def corrected_teacher(teacher, task, config, out: Path, rank: int = 0, size: int = 1):
    """A copy of ``teacher`` (a LoadedModel) corrected as the module doc says, and its record for distill.json.

    Rank 0 trains and writes it (or reuses the cached one); other torchrun ranks wait and read the file."""
    from safetensors.torch import save_model
    d = out / FOLDER
    # a link inside OUT may point anywhere: the cached files are read only where they resolve inside OUT
    w, meta_p = (inside(out, f"{FOLDER}/{n}", f"{FOLDER}/{n}") if (d / n).exists() or (d / n).is_symlink()
                 else d / n for n in (WEIGHTS, META))
    stamp = _stamp(config, teacher, task)
    module = copy.deepcopy(teacher.module)
    dtype = next(module.parameters()).dtype
    module.float()
    try:
        meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    except (OSError, ValueError):
        meta = {}  # unreadable: trained again and rewritten
    meta = meta if isinstance(meta, dict) else {}
    reuse = meta.get("stamp") == stamp and w.is_file()
    if rank == 0 and not reuse:
        before = task.evaluate(teacher, task.split["val"])["loss"]
        rec = _train(module, teacher, task, config, stamp)
        lm = copy.copy(teacher)
        lm.module = module
        rec |= {"val_loss_before": before, "val_loss_after": task.evaluate(lm, task.split["val"])["loss"],
                "tokens": config.teacher_correction * config.batch_size * (getattr(task.spec, "seq_len", 1) or 1)}
        d.mkdir(parents=True, exist_ok=True)
        record_files(out, "distill", files())
        tmp = w.with_name(WEIGHTS + ".tmp")
        save_model(module, str(tmp))
        tmp.replace(w)
        meta = {"lamina_teacher_correction": 1, "stamp": stamp, "sha256": sha256_of(w), "record": rec}
        write_json(meta_p, meta)
        log.info("distill: teacher corrected in %d steps (validation loss %.4f -> %.4f), kept in %s",
                 config.teacher_correction, before, rec["val_loss_after"], d)
    if size > 1:
        torch.distributed.barrier()
        meta = json.loads(meta_p.read_text())
    cached = reuse
    # what a later run will read: loaded back through the checksum, also right after training (the reload check)
    trained = copy.deepcopy(module) if rank == 0 and not reuse else None
    _load(module, w, meta, d)
    if trained is not None and any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                                         module.state_dict().values())):
        raise LaminaError("the corrected teacher reloads to other weights than it was trained to", value=str(w),
                          allowed="an exact round trip", fix="check the disk, then run again")
    module.to(dtype).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    out_lm = copy.copy(teacher)
    out_lm.module = module
    return out_lm, {"teacher": "corrected", "path": str(d), "sha256": meta["sha256"], "cached": cached,
                    "steps": stamp["steps"], **meta["record"]}
