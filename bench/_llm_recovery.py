"""Recovery of the 22-block SmolLM2 student by distillation: `bench/llm.py --part recovery` and `--part step`.

- ``step``: the cost of one training step (forward + backward + teacher forward + AdamW) of the 22-block
  student at the recovery's block size and batch, at 1 and 2 threads, for the plain fp32 recipe ("before")
  and each speed change alone and together ("after"), interleaved, with a short profile of both ends and
  the correctness checks each change needs (KD of a model against itself is 0, CE equals the model's own
  loss, the bf16 teacher's distribution against the fp32 one).
- ``recovery``: the student distilled for a fixed token budget with CE only and with CE + KD (KL at every
  position), 3 paired seeds each, held-out log-perplexity on test blocks (documents never seen in
  training) at a few points of training (the learning curve) and at the end.

Design decisions (measured by ``step``, see BENCHMARKS.md "llm"):
- The teacher runs as a bfloat16 copy under ``torch.inference_mode`` (AMX on these CPUs): it is a fixed
  target, its KL to the fp32 teacher is recorded.
- The student trains under bf16 autocast with float32 master weights and a float32 loss; evaluation is
  in float32 without autocast, so every reported perplexity is the fp32 model's.
- KD uses ``lamina.distill.losses.kd_loss`` (KL and its gradient in cache-sized chunks of positions);
  AdamW is torch's fused CPU kernel. Gradient checkpointing stays off (HF's default; it trades time for
  memory, and memory is not short here). The tied embedding / output head is frozen.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _llm_common import evaluate, indices, pruned, smollm2_task
from lamina.distill.losses import kd_loss
from lamina.trust import sha256_of

RECIPES = {"ce": {"ce": 1.0, "kd": 0.0, "temperature": 1.0},
           "kd": {"ce": 1.0, "kd": 1.0, "temperature": 1.0},
           "kd_only": {"ce": 0.0, "kd": 1.0, "temperature": 1.0},
           # Minitron's teacher correction: the KD target is the teacher fine-tuned with CE on the training split
           # first (``--teacher-correction STEPS``); the student is still pruned from the original teacher
           "kd_corrected": {"ce": 1.0, "kd": 1.0, "temperature": 1.0, "teacher": "corrected"},
           "kd_only_corrected": {"ce": 0.0, "kd": 1.0, "temperature": 1.0, "teacher": "corrected"}}
# the corrected teacher's own draw of training blocks, apart from the students' seeds 0, 1, 2
CORRECTION_SEED = 1000
FAST = {"teacher_bf16": True, "autocast": True, "chunked_kd": True, "fused_adam": True}
PLAIN = {k: False for k in FAST}


def _kd_autograd(s, t, tau):
    """The KD loss as autograd computes it without chunking (what kd_loss did before): the "before" side."""
    k = s.shape[-1]
    ls = F.log_softmax(s.reshape(-1, k).float() / tau, dim=-1)
    lt = F.log_softmax(t.detach().reshape(-1, k).float() / tau, dim=-1)
    return tau * tau * F.kl_div(ls, lt, log_target=True, reduction="batchmean")


class Trainer:
    """One training run's step: the student (in place), its optimizer and LR schedule, a recipe, speed options.

    ``teachers`` maps False/True (bf16?) to the fp32 teacher module and its bf16 copy.
    """

    def __init__(self, teachers: dict, student, task, recipe: dict, lr: float, steps: int, opts: dict, opt=None):
        self.t = teachers[opts["teacher_bf16"]]
        self.student, self.task, self.recipe, self.opts = student, task, recipe, opts
        m = student.module
        emb = m.get_input_embeddings().weight
        self.params = [p for p in m.parameters() if p is not emb]
        for p in m.parameters():
            p.requires_grad_(p is not emb)
        if getattr(m, "is_activation_checkpointing", getattr(m, "is_gradient_checkpointing", False)):
            m.gradient_checkpointing_disable()
        self.opt = opt or torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, fused=opts["fused_adam"] or None)
        warm = max(1, steps // 10)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
        m.train()

    def step(self, rows) -> dict:
        b = self.task.batch(self.student, rows)
        tgt = b["input_ids"][:, 1:]
        r = self.recipe
        if r["kd"] > 0:
            with torch.inference_mode():
                t_pred = self.t(**b).logits[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.opts["autocast"]):
            z = self.student.forward(b).logits
        pred = z[:, :-1].float()  # losses in float32 whatever the forward ran in
        loss, parts = torch.zeros(()), {}
        if r["ce"] > 0:
            ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1))
            loss, parts["ce"] = loss + r["ce"] * ce, float(ce.detach())
        if r["kd"] > 0:
            kd = (kd_loss if self.opts["chunked_kd"] else _kd_autograd)(pred, t_pred, r["temperature"])
            loss, parts["kd"] = loss + r["kd"] * kd, float(kd.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        return {"loss": float(loss.detach()), **parts}

    def done(self) -> None:
        self.student.module.eval()
        for p in self.student.module.parameters():
            p.requires_grad_(False)


def _setup(args, res: dict):
    lm, task = smollm2_task(args.seq_len)
    for p in lm.module.parameters():
        p.requires_grad_(False)
    lm.module.eval()
    # the joint method's 22-block set: its greedy path's 8th set
    remove = indices(res["joint"]["greedy_path"][lm.blocks.n_blocks - 22 - 1])
    teachers = {False: lm.module, True: copy.deepcopy(lm.module).to(torch.bfloat16).eval()}
    return lm, task, remove, teachers, (lambda: pruned(lm, remove))


def _log_ppl(lm, task, rows) -> float:
    return float(evaluate(lm, task, rows)["loss"])


def checks(lm, teachers, student, task, rows) -> dict:
    """What each speed change must keep: KD(model, itself) = 0, CE = the model's own loss, bf16 teacher ~ fp32."""
    b = task.batch(lm, rows)
    with torch.inference_mode():
        z32 = teachers[False](**b).logits
        z16 = teachers[True](**b).logits
        own = float(teachers[False](**b, labels=b["input_ids"]).loss)
        sz32 = student.module(**b).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sz16 = student.module(**b).logits
    tgt = b["input_ids"][:, 1:].reshape(-1)
    ce = float(F.cross_entropy(z32[:, :-1].float().reshape(-1, z32.shape[-1]), tgt))
    s_ce = [float(F.cross_entropy(z[:, :-1].float().reshape(-1, z.shape[-1]), tgt)) for z in (sz32, sz16)]
    return {"rows": len(rows), "kd_teacher_vs_itself": float(kd_loss(z32[:, :-1], z32[:, :-1], 1.0)),
            "ce_minus_model_own_loss": ce - own,
            "kl_teacher_fp32_to_bf16": float(kd_loss(z16[:, :-1], z32[:, :-1], 1.0)),
            "kl_student_fp32_to_autocast": float(kd_loss(sz16[:, :-1], sz32[:, :-1], 1.0)),
            "kd_pruned_student_vs_teacher": float(kd_loss(sz32[:, :-1], z32[:, :-1], 1.0)),
            "kd_pruned_student_vs_bf16_teacher": float(kd_loss(sz32[:, :-1], z16[:, :-1], 1.0)),
            "student_ce_fp32": s_ce[0], "student_ce_autocast": s_ce[1]}


def run_step(args, res: dict, save) -> dict:
    """Seconds per training step, before/after and each change alone, interleaved; profiles; checks.

    ``save(out)`` after each thread count, so a stopped run keeps the counts it finished."""
    from torch.profiler import ProfilerActivity, profile
    lm, task, remove, teachers, make = _setup(args, res)
    student = make()
    rows = task.split["train"][: args.recovery_batch]
    out = {"seq_len": args.seq_len, "batch": args.recovery_batch, "repeats": args.repeats, "remove": remove,
           "checks": checks(lm, teachers, student, task, rows), "threads": {}}
    variants = {"before": PLAIN, "teacher_bf16": PLAIN | {"teacher_bf16": True},
                "autocast": PLAIN | {"autocast": True}, "chunked_kd": PLAIN | {"chunked_kd": True},
                "fused_adam": PLAIN | {"fused_adam": True}, "after": FAST}
    runs = [(f"kd_{v}", RECIPES["kd"], o) for v, o in variants.items()]
    runs += [("ce_before", RECIPES["ce"], PLAIN), ("ce_after", RECIPES["ce"], FAST)]
    # two optimizers (foreach, fused) over the same weights: a third of the memory of one per variant
    opts = {f: Trainer(teachers, student, task, RECIPES["ce"], 1e-5, 10 ** 6, PLAIN | {"fused_adam": f}).opt
            for f in (False, True)}
    trainers = {name: Trainer(teachers, student, task, rec, 1e-5, 10 ** 6, o, opt=opts[o["fused_adam"]])
                for name, rec, o in runs}
    for th in args.step_threads:
        torch.set_num_threads(th)
        times: dict = {n: [] for n in trainers}
        loads = [os.getloadavg()[0]]
        for rep in range(args.repeats + 1):  # round 0 is the warm-up
            for name, tr in trainers.items():
                t = time.perf_counter()
                tr.step(rows)
                if rep:
                    times[name].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
        prof = {}
        for name in ("kd_before", "kd_after"):
            with profile(activities=[ProfilerActivity.CPU]) as p:
                trainers[name].step(rows)
            ev = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
            prof[name] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ev]
        out["threads"][str(th)] = {
            "seconds": {n: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v)), "all": v}
                        for n, v in times.items()},
            "kd_speedup": float(np.median(times["kd_before"]) / np.median(times["kd_after"])),
            "ce_speedup": float(np.median(times["ce_before"]) / np.median(times["ce_after"])),
            "loadavg_1min": loads, "profile": prof}
        print(f"{th} thread(s): " + ", ".join(f"{n} {np.median(v):.2f} s" for n, v in times.items()), flush=True)
        save(out)
    return out


def corrected_teacher(args, lm, task, eval_rows, curve_at_of, start_log_ppl: float) -> tuple:
    """Minitron's teacher correction: a copy of the 30-block teacher fine-tuned with CE on training blocks.

    Trained once with the students' recipe (AdamW, peak lr, warm-up + linear decay, batch, bf16 autocast,
    tied embedding frozen) for ``--teacher-correction`` steps on its own draw of the training split (seed
    ``CORRECTION_SEED``; never validation or test documents). Cached under ``--work`` as safetensors (no
    pickle) with its sha256, checked before reuse. Returns ({False: fp32, True: bf16} modules, record)."""
    from safetensors.torch import load_model as st_load, save_model as st_save
    steps, batch = args.teacher_correction, args.recovery_batch
    train = task.split["train"]
    if steps * batch > len(train):
        raise SystemExit(f"--teacher-correction {steps} x {batch} blocks asked, the training split has {len(train)}")
    stamp = {"steps": steps, "batch": batch, "lr": args.recovery_lr, "seq_len": args.seq_len, "seed": CORRECTION_SEED,
             "split": "train", "data": "debates", "schedule": "linear warm-up (10%), linear decay", "speed": FAST,
             "eval_blocks": len(eval_rows)}
    d = Path(args.work) / "teacher-corrected"
    meta_p, w = d / "meta.json", d / "model.safetensors"
    module = copy.deepcopy(lm.module)
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    if meta.get("stamp") == stamp and w.exists() and sha256_of(w) == meta.get("sha256"):
        st_load(module, str(w), strict=True)
        rec = meta["record"] | {"cached": str(d)}
    else:
        t_lm = copy.copy(lm)
        t_lm.module = module
        rows = np.random.default_rng(CORRECTION_SEED).permutation(np.asarray(train))[:steps * batch].tolist()
        torch.manual_seed(CORRECTION_SEED)
        tr = Trainer({False: None, True: None}, t_lm, task, RECIPES["ce"], args.recovery_lr, steps, FAST)
        curve_at = curve_at_of(steps)
        rec = {"stamp": stamp, "tokens": steps * batch * args.seq_len, "training_blocks": len(rows),
               "loadavg_start": os.getloadavg()[0], "curve": [{"step": 0, "log_ppl": start_log_ppl}],
               "step_seconds": [], "eval_seconds": 0.0}
        for s in range(steps):
            t = time.perf_counter()
            tr.step(rows[s * batch:(s + 1) * batch])
            rec["step_seconds"].append(time.perf_counter() - t)
            if s + 1 in curve_at:
                t = time.perf_counter()
                module.eval()
                rec["curve"].append({"step": s + 1, "log_ppl": _log_ppl(t_lm, task, eval_rows)})
                module.train()
                rec["eval_seconds"] += time.perf_counter() - t
                print(f"  teacher correction step {s + 1}: held-out log ppl {rec['curve'][-1]['log_ppl']:.4f} "
                      f"({np.median(rec['step_seconds']):.1f} s/step, load {os.getloadavg()[0]:.1f})", flush=True)
        tr.done()
        rec |= {"log_ppl": rec["curve"][-1]["log_ppl"], "train_seconds": float(sum(rec["step_seconds"])),
                "step_seconds_median": float(np.median(rec["step_seconds"])), "loadavg_end": os.getloadavg()[0]}
        d.mkdir(parents=True, exist_ok=True)
        st_save(module, str(w))
        meta_p.write_text(json.dumps({"stamp": stamp, "sha256": sha256_of(w), "record": rec}))
        # reload it as a later run will, and check it gives the same held-out loss
        check = copy.deepcopy(lm.module)
        st_load(check, str(w), strict=True)
        c_lm = copy.copy(lm)
        c_lm.module = check.eval()
        again = _log_ppl(c_lm, task, eval_rows)
        if abs(again - rec["log_ppl"]) > 1e-4:
            raise SystemExit(f"the saved corrected teacher reloads to log ppl {again}, trained {rec['log_ppl']}")
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {False: module, True: copy.deepcopy(module).to(torch.bfloat16).eval()}, rec


def run_recovery(args, res: dict, save) -> dict:
    """KD vs CE-only recovery at a fixed token budget, paired seeds; ``save(rec)`` after every finished run.

    Seed s draws the training blocks (a permutation of the training split) and their order; every recipe of
    one seed sees the same blocks in the same order, so differences between recipes are paired.
    """
    torch.set_num_threads(args.threads or 1)
    lm, task, remove, teachers, make = _setup(args, res)
    eval_rows = task.split["test"][: args.eval_blocks]
    n_rows = args.recovery_steps * args.recovery_batch
    if n_rows > len(task.split["train"]):
        raise SystemExit(f"{n_rows} training blocks asked, the training split has {len(task.split['train'])}")
    every = max(1, args.recovery_steps // args.curve_points)
    curve_at = sorted({*range(every, args.recovery_steps, every), args.recovery_steps})
    recipes = {k: RECIPES[k] for k in args.recipes}
    settings = {"remove": remove, "seq_len": args.seq_len, "eval_blocks": len(eval_rows), "steps": args.recovery_steps,
                "batch": args.recovery_batch, "lr": args.recovery_lr, "schedule": "linear warm-up (10%), linear decay",
                "tokens_per_run": n_rows * args.seq_len, "threads": args.threads or 1, "curve_at": curve_at,
                "speed": FAST, "trained": "every block and norm; the tied embedding / output head frozen"}
    old = res.get("recovery") or {}
    same = old.get("settings", {}) | {"recipes": None} == settings | {"recipes": None}
    rec = old if same else {"settings": settings, "runs": {}}
    rec["settings"]["recipes"] = {**rec["settings"].get("recipes", {}), **recipes}
    rec.setdefault("loadavg", []).append(list(os.getloadavg()))
    if "pruned_log_ppl" not in rec:
        rec["teacher_log_ppl"] = _log_ppl(lm, task, eval_rows)
        rec["pruned_log_ppl"] = _log_ppl(make(), task, eval_rows)
        rec["checks"] = checks(lm, teachers, make(), task, task.split["train"][:args.recovery_batch])
        save(rec)
    print(f"teacher log ppl {rec['teacher_log_ppl']:.4f}, pruned {rec['pruned_log_ppl']:.4f} on {len(eval_rows)} "
          f"test blocks; {n_rows} training blocks per run ({n_rows * args.seq_len} tokens)", flush=True)
    by_teacher = {None: teachers}
    if any(r.get("teacher") == "corrected" for r in recipes.values()):
        if not args.teacher_correction:
            raise SystemExit("recipes " + ",".join(k for k, r in recipes.items() if r.get("teacher")) +
                             " need --teacher-correction STEPS (the corrected teacher's CE fine-tuning steps)")
        by_teacher["corrected"], tc = corrected_teacher(
            args, lm, task, eval_rows, lambda n: sorted({*range(max(1, n // args.curve_points), n,
                                                                max(1, n // args.curve_points)), n}),
            rec["teacher_log_ppl"])
        if (rec.get("teacher_correction") or {}).get("stamp") != tc["stamp"]:  # runs toward another teacher
            rec["runs"] = {k: v for k, v in rec["runs"].items()
                           if not RECIPES.get(k.rsplit("_seed", 1)[0], {}).get("teacher")}
        # how much of each student's training draw the teacher also trained on (one training split, two draws)
        train = np.asarray(task.split["train"])
        t_rows = set(np.random.default_rng(CORRECTION_SEED).permutation(train)[:tc["training_blocks"]].tolist())
        tc["training_split_blocks"] = len(train)
        tc["shared_blocks_per_seed"] = [len(t_rows & set(np.random.default_rng(sd).permutation(train)[:n_rows].tolist()))
                                        for sd in range(args.seeds)]
        rec["teacher_correction"] = tc
        print(f"corrected teacher: held-out log ppl {tc['log_ppl']:.4f} after {tc['tokens']} tokens "
              f"({tc['train_seconds']:.0f} s training)", flush=True)
        save(rec)
    for seed in range(args.seeds):
        rows = np.random.default_rng(seed).permutation(np.asarray(task.split["train"]))[:n_rows].tolist()
        for name, recipe in recipes.items():
            key = f"{name}_seed{seed}"
            if key in rec["runs"]:
                continue
            torch.manual_seed(seed)
            student = make()
            tr = Trainer(by_teacher[recipe.get("teacher")], student, task, recipe, args.recovery_lr,
                         args.recovery_steps, FAST)
            run = {"steps": args.recovery_steps, "loadavg_start": os.getloadavg()[0], "train_curve": [],
                   "curve": [{"step": 0, "log_ppl": rec["pruned_log_ppl"]}], "step_seconds": []}
            for s in range(args.recovery_steps):
                t = time.perf_counter()
                run["train_curve"].append({"step": s + 1, **tr.step(rows[s * args.recovery_batch:
                                                                          (s + 1) * args.recovery_batch])})
                run["step_seconds"].append(time.perf_counter() - t)
                if s + 1 in curve_at:
                    student.module.eval()
                    run["curve"].append({"step": s + 1, "log_ppl": _log_ppl(student, task, eval_rows)})
                    student.module.train()
                    print(f"  {key} step {s + 1}: held-out log ppl {run['curve'][-1]['log_ppl']:.4f} "
                          f"({np.median(run['step_seconds']):.1f} s/step, load {os.getloadavg()[0]:.1f})", flush=True)
            tr.done()
            run |= {"log_ppl": run["curve"][-1]["log_ppl"], "train_seconds": float(sum(run["step_seconds"])),
                    "step_seconds_median": float(np.median(run["step_seconds"])), "loadavg_end": os.getloadavg()[0]}
            rec["runs"][key] = run
            print(f"recovery {key}: log ppl {run['log_ppl']:.4f} (pruned {rec['pruned_log_ppl']:.4f}, teacher "
                  f"{rec['teacher_log_ppl']:.4f}), {run['train_seconds']:.0f} s", flush=True)
            save(rec)
    rec["summary"] = summary(rec)
    if args.note:
        rec["note"] = args.note
    return rec


def summary(rec: dict) -> dict:
    """Mean and spread per recipe over the seeds that finished every recipe, and KD - CE paired by seed."""
    names = sorted({k.rsplit("_seed", 1)[0] for k in rec["runs"]})
    seeds = sorted({int(k.rsplit("_seed", 1)[1]) for k in rec["runs"]})
    seeds = [s for s in seeds if all(f"{n}_seed{s}" in rec["runs"] for n in ("ce", "kd"))]
    gap = rec["pruned_log_ppl"] - rec["teacher_log_ppl"]
    out = {"seeds": len(seeds), "gap": gap, "recipes": {}}
    for n in names:
        have = [s for s in seeds if f"{n}_seed{s}" in rec["runs"]]
        v = np.array([rec["runs"][f"{n}_seed{s}"]["log_ppl"] for s in have])
        if len(v):
            out["recipes"][n] = {"seeds": have, "log_ppl_mean": float(v.mean()),
                                 "log_ppl_std": float(v.std(ddof=1)) if len(v) > 1 else None,
                                 "log_ppl_min": float(v.min()), "log_ppl_max": float(v.max()),
                                 "gap_recovered": float((rec["pruned_log_ppl"] - v.mean()) / gap)}
    # every other recipe against CE only, paired by seed (the seeds that ran both)
    out["vs_ce"] = {}
    for n in names:
        both = [s for s in sorted({int(k.rsplit("_seed", 1)[1]) for k in rec["runs"]})
                if n != "ce" and f"{n}_seed{s}" in rec["runs"] and f"ce_seed{s}" in rec["runs"]]
        if len(both) >= 2:
            x = np.array([rec["runs"][f"{n}_seed{s}"]["log_ppl"] - rec["runs"][f"ce_seed{s}"]["log_ppl"] for s in both])
            out["vs_ce"][n] = {"seeds": both, "mean": float(x.mean()), "std": float(x.std(ddof=1)),
                               "per_seed": x.tolist(), "beats_ce_beyond_spread": bool(x.mean() < 0 and -x.mean() > x.std(ddof=1))}
    if len(seeds) >= 2:
        kd = np.array([rec["runs"][f"kd_seed{s}"]["log_ppl"] for s in seeds])
        ce = np.array([rec["runs"][f"ce_seed{s}"]["log_ppl"] for s in seeds])
        # the old flat keys, read by the targets and the BENCHMARKS.md writer
        out |= {"kd_log_ppl_mean": float(kd.mean()), "kd_log_ppl_std": float(kd.std(ddof=1)),
                "ce_log_ppl_mean": float(ce.mean()), "ce_log_ppl_std": float(ce.std(ddof=1)),
                "kd_gap_recovered": float((rec["pruned_log_ppl"] - kd.mean()) / gap),
                "ce_gap_recovered": float((rec["pruned_log_ppl"] - ce.mean()) / gap),
                "kd_minus_ce": float((kd - ce).mean()), "kd_minus_ce_std": float((kd - ce).std(ddof=1)),
                "kd_minus_ce_per_seed": (kd - ce).tolist()}
    return out


def _ms(x: dict | None) -> str:
    if x is None:
        return "–"
    return f"{x['median']:.2f}" + (f" ({x['min']:.2f}–{x['max']:.2f})" if "min" in x else
                                   f" (1 round)" if x.get("n") == 1 else "")


STEP_NAMES = {"kd_before": "CE + KD, plain fp32 (before)", "kd_teacher_bf16": "+ teacher bf16 only",
              "kd_autocast": "+ student bf16 autocast only", "kd_chunked_kd": "+ chunked KD only",
              "kd_fused_adam": "+ fused AdamW only", "kd_after": "CE + KD, all four (after)",
              "ce_before": "CE only, plain fp32 (before)", "ce_after": "CE only, autocast + fused AdamW (after)"}


def step_lines(s: dict) -> list[str]:
    """The BENCHMARKS.md paragraph on one training step's cost (``--part step``)."""
    ths = sorted(s["threads"], key=int)
    c = s["checks"]
    out = [f"Training step of the 22-block student (`{s['command']}`): {s['batch']} blocks of {s['seq_len']} tokens, "
           "forward + backward + AdamW (+ the teacher's forward for KD), seconds per step, median"
           + (" (min–max)" if "min" in s["threads"][ths[0]]["seconds"]["kd_before"] else "") + f" of {s['repeats']} interleaved repeats after a warm-up "
           "round, on this shared 2-core machine" + (f" ({s['partial']})" if s.get("partial") else "") + ":", "",
           "| step | " + " | ".join(f"{t} thread(s)" for t in ths) + " |", "|---|" + "---|" * len(ths)]
    for k, name in STEP_NAMES.items():
        out.append(f"| {name} | " + " | ".join(_ms(s["threads"][t]["seconds"].get(k)) for t in ths) + " |")
    done = [t for t in ths if "kd_speedup" in s["threads"][t]]
    out += ["", "Speed-up of the whole step: " + "; ".join(
        f"{t} thread(s): CE + KD {s['threads'][t]['kd_speedup']:.2f}x, CE only {s['threads'][t]['ce_speedup']:.2f}x "
        f"(1-minute load average {min(s['threads'][t]['loadavg_1min']):.1f}–{max(s['threads'][t]['loadavg_1min']):.1f})"
        for t in done) + "."]
    for t in done:
        sec = s["threads"][t]["seconds"]
        if "min" in sec["kd_before"]:
            sep = {k: sec[f"{k}_after"]["max"] < sec[f"{k}_before"]["min"] for k in ("kd", "ce")}
            single = [k for k in STEP_NAMES if k.startswith("kd_") and k not in ("kd_before", "kd_after")]
            clear = [k[3:] for k in single if sec[k]["max"] < sec["kd_before"]["min"]]
            out[-1] += (f" At {t} thread(s) the before and after ranges " + "; ".join(
                f"{'CE + KD' if k == 'kd' else 'CE only'}: {'do not overlap' if v else 'overlap (within noise)'}"
                for k, v in sep.items()) + "; of the single changes, "
                + (", ".join(clear) + " alone clear the plain step's range" if clear else
                   "each alone overlaps the plain step's range (the medians rank them, the spread does not)") + ".")
    for t in ths:
        if t != "1" and "1" in s["threads"] and "kd_before" in s["threads"][t]["seconds"]:
            r = s["threads"][t]["seconds"]["kd_before"]["median"] / s["threads"]["1"]["seconds"]["kd_before"]["median"]
            out[-1] += (f" At {t} threads the plain step took {r:.1f}x its 1-thread time at this load (OpenMP threads "
                        "wait on each other whenever one is descheduled), so the recovery runs use 1 thread.")
    prof = s.get("profile_smoke")
    if prof:
        out[-1] += (f" Where the time goes (torch.profiler, one step, self CPU time, {prof['threads']} thread, "
                    f"`{prof['command']}` at load {prof['loadavg_1min']:.0f}, where the step took "
                    f"{prof['seconds_1_repeat']['kd_before']:.1f} s before and {prof['seconds_1_repeat']['kd_after']:.1f} s "
                    "after): before — " + ", ".join(f"{o} {t:.2f} s" for o, t in prof["kd_before"]) + "; after — "
                    + ", ".join(f"{o} {t:.2f} s" for o, t in prof["kd_after"]) + ".")
    elif done:
        pr = s["threads"][done[0]]["profile"]
        out[-1] += (f" Where the time goes (torch.profiler, one step, self CPU time, {done[0]} thread): before — "
                    + ", ".join(f"{e['op'].replace('aten::', '')} {e['self_s']:.2f} s" for e in pr["kd_before"][:5])
                    + "; after — " + ", ".join(f"{e['op'].replace('aten::', '')} {e['self_s']:.2f} s"
                                              for e in pr["kd_after"][:5]) + ".")
    out += ["", f"Checks on {c['rows']} training blocks: KD of the teacher against itself {c['kd_teacher_vs_itself']:.1e}; "
            f"CE as computed here minus the model's own `labels=` loss {c['ce_minus_model_own_loss']:.1e}; KL from the "
            f"fp32 teacher to its bf16 copy {c['kl_teacher_fp32_to_bf16']:.4f} nats, against a KD loss of the pruned "
            f"student of {c['kd_pruned_student_vs_teacher']:.3f} (fp32 teacher) / "
            f"{c['kd_pruned_student_vs_bf16_teacher']:.3f} (bf16 teacher); the student's CE in fp32 "
            f"{c['student_ce_fp32']:.4f}, under bf16 autocast {c['student_ce_autocast']:.4f} (KL between the two "
            f"{c['kl_student_fp32_to_autocast']:.4f}). Gradient checkpointing is off (HF's default); the chunked KD "
            "loss equals autograd's to float precision (tests/test_lm_distill.py).", ""]
    return out


NAMES = {"ce": "CE only", "kd": "CE + KD", "kd_only": "KD only", "kd_corrected": "CE + KD, corrected teacher",
         "kd_only_corrected": "KD only, corrected teacher"}


def _recipe_text(k: str, v: dict) -> str:
    return (f"{NAMES.get(k, k)} (CE weight {v['ce']}, KD weight {v['kd']}, T = {v['temperature']}"
            + (", KD toward the corrected teacher" if v.get("teacher") == "corrected" else "") + ")")


def correction_lines(rc: dict) -> list[str]:
    """The teacher-correction sentences: what it trained on, its cost, its held-out curve."""
    tc = rc.get("teacher_correction")
    if not tc:
        return []
    st = tc["stamp"]
    return ["", f"Teacher correction (Minitron, Sreenivas et al. 2024): a copy of the 30-block teacher fine-tuned once "
            f"with CE for {st['steps']} steps of {st['batch']} blocks of {st['seq_len']} tokens = {tc['tokens']} tokens "
            + ("(the students' budget; " if tc["tokens"] == rc["settings"]["tokens_per_run"] else "(")
            + f"peak lr {st['lr']}, {st['schedule']}, bf16 autocast, tied embedding frozen), on "
            f"its own draw of {tc['training_blocks']} training-split blocks (seed {st['seed']}; no validation or test "
            f"document), cached under `--work` as safetensors with its sha256. Cost: {tc['train_seconds']:.0f} s of "
            f"training ({tc['step_seconds_median']:.1f} s/step median, 1-minute load {tc['loadavg_start']:.1f} at the "
            f"start, {tc['loadavg_end']:.1f} at the end) plus {tc['eval_seconds']:.0f} s of held-out evaluations. "
            "Held-out log perplexity along its training: " + ", ".join(
                f"step {c['step']}: {c['log_ppl']:.4f}" for c in tc["curve"]) + ". The students are still pruned "
            "from the original teacher (the same 22-block initialization as the other recipes); only the KD target "
            "changes. The pruning gap and the share of it recovered stay measured against the original teacher "
            "(what pruning opened)."
            + (f" Not an equal-cost comparison: the corrected recipe also pays the teacher's one-time {tc['tokens']} "
               f"tokens of CE on the 30-block model, and the teacher's draw and each student's draw come from the "
               f"same {tc['training_split_blocks']}-block training split (they share "
               + "/".join(str(x) for x in tc["shared_blocks_per_seed"]) + " blocks for seeds "
               + "/".join(str(i) for i in range(len(tc["shared_blocks_per_seed"]))) + "), so the KD student learns "
               "from the same text twice, once through the teacher. CE only at twice the tokens would repeat blocks "
               "on this split and was not run." if "shared_blocks_per_seed" in tc else "")]


def recovery_lines(rc: dict) -> list[str]:
    """The BENCHMARKS.md paragraph on KD vs CE-only recovery (``--part recovery``)."""
    st, sm = rc["settings"], rc["summary"]
    names = NAMES
    rs = sm["recipes"]
    tc = rc.get("teacher_correction")
    steps_s = [x for r in rc["runs"].values() for x in r["step_seconds"]]
    by = {n: float(np.median([x for k, r in rc["runs"].items() if k.startswith(n + "_seed")
                              for x in r["step_seconds"]])) for n in rs}
    loads = [x for r in rc["runs"].values() for x in (r["loadavg_start"], r["loadavg_end"])]
    out = [f"Recovery (`{rc['command']}`): the 22-block joint student (removed {st['remove']}) trained for "
           f"{st['steps']} AdamW steps of {st['batch']} blocks of {st['seq_len']} tokens = **{st['tokens_per_run']} "
           f"tokens per run** (peak lr {st['lr']}, {st['schedule']}; {st['trained']}; teacher bf16, student bf16 "
           "autocast with fp32 weights, see the step table above), "
           + ", ".join(_recipe_text(k, v) for k, v in st["recipes"].items() if k in rs)
           + f"; {sm['seeds']} seeds each (seed s draws the training blocks and their order; every recipe of a "
           f"seed sees the same ones). Held-out: the first {st['eval_blocks']} test blocks "
           f"({st['eval_blocks'] * (st['seq_len'] - 1)} predicted tokens; documents never seen in training), "
           "evaluated in fp32." + (" " + " ".join(correction_lines(rc)).strip() if tc else ""), "",
           "| | log perplexity (mean ± std over seeds) | min–max | perplexity | share of the pruning gap recovered |",
           "|---|---|---|---|---|",
           f"| teacher | {rc['teacher_log_ppl']:.4f} | | {np.exp(rc['teacher_log_ppl']):.2f} | |"]
    if tc:
        out.append(f"| teacher, corrected ({tc['tokens']} tokens of CE) | {tc['log_ppl']:.4f} | | "
                   f"{np.exp(tc['log_ppl']):.2f} | |")
    out.append(f"| pruned, no training | {rc['pruned_log_ppl']:.4f} | | {np.exp(rc['pruned_log_ppl']):.2f} | 0 |")
    for k, v in rs.items():
        sd = f" ± {v['log_ppl_std']:.4f}" if v["log_ppl_std"] is not None else ""
        out.append(f"| {names.get(k, k)} | {v['log_ppl_mean']:.4f}{sd} | {v['log_ppl_min']:.4f}–{v['log_ppl_max']:.4f}"
                   f" | {np.exp(v['log_ppl_mean']):.2f} | {v['gap_recovered']:.3f} |")
    at = [0] + st["curve_at"]
    out += ["", "Learning curve: held-out log perplexity after N steps (N × "
            f"{st['batch'] * st['seq_len']} tokens), mean over seeds:", "",
            "| steps | " + " | ".join(str(a) for a in at) + " |", "|---|" + "---|" * len(at)]
    for k in rs:
        runs = [r for key, r in rc["runs"].items() if key.startswith(k + "_seed")]
        pts = [np.mean([next(c["log_ppl"] for c in r["curve"] if c["step"] == a) for r in runs]) for a in at]
        out.append(f"| {names.get(k, k)} | " + " | ".join(f"{p:.4f}" for p in pts) + " |")
    diffs = {}
    for n, v in sm.get("vs_ce", {}).items():
        diffs[n] = [np.mean([rc["runs"][f"{n}_seed{x}"]["curve"][i]["log_ppl"] - rc["runs"][f"ce_seed{x}"]["curve"][i]["log_ppl"]
                             for x in v["seeds"]]) for i in range(1, len(at))]
    if diffs:
        out += ["", "Minus CE only along the curve (paired, mean over seeds): " + "; ".join(
            f"{names.get(n, n)}: " + ", ".join(f"step {a}: {x:+.4f}" for a, x in zip(at[1:], d))
            for n, d in diffs.items()) + "."]
        pair = sm["vs_ce"][next(iter(diffs))]["seeds"]
        ce_end = np.mean([rc["runs"][f"ce_seed{x}"]["log_ppl"] for x in pair])
        if ce_end < rc["teacher_log_ppl"]:
            d = diffs.get("kd")
            out += ["", f"CE only ends below the original teacher's own held-out log perplexity ({ce_end:.4f} against "
                    f"{rc['teacher_log_ppl']:.4f}): {st['tokens_per_run']} tokens of debate text adapt the student to "
                    "the domain, which the teacher never saw, so \"the gap pruning opened\" is more than recovered by "
                    "either recipe and the original teacher is no ceiling for CE. The KL term toward it pulls the "
                    "student toward a distribution that on this domain is worse than what CE learns"
                    + (", so KD ahead early turns into KD behind once CE passes the teacher." if d and d[0] < 0 < d[-1]
                       else ".")
                    + (" Minitron meets this with teacher correction (fine-tune the teacher on the distillation data "
                       "first); it is not run here." if not tc else
                       f" Teacher correction (above) moves the KD target to {tc['log_ppl']:.4f}, "
                       + ("below" if tc["log_ppl"] < ce_end else "still above")
                       + f" what CE only reaches ({ce_end:.4f})." + _corrected_verdict(sm, names))]
    for n, v in sm.get("vs_ce", {}).items():
        d, sd = v["mean"], v["std"]
        verdict = (f"{names.get(n, n)} beats CE only beyond the seed spread" if v["beats_ce_beyond_spread"] else
                   f"{names.get(n, n)} is ahead but within the seed spread" if d < 0 else
                   f"{names.get(n, n)} does not beat CE only")
        out += ["", f"{names.get(n, n)} − CE only per seed (paired, seeds {v['seeds']}): "
                + ", ".join(f"{x:+.4f}" for x in v["per_seed"]) + f"; mean {d:+.4f}, std {sd:.4f} nats: {verdict}."]
    if "kd_minus_ce" in sm:
        out[-1] += (" Time: a training step took "
                    + ", ".join(f"{by[n]:.1f} s ({names.get(n, n)})" for n in by)
                    + f", median over runs (all steps {min(steps_s):.1f}–{max(steps_s):.1f} s), at a 1-minute load "
                    f"average of {min(loads):.1f}–{max(loads):.1f} from other sessions ({st['threads']} thread); the "
                    f"{len(rc['runs'])} runs took {sum(r['train_seconds'] for r in rc['runs'].values()) / 60:.0f} "
                    "minutes of training plus the held-out evaluations. `--recovery-steps N` reruns it with another "
                    "budget; a rerun with the same settings keeps the finished runs (saved after each), `--recipes "
                    "ce,kd,kd_only` adds Minitron's KD-only recipe to the same seeds, and `--teacher-correction STEPS "
                    "--recipes kd_corrected,kd_only_corrected` the recipes toward the corrected teacher (trained once, "
                    "cached in `--work`; the CE-only runs are reused).")
        out.append("")
    if rc.get("note"):
        out += [rc["note"], ""]
    return out


def _corrected_verdict(sm: dict, names: dict) -> str:
    v = sm.get("vs_ce", {}).get("kd_corrected")
    if not v:
        return ""
    return (f" With it, CE + KD ends {v['mean']:+.4f} nats against CE only (paired std {v['std']:.4f}), "
            + ("ahead beyond the seed spread." if v["beats_ce_beyond_spread"] else
               "ahead, but within the seed spread." if v["mean"] < 0 else "still behind."))
