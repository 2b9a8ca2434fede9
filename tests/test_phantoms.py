"""Procedural phantom datasets: determinism, plausibility (labels, HU, placement, imbalance), safe writing,
and nnU-Net's own dataset verification + planning on the result."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nnunet_promptlesion.cli.make_phantoms import main as make_phantoms_main
from nnunet_promptlesion.dataset_conversion import phantoms as P
from nnunet_promptlesion.dataset_conversion import phantom_base, phantoms_abdomen, phantoms_ccta
from nnunet_promptlesion.lesions.spec import EARLY_RADIUS_MM, LesionSpec

N_CASES = 8


@pytest.fixture(scope="module")
def ccta_cases():
    return P.generate_split("ccta", N_CASES, seed=0)


@pytest.fixture(scope="module")
def abdomen_cases():
    return P.generate_split("abdomen", 6, seed=0)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    env = {"nnUNet_raw": tmp_path / "raw", "nnUNet_preprocessed": tmp_path / "pre", "nnUNet_results": tmp_path / "res"}
    for k, v in env.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return env


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    for root in ("a", "b", "c"):
        seed = 3 if root != "c" else 4
        assert make_phantoms_main(["--kind", "ccta", "--dataset-id", "11", "--cases", "1", "--test-cases", "1",
                                   "--seed", str(seed), "--output-root", str(tmp_path / root), "--quiet"]) == 0
    ha, hb, hc = (_hashes(tmp_path / r / "Dataset011_PhantomCCTA") for r in ("a", "b", "c"))
    assert len(ha) == 2 * 1 + 2 * 1 + 3  # images/labels Tr and Ts + dataset.json, lesion_spec.json, manifest
    assert ha == hb
    images = [k for k in ha if k.startswith("images")]
    assert all(ha[k] != hc[k] for k in images)


def test_abdomen_generation_is_deterministic():
    a = P.generate_split("abdomen", 1, seed=7)
    b = P.generate_split("abdomen", 1, seed=7)
    c = P.generate_split("abdomen", 1, seed=8)
    for x, y, z in zip(a, b, c):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label)
        assert not np.array_equal(x.image, z.image)


def test_case_does_not_depend_on_number_of_cases():
    # Per-case seed streams: a case with the same planned lesion classes is identical in a 2- and a 4-case split.
    kind = P.phantom_kinds()["ccta"]
    cfg = P.get_config("ccta")
    plans = {n: P.plan_lesion_presence(n, kind.class_fractions(cfg), kind.healthy_fraction(cfg), P.plan_rng(1, P.TRAIN))
             for n in (2, 4)}
    small, big = P.generate_split("ccta", 2, seed=1), P.generate_split("ccta", 4, seed=1)
    same = [i for i in range(2) if plans[2][i] == plans[4][i]]
    assert same, "seed 1 no longer gives a shared plan; pick another seed"
    for i in same:
        assert np.array_equal(small[i].image, big[i].image) and np.array_equal(small[i].label, big[i].label)


# ---------------------------------------------------------------------------------------------- CCTA content
def test_ccta_labels_spacing_and_hu(ccta_cases):
    calc_max = []
    for case in ccta_cases:
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.image.shape == case.label.shape == tuple(phantoms_ccta.CCTAPhantomConfig().shape)
        assert case.spacing == (0.5, 0.5, 0.6)
        assert set(np.unique(case.label)) <= {0, 1, 2, 3}
        im, lb = case.image.astype(float), case.label
        core_lumen = ndimage.binary_erosion(case.aux["lumen"] & (lb == 0))
        wall_mean = im[lb == 1].mean()
        assert im[core_lumen].mean() > wall_mean + 200, "contrast lumen must be far brighter than the wall"
        assert 0 < wall_mean < 120
        assert im.min() >= -1024 and im.max() <= 3071
        comps, n = ndimage.label(lb == 2, structure=np.ones((3, 3, 3)))
        for i in range(1, n + 1):
            calc_max.append(im[comps == i].max())
        if (lb == 3).any():
            assert abs(im[lb == 3].mean() - wall_mean) < 80, "non-calcified plaque must stay close to wall HU"
            assert im[lb == 3].mean() < wall_mean, "this phantom's soft plaque is hypodense"
    assert calc_max and min(calc_max) >= 600, "every calcified plaque must contain voxels >= 600 HU"


def test_ccta_plaques_lie_in_the_vessel_wall_neighbourhood(ccta_cases):
    seen = set()
    for case in ccta_cases:
        vessel = case.aux["lumen"] | case.aux["vessel_wall"]
        for lab in (2, 3):
            m = case.label == lab
            if not m.any():
                continue
            seen.add(lab)
            assert not (m & ~case.parent_regions[lab]).any()
            # Each plaque touches the wall or lumen (within one voxel).
            comps, n = ndimage.label(m)
            for i in range(1, n + 1):
                assert (ndimage.binary_dilation(comps == i) & vessel).any()
        if 2 in np.unique(case.label):
            assert not ((case.label == 2) & ~vessel).any(), "calcium is clipped to lumen + wall"
    assert seen == {2, 3}


def test_ccta_imbalance_and_healthy_cases(ccta_cases):
    has = lambda lab: sum(int((c.label == lab).any()) for c in ccta_cases)
    n_calc, n_ncp = has(2), has(3)
    healthy = sum(int(not np.isin(c.label, [2, 3]).any()) for c in ccta_cases)
    assert 1 <= n_ncp < n_calc
    assert healthy >= 1
    assert sum(int((c.label == 1).any()) for c in ccta_cases) == N_CASES  # every case has vessels


def test_ct_image_formation_noise_and_partial_volume():
    hu = np.zeros((40, 40, 20), np.float32)
    hu[20:] = 400.0
    img = phantom_base.form_ct_image(hu, (0.5, 0.5, 0.6), np.random.default_rng(0), (0.3, 0.3, 0.35), noise_sd_hu=15.0)
    assert img.dtype == np.int16
    assert 13.5 < img[:15].std() < 16.5  # noise SD as asked, on a flat region
    edge = img[19:21].astype(float).mean(axis=(1, 2))  # partial volume across the step
    assert 50 < edge[0] < 200 < edge[1] < 350


def test_plan_lesion_presence_stratifies():
    rng = np.random.default_rng(0)
    plan = P.plan_lesion_presence(20, {"a": 0.7, "b": 0.25}, 0.2, rng)
    assert sum("a" in s for s in plan) == 14 and sum("b" in s for s in plan) == 5
    assert sum(not s for s in plan) == 4
    assert P.plan_lesion_presence(1, {"a": 0.7, "b": 0.25}, 0.2, rng) == [{"a"}]



def test_split_fractions_enrich_only_the_test_split():
    kind = P.phantom_kinds()["ccta"]
    cfg = P.get_config("ccta", "demo")
    tr, tr_h = P.split_fractions(kind, cfg, P.TRAIN)
    ts, ts_h = P.split_fractions(kind, cfg, P.TEST)
    assert tr == {"calcified_plaque": 0.75, "noncalcified_plaque": 0.2} and tr_h == 0.15
    assert ts == {"calcified_plaque": 0.6, "noncalcified_plaque": 0.6} and ts_h == 0.1
    assert P.split_fractions(kind, P.get_config("ccta"), P.TEST) == P.split_fractions(kind, P.get_config("ccta"), P.TRAIN)
    with pytest.raises(ValueError, match="unknown classes"):
        P.split_fractions(kind, P.get_config("ccta", test_fractions={"plaque": 0.5}), P.TEST)


def test_ccta_demo_preset_keeps_the_imbalance_and_has_larger_calcium():
    cfg = P.get_config("ccta", "demo")
    tr = P.generate_split("ccta", 16, seed=0, split=P.TRAIN, config=cfg)
    ts = P.generate_split("ccta", 10, seed=0, split=P.TEST, config=cfg)
    assert tr[0].image.shape == (48, 48, 40)
    lesions = lambda cases, cls: [l for c in cases for l in c.lesions if l["class"] == cls]
    calc, ncp = lesions(tr, "calcified_plaque"), lesions(tr, "noncalcified_plaque")
    assert len(ncp) <= 4 < 3 * len(ncp) < len(calc)  # the non-calcified class stays rare in training
    assert np.median([l["voxels"] for l in calc]) >= 60  # the default preset's median is ~50
    assert all(l["voxels"] >= cfg.min_plaque_voxels for l in calc)
    assert len(lesions(ts, "noncalcified_plaque")) == 6  # 60 % of 10 test cases
    for c in tr + ts:  # same HU design as the default preset
        if (c.label == 2).any():
            assert c.image[c.label == 2].max() >= 600

# ---------------------------------------------------------------------------------------------- abdomen content
def test_abdomen_labels_hu_and_placement(abdomen_cases):
    lab = phantoms_abdomen.LABELS
    stages = set()
    for case in abdomen_cases:
        im, lb = case.image.astype(float), case.label
        assert case.spacing == (2.5, 2.5, 3.0)
        assert set(np.unique(lb)) <= set(lab.values())
        assert {1, 2, 3} <= set(np.unique(lb)), "every case has liver, kidneys and pancreas"
        assert im[~case.aux["body"]].mean() < -900  # air around the body
        assert 40 < np.median(im[lb == 1]) < 90 and np.median(im[lb == 2]) > 100
        for t_name, organ in phantoms_abdomen.TUMOUR_PARENT.items():
            m = lb == lab[t_name]
            if not m.any():
                continue
            assert not (m & ~case.parent_regions[lab[t_name]]).any()
            if t_name != "kidney_tumor":
                assert not (m & ~case.aux[organ]).any(), f"{t_name} must stay inside the {organ}"
            else:
                comps, n = ndimage.label(m)
                for i in range(1, n + 1):
                    assert (ndimage.binary_dilation(comps == i) & case.aux["kidney"]).any()
        if (lb == lab["liver_tumor"]).any():
            assert im[lb == lab["liver_tumor"]].mean() < np.median(im[lb == lab["liver"]]) - 10, "liver tumours are hypodense"
        for rec in case.lesions:
            stages.add(rec["stage"])
            assert (rec["radius_mm_drawn"] <= EARLY_RADIUS_MM) == (rec["stage"] == "early")
    assert stages == {"early", "late"}
    n = {k: sum(int((c.label == lab[k]).any()) for c in abdomen_cases) for k in phantoms_abdomen.TUMOUR_PARENT}
    assert n["pancreas_tumor"] < n["liver_tumor"] and n["pancreas_tumor"] >= 1
    assert any(not (c.label >= 4).any() for c in abdomen_cases), "some cases are healthy"


# ---------------------------------------------------------------------------------------------- safe writing
def test_refuses_existing_id_and_leaves_nothing_behind(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    args = ["--kind", "ccta", "--dataset-id", "12", "--cases", "1", "--test-cases", "0", "--output-root", str(root), "--quiet"]
    assert make_phantoms_main(args) == 0
    before = _hashes(root / "Dataset012_PhantomCCTA")
    # Same id under another name is refused too (nnU-Net could not tell them apart).
    assert make_phantoms_main(args + ["--name", "Other", "--seed", "1"]) == 1
    assert make_phantoms_main(args + ["--seed", "1"]) == 1
    assert sorted(p.name for p in root.iterdir()) == ["Dataset012_PhantomCCTA"]
    assert _hashes(root / "Dataset012_PhantomCCTA") == before

    # An interrupted run (error in the 2nd case) leaves the old dataset untouched and no temporary folder.
    real = phantoms_ccta.KIND.generate
    calls = {"n": 0}

    def failing(cfg, classes, rng):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(cfg, classes, rng)

    monkeypatch.setattr(phantoms_ccta.KIND, "generate", failing)
    with pytest.raises(KeyboardInterrupt):
        make_phantoms_main(["--kind", "ccta", "--dataset-id", "12", "--cases", "3", "--output-root", str(root),
                            "--overwrite", "--quiet"])
    monkeypatch.setattr(phantoms_ccta.KIND, "generate", real)
    assert sorted(p.name for p in root.iterdir()) == ["Dataset012_PhantomCCTA"]
    assert _hashes(root / "Dataset012_PhantomCCTA") == before

    # --overwrite under a new name replaces the dataset and removes the old folder with the same id.
    assert make_phantoms_main(args + ["--name", "Other", "--overwrite", "--seed", "1"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["Dataset012_Other"]


def test_cli_help_and_bad_input(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        make_phantoms_main(["--help"])
    assert e.value.code == 0
    assert "--dataset-id" in capsys.readouterr().out
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert make_phantoms_main(["--kind", "ccta", "--dataset-id", "1", "--cases", "1"]) == 2
    assert "nnUNet_raw" in capsys.readouterr().err
    assert make_phantoms_main(["--kind", "ccta", "--dataset-id", "1000", "--cases", "1", "--output-root", str(tmp_path)]) == 1
    assert make_phantoms_main(["--kind", "ccta", "--dataset-id", "1", "--cases", "1", "--preset", "nope",
                               "--output-root", str(tmp_path)]) == 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- nnU-Net
class _SerialPool:
    """Stands in for a spawn Pool so nnU-Net's own checks run in this process (a spawn pool costs
    several seconds of torch imports per worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


class _SerialMultiprocessing:
    def get_context(self, method):
        return self

    def Pool(self, *args, **kwargs):
        return _SerialPool()


def test_nnunet_verifies_and_plans_both_kinds(nnunet_env, ccta_dataset, monkeypatch):
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    raw = nnunet_env["nnUNet_raw"]
    assert make_phantoms_main(["--kind", "ccta", "--dataset-id", "21", "--cases", "4", "--seed", "0", "--quiet"]) == 0
    assert make_phantoms_main(["--kind", "abdomen", "--dataset-id", "22", "--cases", "4", "--seed", "0", "--quiet"]) == 0
    for folder, kind in (("Dataset021_PhantomCCTA", "ccta"), ("Dataset022_PhantomAbdomen", "abdomen")):
        ds = json.loads((raw / folder / "dataset.json").read_text())
        assert ds["channel_names"] == {"0": "CT"} and ds["numTraining"] == 4 and ds["file_ending"] == ".nii.gz"
        assert ds["labels"] == P.phantom_kinds()[kind].labels
        spec = LesionSpec.load(raw / folder / "lesion_spec.json")
        spec.validate_against_dataset(ds)
        assert len(list((raw / folder / "imagesTs").iterdir())) == len(list((raw / folder / "labelsTs").iterdir())) == 2
        img = nib.load(str(next((raw / folder / "imagesTr").iterdir())))
        assert np.allclose(img.header.get_zooms(), P.get_config(kind).spacing)

    # The abdomen dataset goes through nnU-Net's full integrity check in-process ...
    monkeypatch.setattr(vdi, "multiprocessing", _SerialMultiprocessing())
    vdi.verify_dataset_integrity(str(raw / "Dataset022_PhantomAbdomen"), 1)
    # ... and a CCTA phantom through the real command (the session's: promptlesion_make_phantoms, then
    # nnUNetv2_plan_and_preprocess --verify_dataset_integrity): integrity check, fingerprint and planning.
    root, did, _ = ccta_dataset
    assert "verify_dataset_integrity Done" in (root / "plan_and_preprocess.log").read_text()
    pre = next((root / "preprocessed").glob(f"Dataset{did}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]
    assert fullres["normalization_schemes"] == ["CTNormalization"]
    assert np.prod(fullres["patch_size"]) <= 64 ** 3, fullres["patch_size"]
    fp = json.loads((pre / "dataset_fingerprint.json").read_text())
    n_train = json.loads((root / "raw" / pre.name / "dataset.json").read_text())["numTraining"]
    assert len(fp["shapes_after_crop"]) == n_train == 8
    # HU statistics nnU-Net will normalise with: the foreground (labelled) voxels are soft tissue to calcium
    props = fp["foreground_intensity_properties_per_channel"]["0"]
    assert -100 < props["mean"] < 400 and props["max"] >= 600
