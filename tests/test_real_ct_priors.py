"""Rule-based synthesis from the lesion spec's intensity priors, in real anatomy.

The real CT in ../shared/data/ct_example has organ labels (liver, kidneys, pancreas) and no lesion at
all, so rule-based synthesis cannot learn any lesion intensity from it: only the spec's
``contrast_hu``/``texture_hu`` priors make the classes drawable. The CT goes through nnU-Net's own
planning and preprocessing; PromptLesionTrainer's loader places and paints tumours of every class and
a PNG montage (before/after, per class) is written. Skipped where the folder is absent.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, CT_EXAMPLE, nnunet_env, run

CT = CT_EXAMPLE / "abdomen_3mm_ct.nii.gz"
ORGANS = CT_EXAMPLE / "abdomen_3mm_organs.nii.gz"
NAME = "Dataset612_RealCTPriors"
#: TotalSegmentator ids -> our labels: liver 1, kidney 2, pancreas 3; tumours 4-6 (no real voxel anywhere)
ORGAN_MAP = {5: 1, 2: 2, 3: 2, 7: 3}
TUMOURS = [("liver_tumor", 4, 1, [-60.0, -20.0]), ("kidney_tumor", 5, 2, [-50.0, -20.0]),
           ("pancreas_tumor", 6, 3, [-40.0, -15.0])]

pytestmark = pytest.mark.skipif(not (CT.is_file() and ORGANS.is_file()), reason=f"{CT_EXAMPLE} not present")


@pytest.fixture(scope="module")
def real_ct_dataset(tmp_path_factory):
    import SimpleITK as sitk

    root = tmp_path_factory.mktemp("real_ct")
    env = nnunet_env(root)
    raw = root / "raw" / NAME
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    shutil.copy(CT, raw / "imagesTr" / "ct_0000.nii.gz")
    organs = sitk.ReadImage(str(ORGANS))
    arr = sitk.GetArrayFromImage(organs)
    lab = np.zeros(arr.shape, np.uint8)
    for src, dst in ORGAN_MAP.items():
        lab[arr == src] = dst
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(organs)
    sitk.WriteImage(out, str(raw / "labelsTr" / "ct.nii.gz"))
    labels = {"background": 0, "liver": 1, "kidney": 2, "pancreas": 3} | {n: l for n, l, _, _ in TUMOURS}
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1,
                                                  "file_ending": ".nii.gz"}))
    spec = {"version": 1, "lesions": [
        {"name": n, "label": l, "parents": [p], "radius_mm": [[6.0, 10.0]], "shape": "ellipsoid",
         "contrast_hu": c, "texture_hu": [4.0, 8.0]} for n, l, p, c in TUMOURS]}
    (raw / "lesion_spec.json").write_text(json.dumps(spec))
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", 612, "-c", "3d_fullres", "-np", 1, "-npfp", 1], env)
    return root, env


def test_intensity_priors_paint_tumours_into_real_ct_without_real_lesions(real_ct_dataset, monkeypatch, tmp_path):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_promptlesion.evaluation.montage import save_montage
    from nnunet_promptlesion.lesions.blending import dilate
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    root, env = real_ct_dataset
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("PROMPTLESION_SETTINGS", raising=False)
    pre = root / "preprocessed" / NAME
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = PromptLesionTrainer(plans, "3d_fullres", "all", load_json(str(pre / "dataset.json")),
                                  device=torch.device("cpu"))
    trainer.initialize()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    ds, _ = trainer.get_tr_and_val_datasets()
    loader = trainer.build_train_loader(ds, trainer.configuration_manager.patch_size, None)
    assert all(loader.index.counts[l] == 0 for _, l, _, _ in TUMOURS)  # no real tumour to learn from
    prop = plans["foreground_intensity_properties_per_channel"]["0"]
    mean, std = prop["mean"], prop["std"]
    np.random.seed(0)
    rows = []
    for class_idx, (name, label, parent, contrast) in enumerate(TUMOURS):
        samples = []
        for _ in range(2):
            s = loader.make_synthetic(class_idx)
            carrier, _ = loader.placer.load_crop(s.case, s.bbox)
            m = s.mask
            assert m.any()
            orig_seg = loader.placer.load_crop(s.case, s.bbox)[1][0]
            assert (orig_seg[m] == parent).all() and (s.seg[0][m] == label).all()
            # the painted lesion's mean differs from the surrounding organ by the prior's HU contrast
            ring = dilate(m, 3) & ~m & (orig_seg == parent)
            if ring.sum() >= 5:
                drop_hu = (s.data[0][m].mean() - carrier[0][ring].mean()) * std
                assert contrast[0] - 15 <= drop_hu <= contrast[1] + 15, (name, drop_hu)
            samples += [(carrier[0] * std + mean, m), (s.data[0] * std + mean, m)]
        rows.append((f"{name} (before/after)", samples))
    png = tmp_path / "synthetic_tumours_real_ct.png"
    save_montage(rows, png, window=(-150.0, 250.0), title="rule-based tumours from contrast_hu priors, real CT")
    assert png.stat().st_size > 10_000
    keep = os.environ.get("PROMPTLESION_TEST_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
