"""Reload a saved model the way a user will, and check it computes what was saved.

Every stage that writes a model (prune, finetune, distill, and later transfer,
elastic, quantize) ends with :func:`save_checked`: save, reload through the
user's path, compare outputs on a calibration batch, and only then report
success. A model that a config cannot express (a stage silently re-initialized
by ``from_pretrained``, a Swin block whose window shift depends on its position,
a block that owned a bias others reuse) is caught here instead of shipping.

The user's path:
    format 'huggingface'  ``<the model's class>.from_pretrained(path)``, with
                          transformers' loading report: a missing, unexpected or
                          resized tensor is a failure on its own (transformers
                          would fill it with random values and only log it);
    format 'lamina'       :func:`lamina.savefmt.load_lamina` (what ``lamina.load``
                          and ``lamina.load_model`` call).

Comparison: the model's main output (logits, else last hidden state, else its
first tensor), ``max |reloaded - saved| <= atol + rtol * max |saved|``. Both
run the same float32 kernels on the same weights, so the difference is
normally 0; the tolerance only absorbs kernel-order noise, and scales with the
output (a random-init CNN's outputs can be 1e-20).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from .errors import LaminaError

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-4, 1e-30  # relative to the largest output; the atol only keeps an all-zero output comparable


def _main_output(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    from .blocks import block_output
    x = block_output(out)
    if x is None:
        raise LaminaError("cannot find a tensor in the model output to compare after reloading",
                          value=type(out).__name__, allowed="a tensor or an output with .logits / .last_hidden_state",
                          fix="wrap the model so its forward returns a tensor")
    return x


def _run(lm, batch) -> torch.Tensor:
    was = lm.module.training
    lm.module.eval()
    try:
        with torch.inference_mode():
            return _main_output(lm.forward(batch)).detach().float().clone()
    finally:
        lm.module.train(was)


def _reload(lm, path: Path, fmt: str):
    """(a LoadedModel around the reloaded module, how it was reloaded)."""
    if fmt == "huggingface":
        cls = type(lm.module)
        how = f"{cls.__name__}.from_pretrained"
        try:
            module, info = cls.from_pretrained(path, output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - any failure to reload is the finding, reported with its cause
            raise LaminaError(f"the saved model does not reload with {how}: {type(e).__name__}: {str(e)[:300]}",
                              value=str(path), allowed="a folder that from_pretrained rebuilds",
                              fix="report this architecture to lamina; the plan cannot be saved faithfully") from e
        bad = {k: sorted(v)[:5] for k, v in (info or {}).items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise LaminaError(f"{how} does not rebuild the saved model: its config describes another architecture "
                              f"({'; '.join(f'{k}: {v}' for k, v in bad.items())})", value=str(path),
                              allowed="every saved tensor loaded, none missing or resized",
                              fix="this architecture cannot lose what the plan removes; prune other blocks or "
                                  "prune width instead")
        out = copy.copy(lm)
        out.module = module.eval()
        return out, how
    from .savefmt import load_lamina
    try:
        return load_lamina(path), "lamina.load"
    except LaminaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise LaminaError(f"the saved model does not reload with lamina.load: {type(e).__name__}: {str(e)[:300]}",
                          value=str(path), allowed="a folder lamina.load rebuilds",
                          fix="report this architecture to lamina") from e


def check_saved(lm, path, batch: dict, fmt: str, *, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Reload the model saved at ``path`` in format ``fmt`` and compare it with ``lm`` on ``batch``.

    Args:
        lm: the in-memory LoadedModel that was saved.
        path: the saved folder.
        batch: one model input dict (``lm.batch(...)``), e.g. calibration rows.
        fmt: 'huggingface' or 'lamina' (what :func:`lamina.savefmt.save` returned).
    Returns the record for the stage's JSON: ``{"reloaded_with", "max_abs_diff", "max_abs_output",
    "tolerance", "ok": True, "batch_size"}``. Raises LaminaError (exit 1) saying what failed.
    """
    path = Path(path)
    ref = _run(lm, batch)
    new, how = _reload(lm, path, fmt)
    got = _run(new, batch)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    tol = atol + rtol * scale
    if got.shape != ref.shape:
        raise LaminaError(f"the model reloaded with {how} gives outputs of another shape", value=tuple(got.shape),
                          allowed=str(tuple(ref.shape)), fix="this architecture cannot be saved faithfully")
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    if not diff <= tol:  # also catches NaN
        raise LaminaError(f"the model reloaded with {how} does not reproduce the saved one on a calibration batch "
                          f"(max abs difference {diff:.3g}, allowed {tol:.3g})", value=str(path),
                          allowed="the same outputs as the in-memory model",
                          fix="the saved config cannot express this model (e.g. a block's behaviour depends on its "
                              "position); prune other blocks or prune width instead")
    rows = next((int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor)), 0)
    return {"reloaded_with": how, "max_abs_diff": diff, "max_abs_output": scale, "tolerance": tol, "ok": True,
            "batch_size": rows}


def synthetic_batch(lm, rows: int = 2) -> dict | None:
    """A seeded stand-in batch when a stage has no data at hand: a sentence through the tokenizer (text), random
    pixels at the model's image size (images); None for plain-array models, whose input shape lamina cannot know."""
    if lm.modality == "text" and lm.tokenizer is not None:
        return dict(lm.tokenizer(["the reload check reads this sentence", "and this one"][:rows], padding=True,
                                 return_tensors="pt"))
    if lm.modality == "image":
        g = torch.Generator().manual_seed(0)
        size = lm.image_size or 32
        return {"pixels": torch.randn(rows, lm.in_channels, size, size, generator=g)}
    return None


def check_weights(lm, path, fmt: str) -> dict:
    """Without inputs to run: the reloaded model must hold exactly the in-memory model's tensors."""
    new, how = _reload(lm, Path(path), fmt)
    a, b = lm.module.state_dict(), new.module.state_dict()
    bad = sorted(k for k in a.keys() | b.keys()
                 if k not in a or k not in b or a[k].shape != b[k].shape or not torch.equal(a[k].cpu(), b[k].cpu()))
    if bad:
        raise LaminaError(f"the model reloaded with {how} holds other tensors than the saved one ({len(bad)}, e.g. "
                          f"{', '.join(bad[:3])})", value=str(path), allowed="the same tensors",
                          fix="this architecture cannot be saved faithfully")
    return {"reloaded_with": how, "compared": "weights (no inputs to run)", "ok": True}


def save_checked(lm, dest, source, batch: dict | None, stage: str = "save") -> tuple[str, dict]:
    """:func:`lamina.savefmt.save` ``lm`` to ``dest``, then :func:`check_saved` it on ``batch``.

    On a failed check the saved folder is removed (a model that looks good must
    not stay behind) and the LaminaError propagates. ``batch`` None: a seeded
    stand-in (:func:`synthetic_batch`), else (plain-array models) the reloaded
    tensors are compared (:func:`check_weights`). Returns (format, check record).
    """
    from .savefmt import save
    dest = Path(dest)
    fmt = save(lm, dest, source, stage=stage)
    try:
        if batch is None:
            batch = synthetic_batch(lm)
            if batch is None:
                return fmt, check_weights(lm, dest, fmt)
            return fmt, {**check_saved(lm, dest, batch, fmt), "batch": "synthetic (no calibration data)"}
        return fmt, check_saved(lm, dest, batch, fmt)
    except BaseException:
        from .runfolder import discard
        discard(dest)  # only what lamina just wrote there
        raise
