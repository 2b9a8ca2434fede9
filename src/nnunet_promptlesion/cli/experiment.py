"""promptlesion_experiment: arms x repeats of nnU-Net training, prediction and evaluation, then the comparison."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
CONFIG is a JSON file or the name of a shipped config:
  paper_ablation    real-only, rule-based, diffusion one-hot / MaskTransformer / no prompt, 1:1 vs 1:3
  rule_based_vs_real  real-only vs rule-based PromptLesion (runs anywhere, no generator needed)
  demo              what promptlesion_demo runs: scarce real-only, rule-based 1:1, ceiling (+ diffusion)
  sarcoma           real CT: 36 soft-tissue sarcoma scans (set PROMPTLESION_IBSI_STS), converted, planned and
                    preprocessed by its "prepare" section, then scarce / rule-based 1:1 and 1:3 / ceiling
(see docs/evaluation.md for the format, and `--show-config NAME` to print one).

examples:
  export nnUNet_raw=... nnUNet_preprocessed=...      # dataset planned and preprocessed beforehand
  promptlesion_experiment rule_based_vs_real --dataset 501 --device cpu -o runs/exp501
  promptlesion_experiment my_config.json -o runs/exp --arms real_only rule_based --repeats 2
  promptlesion_experiment demo --dataset 501 -o runs/demo501 --jobs 2       # two trainings at a time
  promptlesion_experiment my_config.json -o runs/exp --report-only     # table from what is finished
  PROMPTLESION_IBSI_STS=../shared/data/ibsi_sts promptlesion_experiment sarcoma -o runs/sarcoma   # from source files
  promptlesion_experiment paper_ablation --dataset 501 -o runs/paper --executor slurm   # one SLURM job per
                                          # (arm, repeat) via submitit; resources: "executor" (docs/cluster.md)

Re-running the same command resumes: finished trainings/predictions/evaluations are skipped, an
interrupted training continues from its last checkpoint with nnUNetv2_train --c, an interrupted
prediction is redone. Every step records what it was made from (runs/<arm>/repeat_<r>/train_fold<f>.inputs.json,
predictions/.complete, evaluation/inputs.json); a re-run with another budget, arm settings, seed, plans or data
refuses and names the changed steps, unless --retrain-changed redoes exactly those. Every step prints a progress line; commands and outcomes go to OUT/experiment.log,
nnU-Net's output to OUT/runs/<arm>/repeat_<r>/logs/. SIGTERM or Ctrl-C stops the running nnU-Net commands
and every process they started (--executor slurm: cancels the submitted jobs; OUT/jobs/ records them, and a
re-run waits for jobs still queued or running instead of submitting them again; see docs/cluster.md).
Results: OUT/results/report.txt and results.md (one table per class, arms from
the scarce baseline to the ceiling: Dice mean ± sd over repeats, lesion-wise sensitivity, Dice difference to
the baseline with a bootstrap CI, paired t-test and Wilcoxon over test cases, gap closed, transfer gauges),
comparison.json, per_class_<class>.csv, dice_by_arm.png, sensitivity_by_arm.png, nsd_by_arm.png.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="promptlesion_experiment", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run a segmentation experiment: for every arm (an nnU-Net trainer + optional PromptLesion "
                    "settings) and repeat, nnUNetv2_train (each fold), nnUNetv2_predict on the test images with "
                    "checkpoint_best.pth, and promptlesion_evaluate; then per-class tables with significance tests.")
    ap.add_argument("config", nargs="?", help="experiment config (JSON file or shipped config name)")
    ap.add_argument("-o", "--output", help="experiment folder (default: ./experiments/<config name>)")
    ap.add_argument("--dataset", help="dataset id or name (overrides the config's)")
    ap.add_argument("--device", help="cpu, cuda or mps (overrides the config's)")
    ap.add_argument("--repeats", type=int, help="number of repeats (overrides the config's)")
    ap.add_argument("--folds", nargs="+", help="folds to train (overrides the config's)")
    ap.add_argument("--jobs", type=int, help="(arm, repeat) chains run at the same time (overrides the config's; "
                    "default 1). Worth it where one training leaves the device partly idle, e.g. on a CPU")
    ap.add_argument("--executor", choices=("local", "slurm", "submitit_local"),
                    help="where the (arm, repeat) chains run (overrides the config's \"executor\" kind): local "
                    "(default: child processes here), slurm (one SLURM job per chain through submitit; partition, "
                    "GPUs, time from the config's \"executor\" object, see docs/cluster.md), submitit_local (the same "
                    "jobs as local processes). slurm and submitit_local need: "
                    "pip install \"nnunet_promptlesion[cluster]\"")
    ap.add_argument("--budget", nargs="+", metavar="KEY=VALUE", help="override budget entries: epochs, "
                    "iterations_per_epoch, val_iterations_per_epoch, early_stopping_patience (0: off), mirroring (0/1), "
                    "save_every, final_validation (0/1); e.g. --budget epochs=50 iterations_per_epoch=25")
    ap.add_argument("--arms", nargs="+", help="run only these arms")
    ap.add_argument("--include", nargs="+", default=[], metavar="GROUP",
                    help="also run the optional arms of these groups (arms with \"optional\": GROUP, e.g. diffusion, pretrain)")
    ap.add_argument("--check", action="store_true", help="only check the config, dataset and arms, run nothing")
    ap.add_argument("--report-only", action="store_true", help="only (re)build the results from finished evaluations; "
                    "the report states what the models were trained with (their records), whatever the config says now")
    ap.add_argument("--retrain-changed", action="store_true",
                    help="redo exactly the steps whose recorded inputs (trainer, settings, budget, seed, folds, plans, "
                    "data) differ from this config, and the predictions and evaluations of their models; without it "
                    "such a re-run refuses and names them")
    ap.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    ap.add_argument("--show-config", metavar="NAME", help="print a shipped config and exit")
    args = ap.parse_args(argv)

    # deferred until the arguments are parsed: see cli/__init__.py (the runner itself defers torch and nnU-Net)
    from ..experiments.config import SHIPPED_CONFIGS, ExperimentError, load_config, parse_budget, resolve_config_path
    from ..experiments.executors import sbatch_script
    from ..experiments.prepare import PrepareError, prepare_dataset
    from ..experiments.runner import ExperimentRunner, run_as_command

    if args.list_configs:
        for p in sorted(SHIPPED_CONFIGS.glob("*.json")):
            print(f"{p.stem:22s} {json.loads(p.read_text()).get('description', '')}")
        return
    if args.show_config:
        print(resolve_config_path(args.show_config).read_text())
        return
    if not args.config:
        ap.error("CONFIG is required (or --list-configs)")
    budget = parse_budget(args.budget, ap.error)

    def body() -> None:
        cfg = load_config(args.config, {"dataset": args.dataset, "device": args.device, "repeats": args.repeats,
                                        "folds": args.folds, "jobs": args.jobs, "budget": budget,
                                        "executor": args.executor})
        out = args.output or f"experiments/{cfg.name}"
        if cfg.prepare and not (args.check or args.report_only):
            # the dataset is made from its source files first (convert, plan, CPU configurations, preprocess)
            try:
                prepare_dataset(cfg.prepare, cfg.dataset, Path(out) / "logs", where=cfg.source)
            except PrepareError as e:
                raise ExperimentError(str(e)) from None
        runner = ExperimentRunner(cfg, out, arms=args.arms, include=args.include, retrain_changed=args.retrain_changed)
        if args.check:
            for line in runner.check():
                print(f"[experiment] {line}")
            if (cfg.executor or {}).get("kind") == "slurm":   # what would be submitted, made without a cluster
                print("[experiment] the sbatch script of each (arm, repeat) job (submitit):\n" + sbatch_script(runner))
            print("[experiment] config OK")
        elif args.report_only:
            if runner.report() is None:
                raise SystemExit(1)
        else:
            runner.run()

    run_as_command("promptlesion_experiment", body)


if __name__ == "__main__":
    main()
