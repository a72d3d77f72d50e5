"""``prune``: scores.json + a budget -> OUT/plan.json and a smaller model in OUT/model.

The stage behind ``lamina prune teacher/ --drop-blocks 0.5 --out small/`` (and
``lamina prune MODEL --scores RUN/scores.json ...`` for scores made by ``analyze``).

``prune(model, scores, config)`` in Python. Without ``--scores`` (``scores=None``), a
fine-tuned model (``lamina finetune``'s OUT, whose finetune.json records its task)
is scored on its own training rows
(:mod:`lamina.compress._selfscore`): ``calibration_samples`` of them, the same
block importance ``lamina analyze`` computes. The scores go to OUT/scores.json
(with ``computed_by: prune``), so the report shows the importance of the model
that was actually pruned. A model with no task record needs ``--scores``.

Order (every refusal happens before anything is written):
1. check OUT (refused when it exists and is not empty, unless ``overwrite``),
   read the scores, make the plan (pure: refused when the budget removes every
   block, or nothing at all);
2. load the model and check the plan was made for it (fingerprints), that it
   can be saved, that its architecture can lose what the plan removes, and
   load the calibration batches when FFN channels, heads or CNN channels are
   pruned or blocks are chosen iteratively or jointly (the default ``method='auto'``
   is 'joint' where sets can be scored by labels or tokens: the model's own task rows, or
   the text a causal LM's scores run was captured from; else 'skip_nmse', which
   reads the scores only: :func:`resolve_method`, recorded in plan.json);
3. make the depth choices that need the model (iterative rounds, a parameter
   target: :func:`lamina.compress.choose_blocks`), so plan.json records them;
   refused here when a target cannot be reached;
4. apply it on a copy, save the copy to ``OUT/model``, reload it the way a user
   will and compare it with the copy on a calibration batch
   (:func:`lamina.verify.save_checked`; a failure removes the model and exits 1),
   then write plan.json with what was done (indices, parameter counts, the check).

Saving: Hugging Face models whose config still describes them go through
``save_pretrained`` (+ tokenizer), so standard tools load them; everything else
(the bundled EfficientNet, a channel-pruned one, ``module:factory`` models, a
model in lamina's format) is written in lamina's format (:mod:`lamina.savefmt`).
Either way ``lamina.load_model(OUT)`` loads it.

Calibration batches come from the data the scores run was captured on:
``RUN/features/manifest.json`` records the data spec and the capture's limit /
seed / columns / image size; ``calibration_samples`` of those rows (stratified,
the scores' seed) are fed in the capture's batch size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .._cliargs import as_config
from ..errors import UsageError, suggest
from ..runtime import Runtime, describe
from ..models import LoadedModel, load_model, save_json
from ..runfolder import check_out, claim, plan_writes, record
from ..savefmt import save_format
from ..verify import save_checked
from .apply import apply, check_plan, choose_blocks
from .channels import channel_layout
from .heads import _attn_blocks
from ._selfscore import no_task_error, self_scores, task_of
from .plan import METHODS, PlanConfig, is_empty, make_plan, needs_model
from .width import ffn_layout

WRITES = ["plan.json", "model"]  # what prune writes in OUT
AUTO = "auto"  # the default --method: joint where calibration rows exist, else skip_nmse (resolve_method)

log = logging.getLogger(__name__)

_PLAN_HELP = {f.name: dict(f.metadata) for f in fields(PlanConfig)}


@dataclass(frozen=True)
class PruneConfig(Runtime):
    """Settings of ``lamina prune`` (the plan's budget plus where things go)."""

    out: str = field(metadata={"help": "output folder: OUT/plan.json and OUT/model (a save_pretrained folder, or "
                                       "lamina's format for what a standard config cannot express)"})
    drop_blocks: float | None = field(default=None, metadata=_PLAN_HELP["drop_blocks"])
    method: str = field(default=AUTO, metadata={
        "help": _PLAN_HELP["method"]["help"] + "; 'auto' (default): 'joint' when there are calibration rows to run "
                "the model on (a fine-tuned model's own task rows, or a causal LM's --scores run captured from a data path), "
                "else 'skip_nmse'; plan.json records what it resolved to and why",
        "choices": (AUTO,) + METHODS})
    ffn: float | None = field(default=None, metadata=_PLAN_HELP["ffn"])
    ffn_per_layer: bool = field(default=False, metadata=_PLAN_HELP["ffn_per_layer"])
    heads: float | None = field(default=None, metadata=_PLAN_HELP["heads"])
    channels: float | None = field(default=None, metadata=_PLAN_HELP["channels"])
    target_params: float | None = field(default=None, metadata=_PLAN_HELP["target_params"])
    beam: int = field(default=1, metadata=_PLAN_HELP["beam"])
    calibration_samples: int = field(default=256, metadata={
        "help": "samples whose activations rank FFN channels, heads and CNN channels, on which --method "
                "iterative re-scores blocks, and (without --scores) on which blocks are scored: the scores run's "
                "data, or the fine-tuned model's training rows"})
    recalibrate_bn: bool = field(default=False, metadata={
        "help": "after pruning, re-estimate BatchNorm running statistics on the calibration samples (CNNs: "
                "removed channels shift what later layers see; no weight changes, no labels)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the OUT/plan.json and OUT/model lamina wrote (a file it did not write is never touched)"})

    def __post_init__(self):
        if self.method not in (AUTO,) + METHODS:
            raise UsageError("unknown block-selection method", value=self.method, allowed=", ".join((AUTO,) + METHODS),
                             fix=suggest(str(self.method), (AUTO,) + METHODS) or "--method auto")
        self.plan_config()  # validates the budget (one message, one place)
        if isinstance(self.calibration_samples, bool) or not isinstance(self.calibration_samples, int) \
                or self.calibration_samples < 1:
            raise UsageError("--calibration-samples must be a positive integer", value=self.calibration_samples,
                             allowed="an integer >= 1", fix="e.g. --calibration-samples 256")
        if not self.out:
            raise UsageError("--out is required", value=self.out, allowed="a path", fix="pass --out PATH")

    def plan_config(self, method: str | None = None) -> PlanConfig:
        """The plan's settings; ``method`` is what 'auto' resolved to (:func:`resolve_method`)."""
        method = method or (self.method if self.method != AUTO else "skip_nmse")
        return PlanConfig(drop_blocks=self.drop_blocks, method=method, ffn=self.ffn,
                          ffn_per_layer=self.ffn_per_layer, heads=self.heads,
                          channels=self.channels, target_params=self.target_params, beam=self.beam)


@dataclass
class PruneResult:
    """What ``prune`` wrote.

    Attributes:
        out: the output folder.
        plan_path: OUT/plan.json (the plan as carried out).
        model_path: OUT/model, loadable with ``lamina.load_model`` (and ``AutoModel.from_pretrained``
            when ``format`` is 'huggingface').
        plan: the plan as carried out (``applied: true``).
        blocks_before, blocks_after: number of blocks.
        removed: the canonical names of the removed blocks ('blocks.3', ...).
        parameters_before, parameters_after: parameter counts.
        format: 'huggingface' (save_pretrained) or 'lamina' (:mod:`lamina.savefmt`).
    """

    out: str
    plan_path: str
    model_path: str
    plan: dict = field(repr=False)  # the whole plan.json: printed in full it buries the counts
    blocks_before: int
    blocks_after: int
    removed: list
    parameters_before: int
    parameters_after: int
    format: str = "huggingface"

    def to_dict(self) -> dict:
        return asdict(self)


def _read_scores(scores, path: Path) -> dict:
    if isinstance(scores, dict):
        return scores
    if path.is_dir():
        path = path / "scores.json"
    if not path.exists():
        raise UsageError("no scores file there", value=str(path), allowed="a scores.json written by `lamina analyze`",
                         fix="run `lamina analyze RUN` first and pass --scores RUN/scores.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"the scores file is not valid JSON ({e})", value=str(path),
                         allowed="a scores.json written by `lamina analyze`", fix="analyze the run again") from e
    if not isinstance(data, dict) or "model" not in data:
        raise UsageError("the file is not a lamina scores.json", value=str(path),
                         allowed="a scores.json written by `lamina analyze`", fix="point --scores at RUN/scores.json")
    return data


def _manifest(scores_path: Path) -> dict | None:
    run = scores_path if scores_path.is_dir() else scores_path.parent
    path = run / "features" / "manifest.json"
    if not path.exists():
        return None
    from ..store import read_manifest
    from ..trust import inside
    return read_manifest(inside(run, "features", "the scores run's features/ folder"))  # checked, not followed out


def _calibration_batches(lm: LoadedModel, man: dict | None, scores: dict, config: PruneConfig,
                         scores_path: Path, n_rows: int | None = None) -> list:
    from ..data import subsample
    from ..data.text import load_for_capture
    if man is None or not man.get("data_spec"):
        why = "has no features/manifest.json next to it" if man is None else "was captured from in-memory data"
        raise UsageError(f"--ffn / --heads / --channels / --method iterative need calibration data, but the "
                         f"scores run {why}", value=str(scores_path),
                         allowed="scores.json inside a run folder captured from a data path or bundled name",
                         fix="pass the scores.json of such a run, or prune blocks by their scores (--drop-blocks)")
    cap = man.get("config", {})
    n_rows = n_rows or config.calibration_samples
    if man.get("lm_task"):  # a causal LM captured on packed text: calibrate on those very training blocks
        from ..analyze._lm import importance_rows
        from ..capture.packed import reload_packed
        rows = importance_rows(reload_packed(lm, man), n_rows, scores.get("seed", 0) or 0)
        return rows.batches(lm, cap.get("batch_size", 32))
    ds = subsample(load_for_capture(man["data_spec"], cap.get("text_column"), cap.get("label_column"),
                                    cap.get("skip_bad_files", False)), cap.get("limit"), cap.get("seed", 0))
    if n_rows < len(ds):
        ds = subsample(ds, n_rows, scores.get("seed", 0) or 0, min_per_class=0)
    bs, n = cap.get("batch_size", 32), len(ds)
    return [lm.batch(ds, range(s, min(n, s + bs)), cap.get("max_length", 128), cap.get("image_size"))
            for s in range(0, n, bs)]


def _check_batch(lm: LoadedModel, man: dict | None, scores: dict, config: PruneConfig, scores_path: Path):
    """A few rows of the scores run's data to compare the saved model on (None without such data)."""
    if man is None or not man.get("data_spec"):
        return None
    return _calibration_batches(lm, man, scores, config, scores_path, n_rows=min(8, config.calibration_samples))[0]


def resolve_method(config: PruneConfig, own: bool, man: dict | None) -> tuple[str, str]:
    """The depth method ``config.method`` means here, and why: 'auto' is 'joint' when the model can be run on
    calibration rows (joint scores removal sets by running the model), else 'skip_nmse' (reads scores only)."""
    if config.method != AUTO:
        return config.method, "given by --method"
    if own:
        return "joint", ("auto: calibration rows available (the fine-tuned model's own task rows), so removal sets "
                         "are scored jointly on them")
    if man is not None and man.get("data_spec"):
        cls = str((man.get("model") or {}).get("class") or "")
        if cls.endswith(("ForCausalLM", "LMHeadModel")):
            return "joint", ("auto: calibration text available (the data the --scores run was captured from), so "
                             "removal sets are scored jointly by their next-token loss on it")
        # prune passes no labels on this path, so joint could only score sets by logit nMSE, the objective
        # that picked a worse MiniLM set than even spacing at 3 of 6 blocks (BENCHMARKS.md "llm")
        return "skip_nmse", ("auto: the --scores run's rows carry no labels here, and joint's logit-nMSE "
                             "objective is not shown to beat single-block scores on classifiers, so blocks are "
                             "chosen by their single-block skip nMSE scores (--method joint to score sets anyway)")
    why = ("the scores run was captured from in-memory data" if man is not None
           else "the scores have no run folder with features/manifest.json next to them")
    return "skip_nmse", (f"auto: no calibration rows to run the model on ({why}), so blocks are chosen by their "
                         f"single-block skip nMSE scores")


def _budget_flags(config: PruneConfig) -> str:
    """The budget part of the user's command, to repeat it in a fix."""
    flags = []
    own_defaults = {f.name: f.default for f in fields(PruneConfig)}
    for f in fields(PlanConfig):
        v = getattr(config, f.name)
        if v is None or v is False or v == own_defaults.get(f.name, f.default):  # only what the user chose
            continue
        flag = "--" + f.name.replace("_", "-")
        flags.append(flag if v is True else f"{flag} {v}")
    return " ".join(flags)


def _check_same_model(lm: LoadedModel, plan: dict, model, config: PruneConfig, scores_path: Path) -> None:
    """Scores of another model (the base model's, for a fine-tuned teacher): refused with the command that works."""
    want = (plan.get("model") or {}).get("fingerprint")
    if want is None or plan.get("applied"):
        return  # check_plan explains these
    got = lm.fingerprint()
    if got == want:
        return
    of = (plan.get("model") or {}).get("name")
    if task_of(model) is not None:
        fix = (f"drop --scores: `lamina prune {model} {_budget_flags(config)} --out {config.out}` scores this model "
               f"on its own training rows")
    else:
        fix = (f"score this model first: `lamina capture --model {model} --data DATA --out run && lamina analyze "
               f"run`, then `lamina prune {model} --scores run/scores.json {_budget_flags(config)} --out {config.out}`")
    raise UsageError(f"the scores were made for another model ({of}), not for {lm.name} (fingerprints differ)",
                     value=str(scores_path), allowed=f"scores of the model being pruned (fingerprint {got})",
                     fix=fix)


def prune(model, scores=None, config: PruneConfig | None = None) -> PruneResult:
    """Plan from ``scores``, prune a copy of ``model``, save both under ``config.out``.

    Args:
        model: anything :func:`lamina.load_model` accepts (bundled name, Hugging
            Face folder, LoadedModel); it is never modified.
        scores: the path of a scores.json written by ``lamina analyze`` (or its run folder), or a loaded
            scores.json (dict; then there is no run folder to take calibration data from). None: a fine-tuned
            ``model`` is scored on its own training rows (module doc).
        config: a :class:`PruneConfig`.

    Raises UsageError, before anything is written, when OUT is not empty (and
    not ``overwrite``), the scores are missing or of another model, the budget
    removes every block (or nothing), a parameter target cannot be reached, the
    architecture cannot lose what the plan removes, or the model cannot be saved.
    """
    if config is None:
        raise UsageError("prune needs a PruneConfig", value=None, allowed="PruneConfig(out=..., ...)",
                         fix="prune(model, 'run/scores.json', PruneConfig(out='small', drop_blocks=0.25))")
    config = as_config(PruneConfig, config, "prune")
    out = Path(config.out)
    own = scores is None  # no scores given: score the model on its own task rows
    writes = WRITES + (["scores.json"] if own else [])
    plan_writes(out, "prune", writes, config.overwrite)  # refused before the work
    check_out(out, config.overwrite)
    task = task_of(model) if own else None
    if own and task is None:
        if isinstance(model, (str, Path)) and not Path(str(model)).exists():
            load_model(model)  # a model that does not exist is named first (what, value, closest names)
        raise no_task_error(model, config.out, _budget_flags(config))
    own_labels = None  # class labels of the calibration rows (a classifier scored on its own task)
    if own:
        lm = load_model(model, runtime=config.runtime())
        data, own_batches, own_labels = self_scores(lm, task, config.calibration_samples)
        scores_path, man = out / "scores.json", None
    else:
        scores_path = Path("<scores dict>") if isinstance(scores, dict) else Path(scores)
        data = _read_scores(scores, scores_path)
        man = None if isinstance(scores, dict) else _manifest(scores_path)
    method, method_why = resolve_method(config, own, man)
    plan = make_plan(data, config.plan_config(method))
    if plan["depth"] is not None:
        plan["depth"]["method_requested"] = config.method
        plan["depth"]["method_reason"] = method_why
    if is_empty(plan):
        raise UsageError("the budget removes nothing", value=asdict(config.plan_config(method)),
                         allowed="--drop-blocks large enough to remove a whole block, --target-params, or "
                                 "--ffn / --heads / --channels",
                         fix="raise --drop-blocks (it is rounded to whole blocks), or add --ffn / --heads / --channels")
    if not own:
        blocks = ((man or {}).get("config") or {}).get("blocks")
        lm = load_model(model, blocks=blocks, runtime=config.runtime())
        _check_same_model(lm, plan, model, config, scores_path)  # another model's scores: refused before writing
    check_plan(lm.module, plan)
    save_format(lm)  # a model lamina cannot save: refused before anything is written
    container = lm.blocks.container or None
    if plan["ffn"]:
        ffn_layout(lm.module, container)  # a model whose FFN cannot be pruned: refused before writing
    if plan["heads"]:
        _attn_blocks(lm.module, container)  # likewise for heads (Llama-family attention only)
    if plan["channels"]:
        channel_layout(lm.module, container)  # likewise for CNN channels (EfficientNet MBConv blocks only)
    iterative = needs_model(plan) and plan["depth"]["method"] in ("iterative", "joint")
    calibrate = plan["ffn"] or plan["heads"] or plan["channels"] or iterative or config.recalibrate_bn
    if own:
        batches = own_batches if calibrate else None
    else:
        batches = _calibration_batches(lm, man, data, config, scores_path) if calibrate else None
    if needs_model(plan):  # iterative rounds / parameter target: chosen now, so plan.json records the choice
        plan = choose_blocks(lm, plan, batches, labels=own_labels)
        if is_empty(plan):
            raise UsageError("the model already meets the parameter target, so the budget removes nothing",
                             value=config.target_params,
                             allowed=f"a target below {plan['depth'].get('predicted_parameters'):,} parameters",
                             fix="lower --target-params, or add width pruning")

    check_batch = batches[0] if batches else (own_batches[0] if own and own_batches
                                              else _check_batch(lm, man, data, config, scores_path))
    plan_path, model_path = out / "plan.json", out / "model"
    with claim(out, "prune", writes, config.overwrite):
        if own:
            record(out, "prune", ["scores.json", "scores.json.tmp"])
            save_json(scores_path, data)  # what decided the plan, for the report and for a later look
        res = apply(lm, plan, batches=batches)
        done = dict(res.plan)
        if config.recalibrate_bn:
            from ..models import recalibrate_bn
            done["bn_recalibrated"] = recalibrate_bn(res.model, batches)
        # Saved, reloaded the user's way and compared before plan.json says it was done (a failure leaves neither).
        fmt, done["reload_check"] = save_checked(res.model, model_path, lm, check_batch, stage="prune")
        n_before = lm.blocks.n_blocks
        n_after = res.model.blocks.n_blocks
        removed = list((done.get("depth") or {}).get("remove") or [])
        done["result"] = {"model_path": str(model_path), "blocks_before": n_before, "blocks_after": n_after,
                          "parameters_before": res.parameters_before, "parameters_after": res.parameters_after,
                          "blocks_container": res.model.blocks.container or None, "source": lm.source,
                          "format": fmt, "scores": str(scores_path) if own or not isinstance(scores, dict) else None,
                          "scores_computed_by": "prune" if own else "analyze"}
        done["runtime"] = describe(lm.device, lm.dtype)
        record(out, "prune", ["plan.json", "plan.json.tmp"])
        save_json(plan_path, done)
    log.info("prune: %d -> %d blocks, %d -> %d parameters", n_before, n_after, res.parameters_before,
             res.parameters_after)
    return PruneResult(str(out), str(plan_path), str(model_path), done, n_before, n_after, removed,
                       res.parameters_before, res.parameters_after, fmt)
