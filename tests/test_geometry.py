"""One geometry for every reader: nnU-Net's own readers, preprocessor and exporter are the reference.

A small CT with a non-canonical affine (axes permuted and flipped, anisotropic, off-origin) and a zero border
(so nnU-Net crops) is preprocessed by nnU-Net's DefaultPreprocessor with a non-trivial ``transpose_forward``,
once read by SimpleITKIO and once by NibabelIO (and, for the round trips, by both ...WithReorient readers).
"""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_promptlesion.utils.geometry import ArrayAxes, ArrayGeometry, NiftiView, array_axes, reader_axes

SHAPE = (22, 26, 12)                                  # nibabel (i, j, k)
AFFINE = np.array([[0.0, 0.0, -2.5, 40.0],            # i -> -y (0.8 mm), j -> +z (0.9 mm), k -> -x (2.5 mm)
                   [-0.8, 0.0, 0.0, 15.0],
                   [0.0, 0.9, 0.0, -30.0],
                   [0.0, 0.0, 0.0, 1.0]])
TF = [1, 2, 0]                                        # a non-trivial transpose_forward
READERS = ["SimpleITKIO", "NibabelIO", "SimpleITKIOWithReorient", "NibabelIOWithReorient"]
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1,
                "file_ending": ".nii.gz"}


def _plans(reader: str, spacing) -> dict:
    res = "resample_data_or_seg_to_shape"
    kw = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {"dataset_name": "Dataset999_Geometry", "plans_name": "nnUNetPlans", "image_reader_writer": reader,
            "transpose_forward": TF, "transpose_backward": [int(i) for i in np.argsort(TF)],
            "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [8, 8, 8],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1e3,
                                                                  "percentile_99_5": 1e3}},
            "configurations": {"3d_fullres": {
                "data_identifier": "geo", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                "patch_size": [8, 8, 8], "median_image_size_in_voxels": [8, 8, 8], "spacing": list(spacing),
                "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                "resampling_fn_data": res, "resampling_fn_data_kwargs": {**kw, "order": 3},
                "resampling_fn_seg": res, "resampling_fn_seg_kwargs": {**kw, "is_seg": True},
                "resampling_fn_probabilities": res, "resampling_fn_probabilities_kwargs": kw,
                "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []},
                "batch_dice": False}}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A CT (non-zero inside a box, zero border) and a label map holding a distinct value per voxel."""
    import nibabel as nib

    d = tmp_path_factory.mktemp("geometry")
    rng = np.random.default_rng(0)
    ct = np.zeros(SHAPE, np.int16)
    ct[2:19, 3:24, 1:10] = rng.integers(50, 150, (17, 21, 9))
    ids = (np.arange(np.prod(SHAPE)).reshape(SHAPE) + 1).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, AFFINE), str(d / "ct_0000.nii.gz"))
    nib.save(nib.Nifti1Image(ids, AFFINE), str(d / "ids.nii.gz"))
    return {"dir": d, "ct": ct, "ids": ids, "ct_file": str(d / "ct_0000.nii.gz"), "ids_file": str(d / "ids.nii.gz")}


def _preprocess(files, reader: str, spacing, with_ids: bool):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(_plans(reader, spacing))
    cm = pm.get_configuration("3d_fullres")
    data, seg, props = DefaultPreprocessor(verbose=False).run_case(
        [files["ct_file"]], files["ids_file"] if with_ids else None, pm, cm, DATASET_JSON)
    return pm, cm, data, seg, props


def _file_voxels(files, n=40, seed=1):
    """Voxels (nibabel index) inside the non-zero box, so nnU-Net's crop keeps them."""
    inside = np.argwhere(files["ct"] != 0)
    return inside[np.random.default_rng(seed).choice(len(inside), n, replace=False)]


@pytest.mark.parametrize("reader", READERS)
def test_world_index_round_trip_through_reader_and_preprocessed_arrays(files, reader):
    """world -> index -> world is the identity, and the voxel a world point maps to holds the file's value there,
    in the reader's array and in the preprocessed (transposed, cropped) array."""
    import nibabel as nib
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    file_geo = ArrayGeometry.from_nifti(nib.load(files["ct_file"]))
    rw = PlansManager(_plans(reader, [1, 1, 1])).image_reader_writer_class()
    _, rprops = rw.read_images([files["ct_file"]])
    # no resampling: the target spacing is the reader array's spacing, transposed
    target = [float(rprops["spacing"][t]) for t in TF]
    _, _, _, seg, props = _preprocess(files, reader, target, with_ids=True)
    geo = ArrayGeometry.from_preprocessed(props, TF, seg.shape[1:])
    np.testing.assert_allclose(geo.spacing, target, rtol=1e-6)

    vox = _file_voxels(files)
    world = file_geo.index_to_world(vox)
    scale = np.abs(world).max() + 1.0
    tol = 64 * np.finfo(np.float64).eps * scale
    idx = geo.world_to_index(world)
    np.testing.assert_allclose(geo.index_to_world(idx), world, atol=tol)
    # the reader stores its geometry in float32 (SimpleITK spacing/direction): indices land within 1e-4 voxels
    rounded = np.round(idx).astype(int)
    assert np.abs(idx - rounded).max() < 1e-4
    np.testing.assert_array_equal(seg[0][tuple(rounded.T)], files["ids"][tuple(vox.T)])
    # the reader's own array: same check
    rdata, rprops = rw.read_images([files["ids_file"]])
    rgeo = ArrayGeometry.from_reader_properties(rprops, rdata.shape[1:])
    ridx = np.round(rgeo.world_to_index(world)).astype(int)
    np.testing.assert_array_equal(rdata[0][tuple(ridx.T)], files["ids"][tuple(vox.T)])


def test_simpleitk_and_nibabel_datasets_put_a_lesion_at_the_same_world_point(files):
    """A lesion painted at a world point in the preprocessed arrays of a SimpleITKIO and a NibabelIO dataset
    (same file, resampled, cropped, transposed) comes back at that world point through nnU-Net's exporter."""
    import nibabel as nib
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    target = [1.2, 1.7, 1.1]  # mm, transposed order: every axis is resampled
    point = np.array([28.0, 12.0, -19.0])  # world mm (RAS+), off-centre inside the non-zero box
    file_img = nib.load(files["ct_file"])
    file_geo = ArrayGeometry.from_nifti(file_img)
    assert (files["ct"][tuple(np.round(file_geo.world_to_index(point)).astype(int))] != 0)
    radius = 4.0
    found, datas = {}, {}
    for reader in ("SimpleITKIO", "NibabelIO"):
        pm, cm, data, _, props = _preprocess(files, reader, target, with_ids=False)
        datas[reader] = data
        geo = ArrayGeometry.from_preprocessed(props, TF, data.shape[1:])
        np.testing.assert_allclose(geo.spacing, [props["shape_after_cropping_and_before_resampling"][k] / data.shape[1 + k]
                                                 * props["spacing"][TF[k]] for k in range(3)], rtol=1e-6)
        c = geo.world_to_index(point)
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in data.shape[1:]], indexing="ij"), -1)
        ball = np.linalg.norm(geo.index_to_world(grid) - point, axis=-1) <= radius
        assert ball.sum() > 20
        logits = torch.from_numpy(np.stack([~ball, ball]).astype(np.float32))
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, pm, cm, pm.get_label_manager(DATASET_JSON), props, num_threads_torch=1)
        out = files["dir"] / f"lesion_{reader}.nii.gz"
        pm.image_reader_writer_class().write_seg(seg, str(out), props)
        written = nib.load(str(out))
        lesion = np.argwhere(np.asarray(written.dataobj) == 1)
        assert len(lesion) > 5
        found[reader] = ArrayGeometry.from_nifti(written).index_to_world(lesion.mean(0))
        # half a voxel of each grid the ball was discretised on bounds the centroid's offset
        tol = 0.5 * (max(geo.spacing) + max(file_geo.spacing))
        assert np.linalg.norm(found[reader] - point) < tol, (reader, found[reader], point)
    np.testing.assert_allclose(found["SimpleITKIO"], found["NibabelIO"], atol=1e-3)
    # both readers hand nnU-Net the same array: identical preprocessed data
    np.testing.assert_array_equal(datas["SimpleITKIO"], datas["NibabelIO"])


def test_array_axes_agree_across_readers_and_views_match_the_reader(files):
    """The axis description of plans / generator sources is the reader's, permuted by transpose_forward; a
    NiftiView in that order equals the preprocessed array (no resampling) and maps back exactly."""
    import nibabel as nib

    for reader in READERS:
        plans = _plans(reader, [1, 1, 1])
        axes = array_axes(plans)
        src = {"type": "nnunet_preprocessed", "transpose_forward": TF, "image_reader_writer": reader}
        assert array_axes(src) == axes == array_axes({"source": {"train": src, "eval": src}})
        assert axes.axes == tuple([2, 1, 0][t] for t in TF) and axes.reorient == reader.endswith("WithReorient")
    assert array_axes(_plans("NibabelIO", [1, 1, 1])) == array_axes(_plans("SimpleITKIO", [1, 1, 1]))
    assert array_axes({"type": "nifti_folder"}) == ArrayAxes((0, 1, 2)) == array_axes(None)
    # no type recorded (old checkpoints) = nibabel order; no reader recorded = nnU-Net's default (SimpleITKIO)
    assert array_axes({"type": "nnunet_preprocessed", "transpose_forward": TF}) == array_axes(_plans("SimpleITKIO", [1] * 3))

    img = nib.load(files["ids_file"])
    for reader in READERS:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        rw = PlansManager(_plans(reader, [1, 1, 1])).image_reader_writer_class()
        _, rprops = rw.read_images([files["ct_file"]])
        target = [float(rprops["spacing"][t]) for t in TF]
        pm, cm, _, seg, props = _preprocess(files, reader, target, with_ids=True)
        view = NiftiView(img, array_axes(pm.plans))
        ids_v = view.to_view(files["ids"])
        lo = [b[0] for b in props["bbox_used_for_cropping"]]
        crop = ids_v[tuple(slice(l, l + s) for l, s in zip(lo, seg.shape[1:]))]
        np.testing.assert_array_equal(crop, seg[0])
        np.testing.assert_array_equal(view.from_view(ids_v), files["ids"])
        np.testing.assert_allclose(view.geometry.affine, ArrayGeometry.from_preprocessed(props, TF, seg.shape[1:])
                                   .cropped([-l for l in lo], ids_v.shape).affine, atol=1e-4)


def test_resized_geometry_matches_nnunets_resampling():
    """nnU-Net resamples with align_corners=False: a linear ramp resampled by nnU-Net equals the ramp evaluated
    at the input positions ``ArrayGeometry.resized`` assigns to the output voxels (away from the edges)."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    old, new = (15, 20, 9), (22, 13, 9)
    slopes = np.array([1.0, -2.0, 0.5])
    ramp = np.tensordot(np.stack(np.meshgrid(*[np.arange(s) for s in old], indexing="ij"), -1), slopes, 1)
    out = resample_data_or_seg_to_shape(ramp[None], new, (1.0, 1.0, 1.0), (0.7, 1.5, 1.0), is_seg=False, order=1,
                                        order_z=0, force_separate_z=False)[0]
    geo = ArrayGeometry(np.eye(4), old).resized(new)
    pos = geo.index_to_world(np.stack(np.meshgrid(*[np.arange(s) for s in new], indexing="ij"), -1))
    inner = tuple(slice(2, s - 2) for s in new)
    np.testing.assert_allclose(out[inner], (pos @ slopes)[inner], atol=1e4 * np.finfo(np.float64).eps * np.abs(ramp).max())  # float64 interpolation
