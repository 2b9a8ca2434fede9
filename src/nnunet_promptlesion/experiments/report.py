"""The experiment's results: the evaluations of every (arm, repeat) collected, compared against the reference arm
(paired tests over test cases, bootstrap, gap closed towards the ceiling), the transfer gauges, what the models
were trained with (their records), written to OUT/results: comparison.json, report.txt, results.md, one CSV per
class and the figures.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Callable

from ..utils.atomic import write_json_atomic, write_text_atomic
from .executors import jobs_note
from .layout import TRAIN_RECORD, ExperimentLayout, describe_changes, read_record


class ExperimentReport(ExperimentLayout):
    """The report of an experiment folder. Uses ``print`` (progress lines) and ``class_notes`` (extra words per
    class for the table titles), which the runner sets."""

    print: Callable[[str], None]
    class_notes: dict[str, str]

    def collect(self, folder: str = "evaluation") -> dict[str, dict[int, dict]]:
        """{arm: {repeat: evaluation results}} of the (arm, repeat) pairs evaluated into ``folder``."""
        # deferred: evaluation.evaluate loads the metric libraries (4.7 s at import, measured here), which
        # --list-configs, --check and a submitted chain job do not need
        from ..evaluation.evaluate import load_results

        out = {}
        for arm in self.cfg.arms:
            reps = {}
            for r in range(self.cfg.repeats):
                f = self.run_dir(arm.name, r) / folder / "evaluation.json"
                if f.is_file():
                    reps[r] = load_results(f)
            if reps:
                out[arm.name] = reps
        return out

    def gauges(self) -> dict:
        """{class: {arm: {max_softmax, mean_softmax, synthetic_pseudo_dice, verdict, repeats}}} over the
        evaluated repeats: medians over real test lesions of the max / mean softmax of their class, averaged
        over repeats; the synthetic pseudo-Dice averaged over repeats; the verdict of those averages."""
        out: dict = {}
        for arm in self.cfg.arms:
            files = [self.run_dir(arm.name, r) / "evaluation" / "transfer.json" for r in range(self.cfg.repeats)]
            recs = [json.loads(f.read_text()) for f in files if f.is_file()]
            recs = [t for t in recs if "real" in t]
            if not recs:
                continue
            real = mean_dicts([t["real"]["summary"] for t in recs])
            syns = [t["synthetic"] for t in recs if t.get("synthetic")]
            syn = mean_dicts(syns) if syns else None
            try:
                # here, not at the top: scipy (0.24 s at import), and a failing import leaves a report without verdicts
                from ..evaluation.transfer import transfer_verdicts

                verdicts = transfer_verdicts(real, syn)
            except Exception as e:  # noqa: BLE001 - a report without verdicts is still a report
                verdicts = {c: {"verdict": f"n/a ({type(e).__name__})"} for c in real}
            for cls, v in real.items():
                out.setdefault(cls, {})[arm.name] = {
                    "max_softmax": v.get("max_prob_median"), "mean_softmax": v.get("mean_prob_median"),
                    "outside_ratio": v.get("outside_ratio"),
                    "synthetic_pseudo_dice": (syn or {}).get(cls, {}).get("pseudo_dice"),
                    "verdict": (verdicts.get(cls) or {}).get("verdict"), "repeats": len(recs)}
        return out

    def recorded_models(self) -> tuple[dict[str, list[dict]], list[str]]:
        """({arm: [inputs of every finished training of the arm, from its record]}, lines naming where the config
        now differs from them). The report states what the models are from these, never from the config alone."""
        models: dict[str, list[dict]] = {}
        drift = []
        for arm in self.cfg.arms:
            for r in range(self.cfg.repeats):
                for f in sorted(self.run_dir(arm.name, r).glob(f"train_fold*{TRAIN_RECORD}")):
                    fold = f.name[len("train_fold"):-len(TRAIN_RECORD)]
                    rec = read_record(f)
                    if rec is None or not self._train_marker(arm, r, fold).is_file():
                        continue
                    models.setdefault(arm.name, []).append({**rec, "repeat": r})
                    try:
                        now = self.train_inputs(arm, r, fold)
                    except Exception as e:  # noqa: BLE001 - data moved: the report still says what the models are
                        drift.append(f"arm={arm.name} repeat={r} fold={fold}: cannot compare ({e})")
                        continue
                    if now != rec:
                        drift.append(f"arm={arm.name} repeat={r} fold={fold}: {describe_changes(rec, now)}")
        return models, drift

    def _compare(self, evals: dict) -> tuple[dict, list[str]]:
        """compare_arms on ``evals`` with this config's baseline, ceiling and bootstrap, and the (arm, repeat)
        pairs not evaluated yet (raw and postprocessed reports alike)."""
        # deferred: numpy (0.25-0.45 s at import, measured here), which a runner import for --list-configs or a
        # refused config does without
        from ..evaluation.statistics import compare_arms

        ref = self.cfg.reference_arm if self.cfg.reference_arm in evals else None
        ceiling = self.cfg.arm_with_role("ceiling")
        ceil = ceiling.name if ceiling is not None and ceiling.name in evals and ref else None
        boot = self.cfg.evaluation.get("bootstrap", {})
        comp = compare_arms(evals, reference=ref, ceiling=ceil,
                            paired_cases=self.cfg.evaluation.get("paired_cases", "defined"),
                            n_boot=int(boot.get("n", 2000)), seed=int(boot.get("seed", 0)))
        missing = [f"{a.name}/repeat_{r}" for a in self.cfg.arms for r in range(self.cfg.repeats)
                   if r not in evals.get(a.name, {})]
        return comp, missing

    def _postprocessed_comparison(self, notes: dict) -> tuple[dict | None, str]:
        """(the comparison of the postprocessed predictions, its report block); same tables as the raw one."""
        from ..evaluation.statistics import format_comparison_text   # deferred: see _compare

        evals = self.collect("evaluation_pp")
        head = ("\n" + "=" * 100 + "\nAfter nnU-Net postprocessing: decided per training by "
                "nnUNetv2_determine_postprocessing on its validation cases\n(held out of the training, never the test "
                "set), applied to its test predictions by nnUNetv2_apply_postprocessing.\nThe tables above are the raw "
                "predictions.\n")
        if not evals:
            return None, head + "Nothing postprocessed and evaluated yet.\n"
        comp, missing = self._compare(evals)
        comp["missing"] = missing
        comp["decisions"] = {a: {str(r): self._pp_decision_text(a, r) for r in reps} for a, reps in evals.items()}
        text = head + "\n" + format_comparison_text(comp, title=f"{self.cfg.name}: {self.dataset_name}, after nnU-Net "
                                                     "postprocessing", class_notes=notes)
        text += "Postprocessing decided on validation: " + "; ".join(
            f"{a} repeat {r}: {d}" for a, ds in comp["decisions"].items() for r, d in ds.items()) + ".\n"
        if comp["missing"]:
            text += f"Not yet postprocessed and evaluated: {', '.join(comp['missing'])}.\n"
        return comp, text

    def report(self) -> dict | None:
        from ..evaluation.statistics import SECONDARY, format_comparison_text, plot_comparison   # deferred: see _compare

        evals = self.collect()
        if not evals:
            self.print("[experiment] nothing evaluated yet: no report")
            if (self.out / "jobs" / "jobs.json").is_file():   # submitit jobs (.executors): where they stand
                self.print("[experiment] " + jobs_note(self.out).rstrip())
            return None
        comp, missing = self._compare(evals)
        comp["missing"] = missing
        comp["config"] = self.cfg.to_dict()
        sc_file = self.out / "scarcity.json"
        comp["scarcity"] = json.loads(sc_file.read_text())["records"] if sc_file.is_file() else None
        comp["gauges"] = self.gauges()
        comp["models"], drift = self.recorded_models()
        notes = dict(self.class_notes)
        for rec in comp["scarcity"] or []:
            for cls, n in rec["carriers_per_class"].items():
                extra = f"training cases with the class: scarce {n['scarce']}, full {n['full']}"
                notes[cls] = f"{notes[cls]}; {extra}" if cls in notes else extra
        pp_text = ""
        if self.cfg.postprocessing:   # a second block after the raw one, which stays as it is
            comp["postprocessed"], pp_text = self._postprocessed_comparison(notes)
        res = self.out / "results"
        res.mkdir(parents=True, exist_ok=True)
        write_json_atomic(comp, res / "comparison.json")
        # the budget the evaluated models were trained with (their records), not what the config says now
        budgets = {json.dumps(m["budget"], sort_keys=True) for ms in comp["models"].values() for m in ms}
        b = json.loads(budgets.pop()) if len(budgets) == 1 else self.cfg.budget
        title = f"{self.cfg.name}: {self.dataset_name}"
        text = format_comparison_text(comp, title=title, class_notes=notes, gauges=comp["gauges"])
        text += (f"\nBudget: {b.get('epochs', 'trainer default')} epochs x {b.get('iterations_per_epoch', 'default')} "
                 f"iterations, early stopping patience {b.get('early_stopping_patience')}, {self.cfg.checkpoint}, "
                 f"{self.cfg.plans}/{self.cfg.configuration}, folds {self.cfg.folds}, device {self.cfg.device}.\n")
        for rec in comp["scarcity"] or []:
            text += scarcity_line(rec) + ".\n"
        text += ("Models (from their training records): " + "; ".join(
            f"{arm}: " + ", ".join(_model_line(m) for m in ms) for arm, ms in comp["models"].items()) + ".\n"
            if comp["models"] else "Models: no training record here (trained by an older version or by hand): what "
            "they were trained with is unknown; the budget above is the config's.\n")
        if drift:
            text += ("NOTE: the config now differs from the models reported here (a run without --report-only "
                     "refuses or, with --retrain-changed, retrains them):\n  " + "\n  ".join(drift) + "\n")
        if comp["gauges"]:
            text += ("Transfer gauges: max sm / mean sm = median over real test lesions of the max / mean softmax of "
                     "their class; outside = voxels painted with the class outside its real lesions, per lesion voxel; "
                     "syn pDice = pseudo-Dice on held-back synthetic samples during training; verdict: transfers / "
                     "non-specific (scores the lesions by painting the class everywhere) / realism gap (learns "
                     "synthetic, not real) / budget gap (learns neither).\n")
        if missing:
            text += f"Not yet evaluated: {', '.join(missing)}.\n"
        if (self.out / "jobs" / "jobs.json").is_file():   # run through submitit (.executors): the jobs' states
            text += jobs_note(self.out)
        text += pp_text
        write_text_atomic(text, res / "report.txt")
        write_text_atomic(f"# {title}\n\n```\n{text}```\n\n![Dice](dice_by_arm.png)\n\n"
                          "![Lesion-wise sensitivity](sensitivity_by_arm.png)\n", res / "results.md")
        for cls, rows in comp["table"].items():
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["arm", "role", "repeats", "dice_mean", "dice_sd", "nsd_mean", "nsd_sd", "sensitivity_mean",
                        "sensitivity_sd", "fp_per_case_mean", "fp_per_case_sd", "lesion_dice_mean", "lesion_dice_sd",
                        "case_dice", "case_sensitivity", "dice_diff_vs_baseline", "ci_low", "ci_high", "cases",
                        "p_ttest", "p_wilcoxon", "gap_closed_dice", "gap_ci_low", "gap_ci_high",
                        "gap_closed_sensitivity",
                        # the further metrics after every existing column: readers that index columns keep working
                        "iou_mean", "iou_sd", "voxel_precision_mean", "voxel_precision_sd", "voxel_recall_mean",
                        "voxel_recall_sd", "hd95_mm_mean", "hd95_mm_sd", "assd_mm_mean", "assd_mm_sd",
                        "iou_diff_vs_baseline", "iou_p_wilcoxon", "hd95_mm_diff_vs_baseline", "hd95_mm_p_wilcoxon",
                        "assd_mm_diff_vs_baseline", "assd_mm_p_wilcoxon"])
            for arm, row in rows.items():
                t = row["test"] or {}
                g = row["gap_closed"] or {}
                gd, gs = g.get("Dice") or {}, g.get("sensitivity") or {}
                role = next((a.role for a in self.cfg.arms if a.name == arm), "")
                w.writerow([arm, role, row["Dice"]["n"]] + [_blank(row[m][k]) for m in ("Dice", "NSD", "sensitivity",
                            "fp_per_case", "lesion_dice") for k in ("mean", "sd")] +
                           [_blank(row["case_level"]["Dice"]), _blank(row["case_level"]["sensitivity"]),
                            _blank(t.get("mean_diff")), *(_blank(x) for x in (t.get("ci") or [None, None])),
                            _blank(t.get("n")), _blank(t.get("p_ttest")), _blank(t.get("p_wilcoxon")),
                            _blank(gd.get("value")), *(_blank(x) for x in (gd.get("ci") or [None, None])),
                            _blank(gs.get("value"))] +
                           [_blank((row.get(m) or {}).get(k)) for m in SECONDARY for k in ("mean", "sd")] +
                           [_blank(_secondary_test(row, m).get(k)) for m in ("IoU", "HD95_mm", "ASSD_mm")
                            for k in ("mean_diff", "p_wilcoxon")])
            write_text_atomic(buf.getvalue(), res / f"per_class_{cls}.csv")
        plot_comparison(comp, res / "dice_by_arm.png", "Dice", title=f"{self.cfg.name}: Dice per class")
        plot_comparison(comp, res / "sensitivity_by_arm.png", "sensitivity",
                        title=f"{self.cfg.name}: lesion-wise sensitivity per class")
        plot_comparison(comp, res / "nsd_by_arm.png", "NSD", title=f"{self.cfg.name}: NSD per class")
        self.print(text)
        self.print(f"[experiment] results in {res}")
        return comp


def _model_line(m: dict) -> str:
    b = m.get("budget") or {}
    s = f" settings {json.dumps(m['settings'], sort_keys=True)}" if m.get("settings") else ""
    st = m.get("stage") or {}
    if st.get("name") == "finetune":   # a pretrain arm: the budget split between its two trainings
        s += (f" (synthetic-only pretraining {st.get('pretrain_trainer')} {st.get('pretrain_epochs')} epochs, then this "
              f"trainer {st.get('epochs')} epochs on real data from its weights)")
    return (f"repeat {m.get('repeat')} fold {m.get('fold')} {m.get('trainer')} {b.get('epochs', 'default')} epochs x "
            f"{b.get('iterations_per_epoch', 'default')} iterations, seed {m.get('seed')}{s}")


def _secondary_test(row: dict, metric: str) -> dict:
    """The paired test of a further metric (statistics.SECONDARY) against the baseline; {} where there is none (the
    baseline's own row, or a comparison.json written before the metric existed)."""
    return ((row.get("secondary") or {}).get(metric) or {}).get("test") or {}


def _blank(v):
    return "" if v is None else v


def mean_dicts(dicts: list[dict]) -> dict:
    """{class: {key: mean over dicts of the numeric values}} (None where no dict has a number)."""
    out: dict = {}
    for d in dicts:
        for cls, vals in (d or {}).items():
            for k, v in (vals or {}).items():
                out.setdefault(cls, {}).setdefault(k, [])
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and v == v:
                    out[cls][k].append(float(v))
    return {cls: {k: (sum(v) / len(v) if v else None) for k, v in vals.items()} for cls, vals in out.items()}


def scarcity_line(rec: dict) -> str:
    where = (f"folds {rec['scarce_fold']} (scarce) / {rec['full_fold']} (full) of splits_final.json"
             if rec.get("scarce_fold") is not None else "folds not written yet")
    return (f"scarcity: '{rec['class']}' in base fold {rec['base_fold']}: kept {len(rec['kept'])} of "
            f"{len(rec['carriers'])} training cases carrying it ({', '.join(rec['kept']) or 'none'}; seed "
            f"{rec['seed']}), dropped {len(rec['dropped'])}; {rec['n_train_scarce']} vs {rec['n_train_full']} "
            f"training cases; {where}")
