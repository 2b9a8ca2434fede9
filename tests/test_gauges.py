"""Transfer gauges (issue 14 item 2): synthetic-validation pseudo-Dice during training
(trainers/synthetic_validation.py) and the softmax inside real test lesions (evaluation/transfer.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from conftest import BIN, run
from tiny_plans import write_tiny_plans

from nnunet_promptlesion.evaluation.transfer import (MAX_OUTSIDE_RATIO, REAL_TRANSFER_PROB, SYNTHETIC_LEARNT_DICE, TransferError,
                                                     format_transfer_markdown, label_channels, lesion_softmax,
                                                     lesion_softmax_folder, transfer_verdict)
from nnunet_promptlesion.lesions.spec import LesionSpec
from nnunet_promptlesion.trainers.synthetic_validation import (ENV_FORCE, GAUGES_FILENAME, HOLD_BACK_EVERY,
                                                               PLOT_FILENAME, SyntheticValidation, _Sample,
                                                               synthetic_summary)

CCTA = "Dataset601_PhantomCCTA"
#: the keys of nnU-Net 2.8's LocalLogger: checkpoint_best / EMA / early stopping read mean_fg_dice and ema_fg_dice
NNUNET_LOGGER_KEYS = {"mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
                      "epoch_start_timestamps", "epoch_end_timestamps"}
TRAINER = "PromptLesionTrainer_demo"  # fold "all": nnU-Net's final self-validation skipped (variants.py)


def _train(root: Path, env: dict, results: Path, epochs: int, n_proc: int, iterations: int = 2, **extra) -> Path:
    e = {**env, "nnUNet_results": str(results), "nnUNet_n_proc_DA": str(n_proc), "nnUNet_def_n_proc": "1",
         "OMP_NUM_THREADS": "1", "PROMPTLESION_NUM_EPOCHS": str(epochs), "PROMPTLESION_NUM_ITERATIONS_PER_EPOCH": str(iterations),
         "PROMPTLESION_NUM_VAL_ITERATIONS_PER_EPOCH": "1", "PROMPTLESION_MIRRORING": "0", **extra}
    e.pop("PROMPTLESION_SETTINGS", None)
    run([BIN / "nnUNetv2_train", 601, "3d_fullres", "all", "-tr", TRAINER, "-p", "nnUNetPlans_tiny", "-device", "cpu"],
        e, timeout=900)
    return results / CCTA / f"{TRAINER}__nnUNetPlans_tiny__3d_fullres" / "fold_all"


@pytest.fixture(scope="module")
def trained_all(ccta_dataset, tmp_path_factory):
    """A 2-epoch PromptLesionTrainer run (fold all, real loader worker processes) on the session phantom."""
    root, did, env = ccta_dataset
    write_tiny_plans(root / "preprocessed" / CCTA)
    fold = _train(root, env, tmp_path_factory.mktemp("gauges_results"), epochs=2, n_proc=2)
    return root, env, fold


# ---------------------------------------------------------------------------------------------- A: training
def test_synthetic_pseudo_dice_in_training_log_json_and_plot(trained_all):
    root, env, fold = trained_all
    log = next(fold.glob("training_log_*.txt")).read_text()
    spec = LesionSpec.load(root / "raw" / CCTA / "lesion_spec.json")
    names = [l.name for l in spec.lesions]
    for e in (0, 1):
        line = next(l for l in log.splitlines() if f"PromptLesion gauges: epoch {e} synthetic pseudo-Dice" in l)
        syn = json.loads(line.split("synthetic pseudo-Dice ", 1)[1].split(" | ", 1)[0])
        assert sorted(syn) == sorted(names)
    rec = json.loads((fold / GAUGES_FILENAME).read_text())
    assert [e["epoch"] for e in rec["epochs"]] == [0, 1] and rec["source"] == "rule_based"
    # fold "all": every 5th carrier case is held back from training synthesis; the samples sit on those cases
    for name in names:
        c = rec["design"]["carriers"][name]
        assert c["held_back"] and c["cases"]
        assert set(rec["design"]["drawn_cases"][name]) <= set(c["cases"])
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = ckpt["logging"]
    assert set(logging) == NNUNET_LOGGER_KEYS  # nothing of ours in nnU-Net's logger (or in its checkpoint)
    for e in rec["epochs"]:
        for l in spec.lesions:
            s = e["synthetic"][l.name]
            assert s["samples"] == 4 and s["tp"] + s["fn"] > 0  # the synthetic lesions exist in the targets
            assert s["pseudo_dice"] == pytest.approx(2 * s["tp"] / (2 * s["tp"] + s["fp"] + s["fn"]), rel=1e-12)
            assert 0.0 <= s["max_prob_median"] <= 1.0 and s["mean_prob_median"] <= s["max_prob_median"]
            # the real pseudo-Dice printed next to it is nnU-Net's own value of that epoch (label-based: channel - 1)
            real = logging["dice_per_class_or_region"][e["epoch"]][l.label - 1]
            assert e["real"][l.name]["pseudo_dice"] == pytest.approx(real, rel=1e-12, nan_ok=True) or np.isnan(real)
        assert e["ema_fg_dice"] == pytest.approx(logging["ema_fg_dice"][e["epoch"]], rel=1e-12)
    assert (fold / PLOT_FILENAME).stat().st_size > 1000 and (fold / "progress.png").is_file()
    assert synthetic_summary(rec)[names[0]]["epoch"] == 1


def test_gauges_never_change_what_nnunet_selects(ccta_dataset, tmp_path):
    """The same seeded run with the synthetic pseudo-Dice forced to 0 and to 1 in every epoch: nnU-Net's pseudo-Dice,
    EMA and checkpoint_best are identical. A gauge that leaked into mean_fg_dice / ema_fg_dice would differ."""
    root, did, env = ccta_dataset
    write_tiny_plans(root / "preprocessed" / CCTA)
    out = {}
    for forced in ("0", "1"):
        # 2 epochs: EMA, checkpoint_best and the gauge each update twice, enough for a leak to show in both
        fold = _train(root, env, tmp_path / f"force{forced}", epochs=2, n_proc=0, iterations=1,
                      PROMPTLESION_SEED="7", PROMPTLESION_SAVE_EVERY="1", **{ENV_FORCE: forced})
        rec = json.loads((fold / GAUGES_FILENAME).read_text())
        assert {s["pseudo_dice"] for e in rec["epochs"] for s in e["synthetic"].values()} == {float(forced)}
        best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
        final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        lg = final["logging"]
        assert set(lg) == NNUNET_LOGGER_KEYS and len(lg["ema_fg_dice"]) == 2
        # nnU-Net's own relations hold: mean = nanmean(per class), EMA from the means, best = first max of the EMA
        ema = None
        for m, per, e in zip(lg["mean_fg_dice"], lg["dice_per_class_or_region"], lg["ema_fg_dice"]):
            assert m == pytest.approx(np.nanmean(per), rel=1e-12)
            ema = m if ema is None else 0.9 * ema + 0.1 * m
            assert e == pytest.approx(ema, rel=1e-12)
        assert best["current_epoch"] - 1 == int(np.argmax(lg["ema_fg_dice"]))
        out[forced] = (lg["mean_fg_dice"], lg["ema_fg_dice"], lg["dice_per_class_or_region"], best["current_epoch"],
                       best["_best_ema"])
    assert out["0"] == out["1"]


# ---------------------------------------------------------------------------------------------- A: the metric
class _CodeNet(torch.nn.Module):
    """Predicts channel ``ch`` wherever input channel 0 is > 0 (logit 10 against 0), background elsewhere."""

    def __init__(self, n_channels: int, ch: int):
        super().__init__()
        self.n, self.ch = n_channels, ch

    def forward(self, x):
        logits = torch.zeros((x.shape[0], self.n) + tuple(x.shape[2:]))
        logits[:, self.ch] = 10.0 * (x[:, 0] > 0)
        return [logits, logits[..., ::2, ::2, ::2]]  # deep supervision: the first output counts


def _gauge_by_hand(samples, ch=2, n_channels=4, regions=False):
    g = SyntheticValidation.__new__(SyntheticValidation)
    g.spec = LesionSpec.from_dict({"lesions": [{"name": "calc", "label": 2, "parents": [1],
                                                "radius_mm": [[1.0, 2.0]]}]})
    g.channels = {2: (ch, (2,))}
    g.has_regions = regions
    g.samples = {"calc": samples}

    class T:
        network = _CodeNet(n_channels, ch)
        device = torch.device("cpu")
    return g, T


def test_synthetic_pseudo_dice_counts_by_hand(monkeypatch):
    monkeypatch.delenv(ENV_FORCE, raising=False)
    shape = (4, 4, 4)
    target = np.zeros(shape, bool)
    target[1:3, 1:3, 1] = True                     # 4 lesion voxels
    pred = np.zeros(shape, bool)
    pred[1:3, 1, 1] = True                         # 2 of them found (TP 2, FN 2)
    pred[0, 0, 0:3] = True                         # 3 false positives ...
    valid = np.ones(shape, bool)
    valid[0, 0, 2] = False                         # ... one on a voxel that does not count (padding / real lesion)
    data = np.where(pred, 1.0, -1.0).astype(np.float32)[None]
    g, t = _gauge_by_hand([_Sample(data, target, valid, "c0")])
    r = g.measure(t)["calc"]
    assert (r["tp"], r["fp"], r["fn"], r["samples"]) == (2, 2, 2, 1)
    assert r["pseudo_dice"] == pytest.approx(4 / 8)
    p_hit = np.exp(10) / (np.exp(10) + 3)          # softmax of logit 10 against three zeros
    assert r["max_prob_median"] == pytest.approx(p_hit, rel=1e-6)
    assert r["mean_prob_median"] == pytest.approx((2 * p_hit + 2 * 0.25) / 4, rel=1e-6)
    # region-based: sigmoid > 0.5 of the class's region channel, same counts
    g, t = _gauge_by_hand([_Sample(data, target, valid, "c0")], regions=True)
    assert g.measure(t)["calc"]["pseudo_dice"] == pytest.approx(0.5)
    # the test-only override replaces the value (and nothing else)
    monkeypatch.setenv(ENV_FORCE, "0.25")
    g, t = _gauge_by_hand([_Sample(data, target, valid, "c0")])
    r2 = g.measure(t)["calc"]
    assert r2["pseudo_dice"] == 0.25 and r2["tp"] == 2


def test_synthetic_summary_epochs():
    rec = {"epochs": [{"epoch": e, "ema_fg_dice": ema, "synthetic": {"a": {"pseudo_dice": d, "samples": 4}}}
                      for e, ema, d in ((0, 0.1, 0.5), (1, 0.3, 0.6), (2, 0.3, 0.7), (3, float("nan"), 0.8))]}
    assert synthetic_summary(rec)["a"]["pseudo_dice"] == 0.8
    # checkpoint_best holds the first maximum of the EMA (nnU-Net replaces it on a strict improvement only)
    assert synthetic_summary(rec, "best")["a"] == {"pseudo_dice": 0.6, "max_prob_median": None,
                                                   "mean_prob_median": None, "samples": 4, "epoch": 1}
    assert synthetic_summary(rec, 2)["a"]["pseudo_dice"] == 0.7
    assert synthetic_summary(None) is None
    with pytest.raises(KeyError, match="epoch 9"):
        synthetic_summary(rec, 9)


# ---------------------------------------------------------------------------------------------- A: carriers
def _trainer_with_loader(pre: Path, fold):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    plans = load_json(str(pre / "nnUNetPlans_tiny.json"))
    plans["continue_training"] = False
    t = PromptLesionTrainer(plans, "3d_fullres", fold, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    t.initialize()
    t.dataset_class = infer_dataset_class(t.preprocessed_dataset_folder)
    ds_tr, _ = t.get_tr_and_val_datasets()
    loader = t.build_train_loader(ds_tr, t.configuration_manager.patch_size, None)
    return t, loader


@pytest.mark.parametrize("fold", ["all", 0])
def test_validation_carriers_are_held_back(nnunet_paths, monkeypatch, fold):
    root, did, env = nnunet_paths
    monkeypatch.delenv("PROMPTLESION_SETTINGS", raising=False)
    monkeypatch.delenv("PROMPTLESION_SYNTHETIC_VALIDATION", raising=False)
    pre = root / "preprocessed" / CCTA
    write_tiny_plans(pre)
    t, loader = _trainer_with_loader(pre, fold)
    g = t.promptlesion_gauges
    train_cases = {c for pool in loader.placer.pools for c, _ in pool}
    val_cases = {c for l in g.spec.lesions for c, _ in g.index.carrier_pool(l)}
    if fold == "all":
        every = sorted({c for entries in t.lesion_index.carriers.values() for c, _ in entries})
        assert val_cases == set(every[::HOLD_BACK_EVERY])
    else:
        _, val_keys = t.do_split()
        assert val_cases <= set(val_keys)
    assert val_cases and not (val_cases & train_cases) and all(loader.placer.pools)
    samples = g.draw_set(t)
    for l in g.spec.lesions:
        assert len(samples[l.name]) == g.samples_per_class
        assert {s.case for s in samples[l.name]} <= val_cases
        for s in samples[l.name]:
            assert s.data.shape[1:] == s.target.shape == tuple(t.configuration_manager.patch_size)
    # the same seed draws the same set (epochs and continued runs are comparable)
    again = g.draw_set(t)
    for l in g.spec.lesions:
        for a, b in zip(samples[l.name], again[l.name]):
            assert np.array_equal(a.data, b.data) and np.array_equal(a.target, b.target)
    t.close_sample_source()


def test_gauge_can_be_switched_off(nnunet_paths, monkeypatch):
    root, did, env = nnunet_paths
    monkeypatch.delenv("PROMPTLESION_SETTINGS", raising=False)
    monkeypatch.setenv("PROMPTLESION_SYNTHETIC_VALIDATION", "0")
    pre = root / "preprocessed" / CCTA
    write_tiny_plans(pre)
    t, loader = _trainer_with_loader(pre, "all")
    assert t.promptlesion_gauges is None
    # no hold-back either: training places lesions on every carrier case
    assert {c for pool in loader.placer.pools for c, _ in pool} == \
        {c for entries in t.lesion_index.carriers.values() for c, _ in entries}
    t.close_sample_source()


# ---------------------------------------------------------------------------------------------- B: evaluation
def _write_label(path: Path, arr: np.ndarray, spacing=(0.6, 0.5, 0.5)):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path))


CCTA_LABELS = {"background": 0, "vessel_wall": 1, "calcified_plaque": 2, "noncalcified_plaque": 3}
SPEC = {"lesions": [{"name": "calcified_plaque", "label": 2, "parents": [1], "radius_mm": [[0.5, 2.0]]},
                    {"name": "noncalcified_plaque", "label": 3, "parents": [1], "radius_mm": [[0.5, 2.0]]}]}


def test_lesion_softmax_by_hand(tmp_path):
    """Two calcified lesions (one of two voxels touching at a corner: one lesion under full connectivity) and one
    non-calcified lesion, with probabilities set voxel by voxel on a (z, y, x) = (3, 4, 5) grid."""
    gt, pred = tmp_path / "labelsTs", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    lab = np.zeros((3, 4, 5), np.uint8)
    lab[0, 0, 0] = lab[1, 1, 1] = 2          # lesion 1 of class 2 (corner-connected)
    lab[2, 3, 4] = 2                          # lesion 2 of class 2
    lab[0, 3, 0:2] = 3                        # the class-3 lesion
    lab[1, 2, 2] = 1                          # vessel wall: not a lesion class
    probs = np.zeros((4, 3, 4, 5), np.float32)
    probs[0] = 1.0
    for (z, y, x), c, p in (((0, 0, 0), 2, 0.9), ((1, 1, 1), 2, 0.3), ((2, 3, 4), 2, 0.2),
                            ((0, 3, 0), 3, 0.7), ((0, 3, 1), 3, 0.1)):
        probs[:, z, y, x] = (1 - p) / 3
        probs[c, z, y, x] = p
    _write_label(gt / "case_a.nii.gz", lab)
    np.savez_compressed(pred / "case_a.npz", probabilities=probs)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": CCTA_LABELS, "file_ending": ".nii.gz",
                                                       "channel_names": {"0": "CT"}}))
    (tmp_path / "lesion_spec.json").write_text(json.dumps(SPEC))
    r = lesion_softmax_folder(pred, gt)
    by = {(l["class"], l["id"]): l for l in r["lesions"]}
    assert len(by) == 3
    assert by[("calcified_plaque", 1)]["max_prob"] == pytest.approx(0.9, abs=1e-6)
    assert by[("calcified_plaque", 1)]["mean_prob"] == pytest.approx(0.6, abs=1e-6)
    assert by[("calcified_plaque", 1)]["voxels"] == 2
    assert by[("calcified_plaque", 2)]["max_prob"] == pytest.approx(0.2, abs=1e-6)
    assert by[("noncalcified_plaque", 1)]["mean_prob"] == pytest.approx(0.4, abs=1e-6)
    s = r["summary"]["calcified_plaque"]
    assert s["lesions"] == 2 and s["max_prob_median"] == pytest.approx(0.55, abs=1e-6)
    assert s["max_prob_max"] == pytest.approx(0.9, abs=1e-6)
    # painted outside its lesions: calcified nowhere else (0 of its 3 voxels), non-calcified nowhere else either
    assert s["outside_ratio"] == 0.0 and r["outside_voxels"] == {"calcified_plaque": 0, "noncalcified_plaque": 0}
    # a network that paints class 2 on every voxel: every lesion "scores", and the verdict says non-specific
    everywhere = np.zeros_like(probs)
    everywhere[2] = 1.0
    np.savez_compressed(pred / "case_a.npz", probabilities=everywhere)
    r2 = lesion_softmax_folder(pred, gt)
    s2 = r2["summary"]["calcified_plaque"]
    assert s2["max_prob_median"] == 1.0 and s2["outside_ratio"] == pytest.approx((lab.size - 3) / 3)
    assert transfer_verdict(s2, None)["verdict"] == "non-specific"
    np.savez_compressed(pred / "case_a.npz", probabilities=probs)
    # the lesion ids are those of the lesion-wise evaluation (joinable on case, class, id)
    from nnunet_promptlesion.evaluation.metrics import match_lesions

    m = match_lesions(lab == 2, lab == 2, (0.6, 0.5, 0.5))
    assert [(l["id"], l["voxels"]) for l in m.lesions] == [(1, 2), (2, 1)]
    # a probability file transposed against the label is refused, not read along the wrong axes
    np.savez_compressed(pred / "case_a.npz", probabilities=probs.transpose(0, 3, 2, 1))
    with pytest.raises(TransferError, match="differ in shape"):
        lesion_softmax_folder(pred, gt)
    (pred / "case_a.npz").unlink()
    with pytest.raises(TransferError, match="--save_probabilities"):
        lesion_softmax_folder(pred, gt)


def test_region_channels_follow_nnunet_label_manager():
    # KiTS-style regions (Dataset220): channels kidney (1,2,3), masses (2,3), tumor (2); regions_class_order 1, 3, 2
    dj = {"labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
          "regions_class_order": [1, 3, 2]}
    assert label_channels(dj, [2, 3]) == {2: 2, 3: 1}   # tumor -> its own region; cyst -> the masses region
    assert label_channels({"labels": CCTA_LABELS}, [2, 3]) == {2: 2, 3: 3}
    with pytest.raises(TransferError, match="not a label"):
        label_channels({"labels": CCTA_LABELS}, [5])
    probs = np.zeros((3, 2, 2, 2))
    probs[1, 0, 0, 0] = 0.8
    assert lesion_softmax(probs, np.pad(np.ones((1, 1, 1)), ((0, 1),) * 3) * 3, 3, 1)[0]["max_prob"] == 0.8


def test_verdicts():
    hi, lo = REAL_TRANSFER_PROB, REAL_TRANSFER_PROB - 0.01
    real = lambda v: {"lesions": 3, "max_prob_median": v}
    assert transfer_verdict(real(hi), {"pseudo_dice": 0.0})["verdict"] == "transfers"
    painted = lambda o: {"lesions": 3, "max_prob_median": hi, "outside_ratio": o}
    assert transfer_verdict(painted(MAX_OUTSIDE_RATIO), None)["verdict"] == "transfers"
    assert transfer_verdict(painted(MAX_OUTSIDE_RATIO + 0.1), {"pseudo_dice": 0.9})["verdict"] == "non-specific"
    assert transfer_verdict({**painted(50.0), "max_prob_median": lo}, None)["verdict"] == "undetermined"
    assert transfer_verdict(real(lo), {"pseudo_dice": SYNTHETIC_LEARNT_DICE})["verdict"] == "realism gap"
    assert transfer_verdict(real(lo), {"pseudo_dice": SYNTHETIC_LEARNT_DICE - 0.01})["verdict"] == "budget gap"
    assert transfer_verdict(real(lo), None)["verdict"] == "undetermined"
    assert transfer_verdict({"lesions": 0, "max_prob_median": None}, None)["verdict"] == "no lesions"
    md = format_transfer_markdown({"rule-based": ({"soft": real(0.013)}, {"soft": {"pseudo_dice": 0.6}}),
                                   "real only": ({"soft": real(0.002)}, None)})
    assert "| rule-based | soft | 3 | 0.013 |" in md and "realism gap" in md and "undetermined" in md


def test_lesion_softmax_of_a_real_nnunet_prediction(trained_all, tmp_path):
    """nnUNetv2_predict --save_probabilities of the trained model: the npz's argmax is the written segmentation
    (axis order and channels as read), and every ground-truth lesion of the lesion-wise evaluation gets a record."""
    root, env, fold = trained_all
    out = tmp_path / "pred"
    run([BIN / "nnUNetv2_predict", "-i", root / "raw" / CCTA / "imagesTs", "-o", out, "-d", 601, "-c", "3d_fullres",
         "-f", "all", "-tr", TRAINER, "-p", "nnUNetPlans_tiny", "-chk", "checkpoint_final.pth", "--save_probabilities",
         "-device", "cpu", "-npp", 0, "-nps", 0, "--disable_progress_bar"],  # sequential: no worker imports
        {**env, "nnUNet_results": str(fold.parents[2]), "OMP_NUM_THREADS": "1"}, timeout=900)
    gt = root / "raw" / CCTA / "labelsTs"
    r = lesion_softmax_folder(out, gt)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    for case in r["cases"]:
        probs = np.load(out / f"{case}.npz")["probabilities"]
        seg, _ = SimpleITKIO().read_seg(str(out / f"{case}.nii.gz"))
        assert np.array_equal(np.argmax(probs, 0), seg[0].astype(int))
        ref, _ = SimpleITKIO().read_seg(str(gt / f"{case}.nii.gz"))
        assert probs.shape[1:] == ref.shape[1:]
    from nnunet_promptlesion.evaluation.evaluate import evaluate_folders

    ev = evaluate_folders(out, gt)
    assert sorted((l["case"], l["class"], l["id"], l["voxels"]) for l in ev["lesions"]) == \
        sorted((l["case"], l["class"], l["id"], l["voxels"]) for l in r["lesions"])
    assert r["lesions"] and all(0 <= l["mean_prob"] <= l["max_prob"] <= 1 for l in r["lesions"])
    # promptlesion_evaluate's lesion records carry the same numbers when the folder holds the npz files
    by = {(l["case"], l["class"], l["id"]): l for l in r["lesions"]}
    for l in ev["lesions"]:
        assert l["max_prob"] == by[(l["case"], l["class"], l["id"])]["max_prob"]
    assert ev["lesion_softmax"] == r["summary"]
    for name, s in r["summary"].items():
        assert s["lesions"] == sum(l["class"] == name for l in r["lesions"])


# ---------------------------------------------------------------------------------------------- C: realism
def test_realism_cli_on_the_encoder_of_a_trained_model(trained_all, tmp_path):
    """promptlesion_realism: rule-based synthetic lesions against the real ones of the fold, in the feature space of
    the trained model's encoder (tiny plans: 8 + 16 + 32 features); writes a blinded montage and its answer key,
    and nothing into the model folder."""
    root, env, fold = trained_all
    model = fold.parent
    model_files = sorted(model.rglob("*"))
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"synthesizer": "rule_based", "synthetic_fraction": 0.5}))
    out = tmp_path / "realism"
    e = {k: v for k, v in env.items() if k != "PROMPTLESION_SETTINGS"}
    run([BIN / "promptlesion_realism", "-d", 601, "-p", "nnUNetPlans_tiny", "-f", "all", "--settings", settings,
         "--model-folder", model, "--per-class", 4, "--montage-per-class", 2, "-o", out], {**e, "OMP_NUM_THREADS": "1"},
        timeout=900)
    rep = json.loads((out / "realism.json").read_text())
    calc = rep["classes"]["calcified_plaque"]
    assert rep["extractor"].startswith("nnunet_encoder(") and calc["feature_dim"] == 8 + 16 + 32
    assert calc["n_synthetic"] == 4 and calc["n_real"] >= 2 and calc["frechet"] is not None
    assert calc["ks_radius_mm"]["n_real"] == calc["n_real"]
    key = json.loads((out / "answer_key.json").read_text())
    assert {k["source"] for k in key} == {"real", "synthetic"}
    assert (out / "blinded_calcified_plaque.png").is_file()
    assert sorted(model.rglob("*")) == model_files, "realism wrote into the model folder"
