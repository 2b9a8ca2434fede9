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
    return build_trained_run(tmp_path_factory.getbasetemp())


def _load(p):
    import nibabel as nib

    return np.asarray(nib.load(str(p)).dataobj)


def _changed_within_dilated_masks(orig, new, lesions, spacing_ct, spacing_gen, sigma=1.0):
    """Every changed voxel lies within the lesions dilated by the blend margin (converted to CT voxels)."""
    from scipy import ndimage

    from nnunet_promptlesion.synthesis.blending import blend_margin

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

    # same seed and masks, another prompt: another result
    assert main([*args, "--prompt", "healthy", "-o", str(tmp_path / "b")]) == 0
    lab_b = _load(tmp_path / "b" / "abdomen_3mm_ct_lesions.nii.gz")
    assert not lab_b.any()  # healthy writes no lesion label
    syn_b = _load(tmp_path / "b" / "abdomen_3mm_ct_synthetic.nii.gz")
    assert not np.array_equal(syn_b[lab > 0], syn[lab > 0])


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
