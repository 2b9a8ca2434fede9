"""Space mapping between nnU-Net preprocessed data and a generator grid, on a real anisotropic nnU-Net dataset.

The raw CT's intensity is a linear function of the NIfTI (nibabel) position in mm with a different slope per
axis, so any axis mix-up, wrong spacing or wrong intensity conversion changes the values the generator sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_promptlesion.generator.intensity import IntensitySpace
from nnunet_promptlesion.lesions.blending import blend_margin, dilate
from nnunet_promptlesion.synthesis.space import (DoesNotFitError, GridSpec, SpaceMapping, SpaceMismatchError,
                                                 check_intensity_representable)
from nnunet_promptlesion.utils.geometry import array_axes

BIN = Path(sys.executable).parent
SHAPE = (20, 36, 40)          # nibabel (x, y, z) voxels
SPACING = (3.0, 1.0, 1.2)     # mm: x is the coarse axis, so nnU-Net transposes it to the front
SLOPES = (10.0, 3.0, 1.0)     # HU per mm along nibabel x, y, z


def ramp_hu(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    g = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return (sum(k * gi for k, gi in zip(SLOPES, g)) - 200.0).astype(np.float32)


@pytest.fixture(scope="module")
def aniso(tmp_path_factory):
    from nnunet_promptlesion.dataset_conversion.raw_writer import make_dataset_json, save_nifti

    root = tmp_path_factory.mktemp("aniso")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "OMP_NUM_THREADS": "1"}
    env.pop("nnUNet_n_proc_DA", None)
    ds = root / "raw" / "Dataset921_Aniso"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        hu = ramp_hu()
        lab = np.ones(SHAPE, np.uint8)
        lab[:2] = 0
        lab[:, :2] = 0
        lab[5:9, 10:14, 12:18] = 2 if i == 0 else 1
        hu[0, 0, 0] += rng.normal()  # cases differ a little
        save_nifti(hu, SPACING, ds / "imagesTr" / f"an_{i:03d}_0000.nii.gz")
        save_nifti(lab, SPACING, ds / "labelsTr" / f"an_{i:03d}.nii.gz", dtype=np.uint8)
    (ds / "dataset.json").write_text(json.dumps(make_dataset_json({"background": 0, "organ": 1, "lesion": 2}, 2)))
    r = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "921", "-c", "3d_fullres", "-np", "1",
                        "-npfp", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pre = root / "pre" / "Dataset921_Aniso"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = pre / "nnUNetPlans_3d_fullres"
    ds_ = infer_dataset_class(str(folder))(str(folder), ["an_000"])
    data, seg, _, _ = ds_.load_case("an_000")
    return plans, np.asarray(data[:]), np.asarray(seg[:])


def to_nibabel_order(arr: np.ndarray, plans: dict) -> np.ndarray:
    """Undo nnU-Net's axis order: transpose_backward, then (z, y, x) -> (x, y, z)."""
    back = plans["transpose_backward"]
    return np.ascontiguousarray(arr.transpose(back).transpose(2, 1, 0))


def test_dataset_is_transposed_and_world_axes_follow(aniso):
    plans, data, _ = aniso
    tf = plans["transpose_forward"]
    assert tf != [0, 1, 2], "the test needs a non-trivial transpose_forward"
    axes = array_axes(plans).axes
    spacing = plans["configurations"]["3d_fullres"]["spacing"]
    # the preprocessed array runs along nibabel axes `axes`, with their spacings and extents
    assert [SPACING[a] for a in axes] == pytest.approx(spacing)
    assert tuple(data.shape[1:]) == tuple(SHAPE[a] for a in axes)
    # and the array really is the raw CT in that order (CT normalisation is affine inside its window)
    space = IntensitySpace.from_nnunet_plans(plans)
    hu_back = to_nibabel_order(space.to_hu(data[0]), plans)
    inside = (ramp_hu() > space.percentile_00_5 + 1) & (ramp_hu() < space.percentile_99_5 - 1)
    np.testing.assert_allclose(hu_back[inside], ramp_hu()[inside], rtol=0, atol=16 * np.finfo(np.float32).eps * (np.abs(ramp_hu()).max() + abs(space.mean)))  # HU -> fp32 z-score -> HU
    src = {"type": "nnunet_preprocessed", "transpose_forward": tf, "image_reader_writer": plans.get("image_reader_writer")}
    assert array_axes(src).axes == axes and array_axes({"type": "nifti_folder"}).axes == (0, 1, 2)
    # nnU-Net's NibabelIO reads NIfTI in SimpleITK's (z, y, x) order too: a NibabelIO dataset has the same axes
    assert array_axes({**src, "image_reader_writer": "NibabelIO"}).axes == axes


def _nifti_generator(patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0)) -> GridSpec:
    """A generator trained on NIfTI files: nibabel axis order, isotropic 1 mm, wide HU window."""
    return GridSpec(spacing, (0, 1, 2), IntensitySpace.hu_window(-1000, 3000))


def test_generator_patch_sees_the_right_axes_spacing_and_intensities(aniso):
    plans, data, _ = aniso
    data_grid = GridSpec.from_nnunet(plans, "3d_fullres")
    patch = (16, 16, 16)
    m = SpaceMapping(data_grid, _nifti_generator(patch), patch)
    assert not m.identity_grid and not m.same_intensity
    centre = np.array([10.0, 20.0, 18.0])  # data voxels (nnU-Net order)
    model, (mask_g,) = m.to_generator(data[0], [np.zeros(data.shape[1:], bool)], centre)
    assert model.shape == patch and not mask_g.any()
    hu = m.gen.intensity.model_to_hu(model)
    # expected: the ramp at the physical position of every generator voxel (nibabel order, 1 mm)
    axes = m.data.axes
    centre_mm = np.empty(3)
    for a_data, a_nib in enumerate(axes):
        centre_mm[a_nib] = centre[a_data] * SPACING[a_nib]
    pos = np.meshgrid(*[centre_mm[k] + (np.arange(patch[k]) - (patch[k] - 1) / 2) * 1.0 for k in range(3)], indexing="ij")
    expected = sum(k * p for k, p in zip(SLOPES, pos)) - 200.0
    win = m.data.intensity
    # inside the volume and the dataset's CT window (outside, nnU-Net clipped / we extend the edge)
    ext = [(p >= 0) & (p <= (n - 1) * s) for p, n, s in zip(pos, SHAPE, SPACING)]
    ok = ext[0] & ext[1] & ext[2] & (expected > win.percentile_00_5 + 1) & (expected < win.percentile_99_5 - 1)
    assert ok.mean() > 0.3
    np.testing.assert_allclose(hu[ok], expected[ok], rtol=0, atol=16 * np.finfo(np.float32).eps * (np.abs(expected[ok]).max() + abs(win.mean)))  # linear data: interpolation exact up to fp32


def test_lesion_painted_at_a_known_voxel_lands_there_and_nothing_else_changes(aniso):
    plans, data, _ = aniso
    space = IntensitySpace.from_nnunet_plans(plans)
    data_grid = GridSpec.from_nnunet(plans, "3d_fullres")
    patch = (16, 16, 16)
    m = SpaceMapping(data_grid, _nifti_generator(patch), patch)
    axes = m.data.axes
    target_nib = np.array([9, 17, 21])             # nibabel voxel that must receive the lesion
    target = np.array([target_nib[a] for a in axes])  # the same voxel in nnU-Net order
    mask = np.zeros(data.shape[1:], bool)
    mask[tuple(target)] = True
    sigma = 0.0
    support = m.support(mask, sigma)
    centre = m.centre_for(support)
    # "decoded" generator output: dark everywhere, bright at the generator voxel of the target's position,
    # computed from nibabel millimetres alone
    decoded = np.full(patch, m.gen.intensity.hu_to_model(-500.0), np.float32)
    centre_mm = np.array([centre[axes.index(k)] * SPACING[k] for k in range(3)])
    u = (target_nib * np.array(SPACING) - centre_mm) / 1.0 + (np.array(patch) - 1) / 2
    # the position may fall between generator voxels (even patch sizes): light the voxels around it
    decoded[tuple(slice(int(np.floor(x)), int(np.ceil(x)) + 1) for x in u)] = m.gen.intensity.hu_to_model(400.0)
    assert (decoded > 0).sum() <= 8
    out = m.from_generator(data[0], decoded, mask, centre, sigma)
    changed = out != data[0]
    assert changed[tuple(target)] and changed.sum() == 1
    # the full case, back in NIfTI order: the lesion sits at the target voxel, nowhere else
    back = to_nibabel_order(out, plans)
    orig = to_nibabel_order(data[0], plans)
    diff = np.argwhere(back != orig)
    assert diff.tolist() == [target_nib.tolist()]
    assert space.to_hu(back[tuple(target_nib)]) == pytest.approx(min(400.0, space.percentile_99_5), abs=1.0)


def test_outside_blend_identity_after_round_trip_and_fit_check(aniso):
    plans, data, seg = aniso
    data_grid = GridSpec.from_nnunet(plans, "3d_fullres")
    patch = (24, 24, 24)
    m = SpaceMapping(data_grid, _nifti_generator(patch, (1.5, 1.5, 1.5)), patch)
    mask = seg[0] == 2
    sigma = 1.0
    support = m.support(mask, sigma)
    centre = m.centre_for(support)
    model, (gmask,) = m.to_generator(data[0], [mask], centre)
    assert gmask.any()
    rng = np.random.default_rng(0)
    decoded = np.clip(model + rng.normal(0, 0.2, model.shape).astype(np.float32), -1, 1)
    out = m.from_generator(data[0], decoded, mask, centre, sigma)
    assert out.dtype == np.float32
    assert np.array_equal(out[~support], data[0][~support])  # bit-identical outside the blend support
    assert not np.array_equal(out[mask], data[0][mask])
    assert not (out != data[0])[~dilate(mask, blend_margin(sigma))].any()
    # a generator patch too small for the lesion is refused, not silently cut
    small = SpaceMapping(data_grid, _nifti_generator((4, 4, 4)), (4, 4, 4))
    with pytest.raises(DoesNotFitError, match="does not fit"):
        small.from_generator(data[0], np.zeros((4, 4, 4), np.float32), mask, small.centre_for(support), sigma)


def test_identity_mapping_is_a_plain_crop(aniso):
    plans, data, seg = aniso
    data_grid = GridSpec.from_nnunet(plans, "3d_fullres")
    patch = (12, 16, 16)
    m = SpaceMapping(data_grid, data_grid, patch)
    assert m.identity_grid and m.same_intensity and m.perm == (0, 1, 2)
    mask = seg[0] == 2
    support = m.support(mask, 0.5)
    centre = m.centre_for(support)
    model, (gmask,) = m.to_generator(data[0], [mask], centre)
    lo = np.round(centre - (np.array(patch) - 1) / 2).astype(int)
    assert (lo >= 0).all() and (lo + patch <= data.shape[1:]).all()
    crop = data[0][tuple(slice(a, a + p) for a, p in zip(lo, patch))]
    assert np.array_equal(model, m.data.intensity.to_model(crop).astype(np.float32))
    assert np.array_equal(gmask, mask[tuple(slice(a, a + p) for a, p in zip(lo, patch))])
    decoded = np.full(patch, 0.25, np.float32)
    out = m.from_generator(data[0], decoded, mask, centre, 0.5)
    np.testing.assert_allclose(out[mask], m.data.intensity.from_model(np.float32(0.25)), rtol=4 * np.finfo(np.float32).eps)
    assert np.array_equal(out[~support], data[0][~support])


def test_generator_that_cannot_represent_the_dataset_is_refused():
    ccta = IntensitySpace(kind="nnunet_ct", mean=300.0, std=250.0, percentile_00_5=-50.0, percentile_99_5=1400.0)
    difftumor = IntensitySpace.hu_window(-175, 250)
    with pytest.raises(SpaceMismatchError) as e:
        check_intensity_representable(ccta, difftumor)
    msg = str(e.value)
    assert "dataset nnU-Net CTNormalization" in msg and "generator HU window [-175, 250]" in msg
    abdomen = IntensitySpace(kind="nnunet_ct", mean=80.0, std=40.0, percentile_00_5=-60.0, percentile_99_5=220.0)
    check_intensity_representable(abdomen, difftumor)  # covered: accepted
    with pytest.raises(SpaceMismatchError, match="data .* generator"):
        SpaceMapping(GridSpec((1, 1, 1), (0, 1, 2), ccta), GridSpec((1, 1, 1), (0, 1, 1), difftumor), (8, 8, 8))


def test_no_prompt_model_is_sampled_with_its_null_token_and_others_with_class_prompts():
    """The "no lesion prompt" ablation model (trained with prompt dropout 1) never saw a class id: sampling must
    use its null token, while a normal model keeps one prompt per class."""
    from nnunet_promptlesion.generator.diffusion.config import PromptVocabulary
    from nnunet_promptlesion.synthesis.diffusion_render import sampling_prompt_ids
    from nnunet_promptlesion.lesions.spec import LesionSpec

    spec = LesionSpec.from_dict({"lesions": [
        {"name": "calcified_plaque", "label": 2, "parents": [1], "radius_mm": [[1.0, 2.0]]},
        {"name": "noncalcified_plaque", "label": 3, "parents": [1], "radius_mm": [[1.0, 2.0]]}]})
    vocab = PromptVocabulary.from_lesion_spec(spec)
    normal = {"config": {"prompt_dropout": 0.1}, "null_prompt_id": 3}
    assert sampling_prompt_ids(normal, spec, vocab) == {2: 1, 3: 2}
    no_prompt = {"config": {"prompt_dropout": 1.0}, "null_prompt_id": 3}
    assert sampling_prompt_ids(no_prompt, spec, vocab) == {2: 3, 3: 3}
