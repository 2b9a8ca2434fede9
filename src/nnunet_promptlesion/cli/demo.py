"""promptlesion_demo: the whole chain on a procedural CCTA phantom, on the CPU, in one command.

The demo is an experiment: it prepares a dataset and then runs the shipped experiment config ``demo``
(src/nnunet_promptlesion/experiments/configs/demo.json) through :class:`ExperimentRunner`, the same runner,
statistics, report and kill/resume behaviour as ``promptlesion_experiment``.

Steps (each skipped when its output is complete, so an interrupted demo resumes):
  1. promptlesion_make_phantoms --kind ccta --preset demo   -> nnUNet_raw/DatasetNNN_PhantomCCTA
  2. nnUNetv2_plan_and_preprocess --verify_dataset_integrity (nnU-Net's own 3d_fullres plan), then the 2D
     configuration "2d_demo" added to nnUNetPlans.json the nnU-Net way (a configuration that "inherits_from"
     3d_fullres: same preprocessed data, 32 x 32 in-plane patches, batch 8, 4 stages of 16-128 features)
  3. the experiment (work-dir/experiment): the scarcity setting of demo.json derives a *scarce* training set
     (few cases carrying the rare class) and the *full* one as nnU-Net folds; per repeat it trains the scarce
     real-only baseline, the rule-based arm (1 real : 1 synthetic) and the ceiling (full set, real only) with
     the same budget, predicts the held-out test cases with probabilities, evaluates them (Dice, lesion-wise
     detection, softmax inside the real test lesions) and prints one aligned table per class: every arm
     between baseline and ceiling, gap closed, bootstrap intervals, paired tests over test cases, gauges
  4. a montage of real and synthetic lesions (what the rule-based arm's trainer feeds nnU-Net)

All nnU-Net folders live under --work-dir; nnU-Net's output is logged under work-dir/logs and
work-dir/experiment/runs/<arm>/repeat_<r>/logs. SIGTERM or Ctrl-C stops every process the demo started.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ..utils.atomic import write_json_atomic, write_text_atomic

LESION_CLASSES = ["calcified_plaque", "noncalcified_plaque"]
# The demo trains slice-wise (docs/results.md, "How the demo design was reached"): a 2D network on 3d_fullres's
# preprocessed data learns the calcified plaques at the CPU budget; "3d_demo" (add_demo_configuration) is kept
# for users who want a 3D small-patch configuration.
DEMO_CONFIGURATION = "2d_demo"
#: promptlesion_demo --diffusion: generator preset per configuration dimensionality (2D: CPU-sized slices); the
#: training steps are the preset's (promptlesion_pretrain: cpu2d 3000 VQGAN + 4000 diffusion steps) unless given
DEMO_PRETRAIN_PRESET = {2: "cpu2d", 3: "tiny"}
#: classifier-free guidance of the demo's diffusion lesions, per dimensionality: measured on the 2D demo
#: (BENCHMARKS.md "Generator recipe"), guidance 1 left calcified plaques at ~100 HU where the real ones have ~820;
#: the 3D tiny generator keeps 1 (not measured)
DEMO_GUIDANCE = {2: 5.0, 3: 1.0}
DEMO_3D_CONFIGURATION = "3d_demo"
DEMO_EXPERIMENT = "demo"
DIFFUSION_ENV = "PROMPTLESION_DEMO_DIFFUSION"
# nnU-Net output lines echoed while a training runs (the rest goes to the logs)
SHOW = ("Pseudo dice", "PromptLesion: batch", "PromptLesion gauges", "Epoch time")
# One display window for every montage panel (HU): a CCTA-like window (W 900 / L 250) in which the wall,
# fat and lumen are distinguishable and calcium saturates.
MONTAGE_WINDOW_HU = (-200.0, 700.0)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# ---------------------------------------------------------------------------------------------- plan
def add_demo_configuration(plans_file: Path, patch_size=(32, 32, 32), batch_size: int = 4,
                           features=(16, 32, 64, 128)) -> dict:
    """Add the small-patch configuration ``3d_demo`` to an nnU-Net plans file (idempotent).

    nnU-Net's own mechanism: a configuration with ``"inherits_from": "3d_fullres"`` reuses the parent's
    preprocessed data (same data_identifier, spacing, normalisation) and overrides only what is listed.
    Why: nnU-Net's 3d_fullres network for this phantom (48 x 64 x 64 patch, 5 stages up to 320 features)
    costs ~4 s per iteration on 2 CPU cores; a 32^3 patch and 16-128 features cost ~0.3 s, so ~10x more
    iterations fit the demo budget. Foreground oversampling, loss, augmentation and inference are unchanged.
    """
    import copy  # stdlib, cheap: kept with this CLI's deferred imports (see cli/__init__.py)

    plans = json.loads(plans_file.read_text())
    base = plans["configurations"]["3d_fullres"]
    shape = base.get("median_image_size_in_voxels") or patch_size
    ps = [int(min(p, s)) for p, s in zip(patch_size, shape)]
    n = len(features)
    # Stride 2 per stage while the patch stays divisible; the first stage keeps full resolution.
    strides = [[1, 1, 1]] + [[2 if p % 2 ** (k + 1) == 0 and p // 2 ** (k + 1) >= 4 else 1 for p in ps]
                             for k in range(n - 1)]
    arch = copy.deepcopy(base["architecture"])
    arch["arch_kwargs"].update(n_stages=n, features_per_stage=list(features), kernel_sizes=[[3, 3, 3]] * n,
                               strides=strides, n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    wanted = {"inherits_from": "3d_fullres", "patch_size": ps, "batch_size": int(batch_size), "architecture": arch}
    if plans["configurations"].get(DEMO_3D_CONFIGURATION) != wanted:
        plans["configurations"][DEMO_3D_CONFIGURATION] = wanted
        write_json_atomic(plans, plans_file)
    return wanted


def add_demo_configuration_2d(plans_file: Path, name: str = "2d_demo", batch_size: int = 8,
                              features=(16, 32, 64, 128), patch_size=(32, 32)) -> dict:
    """Add a 2D configuration ``name`` that trains on 3d_fullres's preprocessed data (idempotent).

    :func:`~nnunet_promptlesion.experiments.plans_configs.add_2d_configuration` on ``3d_fullres``. For a phantom
    whose cases share one spacing this is nnU-Net's ``2d`` configuration with a smaller patch and network.
    Why (docs/results.md, demo design): a 32 x 32 patch costs ~0.28 CPU-s per iteration of 16 against ~0.47
    for the whole 48 x 48 slice, and nnU-Net's foreground oversampling then centres a third of the patches on
    a labelled structure; at 600 iterations the full training set reached 69-90 % calcified Dice where 300
    iterations of whole slices reached 0-56 %. Batch 8 (default) costs ~2/3 of batch 16 for the same steps.
    """
    from ..experiments.plans_configs import add_2d_configuration  # deferred: see cli/__init__.py

    return add_2d_configuration(plans_file, name, "3d_fullres", batch_size=batch_size, features=features,
                                patch_size=patch_size)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="promptlesion_demo",
        description="Build a CCTA phantom dataset and run the shipped experiment 'demo': nnU-Net on a training set "
                    "where the rare class is scarce (real only), the same with rule-based PromptLesion synthesis "
                    "(1 real : 1 synthetic), and the ceiling (the full training set, real only), the same budget, "
                    "repeated; then per-class Dice, lesion detection, gap closed, paired tests and transfer gauges "
                    "on the held-out test cases. Re-running resumes: finished steps are skipped.")
    ap.add_argument("--work-dir", default="demo_output", help="folder for nnUNet_raw/_preprocessed, the experiment, "
                    "logs and the report (default: ./demo_output)")
    ap.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id of the phantom (default 501)")
    ap.add_argument("--cases", type=int, default=16, help="training cases in the phantom (default 16)")
    ap.add_argument("--test-cases", type=int, default=10, help="test cases in imagesTs/labelsTs (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    ap.add_argument("--preset", default="demo", help="CCTA phantom preset (default: demo; see docs/phantoms.md)")
    ap.add_argument("--config", default=DEMO_EXPERIMENT,
                    help="experiment config run on the phantom (default: the shipped 'demo'; see docs/evaluation.md)")
    ap.add_argument("--repeats", type=int, help="independent trainings per arm (default: the config's)")
    ap.add_argument("--budget", nargs="+", metavar="KEY=VALUE",
                    help="override budget entries of the config, e.g. --budget epochs=1 iterations_per_epoch=2")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--jobs", type=int, help="trainings run at the same time (default: the config's, 2 for the "
                    "shipped demo: one CPU training keeps ~1.5 of 2 cores busy)")
    ap.add_argument("--diffusion", action="store_true",
                    help="add the diffusion arm: pretrain a generator with promptlesion_pretrain (VQGAN, diffusion, "
                         "lesion cache) on the scarce training cases, then train PromptLesionTrainer with it. On the "
                         "default 2-D configuration 2d_demo the generators are 2-D (preset cpu2d, lesions rendered in "
                         "plane); with --config demo_3d they are 3-D (preset tiny). Not part of the 20-minute CPU demo")
    ap.add_argument("--include", nargs="+", default=[], metavar="GROUP",
                    help="also run the config's optional arms of these groups, e.g. 'pretrain' (the synthetic-"
                         "pretraining arm: synthetic samples only, then fine-tuning on the scarce real cases)")
    ap.add_argument("--diffusion-steps", type=int, default=None,
                    help="--diffusion: diffusion model training steps (default: the preset's, 4000 for cpu2d)")
    ap.add_argument("--vqgan-steps", type=int, default=None,
                    help="--diffusion: VQGAN training steps (default: the preset's, 3000 for cpu2d)")
    ap.add_argument("--diffusion-cache", type=int, default=200, help="--diffusion: cached lesions per class (default 200)")
    ap.add_argument("--montage-samples", type=int, default=6, help="samples per class in the montage (0: none)")
    ap.add_argument("--retrain-changed", action="store_true", help="redo the experiment steps whose recorded inputs "
                    "(budget, settings, seed, data) differ from this run's (default: refuse, naming them)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be >= 1")
    from ..experiments.config import parse_budget  # deferred: see cli/__init__.py
    from ..experiments.runner import run_as_command

    budget = parse_budget(args.budget, ap.error)

    run_as_command("promptlesion_demo", lambda: run_demo(args, budget))


def pretrain_argv(args, dataset_id: int, configuration: str, fold: str, dims: int) -> list[str]:
    """``promptlesion_pretrain`` for --diffusion: generators of the configuration's dimensionality (``dims``), its
    lesion cache keyed by the configuration the arms train."""
    steps = [*(["--vqgan-steps", str(args.vqgan_steps)] if args.vqgan_steps else []),
             *(["--diffusion-steps", str(args.diffusion_steps)] if args.diffusion_steps else [])]
    return [_bin("promptlesion_pretrain"), "-d", str(dataset_id), "-c", configuration, "-f", str(fold),
            "--preset", DEMO_PRETRAIN_PRESET[dims], *steps, "--cache-per-class", str(args.diffusion_cache),
            "--cache-guidance", str(DEMO_GUIDANCE[dims]), "--device", args.device]


def _stage(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _step(name: str, cmd: list[str], env: dict, logs: Path) -> None:
    from ..experiments.config import ExperimentError  # deferred: see cli/__init__.py
    from ..experiments.processes import run_command

    log = logs / f"{name}.log"
    rc = run_command(cmd, env, log)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise ExperimentError(f"demo step '{name}' failed (exit {rc}); full log: {log}\n{tail}")


def run_demo(args, budget: dict | None) -> dict | None:
    from ..dataset_conversion.phantoms import MANIFEST_FILENAME  # deferred: see cli/__init__.py
    from ..experiments.config import load_config
    from ..experiments.runner import ExperimentRunner

    # the config (name, types, ranges) is checked before any work: a typo must not cost a phantom and its
    # preprocessing first; it is loaded again below, once the plans it names exist
    load_config(args.config, {"dataset": str(args.dataset_id), "device": args.device, "repeats": args.repeats,
                              "jobs": args.jobs, "budget": budget})
    work = Path(args.work_dir).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    paths = {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
             "nnUNet_results": str(work / "nnUNet_results")}
    os.environ.update(paths)   # the runner and nnU-Net's path module read them from the environment
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    d = args.dataset_id
    raw = work / "nnUNet_raw"

    existing = sorted(raw.glob(f"Dataset{d:03d}_*")) if raw.is_dir() else []
    if existing and not (existing[0] / MANIFEST_FILENAME).is_file():
        # the manifest is written last: without it the phantom was interrupted half-way; make it again
        shutil.rmtree(existing[0])
        existing = []
    if existing:
        _stage(f"1/4 phantom dataset exists: {existing[0]}")
    else:
        _stage(f"1/4 making a CCTA phantom (preset {args.preset}): {args.cases} training + {args.test_cases} test cases")
        _step("make_phantoms", [_bin("promptlesion_make_phantoms"), "--kind", "ccta", "--preset", args.preset,
                                "--dataset-id", str(d), "--cases", str(args.cases),
                                "--test-cases", str(args.test_cases), "--seed", str(args.seed), "--quiet"], env, logs)
        existing = sorted(raw.glob(f"Dataset{d:03d}_*"))
    ds_dir = existing[0]
    pre = work / "nnUNet_preprocessed" / ds_dir.name
    done = logs / "plan_and_preprocess.complete"
    if done.is_file() and (pre / "nnUNetPlans.json").is_file():
        _stage("2/4 preprocessed data exists")
    else:
        _stage("2/4 nnUNetv2_plan_and_preprocess --verify_dataset_integrity")
        _step("plan_and_preprocess", [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(d), "-c", "3d_fullres",
                                      "--verify_dataset_integrity", "-np", "2", "-npfp", "2"], env, logs)
        write_text_atomic("done\n", done)
    cfg_plan = add_demo_configuration_2d(pre / "nnUNetPlans.json", name=DEMO_CONFIGURATION)
    add_demo_configuration(pre / "nnUNetPlans.json")   # 3d_demo, for --config demo_3d (the diffusion arm)
    _stage(f"2/4 configuration '{DEMO_CONFIGURATION}' in nnUNetPlans.json: inherits 3d_fullres, patch "
           f"{cfg_plan['patch_size']}, batch {cfg_plan['batch_size']}, features "
           f"{cfg_plan['architecture']['arch_kwargs']['features_per_stage']}")

    cfg = load_config(args.config, {"dataset": str(d), "device": args.device, "repeats": args.repeats,
                                    "jobs": args.jobs, "budget": budget})
    if args.diffusion:
        from ..generator.data import configuration_spatial_dims  # deferred: see cli/__init__.py

        # the generators' dimensionality follows the configuration the arms train (2d_demo: 2-D slices)
        dims = configuration_spatial_dims(str(d), cfg.configuration, cfg.plans)
    manifest = json.loads((ds_dir / MANIFEST_FILENAME).read_text())
    include = (["diffusion"] if args.diffusion else []) + list(args.include)
    runner = ExperimentRunner(cfg, work / "experiment", include=include,
                              show=SHOW, class_notes=_class_notes(manifest), retrain_changed=args.retrain_changed)
    runner.out.mkdir(parents=True, exist_ok=True)
    runner.prepare()
    scarce_fold = runner.scarcity[0]["scarce_fold"] if runner.scarcity else cfg.folds[0]
    if args.diffusion:
        _stage(f"3/4 --diffusion: pretraining a {DEMO_PRETRAIN_PRESET[dims]} generator on fold {scarce_fold} with "
               "promptlesion_pretrain "
               f"(log: {logs / 'pretrain.log'})")
        # the same configuration the arms train: the lesion cache is keyed by it
        _step("pretrain", pretrain_argv(args, d, cfg.configuration, scarce_fold, dims), env, logs)
        # promptlesion_pretrain's last line is the settings snippet for its generator/cache
        snippet = json.loads((logs / "pretrain.log").read_text().strip().splitlines()[-1])
        for arm in cfg.arms:
            if arm.optional == "diffusion":
                # the generator the pretraining made replaces the template's; the mixing ratio and the class
                # weights (the same as the rule-based arm's) stay
                keep = {k: v for k, v in (arm.settings or {}).items() if k not in ("synthesizer", "diffusion", "vqgan", "cache")}
                arm.settings = {**keep, **snippet}
    _stage(f"3/4 experiment '{cfg.name}' ({cfg.source}): arms {', '.join(a.name for a in cfg.arms)}, "
           f"{cfg.repeats} repeat(s); progress in {runner.out / 'experiment.log'}")
    comp = runner.run()
    res = runner.out / "results"
    if args.montage_samples > 0:
        montage = res / "synthetic_montage.png"
        try:
            rule = next((a for a in cfg.arms if (a.settings or {}).get("synthesizer") == "rule_based"), None)
            sf = runner.run_dir(rule.name, 0) / "settings.json" if rule is not None else None
            make_montage(d, montage, args.montage_samples, fold=scarce_fold, configuration=cfg.configuration,
                         plans_name=cfg.plans, settings_file=sf if sf is not None and sf.is_file() else None)
            md = res / "results.md"
            write_text_atomic(md.read_text() + "\n![real and synthetic lesions](synthetic_montage.png)\n", md)
            _stage(f"4/4 montage of real and synthetic lesions: {montage}")
        except Exception as e:  # noqa: BLE001 - the report above stands on its own; say why the picture is missing
            _stage(f"4/4 montage not written: {type(e).__name__}: {e}")
    _stage(f"done: {res / 'report.txt'}, {res / 'results.md'}, {res / 'dice_by_arm.png'}, "
           f"{res / 'sensitivity_by_arm.png'}; logs {logs} and {runner.out / 'runs'}")
    return comp


def _class_notes(manifest: dict) -> dict[str, str]:
    """'N training lesions, M test lesions' per lesion class, from the phantom manifest."""
    notes = {}
    for cls in LESION_CLASSES:
        tr = sum(1 for c in manifest["training"] for l in c["lesions"] if l["class"] == cls)
        ts = sum(1 for c in manifest.get("test", []) for l in c["lesions"] if l["class"] == cls)
        notes[cls] = f"phantom: {tr} training lesions before scarcity, {ts} test lesions"
    return notes


def make_montage(dataset_id: int, path: Path, per_class: int, seed: int = 0, fold: str = "all",
                 configuration: str = DEMO_CONFIGURATION, plans_name: str = "nnUNetPlans",
                 settings_file: Path | None = None) -> None:
    """Real lesions and ``per_class`` synthetic samples of every lesion class the trainer synthesizes, with one
    intensity window.

    Synthetic samples come from PromptLesionTrainer's own training loader on ``fold`` (the scarce training
    cases) with ``settings_file`` (the rule-based arm's settings.json; None: the trainer's defaults), so the
    picture shows exactly what that arm's trainer feeds nnU-Net (before augmentation); the real lesions are
    those of the same training cases. Classes the settings give no weight get real rows only.
    """
    import numpy as np  # deferred: see cli/__init__.py
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from ..evaluation.montage import real_lesion_crops, save_montage
    from ..trainers.promptlesion_trainer import PromptLesionTrainer

    name = maybe_convert_to_dataset_name(dataset_id)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(pre / f"{plans_name}.json"))
    plans["continue_training"] = False  # nnunetv2 2.8's run_training sets this key before building a trainer
    from ..trainers.settings import SETTINGS_ENV  # deferred: see cli/__init__.py

    before = os.environ.pop(SETTINGS_ENV, None)
    if settings_file is not None:
        os.environ[SETTINGS_ENV] = str(settings_file)   # the trainer reads its settings from here at __init__
    try:
        trainer = PromptLesionTrainer(plans, configuration, fold if fold == "all" else int(fold),
                                      load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    finally:
        os.environ.pop(SETTINGS_ENV, None)
        if before is not None:
            os.environ[SETTINGS_ENV] = before
    trainer.initialize()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    ps = trainer.configuration_manager.patch_size
    loader = trainer.build_train_loader(dataset_tr, ps, None)
    # The data are CT-normalised z-scores: map the HU window with the dataset's own normalisation.
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    window = tuple((h - props["mean"]) / props["std"] for h in MONTAGE_WINDOW_HU)
    np.random.seed(seed)
    rows = []
    for ci, lesion in enumerate(loader.index.spec.lesions):
        real = []
        for ident in dataset_tr.identifiers:
            if len(real) >= per_class:
                break
            data, seg, _, _ = dataset_tr.load_case(ident)
            crops = real_lesion_crops(np.asarray(data[:1]), np.asarray(seg[0]), lesion.label, ps, per_class - len(real))
            real += [(img[0], m) for img, m in crops]
        if real:
            rows.append((f"real {lesion.name}", real))
        if loader.class_probs[ci] <= 0:
            continue   # the arm does not synthesize this class
        samples = []
        for _ in range(per_class):
            sample = loader.make_synthetic(class_idx=ci)
            img, msk = np.asarray(sample.data[0]), np.asarray(sample.mask)
            if img.ndim == 2:  # 2D configuration: a (1, Y, X) stack, as the real crops above
                img, msk = img[None], msk.reshape(img.shape)
            samples.append((img, msk))
        rows.append((f"synthetic {lesion.name}", samples))
    lo, hi = MONTAGE_WINDOW_HU
    save_montage(rows, path, window=window,
                 title=f"Real and PromptLesion synthetic (rule-based) lesions, red contour = lesion; "
                       f"one window for all panels: {lo:.0f} to {hi:.0f} HU")


if __name__ == "__main__":
    main()
