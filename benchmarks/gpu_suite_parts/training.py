"""Section ``training``: the phantom's ``3d_fullres`` trained for the same number of iterations with nnUNetTrainer and
PromptLesionTrainer (rule_based, diffusion_cache, diffusion_online), nnU-Net's own trainer classes in this process (no
final validation); iteration time and its ratio to nnUNetTrainer."""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

from nnunet_promptlesion.utils.env_names import ENV_SETTINGS

from .cache import build_cache
from .common import fmt, md_table, sig, slug
from .phantom import setup


def run(suite, sec: dict) -> None:
    st = setup(suite)
    sec["setup"] = st["info"]
    tiny = suite.args.tiny
    iters = suite.args.train_iterations or (3 if tiny else 40)
    warm = 1 if tiny else 5
    if iters <= warm:
        raise ValueError(f"--train-iterations must exceed the {warm} warm-up iteration(s)")
    if st["cache"] is None:
        sec["cache_build"] = build_cache(suite)
    if not suite.args.nnunet_compile:
        os.environ["nnUNet_compile"] = "f"
    if suite.args.n_proc_da is not None:
        os.environ["nnUNet_n_proc_DA"] = str(suite.args.n_proc_da)
    elif tiny:
        os.environ["nnUNet_n_proc_DA"] = "0"
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA   # nnU-Net: only when the section runs

    steps = suite.args.synthesis_steps or (2 if tiny else 50)
    common = {"class_weights": "uniform"}
    arms = [("nnUNetTrainer", None),
            ("PromptLesionTrainer[diffusion_online]", {**common, "synthesizer": "diffusion_online",
                                                      "diffusion": str(st["diffusion"]), "steps": steps,
                                                      "online_batch": 2 if tiny else 8,
                                                      "ring_slots_per_class": 4 if tiny else 16,
                                                      "online_warmup_s": 600}),
            ("PromptLesionTrainer[diffusion_cache]", {**common, "synthesizer": "diffusion_cache", "cache": str(st["cache"])}),
            ("PromptLesionTrainer[rule_based]", {**common, "synthesizer": "rule_based"})]
    from nnunet_promptlesion.synthesis.sources import registered_settings   # imports monai: as above

    if "baseline_iterations" in registered_settings():
        # the online source can pause rendering for its first iterations (its own no-rendering baseline);
        # here every timed iteration must run with the producer rendering, as in a long training
        arms[1][1]["baseline_iterations"] = 0
    sec.update(iterations=iters, warmup_iterations=warm, timed_iterations=iters - warm,
               plans=st["plans"], nnunet_compile=bool(suite.args.nnunet_compile),
               n_proc_DA=get_allowed_n_proc_DA(), online_sampler=f"ddim {steps}", arms={}, skipped_arms={},
               iteration_time="wall time of next(dataloader) + train_step (its loss .cpu() synchronises), "
                              "after the warm-up iterations; ratio = median / nnUNetTrainer's median")
    last_cost = None
    for name, settings in arms:
        proj = last_cost * (1.5 if settings else 1.0) if last_cost else 0.0
        if proj > suite.budget.left():
            sec["skipped_arms"][name] = f"projected {proj:.0f} s > {max(suite.budget.left(), 0):.0f} s left"
            continue
        t0 = time.monotonic()
        try:
            sec["arms"][name] = _train_arm(suite, name, settings, st, iters, warm)
        except Exception as e:  # noqa: BLE001 - one arm failing leaves the others' figures
            sec["arms"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        gc.collect()  # the trainer (network, optimizer, loaders) goes before the next one is built
        if suite.dev.type == "cuda":
            torch.cuda.empty_cache()
        last_cost = time.monotonic() - t0
        suite.save()
    ref = sec["arms"].get("nnUNetTrainer", {}).get("median_iteration_s")
    for name, r in sec["arms"].items():
        if "median_iteration_s" in r and ref:
            r["ratio_to_nnUNetTrainer"] = r["median_iteration_s"] / ref
    bad = [n for n, r in sec["arms"].items() if "error" in r]
    if bad:
        sec.update(status="failed", error="arm(s) failed: " + "; ".join(f"{n}: {sec['arms'][n]['error']}" for n in bad))
    sec["goal"] = "diffusion_online iteration time <= 1.3 x nnUNetTrainer (on a GPU, paper generator, DDIM-50)"

def _train_arm(suite, name: str, settings: dict | None, st: dict, iters: int, warm: int) -> dict:
    # nnU-Net, batchgenerators and the trainer (monai): imported when the section runs (see phantom.py)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    os.environ.pop(ENV_SETTINGS, None)
    cls = nnUNetTrainer
    if settings is not None:
        sfile = st["root"] / f"settings_{slug(name)}.json"
        sfile.write_text(json.dumps(settings))
        os.environ[ENV_SETTINGS] = str(sfile)
        cls = PromptLesionTrainer
    plans = load_json(str(st["pre"] / f"{st['plans']}.json"))
    plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args sets for a new run
    times, losses = [], []
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's console chatter; our summary stays on stdout
        t = cls(plans, "3d_fullres", 0, load_json(str(st["pre"] / "dataset.json")), device=suite.dev)
        t.num_iterations_per_epoch = iters
        t0 = time.monotonic()
        try:
            t.on_train_start()
            startup = time.monotonic() - t0
            t.on_epoch_start()
            t.on_train_epoch_start()
            for _ in range(iters):
                a = time.perf_counter()
                out = t.train_step(next(t.dataloader_train))
                suite.sync()
                times.append(time.perf_counter() - a)
                losses.append(float(out["loss"]))
            stats = t.promptlesion_epoch_summary() if isinstance(t, PromptLesionTrainer) else None
        except BaseException:
            with contextlib.suppress(Exception):  # clean up (loader workers, producer), keep the first error
                t.on_train_end()
            raise
        else:
            t.on_train_end()  # saves checkpoint_final, stops loader workers (and the source's producer)
        finally:
            os.environ.pop(ENV_SETTINGS, None)
    timed = times[warm:]
    r = {"trainer": cls.__name__, "settings": settings, "startup_s": round(startup, 2),
         "median_iteration_s": statistics.median(timed), "mean_iteration_s": statistics.fmean(timed),
         "min_iteration_s": min(timed), "max_iteration_s": max(timed), "timed_iterations": len(timed),
         "warmup_iteration_s": [round(x, 4) for x in times[:warm]], "batch_size": t.batch_size,
         "patch_size": list(t.configuration_manager.patch_size), "losses_finite": all(map(math.isfinite, losses))}
    if stats is not None:
        r["promptlesion_stats"] = stats
    return r



def summary(sec: dict) -> dict:
    return {n: {"median_s": sig(r.get("median_iteration_s")), "ratio": sig(r.get("ratio_to_nnUNetTrainer"))}
            for n, r in sec.get("arms", {}).items()}


def markdown(sec: dict) -> list[str]:
    L: list[str] = []
    if "iterations" in sec:
        L.append(f"{sec['iterations']} iterations per trainer ({sec['warmup_iterations']} warm-up), plans "
                 f"{sec['plans']}, nnU-Net compile {sec['nnunet_compile']}, nnUNet_n_proc_DA {sec['n_proc_DA']}, "
                 f"online sampler {sec['online_sampler']}. Iteration time: {sec['iteration_time']}.")
        L.append("")
    rows = []
    for n, r in sec.get("arms", {}).items():
        if "error" in r:
            rows.append([n, "failed", "", "", "", "", r["error"][:120]])
            continue
        extra = ""
        src = (r.get("promptlesion_stats") or {}).get("source") or {}
        if "rendered" in src:
            extra = f"online: rendered {src['rendered']}, draws {src['draws']}, reuse {fmt(src['reuse_rate'])}"
        rows.append([n, r["median_iteration_s"], r["mean_iteration_s"], r["timed_iterations"], r["startup_s"],
                     r.get("ratio_to_nnUNetTrainer"), extra])
    L += md_table(["trainer", "median s/it", "mean s/it", "timed its", "start-up s", "ratio to nnUNetTrainer",
                   "notes"], rows)
    for n, why in sec.get("skipped_arms", {}).items():
        L.append(f"- not run: {n}: {why}")
    if "goal" in sec:
        L.append(f"\nGoal: {sec['goal']}.")
    return L
