"""promptlesion_synthesize on the real CTs in ../shared/data/ct_example with a tiny trained checkpoint."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from test_diffusion_train import build_trained_run


def _ct_example() -> Path | None:
    for p in (os.environ.get("PROMPTLESION_CT_EXAMPLE"), Path(__file__).parents[1].parent / "shared" / "data" / "ct_example"):
        if p and (Path(p) / "abdomen_3mm_ct.nii.gz").is_file():
            return Path(p)
    return None


CT = _ct_example()
needs_ct = pytest.mark.skipif(CT is None, reason="real CT examples (../shared/data/ct_example) not available")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_trained_run(tmp_path_factory)


def _load(p):
    import nibabel as nib

    return np.asarray(nib.load(str(p)).dataobj)


def _changed_within_dilated_masks(orig, new, lesions, spacing_ct, spacing_gen, sigma=1.0):
    """Every changed voxel lies within the lesions dilated by the blend margin (converted to CT voxels)."""
    from scipy import ndimage

    from nnunet_promptlesion.lesions.blending import blend_margin

    r = int(math.ceil((blend_margin(sigma) + 1) * max(spacing_gen) / min(spacing_ct))) + 1
    allowed = ndimage.maximum_filter(lesions.astype(np.uint8), size=2 * r + 1) > 0
    changed = orig != new
    return bool(changed.any()), bool((changed & ~allowed).any())


@needs_ct
def test_synthesize_real_ct_size_mm(tmp_path, trained):
    from nnunet_promptlesion.cli.synthesize import main

    args = ["-i", str(CT / "abdomen_3mm_ct.nii.gz"), "--parent-mask", str(CT / "abdomen_3mm_organs.nii.gz"),
            "--parent-label", "5", "--size-mm", "8", "--count", "2", "--seed", "3", "--steps", "3",
            "--diffusion", str(trained["checkpoint"]), "--num-threads", "1"]
    assert main([*args, "--prompt", "liver_tumor", "-o", str(tmp_path / "a")]) == 0
    out = tmp_path / "a"
    orig = _load(CT / "abdomen_3mm_ct.nii.gz")
    organs = _load(CT / "abdomen_3mm_organs.nii.gz")
    syn = _load(out / "abdomen_3mm_ct_synthetic.nii.gz")
    lab = _load(out / "abdomen_3mm_ct_lesions.nii.gz")
    assert syn.dtype == orig.dtype and syn.shape == orig.shape
    assert set(np.unique(lab).tolist()) == {0, 4}  # liver_tumor's label from the lesion spec
    assert not ((lab > 0) & (organs != 5)).any()    # lesions stay inside the parent label
    rec = json.loads((out / "abdomen_3mm_ct_synthesis.json").read_text())
    assert len(rec["lesions"]) == 2 and all(5 < l["equivalent_radius_mm"] < 11 for l in rec["lesions"])
    any_change, outside = _changed_within_dilated_masks(orig, syn, lab > 0, [3, 3, 3], rec["generator_spacing_mm"])
    assert any_change and not outside
    assert (out / "abdomen_3mm_ct_preview.png").stat().st_size > 5000

    assert main([*args, "--prompt", "healthy", "-o", str(tmp_path / "b")]) == 0
    lab_b = _load(tmp_path / "b" / "abdomen_3mm_ct_lesions.nii.gz")
    assert not lab_b.any()  # healthy writes no lesion label
    # same seed: the same two regions were regenerated (healthy tissue), nothing else changed
    syn_b = _load(tmp_path / "b" / "abdomen_3mm_ct_synthetic.nii.gz")
    any_change, outside = _changed_within_dilated_masks(orig, syn_b, lab > 0, [3, 3, 3], rec["generator_spacing_mm"])
    assert any_change and not outside


@needs_ct
def test_prompt_changes_the_sampled_latents_inside_the_lesion_only(trained):
    """Same CT patches, masks and noise, prompts 'healthy' vs 'liver_tumor': the sampled latents must differ
    inside the lesion region and be identical outside it. Compared before the decoder's codebook snap, which
    may map a briefly trained model's small prompt effect onto the same codes (the voxels then agree)."""
    import nibabel as nib
    import torch

    from nnunet_promptlesion.synthesis.single_ct import extract_patches, place_masks
    from nnunet_promptlesion.utils.geometry import array_axes
    from nnunet_promptlesion.generator.diffusion.checkpoint import load_generator_pair
    from nnunet_promptlesion.generator.diffusion.inpaint import dilate, inpaint_lesions, latent_region
    from nnunet_promptlesion.generator.intensity import IntensitySpace

    torch.set_num_threads(1)
    vq, _, model, meta, vocab = load_generator_pair(trained["checkpoint"])
    img = nib.load(str(CT / "abdomen_3mm_ct.nii.gz"))
    ct = np.asarray(img.dataobj, dtype=np.float32)
    liver = _load(CT / "abdomen_3mm_organs.nii.gz") == 5
    spacing = np.array(img.header.get_zooms()[:3], float)
    masks = place_masks(liver, spacing, 2, 8.0, None, np.random.default_rng(3), False, 5)
    assert array_axes(meta).axes == (0, 1, 2)  # trained on a NIfTI folder: nibabel order
    p = extract_patches(ct, liver, masks, spacing, np.array(meta["spacing"]), meta["patch_size"],
                        IntensitySpace.from_dict(meta["intensity"]))
    image, mask = torch.from_numpy(p["image"]), torch.from_numpy(p["mask"])
    lat = {}
    for name in ("healthy", "liver_tumor"):
        ids = torch.full((2,), vocab.id_of(name), dtype=torch.long)
        _, _, lat[name] = inpaint_lesions(vq, model, image, mask, ids, steps=3, return_decoded=True,
                                          generator=torch.Generator().manual_seed(3),
                                          parent_mask=torch.from_numpy(p["parent"]))
    # the sampler generates the lesion's latent cells dilated by the encoder's reach (encode_inputs' "generate")
    region = latent_region(mask, vq.downsample_factor, lat["healthy"].shape[2:])
    inside = dilate(region, int(vq.config.encoder_reach)).float().expand_as(lat["healthy"]) > 0.5
    diff = (lat["healthy"] - lat["liver_tumor"]).abs()
    assert torch.equal(lat["healthy"][~inside], lat["liver_tumor"][~inside])
    # the prompt moves every sample's lesion latents (mean |difference| on the [-1, 1] latent scale)
    for b in range(2):
        assert diff[b][inside[b]].mean() > 1e-3, diff[b][inside[b]].mean()


@needs_ct
def test_synthesize_real_ct_with_mask_and_errors(tmp_path, trained, capsys):
    import nibabel as nib

    from nnunet_promptlesion.cli.synthesize import main

    img = nib.load(str(CT / "abdomen_3mm_ct.nii.gz"))
    organs = _load(CT / "abdomen_3mm_organs.nii.gz")
    liver = np.argwhere(organs == 5)
    c = liver[len(liver) // 2]
    user = np.zeros(organs.shape, np.uint8)
    user[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = 1  # may poke out of the liver: clipped
    mpath = tmp_path / "lesion.nii.gz"
    nib.save(nib.Nifti1Image(user, img.affine), str(mpath))
    base = ["-i", str(CT / "abdomen_3mm_ct.nii.gz"), "--parent-mask", str(CT / "abdomen_3mm_organs.nii.gz"),
            "--diffusion", str(trained["checkpoint"]), "--num-threads", "1", "--steps", "2"]
    assert main([*base, "--parent-label", "5", "--prompt", "4", "--mask", str(mpath), "-o", str(tmp_path / "m")]) == 0
    lab = _load(tmp_path / "m" / "abdomen_3mm_ct_lesions.nii.gz")
    assert np.array_equal(lab > 0, (user > 0) & (organs == 5))

    assert main([*base, "--parent-label", "250", "--prompt", "liver_tumor", "-o", str(tmp_path / "e")]) == 2
    assert "holds no voxel with label 250" in capsys.readouterr().err
    assert main([*base, "--parent-label", "5", "--prompt", "plaque", "-o", str(tmp_path / "e")]) == 2
    assert "knows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--size-mm" in capsys.readouterr().out


def _nnunet_generator_pair(tmp_path, spacing_g, transpose_forward, prompt_dropout=0.1, reader=None):
    """A VQGAN + diffusion checkpoint pair whose metadata says: trained with -d (nnU-Net order, spacing
    ``spacing_g`` mm in that order, read by ``reader``). Untrained weights: the tests replace the sampler."""
    import torch

    from nnunet_promptlesion.generator.diffusion.checkpoint import build_meta
    from nnunet_promptlesion.generator.diffusion.config import DiffusionConfig, PromptVocabulary
    from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet
    from nnunet_promptlesion.generator.intensity import IntensitySpace
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan
    from nnunet_promptlesion.utils.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    source = {"type": "nnunet_preprocessed", "axis_order": "nnunet", "transpose_forward": list(transpose_forward)}
    if reader:
        source["image_reader_writer"] = reader
    vq = tmp_path / "vq.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))), vq, spacing=spacing_g,
               intensity=IntensitySpace.hu_window(-175, 250), step=0, source={"train": source, "eval": source})
    cfg = DiffusionConfig.tiny(num_classes=1, channels=(16, 32, 32), prompt_dropout=prompt_dropout)
    model = PromptLesionUNet(cfg)
    vocab = PromptVocabulary(names=["healthy", "tumor"], labels=[0, 2])
    meta = build_meta(cfg, vocab, load_checkpoint(vq)["meta"], vq, (24, 24, 24), 0, source, model.state_dict())
    ck = tmp_path / f"diff_{prompt_dropout}.pt"
    save_checkpoint({"meta": meta, "model": model.state_dict()}, ck)
    return ck


def test_synthesize_uses_the_generators_axis_order_and_spacing(tmp_path, monkeypatch):
    """Anisotropic CT (0.8 x 0.8 x 3 mm, NIfTI x, y, z), generator trained on nnU-Net data: arrays (z, y, x) at
    (3.0, 1.6, 0.8) mm. The generator must see the patch in its own order and scale; the result must land
    on the lesion in the CT."""
    import nibabel as nib
    import torch

    from nnunet_promptlesion.cli.synthesize import main
    from nnunet_promptlesion.generator.diffusion import inpaint

    ck = _nnunet_generator_pair(tmp_path, (3.0, 1.6, 0.8), (0, 1, 2))
    shape = (48, 40, 14)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    ct = np.broadcast_to(-150.0 + 8.0 * x, shape).astype(np.int16)  # HU ramp along x only: asymmetric
    organ = np.zeros(shape, np.uint8)
    organ[5:43, 5:35, 2:12] = 1
    lesion = np.zeros(shape, np.uint8)
    lesion[20:30, 17:23, 6:8] = 1  # 8 mm along x, 4.8 mm along y, 6 mm along z
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    for name, arr in (("ct", ct), ("organ", organ), ("lesion", lesion)):
        nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / f"{name}.nii.gz"))

    seen = {}
    bright = float(np.asarray(inpaint_space_value(200.0)))

    def fake_inpaint(vqgan, model, image, lesion_mask, prompt_ids, **kw):
        seen.update(image=image.numpy(), mask=lesion_mask.numpy(), parent=kw.get("parent_mask"))
        decoded = torch.full_like(image, bright)
        return image, decoded, None

    monkeypatch.setattr(inpaint, "inpaint_lesions", fake_inpaint)
    rc = main(["-i", str(tmp_path / "ct.nii.gz"), "--parent-mask", str(tmp_path / "organ.nii.gz"), "--parent-label", "1",
               "--prompt", "tumor", "--mask", str(tmp_path / "lesion.nii.gz"), "--diffusion", str(ck),
               "--device", "cpu", "-o", str(tmp_path / "out")])
    assert rc == 0
    m = seen["mask"][0, 0] > 0.5
    extent = [int(np.ptp(np.nonzero(m.any(axis=tuple(a for a in range(3) if a != k)))[0])) + 1 for k in range(3)]
    # (z, y, x) in generator voxels: 6 / 3.0, 4.8 / 1.6 (+1 from the 0.5 threshold at the edges), 8 / 0.8
    assert extent[0] == 2 and extent[1] in (3, 4) and extent[2] == 10, extent
    img = seen["image"][0, 0]
    c = 12
    assert np.all(np.diff(img[c, c, 4:20]) > 0)          # the ramp runs along the generator's last axis (x)
    assert np.ptp(img[:, c, c]) < 1e-5 and np.ptp(img[c, :, c]) < 1e-5
    parent = seen["parent"].numpy()  # the organ reaches the generator (MaskTransformer prompts read it)
    assert (parent >= seen["mask"]).all() and parent.sum() > 5 * seen["mask"].sum()

    syn = _load(tmp_path / "out" / "ct_synthetic.nii.gz")
    lab = _load(tmp_path / "out" / "ct_lesions.nii.gz")
    assert np.array_equal(lab > 0, lesion > 0)
    assert syn[lesion > 0].mean() > 180  # the generated content (200 HU) lands on the lesion (was 10-82 HU)
    any_change, outside = _changed_within_dilated_masks(ct, syn, lesion > 0, [0.8, 0.8, 3.0], [3.0, 1.6, 0.8])
    assert any_change and not outside
    rec = json.loads((tmp_path / "out" / "ct_synthesis.json").read_text())
    assert rec["generator_axes"] == [2, 1, 0]


def inpaint_space_value(hu: float) -> float:
    from nnunet_promptlesion.generator.intensity import IntensitySpace

    return float(IntensitySpace.hu_window(-175, 250).hu_to_model(np.float32(hu)))


def _tiny_ct(tmp_path, aff=None):
    """A small CT (HU ramp along nibabel x), an organ and a lesion mask, written as NIfTI."""
    import nibabel as nib

    shape = (40, 36, 14)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    ct = np.broadcast_to(-150.0 + 8.0 * x, shape).astype(np.int16)
    organ = np.zeros(shape, np.uint8)
    organ[5:35, 5:31, 2:12] = 1
    lesion = np.zeros(shape, np.uint8)
    lesion[16:22, 15:21, 6:8] = 1
    aff = np.diag([0.8, 0.8, 3.0, 1.0]) if aff is None else aff
    for name, arr in (("ct", ct), ("organ", organ), ("lesion", lesion)):
        nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / f"{name}.nii.gz"))
    return ct, organ, lesion


@pytest.mark.parametrize("prompt_dropout", [0.1, 1.0])
def test_synthesize_samples_a_no_prompt_model_with_its_null_token(tmp_path, monkeypatch, prompt_dropout):
    """A model trained with prompt dropout 1 has only seen its null token: single-CT synthesis must sample it
    with that token (as training-time sources do), and any other model with the requested class prompt; the
    label map keeps the requested class either way."""
    import torch

    from nnunet_promptlesion.cli.synthesize import main
    from nnunet_promptlesion.generator.diffusion import inpaint
    from nnunet_promptlesion.utils.checkpoint import load_checkpoint

    ck = _nnunet_generator_pair(tmp_path, (3.0, 1.6, 0.8), (0, 1, 2), prompt_dropout=prompt_dropout)
    meta = load_checkpoint(ck)["meta"]
    _, _, lesion = _tiny_ct(tmp_path)
    seen = {}

    def fake_inpaint(vqgan, model, image, lesion_mask, prompt_ids, **kw):
        seen["ids"] = prompt_ids.tolist()
        return image, image.clone(), None

    monkeypatch.setattr(inpaint, "inpaint_lesions", fake_inpaint)
    assert main(["-i", str(tmp_path / "ct.nii.gz"), "--parent-mask", str(tmp_path / "organ.nii.gz"),
                 "--parent-label", "1", "--prompt", "tumor", "--mask", str(tmp_path / "lesion.nii.gz"),
                 "--diffusion", str(ck), "--device", "cpu", "-o", str(tmp_path / "out")]) == 0
    tumor_id = 1  # vocabulary ["healthy", "tumor"]
    want = int(meta["null_prompt_id"]) if prompt_dropout >= 1 else tumor_id
    assert want != tumor_id or prompt_dropout < 1
    assert seen["ids"] == [want]
    rec = json.loads((tmp_path / "out" / "ct_synthesis.json").read_text())
    assert rec["sampled_prompt_id"] == want and rec["prompt"] == "tumor"
    assert np.array_equal(_load(tmp_path / "out" / "ct_lesions.nii.gz") > 0, lesion > 0)
    del torch


def test_synthesize_with_a_nibabel_generator_sees_the_same_patch_as_with_a_simpleitk_one(tmp_path, monkeypatch):
    """nnU-Net's NibabelIO reads NIfTI in the same (z, y, x) order as SimpleITKIO: a generator trained on a
    NibabelIO dataset must get the same patch (and the lesion land at the same voxels) as one trained on a
    SimpleITKIO dataset. A ...WithReorient generator sees the reoriented CT, and the result maps back exactly."""
    import nibabel as nib

    from nnunet_promptlesion.cli.synthesize import main
    from nnunet_promptlesion.generator.diffusion import inpaint

    # stored with flipped x and y (LPS-like): the reorienting readers flip these two axes
    aff = np.diag([-0.8, -0.8, 3.0, 1.0])
    _, _, lesion = _tiny_ct(tmp_path, aff)
    seen = {}
    bright = inpaint_space_value(200.0)

    def fake_inpaint(vqgan, model, image, lesion_mask, prompt_ids, **kw):
        seen.setdefault("image", []).append(image.numpy().copy())
        return image, torch.full_like(image, bright), None

    import torch

    monkeypatch.setattr(inpaint, "inpaint_lesions", fake_inpaint)
    outs = {}
    for reader in ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"):
        d = tmp_path / reader
        d.mkdir()
        ck = _nnunet_generator_pair(d, (3.0, 1.6, 0.8), (0, 1, 2), reader=reader)
        assert main(["-i", str(tmp_path / "ct.nii.gz"), "--parent-mask", str(tmp_path / "organ.nii.gz"),
                     "--parent-label", "1", "--prompt", "tumor", "--mask", str(tmp_path / "lesion.nii.gz"),
                     "--diffusion", str(ck), "--device", "cpu", "-o", str(d / "out")]) == 0
        outs[reader] = _load(d / "out" / "ct_synthetic.nii.gz")
        assert syn_ok(outs[reader], lesion)
        rec = json.loads((d / "out" / "ct_synthesis.json").read_text())
        assert rec["generator_axes"] == [2, 1, 0] and rec["generator_reorients"] == reader.endswith("Reorient")
        # the recorded world centre is the lesion's centre under the file's affine
        np.testing.assert_allclose(rec["lesions"][0]["centre_world_mm_ras"],
                                   nib.affines.apply_affine(aff, np.argwhere(lesion > 0).mean(0)), atol=0.01)
    sitk_img, nib_img, reo_img = seen["image"]
    np.testing.assert_array_equal(sitk_img, nib_img)
    # reoriented to RAS: the generator's last axis (x) runs the other way, the ramp falls along it
    # (patch coordinates are symmetric about the lesion centre; mirrored, they round a little differently)
    np.testing.assert_allclose(reo_img[..., ::-1, ::-1], sitk_img, atol=16 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(outs["SimpleITKIO"], outs["NibabelIO"])


def syn_ok(syn, lesion) -> bool:
    """The generated content (200 HU) landed on the lesion (the CT ramp there is far below it)."""
    return bool(syn[lesion > 0].mean() > 180)
