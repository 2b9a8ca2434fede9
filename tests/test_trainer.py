"""PromptLesionTrainer's data path on a real nnU-Net preprocessed phantom (in-process, CPU)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy import stats as sps

from nnunet_promptlesion.lesions.blending import blend_margin, dilate
from nnunet_promptlesion.lesions.spec import LesionSpecError
from nnunet_promptlesion.placement.index import NoHealthyRegionError, centre_box, centre_slices
from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionConfigError, PromptLesionTrainer
from nnunet_promptlesion.trainers.settings import SETTINGS_ENV, SettingsError
from nnunet_promptlesion.trainers.transforms import training_transforms

NAME = "Dataset601_PhantomCCTA"


def _pre(env):
    from pathlib import Path
    return Path(env["nnUNet_preprocessed"]) / NAME


def make_trainer(env, plans=None, cls=PromptLesionTrainer):
    pre = _pre(env)
    plans = plans or load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # nnunetv2 2.8's run_training sets this key before building a trainer
    return cls(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))


def make_loader(trainer, with_transforms=False):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer.initialize()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    ds_tr, _ = trainer.get_tr_and_val_datasets()
    ps = trainer.configuration_manager.patch_size
    if with_transforms:
        initial, tr = training_transforms(trainer)
        return trainer.build_train_loader(ds_tr, initial, tr), ds_tr
    return trainer.build_train_loader(ds_tr, ps, None), ds_tr


@pytest.fixture(scope="module")
def loader_and_data(ccta_dataset):
    root, did, env = ccta_dataset
    # module scope: pytest's function-scoped monkeypatch fixture is not available here, its context is
    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(k, env[k])
        trainer = make_trainer(env)
        loader, ds = make_loader(trainer)
        yield trainer, loader, ds


def test_batch_is_half_real_half_synthetic_with_nnunet_transforms(nnunet_paths):
    _, _, env = nnunet_paths
    trainer = make_trainer(env)
    loader, _ = make_loader(trainer, with_transforms=True)
    np.random.seed(0)
    batch = loader.generate_train_batch()
    assert trainer.batch_size == 2
    assert batch["synthetic"].tolist() == [False, True]
    ps = tuple(trainer.configuration_manager.patch_size)
    assert tuple(batch["data"].shape) == (2, 1, *ps)
    # deep supervision: one target per decoder scale, full resolution first, for real and synthetic alike
    assert isinstance(batch["target"], list) and len(batch["target"]) > 1
    assert tuple(batch["target"][0].shape) == (2, 1, *ps)
    assert batch["keys"][1].startswith("synthetic:")


def test_ratio_setting_and_odd_batches_round_synthetic_down(nnunet_paths, tmp_path, monkeypatch):
    from nnunet_promptlesion.trainers.settings import PromptLesionSettings
    assert PromptLesionSettings().n_synthetic(2) == 1
    assert PromptLesionSettings().n_synthetic(3) == 1
    assert PromptLesionSettings(synthetic_fraction=0.75).n_synthetic(4) == 3
    _, _, env = nnunet_paths
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"synthetic_fraction": 1.0, "class_weights": "uniform"}))
    monkeypatch.setenv(SETTINGS_ENV, str(settings))
    loader, _ = make_loader(make_trainer(env))
    assert loader.n_real == 0 and loader.n_synthetic == 2
    np.random.seed(1)
    assert loader.generate_train_batch()["synthetic"].tolist() == [True, True]
    settings.write_text(json.dumps({"synthetic_fraction": 0.5, "colour": "red"}))
    with pytest.raises(SettingsError, match="unknown settings"):
        make_trainer(env)


def test_synthetic_lesions_inside_parent_with_right_label_and_healthy_carriers(loader_and_data):
    trainer, loader, ds = loader_and_data
    spec = loader.index.spec
    box = centre_box(loader.final_patch_size, trainer.promptlesion_settings.centre_fraction)
    centre = centre_slices(loader.patch_size, box)
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    np.random.seed(2)
    seen = set()
    for i in range(16):
        s = loader.make_synthetic(class_idx=i % len(spec.lesions))
        lesion = spec.by_label(s.label)
        seen.add(s.label)
        data, seg, _, _ = ds.load_case(s.case)
        orig_seg = crop_and_pad_nd(seg, s.bbox, -1)[0]
        orig_img = crop_and_pad_nd(data, s.bbox, 0)
        new_seg = s.seg[0]
        # the carrier's central region held no real lesion of any class, and the lesion is centred inside it
        assert all(sl.start <= c < sl.stop for sl, c in zip(centre, s.placement.centre))
        assert not np.isin(orig_seg[centre], spec.labels).any()
        # the painted lesion lies in the parent structure and carries its label; nothing else changed in the labels
        assert s.mask.any()
        assert np.isin(orig_seg[s.mask], lesion.parents).all()
        assert (new_seg[s.mask] == s.label).all()
        assert np.array_equal(new_seg[~s.mask], orig_seg[~s.mask])
        # the image changed only near the lesion
        outside = ~dilate(s.mask, blend_margin(max(trainer.promptlesion_settings.blend_sigma_voxels)))
        assert np.array_equal(s.data[:, outside], orig_img[:, outside])
        assert not np.array_equal(s.data[:, s.mask], orig_img[:, s.mask])
    assert seen == set(spec.labels)


def test_class_balanced_sampling_follows_configured_weights(loader_and_data):
    _, loader, _ = loader_and_data
    counts = loader.index.counts
    spec = loader.index.spec
    # default: inverse real frequency -> the rare non-calcified class is drawn more often
    inv = np.array([1 / max(counts[l.label], 1) for l in spec.lesions])
    np.testing.assert_allclose(loader.class_probs, inv / inv.sum())
    assert counts[spec.by_name("noncalcified_plaque").label] < counts[spec.by_name("calcified_plaque").label]
    np.random.seed(3)
    n = 4000
    draws = np.bincount([loader.sample_class() for _ in range(n)], minlength=len(spec.lesions))
    assert sps.chisquare(draws, loader.class_probs * n).pvalue > 1e-3
    # the same test rejects uniform weights, so it can fail
    assert sps.chisquare(draws, np.full(len(spec.lesions), n / len(spec.lesions))).pvalue < 1e-6


def test_dataset_without_ct_normalisation_is_refused(nnunet_paths):
    _, _, env = nnunet_paths
    plans = load_json(str(_pre(env) / "nnUNetPlans.json"))
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    with pytest.raises(PromptLesionConfigError, match="needs CT data.*channel_names"):
        make_trainer(env, plans=plans).initialize()


def test_spec_naming_missing_label_and_no_healthy_region(nnunet_paths, tmp_path, monkeypatch):
    _, _, env = nnunet_paths
    spec = json.loads((_pre(env).parents[1] / "raw" / NAME / "lesion_spec.json").read_text())
    bad = json.loads(json.dumps(spec))
    bad["lesions"][0]["parents"] = [7]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "settings.json").write_text(json.dumps({"lesion_spec": str(tmp_path / "bad.json")}))
    monkeypatch.setenv(SETTINGS_ENV, str(tmp_path / "settings.json"))
    with pytest.raises(LesionSpecError, match="parent 7"):
        make_trainer(env).initialize()
    # a lesion whose only parent is another lesion class: every candidate centre is a lesion voxel
    nohealthy = json.loads(json.dumps(spec))
    nohealthy["lesions"][1]["parents"] = [nohealthy["lesions"][0]["label"]]
    (tmp_path / "bad.json").write_text(json.dumps(nohealthy))
    with pytest.raises(NoHealthyRegionError, match="no healthy region.*noncalcified_plaque"):
        make_loader(make_trainer(env))
