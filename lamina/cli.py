"""The ``lamina`` command: a thin layer over the Python API.

Each verb maps to one public function; its flags are generated from that
function's config dataclass. Errors lamina can explain are printed as their
message (never a traceback) with exit code 2 for usage errors and 1 for
failures at run time; Ctrl-C exits 130 with a hint to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from ._cliargs import add_config_args, config_from_args
from .errors import LaminaError

_VERBS: dict[str, tuple] = {}


def verb(name: str, help_: str):
    def deco(fn):
        _VERBS[name] = (fn, help_)
        return fn
    return deco


# ---------------------------------------------------------------- capture ----
def _capture_args(p):
    from .capture import CaptureConfig
    p.add_argument("--model", required=True, help="minilm, efficientnet-lite0, a Hugging Face model folder, "
                                                    "or module:factory returning an nn.Module")
    p.add_argument("--data", required=True, help="rotten-tomatoes, mnist-5k, digits, fashion-mnist, a "
                                                  "CSV/JSONL/Parquet file, an image folder, or a .npz with x and y")
    add_config_args(p, CaptureConfig)


@verb("capture", "record every block's pooled output for every sample into OUT/features")
def _capture(ns):
    from .capture import CaptureConfig, capture
    from .store import FeatureStore
    res = capture(ns.model, ns.data, config_from_args(CaptureConfig, ns))
    if res.rank == 0:
        _print_store(FeatureStore.open(res.store), ns)
        _next(f"lamina analyze {ns.out}")
    return 0


_capture.add_args = _capture_args


# ------------------------------------------------------------------- info ----
def _info_args(p):
    p.add_argument("run", help="a run folder (or its features/ folder)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true", help="re-check every file's checksum")


@verb("info", "summarize a run folder's feature store")
def _info(ns):
    from .store import FeatureStore
    store = FeatureStore.open(ns.run)
    if ns.verify:
        bad = store.verify()
        if bad:
            raise LaminaError("files in the store do not match their checksums", value=", ".join(bad),
                              fix="capture again with --overwrite")
    _print_store(store, ns)
    return 0


_info.add_args = _info_args


def _print_store(store, ns) -> None:
    s = store.summary()
    if getattr(ns, "json", False):
        from .jsonio import strict_json
        print(json.dumps(strict_json(s), indent=2, allow_nan=False))
        return
    print(f"store    {s['path']}")
    print(f"model    {s['model']}    data {s['data']}    samples {s['n']}    pooling {s['pooling']}    "
          f"dtype {s['dtype']}    {s['bytes'] / 1e6:.1f} MB")
    lmt = store.manifest.get("lm_task")
    if lmt:  # a causal LM on text: packed blocks of the LM task, not labelled rows
        print(f"text     {lmt['captured_blocks']} packed blocks of {lmt['seq_len']} tokens from the train split "
              f"(blocks train/val/test: {lmt['blocks']['train']}/{lmt['blocks']['val']}/{lmt['blocks']['test']})")
    elif s.get("classes"):
        print(f"classes  {len(s['classes'])}: " + ", ".join(f"{c} ({k})" for c, k in s["classes"].items()))
    for name, shape in s["layers"].items():
        print(f"  {name:<12} {tuple(shape)}")


# ---------------------------------------------------------------- analyze ----
def _analyze_args(p):
    from .analyze import AnalyzeConfig
    p.add_argument("run", help="run folder written by `lamina capture`")
    add_config_args(p, AnalyzeConfig)


@verb("analyze", "per-layer probes, k-NN, geometry, CKA and block importance -> RUN/scores.json")
def _analyze(ns):
    from .analyze import AnalyzeConfig, analyze
    res = analyze(ns.run, config_from_args(AnalyzeConfig, ns))
    _print_scores(res.scores_path)
    _next(f"lamina report {ns.run}")
    return 0


_analyze.add_args = _analyze_args


def _print_scores(path) -> None:
    s = json.loads(open(path).read())
    m, ctrl = s["metrics"], (s.get("control") or {}).get("metrics", {})
    imp = s.get("importance") or {}
    skip = dict(zip(imp.get("blocks", []), imp.get("skip_nmse", [])))
    bi = dict(zip(imp.get("blocks", []), imp.get("block_influence", [])))
    f = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    print(f"{'layer':<12} {'probe':>6} {'ctrl':>6} {'kNN':>6} {'NCC':>6} {'CKA>last':>8} {'BI':>6} {'skip':>6}")
    for i, name in enumerate(s["layers"]):
        c = ctrl.get("probe_acc", [None] * len(s["layers"]))[i]
        print(f"{name:<12} {f(m['probe_acc'][i])} {f(c)} {f(m['knn_acc'][i])} {f(m['ncc_acc'][i])} "
              f"{f(m['cka_to_last'][i]):>8} {f(bi.get(name))} {f(skip.get(name))}")
    if imp.get("kind") == "lm":
        _print_lm_importance(imp)
    for note in s.get("notes") or []:
        print(f"note: {note}")
    print(f"scores: {path}")


def _print_lm_importance(imp: dict) -> None:
    """A causal LM's importance (lower = can go): perplexity change, angular distance n=1, and the cost."""
    one = (imp.get("angular") or {}).get("1") or [None] * len(imp["blocks"])
    f = lambda v: "     -" if v is None else f"{v:10.4g}"  # noqa: E731
    print(f"LM importance on {imp['tokens']} tokens ({imp['n_samples']} blocks of {imp['seq_len']}); full "
          f"perplexity {imp['full_perplexity']:.4g}")
    print(f"{'block':<12} {'skip ppl':>10} {'ppl change':>10} {'angular n=1':>11}")
    for name, p, d, a in zip(imp["blocks"], imp["skip_perplexity"], imp["perplexity_change"], one):
        print(f"{name:<12} {f(p)} {f(d)} {f(a):>11}")
    x = imp.get("seconds_as_forwards")
    print(f"LM importance cost: {imp['seconds']:.2f} s" + (f" = {x:.1f} forward passes" if x else ""))


# ---------------------------------------------------------------- compare ----
def _compare_args(p):
    from .analyze import CompareConfig
    p.add_argument("run_a", help="first run folder")
    p.add_argument("run_b", help="second run folder, captured on the same samples")
    add_config_args(p, CompareConfig)


@verb("compare", "CKA layer x layer across two models on the same samples, with a permutation null")
def _compare(ns):
    from .analyze import CompareConfig, compare
    res = compare(ns.run_a, ns.run_b, config_from_args(CompareConfig, ns))
    width = max(len(n) for n in res.layers_a)
    print(f"linear CKA: rows: layers of {ns.run_a}; columns: layers of {ns.run_b}")
    print(" " * width + " " + " ".join(f"{n[-8:]:>8}" for n in res.layers_b))
    for name, row in zip(res.layers_a, res.cka):
        print(f"{name:<{width}} " + " ".join(f"{v:8.3f}" for v in row))
    print(f"comparison: {res.path}")
    return 0


_compare.add_args = _compare_args


# ----------------------------------------------------------------- report ----
def _report_args(p):
    from .report import ReportConfig
    p.add_argument("run", help="run folder with scores.json")
    add_config_args(p, ReportConfig)


@verb("report", "write one self-contained HTML page (RUN/report.html) from a run folder")
def _report(ns):
    from .report import ReportConfig, report
    res = report(ns.run, config_from_args(ReportConfig, ns))
    print(f"report: {res.path} ({res.plots} plots; open it in a browser, it works offline)")
    if not ns.stages:
        _next(f"lamina finetune --model MODEL --data DATA --out teacher/  (then prune, distill, bench; "
              f"`lamina report {ns.run} --stages teacher/ small/ recovered/`)")
    return 0


_report.add_args = _report_args


# ------------------------------------------------------------------ prune ----
def _prune_args(p):
    from .compress import PruneConfig
    p.add_argument("model", help="the model to prune: a `lamina finetune` OUT folder (scored on its own training "
                                 "rows unless --scores is given), or minilm, a Hugging Face folder, ... with --scores")
    p.add_argument("--scores", default=None, help="scores.json written by `lamina analyze` for this very model; "
                                                   "without it, a fine-tuned model (a `lamina finetune` OUT) is "
                                                   "scored on --calibration-samples of its own training rows")
    add_config_args(p, PruneConfig)


@verb("prune", "plan from block importance (--scores, or measured on a fine-tuned model's own rows) and a budget, "
              "then save the smaller model -> OUT/plan.json, OUT/model")
def _prune(ns):
    from .compress import PruneConfig, prune
    res = prune(ns.model, ns.scores, config_from_args(PruneConfig, ns))
    if res.plan["result"].get("scores_computed_by") == "prune":
        rows = json.loads(open(res.plan["result"]["scores"]).read())["rows"]
        print(f"scores      no --scores given: block importance measured on {rows['n']} training rows of "
              f"{rows['task']['data']} (the model's own task) -> {res.plan['result']['scores']}")
    kept = res.blocks_after
    print(f"blocks      {kept} kept, {len(res.removed)} removed of {res.blocks_before}"
          + (f" ({', '.join(res.removed)})" if res.removed else ""))
    for part in ("ffn", "heads", "channels"):
        if res.plan.get(part):
            where = "of all FFN channels (per layer)" if part == "ffn" and res.plan[part].get("per_layer") \
                else "removed in every block"
            print(f"{part:<11} {res.plan[part]['fraction']:.0%} {where}")
    pct = 100 * (1 - res.parameters_after / res.parameters_before) if res.parameters_before else 0.0
    print(f"parameters  {res.parameters_before:,} -> {res.parameters_after:,} (-{pct:.1f}%)")
    print(f"plan:  {res.plan_path}")
    how = "lamina.load; its config cannot express it" if res.format == "lamina" \
        else "lamina.load or AutoModel.from_pretrained"
    print(f"model: {res.model_path}  ({how})")
    from .task import read_task
    if read_task(ns.model) is not None:
        _next(f"lamina distill --teacher {ns.model} --student {res.out} --out recovered/")
    else:
        _next(f"lamina bench {ns.model} {res.out}")
    return 0


# --------------------------------------------------------------- quantize ----
def _quantize_args(p):
    from .quantize import QuantizeConfig
    p.add_argument("model", help="the model to quantize: a `lamina finetune` / prune / distill OUT folder "
                                 "(calibrated on its own training rows), or minilm, smollm2, a Hugging Face "
                                 "folder, ... with --data (a causal LM: text, packed into --seq-len blocks)")
    add_config_args(p, QuantizeConfig)


@verb("quantize", "bf16 / int8 for the Linear layers whose quantization changes the output least, within a budget "
                  "-> OUT/quant_plan.json, OUT/model")
def _quantize(ns):
    from .quantize import QuantizeConfig, quantize
    res = quantize(ns.model, config_from_args(QuantizeConfig, ns))
    print(f"layers      {len(res.quantized)} of {res.layers} Linear layers quantized "
          f"({', '.join(f'{n} {f}' for f, n in res.plan['by_format'].items())})")
    if res.metric_drop is not None:
        print(f"validation  measured drop {res.metric_drop:.4g} (allowed {res.plan['budget']['max_drop']}; "
              f"{res.plan['max_drop_unit']})")
    val = res.plan.get("validation") or {}
    if val.get("metric") == "perplexity":
        print(f"perplexity  validation {val['float']:.4g} float -> {val['quantized']:.4g} quantized "
              f"({100 * val['drop']:+.2f}%)")
    if res.plan.get("latency"):
        lat = res.plan["latency"]
        print(f"latency     measured {lat['measured_ms']:.4g} ms (goal {lat['goal_ms']:g}; "
              f"float {lat['float_ms']:.4g})")
    print(f"plan:  {res.plan_path}")
    print(f"model: {res.out}  (lamina.load; reload checked, max abs diff "
          f"{res.plan['reload_check']['max_abs_diff']:.3g})")
    _next(f"lamina bench {ns.model} {res.out}")
    return 0


_quantize.add_args = _quantize_args


def _next(cmd: str) -> None:
    """The command a user would run next (the CLI's last line; the API returns results instead)."""
    print(f"next: {cmd}")


_prune.add_args = _prune_args


# --------------------------------------------------------------- finetune ----
def _finetune_args(p):
    from .finetune import FinetuneConfig
    p.add_argument("--model", required=True, help="the backbone: minilm, efficientnet-lite0, a Hugging Face model "
                                                    "folder, or a lamina model folder")
    p.add_argument("--data", required=True, help="labelled data: rotten-tomatoes, mnist-5k, digits, fashion-mnist, "
                                                  "a CSV/JSONL/Parquet file, an image folder, or a .npz")
    add_config_args(p, FinetuneConfig)


@verb("finetune", "train a classification head on a backbone (frozen, or --full) -> OUT/model, OUT/finetune.json")
def _finetune(ns):
    from .finetune import FinetuneConfig, finetune
    res = finetune(ns.model, ns.data, config_from_args(FinetuneConfig, ns))
    if res.record.get("history") is None or not res.out:
        return 0
    for e in res.record["history"]["epochs"]:
        print(f"epoch {e['epoch']:>3}  train loss {e['train'].get('loss', float('nan')):.4f}  "
              f"val acc {e['val_accuracy']:.4f}  ({e['seconds']:.0f} s)")
    print(f"mode        {res.record['mode']} ({res.trainable_parameters:,} of {res.parameters:,} parameters trained)")
    print(f"test acc    {res.test_accuracy:.4f} on {res.record['test']['n']} held-out rows "
          f"(best val {res.best_val_accuracy:.4f}, epoch {res.record['history']['best_epoch']})")
    print(f"model: {res.model_path}  ({'AutoModelFor*Classification.from_pretrained' if res.record.get('format') == 'huggingface' else 'lamina.load'})")
    print(f"record: {res.out}/finetune.json")
    for w in res.record.get("warnings", []):
        print(f"warning: {w}")
    probe = res.record.get("probe_comparison") or {}
    if not probe.get("compared"):
        print(f"probe       not compared with a frozen probe: {probe.get('why')}")
    _next(f"lamina prune {res.out} --drop-blocks 0.5 --out small/")
    return 0


_finetune.add_args = _finetune_args


# ------------------------------------------------------------------ bench ----
def _bench_args(p):
    from .bench import BenchConfig
    p.add_argument("models", nargs="+", help="model folders (or bundled names); the first is the reference")
    add_config_args(p, BenchConfig)


@verb("bench", "latency (batch 1/8/32), parameters, FLOPs and test accuracy of models side by side -> bench.json")
def _bench(ns):
    from .bench import BenchConfig, bench
    res = bench(ns.models, config_from_args(BenchConfig, ns))
    bss = list(res["models"][0]["latency"])
    metric = res["models"][0].get("metric", "accuracy")  # perplexity for a language model
    head = f"{'model':<28} {'params':>11} {'MFLOP/x':>9} {metric[:6]:>6} " + " ".join(f"{'ms@' + b:>9}" for b in bss)
    print(head + "  speed-up@" + bss[-1] + " (ideal)")
    for r in res["models"]:
        v = r["vs_first"]
        acc = f"{r[metric]:.4g}" if r.get(metric) is not None else "  -   "
        lat = " ".join(f"{r['latency'][b]['median_ms']:9.2f}" for b in bss)
        ideal = f"{v['ideal_speedup']:.2f}x" if v["ideal_speedup"] else "-"
        print(f"{str(r['model'])[-28:]:<28} {r['parameters']:>11,} {r['flops_per_sample'] / 1e6:9.1f} {acc:>6} {lat}"
              f"  {v['speedup'][bss[-1]]:.2f}x ({ideal})")
    for r in res["models"]:
        if "decode" in r:
            d = r["decode"]
            print(f"decode {str(r['model'])[-28:]:<28} {d['tokens_per_s']:8.1f} tokens/s ({d['new_tokens']} new "
                  f"after {d['prompt_tokens']}, greedy, KV cache; "
                  f"{'same tokens without the cache' if d['same_tokens_without_cache'] else 'DIFFERS without the cache'})")
    for r in res["models"]:  # causal LMs with --prefill-lens: one line per model and length
        for n, p in (r.get("prefill") or {}).items():
            sp = r["vs_first"]["prefill"][n]["speedup"]
            print(f"prefill {n} tokens {str(r['model'])[-28:]:<28} " + " ".join(
                f"{p['latency'][b]['median_ms']:9.2f} ms@{b} ({sp[b]:.2f}x)" for b in p["latency"]))
        if r.get("memory"):
            m = r["memory"]
            print(f"memory {str(r['model'])[-28:]:<28} peak {m['peak_bytes'] / 2 ** 20:9.1f} MiB, weights "
                  f"{m['weight_bytes'] / 2 ** 20:9.1f} MiB at {m['input_shape']}")
    print(f"bench: {res['path']}")
    _next("lamina report RUN --stages " + " ".join(ns.models) + "  (RUN: a `lamina analyze` run folder)")
    return 0


_bench.add_args = _bench_args


# ---------------------------------------------------------------- distill ----
def _distill_args(p):
    from .distill import DistillConfig
    p.add_argument("--teacher", required=True, help="the teacher: a `lamina finetune` folder or a classifier folder")
    p.add_argument("--student", default=None, help="the student: a `lamina prune` output or a classifier folder "
                                                   "(or use --width)")
    add_config_args(p, DistillConfig)


@verb("distill", "train a pruned or narrow student to match its teacher (CE, KD, SKT cosine + FSP) -> OUT/model")
def _distill(ns):
    from .distill import DistillConfig, distill
    res = distill(ns.teacher, ns.student, config_from_args(DistillConfig, ns))
    for e in res.record["history"]["epochs"]:
        parts = "  ".join(f"{k} {v:.4f}" for k, v in e["train"].items())
        val = f"val ppl {math.exp(min(e['val_loss'], 700)):.3f}" if res.record.get("metric") == "perplexity" \
            else f"val acc {e['val_accuracy']:.4f}"
        print(f"epoch {e['epoch']:>3}  {parts}  {val}  ({e['seconds']:.0f} s)")
    p = res.record["parameters"]
    print(f"student     {p['student']:,} parameters ({p['student'] / p['teacher']:.1%} of the teacher's), "
          f"layer map {res.record['layer_map_source']}: {res.record['layer_map']}")
    if res.record.get("metric") == "perplexity":
        print(f"test ppl    {res.record['test']['perplexity']:.3f} (teacher {res.record['teacher_test']['perplexity']:.3f})")
    else:
        print(f"test acc    {res.test_accuracy:.4f} (teacher {res.teacher_test_accuracy:.4f}, retained "
              f"{res.accuracy_retained:.1%})")
    print(f"model: {res.model_path}")
    print(f"record: {res.out}/distill.json")
    _next(" ".join(["lamina bench", ns.teacher] + ([ns.student] if ns.student else []) + [res.out]))
    return 0


_distill.add_args = _distill_args


# ---------------------------------------------------------------- elastic ----
def _elastic_cli(verb_fn, config: str, first: tuple, help_: str) -> None:
    """Both elastic verbs: one argument naming their input (``first``: argparse's name or flags), then the
    flags of their config (``lamina.elastic.<config>``)."""
    def add(p):
        from .elastic import ElasticConfig, ExtractConfig
        p.add_argument(*first, **({"required": True} if first[0].startswith("-") else {}), help=help_)
        add_config_args(p, {"ElasticConfig": ElasticConfig, "ExtractConfig": ExtractConfig}[config])
    verb_fn.add_args = add


@verb("elastic", "train one model whose nested sub-models (depth x widths) are all usable -> OUT/model, "
                 "OUT/elastic.json; then `lamina elastic extract OUT ...`")
def _elastic(ns):
    from .elastic import ElasticConfig, elastic
    res = elastic(ns.teacher, config_from_args(ElasticConfig, ns))
    r = res.record
    ppl = r["metric"] == "perplexity"
    for e in r["history"]["epochs"]:
        parts = "  ".join(f"{k} {v:.4f}" for k, v in e["train"].items())
        val = f"val ppl {math.exp(min(e['val_loss'], 700)):.3f}" if ppl else f"val acc {e['val_accuracy']:.4f}"
        print(f"epoch {e['epoch']:>3}  {parts}  {val}  ({e['seconds']:.0f} s)")
    print(f"{'depth':>5} {'ffn':>5} {'heads':>5} {'chan':>5} {'parameters':>12} {'val ' + r['metric']:>15} "
          f"{'latency ms':>11}  pareto")
    for m in res.members:
        print(f"{m['depth']:>5} {m['ffn']:>5g} {m['heads']:>5g} {m['channels']:>5g} {m['parameters']:>12,} "
              f"{m['val_metric']:>15.4f} {m['latency_ms']:>11.3f}  {'*' if m['pareto'] else ''}")
    t, k = r["training"], r["metric"]
    print(f"full member test {k} {r['test'][k]:.4f} (teacher {r['teacher_test'][k]:.4f}); training "
          f"{t['steps']} steps, {t['wall_s']:.0f} s, {t['flops']:.3g} FLOPs (estimated)")
    print(f"model: {res.model_path}")
    print(f"record: {res.out}/elastic.json")
    _next(f"lamina elastic extract {res.out} --out small/ --params 0.5")
    return 0


_elastic_cli(_elastic, "ElasticConfig", ("--teacher",), "the model to make elastic: a `lamina finetune` folder, "
             "a classifier folder with --data, or a causal LM with --data text")


@verb("elastic-extract", "cut one member out of a `lamina elastic` family, no training -> OUT/model "
                         "(also spelled `lamina elastic extract`)")
def _extract(ns):
    from .elastic import ExtractConfig, elastic_extract
    res = elastic_extract(ns.elastic, config_from_args(ExtractConfig, ns))
    b, r = res.budget, res.record
    print(f"member      depth {b['depth']}, ffn {b['ffn']:g}, heads {b['heads']:g}, channels {b['channels']:g} "
          f"(chosen by {res.chosen_by})")
    print(f"parameters  {res.parameters:,} ({res.parameters / r['parent_parameters']:.1%} of the parent's)")
    m = r.get("measured_in_family")
    if m:
        print(f"measured    val {m['metric']} {m['val_metric']:.4f}, {m['latency_ms']:.3f} ms at batch "
              f"{m['latency_batch']} (lamina elastic)")
    print(f"model: {res.model_path}  ({r['format']}; reload checked)")
    _next(f"lamina bench {res.path}")
    return 0


_elastic_cli(_extract, "ExtractConfig", ("elastic",), "the OUT folder of `lamina elastic`")


# --------------------------------------------------------------- transfer ----
def _transfer_args(p):
    from .transfer import TransferConfig
    p.add_argument("run", help="a run folder written by `lamina capture` (its model must be reloadable)")
    add_config_args(p, TransferConfig, skip=TransferConfig.NO_FLAGS)


@verb("transfer", "train a head on the frozen backbone (last/best/mix/select/side) -> RUN/transfer/HEAD, "
                  "RUN/transfer.json")
def _transfer(ns):
    from .transfer import TransferConfig, transfer
    res = transfer(ns.run, config_from_args(TransferConfig, ns))
    r = res.record
    print(f"head        {res.head} reading {len(res.layers)} layer(s): {', '.join(res.layers[:8])}"
          + (" ..." if len(res.layers) > 8 else ""))
    print(f"test acc    {res.test_accuracy:.4f} (95% interval {res.ci_low:.4f}-{res.ci_high:.4f}) on "
          f"{r['test']['n']} held-out rows")
    print(f"trained     {res.trainable_parameters:,} parameters in {res.seconds:.1f} s, peak memory "
          f"+{res.peak_memory_bytes / 2 ** 20:.0f} MiB")
    kept = res.deepest_block + 1
    print(f"deployable  blocks 0..{res.deepest_block} of {res.n_blocks} kept"
          + (f" ({res.n_blocks - max(kept, 1)} removed)" if kept < res.n_blocks else "")
          + f", {r['deployed_parameters']:,} parameters")
    print(f"model: {res.model_path}  (lamina.load; lamina bench TEACHER {res.model_path})")
    return 0


_transfer.add_args = _transfer_args


# ------------------------------------------------------------------- demo ----
def _demo_args(p):
    p.add_argument("--out", default="demo-run", help="run folder (default: demo-run)")
    p.add_argument("--limit", type=int, default=2000, help="sentences to use; 0: all (default: 2000)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="include the random-init control (default: true)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an earlier demo run in OUT (default: true)")


@verb("demo", "the main job: bundled MiniLM on Rotten Tomatoes, capture -> analyze -> report")
def _demo(ns):
    from .analyze import AnalyzeConfig, analyze
    from .analyze.analyze import writes as analyze_writes
    from .capture import CaptureConfig, capture
    from .report import ReportConfig, report
    from .runfolder import claim
    from .store import FeatureStore
    ccfg = CaptureConfig(out=ns.out, limit=ns.limit, overwrite=ns.overwrite)
    acfg = AnalyzeConfig(control=ns.control, overwrite=ns.overwrite)
    # all three stages' writes are decided before the first one starts, and the folder stays locked throughout
    writes = ["features", "config.json", *analyze_writes(acfg), "report.html"]
    with claim(ns.out, "demo", writes, ns.overwrite):
        print(f"[1/3] capture: minilm x {ns.limit} rotten-tomatoes sentences -> {ns.out}/features")
        res = capture("minilm", "rotten-tomatoes", ccfg)
        _print_store(FeatureStore.open(res.store), ns)
        print("[2/3] analyze: probes, k-NN, geometry, CKA, importance"
              + (", random-init control" if ns.control else ""))
        ares = analyze(ns.out, acfg)
        _print_scores(ares.scores_path)
        print("[3/3] report")
        rep = report(ns.out, ReportConfig())
    print(f"report: {rep.path}  (open it in a browser; it works offline)")
    return 0


_demo.add_args = _demo_args


# ------------------------------------------------------------------- main ----
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="lamina", description="Open a pretrained network layer by layer: "
                                     "capture, analyze, report, transfer, compress, distill, bench.")
    parser.add_argument("--version", action="version", version=f"lamina {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (fn, help_) in _VERBS.items():
        # a nested verb's usage line shows the spelling users type, not the flat name it is parsed under
        extra = {"prog": f"lamina {_NESTED[name]}"} if name in _NESTED else {}
        p = sub.add_parser(name, help=help_, description=help_, **extra)
        fn.add_args(p)
        if name in _LOADS_MODELS:
            p.add_argument("--trust-code", action="store_true",
                           help="let saved model folders import the factory:module:function code their lamina.json "
                                "names (off: only a factory you name, as --model module:function@FOLDER)")
        p.set_defaults(_fn=fn)
    return parser


# verbs typed as two words (`lamina elastic extract`), parsed under one flat name: flat name -> what users type
_NESTED = {"elastic-extract": "elastic extract"}

_LOADS_MODELS = ("capture", "analyze", "finetune", "prune", "distill", "bench", "transfer", "quantize", "elastic",
                 "elastic-extract")


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for flat, typed in _NESTED.items():
        if argv[:2] == typed.split():
            argv = [flat, *argv[2:]]
    ns = parser.parse_args(argv)  # argparse exits 2 on unknown flags itself
    if not getattr(ns, "_fn", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(message)s")
    if not ns.verbose:
        from ._quiet import quiet_known_noise
        quiet_known_noise()  # torchao's no-CUDA start-up lines, before anything imports transformers
    from .trust import trusting_code
    said = _NESTED.get(ns.verb, ns.verb)  # the spelling the usage line shows
    try:
        with trusting_code(getattr(ns, "trust_code", False)):
            return int(ns._fn(ns) or 0)
    except LaminaError as e:
        print(f"lamina {said}: error: {e.cli_text()}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a read-only folder, a full disk: the OS's refusal (also inside a library's error)
        from .files import os_error
        err = os_error(e, resumable=hasattr(ns, "resume"), out=getattr(ns, "out", None))
        if err is None:
            raise
        print(f"lamina {said}: error: {err.cli_text()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        then = "run the same command with --resume to continue" if hasattr(ns, "resume") \
            else "run the same command again (it starts over)"
        print(f"lamina {said}: interrupted; {then}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
