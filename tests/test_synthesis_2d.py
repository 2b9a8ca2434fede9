"""2D generators on the nnU-Net side (issue 27, phase 2): the lesion cache, the diffusion sources and single-CT
synthesis with a tiny2d generator on the demo's 2D configuration, the dimensionality refusals and the few-step
solvers through the renderer. One real nnUNetv2_train run (diffusion_online, loader worker processes); the rest runs
in this process."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BIN, TINY2D_PRETRAIN, phantom_copy_2d
from diffusion_fixtures import EXT_TRAINERS

torch.set_num_threads(1)

CONFIG = "2d_demo"


@contextlib.contextmanager
def _paths(env: dict):
    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(k, env[k])
        yield


@pytest.fixture(scope="module")
def gen2d(ccta_dataset, tmp_path_factory):
    """A private copy of the session CCTA phantom with a 2d_demo configuration (batch 2), and a tiny2d generator pair
    plus a lesion cache made by ``promptlesion_pretrain -c 2d_demo --cache-per-class 2`` (2 training steps each)."""
    from nnunet_promptlesion.cli.pretrain import main as pretrain

    did = ccta_dataset[1]
    work = tmp_path_factory.mktemp("synth2d")
    name, paths = phantom_copy_2d(ccta_dataset, work, CONFIG, batch_size=2)
    env = {**os.environ, **paths, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
    env["nnUNet_extTrainer"] = os.pathsep.join(
        [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p] + [str(EXT_TRAINERS)])
    out = io.StringIO()
    with _paths(env), contextlib.redirect_stdout(out):
        rc = pretrain(["-d", str(did), "-c", CONFIG, "-f", "0", *TINY2D_PRETRAIN,
                       "--cache-per-class", "2", "--cache-steps", "2", "--cache-batch", "4"])
    assert rc == 0, out.getvalue()[-3000:]
    res = work / "results" / name
    return {"did": did, "name": name, "env": env, "pre": work / "preprocessed" / name, "raw": work / "raw" / name,
            "diffusion": res / f"promptlesion_diffusion__tiny2d__{CONFIG}__fold0" / "checkpoint_final.pt",
            "snippet": json.loads(out.getvalue().strip().splitlines()[-1])}


def _checkpoint_3d(tmp_path: Path) -> Path:
    """An untrained 3D tiny pair (the dimensionality check reads only the metadata)."""
    from nnunet_promptlesion.generator.intensity import IntensitySpace
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, load_vqgan, save_vqgan
    from test_generator_2d import _diffusion_checkpoint

    vq = tmp_path / "vq3d.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(16, 16, 16))), vq, spacing=(1, 1, 1),
               intensity=IntensitySpace.hu_window(-175, 250), step=0, source={"type": "test"})
    return _diffusion_checkpoint(tmp_path, vq, load_vqgan(vq)[1], "tiny")


def _trainer(g, configuration: str, settings: dict, tmp_path: Path, monkeypatch):
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, g["env"][k])
    sfile = tmp_path / "settings.json"
    sfile.write_text(json.dumps(settings))
    monkeypatch.setenv("PROMPTLESION_SETTINGS", str(sfile))
    plans = json.loads((g["pre"] / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # set by nnUNetv2_train's entry point; nnU-Net's __init__ pops it
    dj = json.loads((g["pre"] / "dataset.json").read_text())
    return PromptLesionTrainer(plans, configuration, 0, dj, device=torch.device("cpu"))


def _source_error(g, configuration: str, settings: dict, tmp_path, monkeypatch) -> str:
    """The PromptLesionConfigError message of building the settings' source for ``configuration``."""
    from nnunet_promptlesion.synthesis.sources import SourceContext, build_source
    from nnunet_promptlesion.utils.errors import PromptLesionConfigError

    t = _trainer(g, configuration, settings, tmp_path, monkeypatch)
    t.promptlesion_setup()
    cm = t.configuration_manager
    ctx = SourceContext(settings=t.promptlesion_settings, spec=t.promptlesion_spec, index=None,
                        spacing=tuple(cm.spacing), patch_size=tuple(cm.patch_size),
                        initial_patch_size=tuple(cm.patch_size), intensity=t._intensity_properties(), trainer=t,
                        log=lambda msg: None)
    with pytest.raises(PromptLesionConfigError) as e:
        build_source(t.promptlesion_settings.synthesizer, ctx).close()
    return str(e.value)


# ---------------------------------------------------------------------------------------------- cache
def test_pretrain_2d_builds_a_cache_of_in_plane_lesions_that_training_batches_draw(gen2d, tmp_path, monkeypatch):
    from nnunet_promptlesion.synthesis.cache import LesionCache
    from nnunet_promptlesion.synthesis.cache_build import RunContext

    g = gen2d
    assert g["snippet"]["synthesizer"] == "diffusion_cache"  # promptlesion_pretrain's last line
    cache = LesionCache(g["snippet"]["cache"])
    m = cache.manifest
    assert m["complete"] and m["generator"]["patch_size"] == [32, 32] and m["generator"]["mapping"]["identity_grid"]
    assert m["fingerprint"]["configuration"] == CONFIG and sorted(m["counts"]) == ["2", "3"]
    with _paths(g["env"]):
        reader = RunContext(str(g["did"]), CONFIG, "0", "nnUNetPlans").reader
    for label in cache.labels():
        for k in range(cache.count(label)):
            s = cache.get(label, k)
            assert s.mask.shape[0] == 1 and s.mask.any() and np.isfinite(s.values).all()  # one slice
            lo = np.asarray(s.box_lo) - [0, 4, 4]
            img, seg = reader.crop(s.case, lo, np.asarray(s.mask.shape) + [0, 8, 8])
            new = img.copy()
            mask = s.paste(new, lo)
            assert np.isin(seg[0][mask], [1]).all()  # inside the vessel wall, the parent
            support = np.zeros(mask.shape, bool)
            support[:, 4:-4, 4:-4] = s.support
            assert np.array_equal(new[0][~support], img[0][~support])
    # the snippet in the 2D trainer: batches hold cached lesions, painted into the 2D patch with their label
    t = _trainer(g, CONFIG, {**g["snippet"], "class_weights": "uniform"}, tmp_path, monkeypatch)
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    t.initialize()
    t.dataset_class = infer_dataset_class(t.preprocessed_dataset_folder)
    ds_tr, _ = t.get_tr_and_val_datasets()
    loader = t.build_train_loader(ds_tr, t.configuration_manager.patch_size, None)
    try:
        from nnunet_promptlesion.trainers.mixing_loader import STATS_KEY

        np.random.seed(0)
        for _ in range(2):
            batch = loader.generate_train_batch()
            assert tuple(batch["data"].shape) == (2, 1, 32, 32) and batch["synthetic"].tolist() == [False, True]
            key = batch["keys"][1]
            assert key.startswith("synthetic:")
            assert (batch["target"][1] == int(key.rsplit("label", 1)[1])).any()
            stats = batch[STATS_KEY]
            assert stats.get("diffusion_cache/draws", 0) >= 1 and not stats.get("fallback_real")
    finally:
        t.close_sample_source()


# ---------------------------------------------------------------------------------------------- refusals
def test_a_generator_of_the_other_dimensionality_is_refused_naming_both(gen2d, tmp_path, monkeypatch):
    from nnunet_promptlesion.cli.build_cache import main as build_cache

    g = gen2d
    d3 = _checkpoint_3d(tmp_path)
    for config, ck, have, want in ((CONFIG, d3, "3D", "2D"), ("3d_fullres", g["diffusion"], "2D", "3D")):
        err = io.StringIO()
        with _paths(g["env"]), contextlib.redirect_stderr(err):
            rc = build_cache(["-d", str(g["did"]), "-c", config, "-f", "0", "--diffusion", str(ck), "--per-class", "1",
                              "--device", "cpu", "--no-progress", "-o", str(tmp_path / f"cache_{config}")])
        assert rc == 2 and f"is a {have} diffusion model" in err.getvalue() and f"a {want} one is needed" in err.getvalue()
        msg = _source_error(g, config, {"synthesizer": "diffusion_online", "diffusion": str(ck)}, tmp_path, monkeypatch)
        assert f"is {have}" in msg and f"configuration '{config}' is {want}" in msg
    # a cache of 2D lesions on the 3D configuration (its fingerprint names the configuration too)
    msg = _source_error(g, "3d_fullres", g["snippet"], tmp_path, monkeypatch)
    assert CONFIG in msg and "3d_fullres" in msg
    # an unknown sampler is refused up front, naming the choices
    msg = _source_error(g, CONFIG, {"synthesizer": "diffusion_online", "diffusion": str(g["diffusion"]),
                                    "sampler": "euler"}, tmp_path, monkeypatch)
    assert "euler" in msg and "dpmpp" in msg and "unipc" in msg


# ---------------------------------------------------------------------------------------------- renderer
def test_few_step_solver_renders_finite_in_plane_lesions(gen2d):
    from nnunet_promptlesion.lesions.masks import MaskSampler
    from nnunet_promptlesion.synthesis.cache_build import RunContext, place_lesion
    from nnunet_promptlesion.synthesis.diffusion_render import DiffusionRenderer

    g = gen2d
    with _paths(g["env"]):
        ctx = RunContext(str(g["did"]), CONFIG, "0", "nnUNetPlans")
        r = DiffusionRenderer(g["diffusion"], ctx.grid, ctx.spec, ctx.reader, device="cpu", sampler="dpmpp", steps=3)
        assert r.two_d and r.identity()["sampler"] == "dpmpp" and r.identity()["steps"] == 3
        index = ctx.build_index(0.5, 100, progress=False)
        placer = ctx.placer(index, MaskSampler(ctx.cm.spacing, bank=index.bank), r.mapping.footprint())
        rng = np.random.default_rng(0)
        reqs = [q for q in (place_lesion(placer, 2, rng, s, 1.0) for s in range(4)) if q is not None][:2]
        assert reqs and all(q.mask.shape[0] == 1 for q in reqs)
        out = r.render(reqs)
    assert all(o is not None for o in out)
    for q, o in zip(reqs, out):
        assert o.mask.shape[0] == 1 and o.box_lo[0] == q.mask_lo[0] and np.isfinite(o.values).all()
        img, _ = ctx.reader.crop(o.case, o.box_lo, o.mask.shape)
        assert not np.allclose(img[0][o.support], o.values)  # the lesion changed the slice
    assert DiffusionRenderer(g["diffusion"], ctx.grid, ctx.spec, ctx.reader, sampler="ddpm", steps=7).steps is None
    with pytest.raises(ValueError, match="unknown sampler"):
        DiffusionRenderer(g["diffusion"], ctx.grid, ctx.spec, ctx.reader, sampler="euler")


# ---------------------------------------------------------------------------------------------- single CT
def test_synthesize_paints_each_lesion_in_one_axial_slice(gen2d, tmp_path):
    from nnunet_promptlesion.cli.synthesize import main as synthesize

    g = gen2d
    ct = sorted((g["raw"] / "imagesTr").glob("*_0000.nii.gz"))[0]
    lab = g["raw"] / "labelsTr" / ct.name.replace("_0000", "")
    labels = np.asarray(nib.load(str(lab)).dataobj)
    base = np.asarray(nib.load(str(ct)).dataobj)
    common = ["-i", str(ct), "--parent-mask", str(lab), "--parent-label", "1", "--prompt", "calcified_plaque",
              "--diffusion", str(g["diffusion"]), "--device", "cpu", "--sampler", "dpmpp", "--steps", "2"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert synthesize([*common, "--size-mm", "1.2", "--count", "2", "-o", str(tmp_path / "a")]) == 0, err.getvalue()
    # a 3D lesion mask: only its largest axial slice is painted and labelled
    ball = np.zeros(labels.shape, np.uint8)
    wall = np.argwhere(labels == 1)
    c = wall[len(wall) // 2]
    ball[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 2:c[2] + 3] = 1
    nib.save(nib.Nifti1Image(ball, nib.load(str(lab)).affine), str(tmp_path / "ball.nii.gz"))
    assert synthesize([*common, "--mask", str(tmp_path / "ball.nii.gz"), "-o", str(tmp_path / "b")]) == 0
    stem = ct.name[:-len(".nii.gz")]
    for folder, n in (("a", 2), ("b", 1)):
        out = np.asarray(nib.load(str(tmp_path / folder / f"{stem}_synthetic.nii.gz")).dataobj)
        lesions = np.asarray(nib.load(str(tmp_path / folder / f"{stem}_lesions.nii.gz")).dataobj)
        rec = json.loads((tmp_path / folder / f"{stem}_synthesis.json").read_text())
        assert rec["generator_spatial_dims"] == 2 and len(rec["lesions"]) == n and rec["steps"] == 2
        # SimpleITK order (z, y, x): the generator's slice axis is the file's k axis, the axial one
        painted = sorted({int(k) for k in np.nonzero(out != base)[2]})
        labelled = sorted({int(k) for k in np.nonzero(lesions)[2]})
        assert labelled and set(painted) <= set(labelled) and len(labelled) <= n
        assert {l["generator_slice"] for l in rec["lesions"]} == set(labelled)
        assert (labels[lesions > 0] == 1).all()
    assert (lesions > 0).sum() <= 3 * 3  # one 3 x 3 slice of the 3 x 3 x 5 block


# ---------------------------------------------------------------------------------------------- nnUNetv2_train
@pytest.mark.slow
def test_nnunetv2_train_2d_with_diffusion_online(gen2d, tmp_path):
    """pretrain's diffusion_online snippet (the generator it trained) in a real 2D nnUNetv2_train with 2 loader
    worker processes: synthetic 2D patches carry their rendered lesion's label, and the producer rendered them."""
    g = gen2d
    settings = {"synthesizer": "diffusion_online", "diffusion": str(g["diffusion"]), "sampler": "dpmpp", "steps": 2,
                "online_batch": 4, "class_weights": "uniform", "ring_slots_per_class": 4, "online_warmup_s": 600,
                "baseline_iterations": 0}
    sfile = tmp_path / "settings.json"
    sfile.write_text(json.dumps(settings))
    env = {**g["env"], "PROMPTLESION_SETTINGS": str(sfile), "nnUNet_n_proc_DA": "2"}
    tr = "PromptLesionTrainer_checked"
    p = subprocess.run([str(BIN / "nnUNetv2_train"), str(g["did"]), CONFIG, "0", "-tr", tr, "-device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    fold = Path(env["nnUNet_results"]) / g["name"] / f"{tr}__nnUNetPlans__{CONFIG}" / "fold_0"
    recs = [json.loads(l) for l in (fold / "promptlesion_batches.jsonl").read_text().splitlines()]
    assert recs and all(r["batch"] == 2 and r["synthetic"] == 1 for r in recs)
    assert all(s["in_target"] and s["label"] in (2, 3) for r in recs for s in r["samples"])
    text = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert "ring after warm-up" in text and "dpmpp 2" in text
    st = [json.loads(m.group(1)) for m in re.finditer(r"PromptLesion: epoch stats (\{.*\})", text)][0]
    assert st["loader"].get("diffusion_online/diffusion", 0) >= 1 and not st["loader"].get("fallback_real")
    # the producer rendered every drawn class before training (epoch 1's own renders depend on the machine's load)
    ring = re.search(r"ring after warm-up \{([^}]*)\}", text).group(1)
    assert all(int(v) >= 1 for v in re.findall(r": (\d+)", ring)) and st["source"]["producer_alive"]
