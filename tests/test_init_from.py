"""Fine-tuning the generators (--init-from) and the VQGAN's extra unlabelled CT (--extra-images)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_promptlesion.generator.data import NiftiPatchSource
from nnunet_promptlesion.generator.intensity import IntensitySpace
from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan
from nnunet_promptlesion.generator.vqgan.train import VQGANRunConfig, VQGANTrainer
from nnunet_promptlesion.utils.checkpoint import CheckpointError, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_diffusion_train import build_trained_run  # noqa: E402
from test_vqgan_helpers import write_nifti_dataset  # noqa: E402

torch.set_num_threads(1)


def _run(**kw) -> VQGANRunConfig:
    base = dict(max_steps=2, batch_size=2, eval_every=0, checkpoint_every=0, log_every=1, num_eval_patches=1,
                progress=False, save_png=False, seed=0)
    base.update(kw)
    return VQGANRunConfig(**base)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def vq_source(tmp_path_factory):
    img, lab = write_nifti_dataset(tmp_path_factory.mktemp("vqdata"), 3, shape=(20, 20, 20), texture_hu=15, noise_hu=2)
    return NiftiPatchSource(img, (1.0, 1.0, 1.0), label_folder=lab)


@pytest.fixture(scope="module")
def vq_source_run(vq_source, tmp_path_factory):
    """A 2-step tiny VQGAN run (adversarial terms on from step 1, so the discriminators and opt_d have state)."""
    out = tmp_path_factory.mktemp("vq_a")
    cfg = VQGANConfig.tiny(patch_size=(16, 16, 16), disc_start=1)
    VQGANTrainer(cfg, _run(), vq_source, None, out, resume=False).fit()
    return cfg, out / "checkpoint_final.pt"


def test_vqgan_init_from_loads_weights_fresh_optimizer_and_records_the_source(vq_source, vq_source_run, tmp_path):
    from nnunet_promptlesion.generator.vqgan import load_vqgan

    cfg, ck = vq_source_run
    src_state = load_checkpoint(ck)
    # fine-tuning settings may differ (learning rate, patch size, discriminator start): no weight depends on them
    ft_cfg = VQGANConfig.tiny(patch_size=(16, 16, 16), lr=1e-5, disc_start=0, l1_weight=2.0)
    tr = VQGANTrainer(ft_cfg, _run(max_steps=3, stop_after=1), vq_source, None, tmp_path / "ft", init_from=ck)
    assert tr.step == 0
    assert _equal_states(tr.model.state_dict(), src_state["model"])
    assert _equal_states(tr.discs.state_dict(), src_state["discriminators"])
    assert not tr.opt_g.state_dict()["state"] and not tr.opt_d.state_dict()["state"]  # optimizer not carried
    # the same reconstruction as the source model on the same patches
    ref, _ = load_vqgan(ck)
    x = tr.eval_batch
    with torch.no_grad():
        assert torch.equal(tr.model.eval().reconstruct(x), ref.reconstruct(x))
    tr.fit()
    meta = load_checkpoint(tmp_path / "ft" / "checkpoint_latest.pt")["meta"]
    assert meta["step"] == 1 and meta["init_from"]["checkpoint_id"] == src_state["meta"]["checkpoint_id"]
    assert meta["init_from"]["path"] == str(ck.resolve()) and meta["init_from"]["optimizer"] is False
    settings = json.loads((tmp_path / "ft" / "run_settings.json").read_text())
    assert settings["init_from"]["checkpoint_id"] == src_state["meta"]["checkpoint_id"]
    assert "initialised from" in (tmp_path / "ft" / "train.log").read_text()

    # resume wins over --init-from: the interrupted fine-tune continues from its own step-1 checkpoint
    other = tmp_path / "other_vq.pt"
    torch.manual_seed(5)
    save_vqgan(VQGAN(cfg), other, spacing=vq_source.spacing, intensity=vq_source.intensity, step=0, source={})
    latest = load_checkpoint(tmp_path / "ft" / "checkpoint_latest.pt")
    again = VQGANTrainer(ft_cfg, _run(max_steps=3), vq_source, None, tmp_path / "ft", init_from=other)
    assert again.step == 1 and _equal_states(again.model.state_dict(), latest["model"])
    assert again.init_meta["checkpoint_id"] == src_state["meta"]["checkpoint_id"]  # still traced to the first init
    assert "resume takes precedence" in again._resume_note

    # with init_optimizer the Adam moments travel, the learning rate stays this run's
    tr2 = VQGANTrainer(ft_cfg, _run(), vq_source, None, tmp_path / "ft_opt", init_from=ck, init_optimizer=True)
    for key in ("opt_g", "opt_d"):
        got, want = tr2.components()[key].state_dict()["state"], src_state[key]["state"]
        assert got.keys() == want.keys() and want
        assert all(torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]) for i in want)
    assert tr2.opt_g.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert tr2.init_meta["optimizer"] is True

    # the command: --preset defaults to the checkpoint's (tiny), a wrong kind or a lone --init-optimizer is refused
    from nnunet_promptlesion.cli.train_vqgan import main

    cli = ["--nifti-folder", str(vq_source.folder), "--patch-size", "16", "16", "16", "--steps", "1", "--batch-size",
           "1", "--eval-every", "0", "--num-eval-patches", "1", "--num-threads", "1", "--no-progress"]
    assert main([*cli, "-o", str(tmp_path / "cli"), "--init-from", str(ck)]) == 0
    meta = load_checkpoint(tmp_path / "cli" / "checkpoint_final.pt")["meta"]
    assert meta["preset"] == "tiny" and meta["init_from"]["checkpoint_id"] == src_state["meta"]["checkpoint_id"]
    assert main([*cli, "-o", str(tmp_path / "cli2"), "--init-optimizer"]) == 2


def test_vqgan_init_from_refuses_other_architecture_dimensionality_and_kind(vq_source, vq_source_run, trained,
                                                                           tmp_path):
    cfg, ck = vq_source_run
    wide = tmp_path / "wide.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny(channels=(16, 32, 64), codebook_size=128)), wide, spacing=vq_source.spacing,
               intensity=vq_source.intensity, step=0, source={})
    with pytest.raises(CheckpointError, match=r"VQGAN model of another architecture.*codebook_size: 128 in the "
                                              r"checkpoint, 256 here; channels: \(16, 32, 64\) in the checkpoint, "
                                              r"\(8, 16, 32\) here"):
        VQGANTrainer(cfg, _run(), vq_source, None, tmp_path / "a", init_from=wide)
    flat = tmp_path / "flat.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny2d()), flat, spacing=(1.0, 1.0), intensity=vq_source.intensity, step=0, source={})
    with pytest.raises(CheckpointError, match="is a 2D VQGAN"):
        VQGANTrainer(cfg, _run(), vq_source, None, tmp_path / "b", init_from=flat)
    diffusion = trained["checkpoint"]
    with pytest.raises(CheckpointError, match="is a diffusion checkpoint, but this training needs a VQGAN"):
        VQGANTrainer(cfg, _run(), vq_source, None, tmp_path / "c", init_from=diffusion)
    assert not (tmp_path / "a" / "checkpoint_latest.pt").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny trained diffusion model of test_diffusion_train (built once per test run, shared)."""
    return build_trained_run(tmp_path_factory)


# ------------------------------------------------------------------------------------------------ diffusion

# no --preset / --channels: a fine-tune inherits them from the checkpoint (tiny, 16 32 32)
FT_ARGS = ["--steps", "5", "--eval-every", "0", "--checkpoint-every", "0", "--log-every", "1", "--batch-size", "2",
           "--num-threads", "1", "--no-progress", "--eval-steps", "2", "--seed", "0"]


def _nifti_args(trained) -> list[str]:
    ds = trained["dataset"]
    return ["--nifti-folder", str(ds / "imagesTr"), "--label-folder", str(ds / "labelsTr")]


def test_diffusion_init_from_weights_ema_optimizer_and_resume(trained, tmp_path, capsys):
    from nnunet_promptlesion.cli.train_diffusion import main

    ck = trained["checkpoint"]
    src = load_checkpoint(ck)
    out = tmp_path / "ft"
    # --vqgan defaults to the VQGAN the checkpoint records; --stop-after 0 saves the initialised state at step 0
    assert main([*_nifti_args(trained), "--init-from", str(ck), "-o", str(out), "--stop-after", "0", *FT_ARGS]) == 0
    st = load_checkpoint(out / "checkpoint_latest.pt")
    assert st["step"] == 0 and _equal_states(st["model"], src["model"]) and _equal_states(st["ema"], src["ema"])
    assert not st["opt"]["state"]
    init = st["meta"]["init_from"]
    assert init["checkpoint_id"] == src["meta"]["checkpoint_id"] and init["step"] == src["meta"]["step"]
    assert st["meta"]["config"] == src["meta"]["config"]  # preset, channels, prompt type inherited
    assert st["meta"]["vqgan"]["checkpoint_id"] == src["meta"]["vqgan"]["checkpoint_id"]

    # resume wins: the same command with --init-from continues the fine-tune at its step
    assert main([*_nifti_args(trained), "--init-from", str(ck), "-o", str(out), "--stop-after", "1", *FT_ARGS]) == 0
    st1 = load_checkpoint(out / "checkpoint_latest.pt")
    assert st1["step"] == 1 and st1["opt"]["state"] and st1["meta"]["init_from"] == init
    assert "resume takes precedence" in (out / "train.log").read_text()

    # --init-optimizer: Adam moments carried over
    out2 = tmp_path / "ft_opt"
    assert main([*_nifti_args(trained), "--vqgan", str(trained["vqgan"]), "--init-from", str(ck), "--init-optimizer",
                 "-o", str(out2), "--stop-after", "0", *FT_ARGS]) == 0
    st2 = load_checkpoint(out2 / "checkpoint_latest.pt")
    want = src["opt"]["state"]
    assert want and all(torch.equal(st2["opt"]["state"][i]["exp_avg"], want[i]["exp_avg"]) for i in want)
    assert st2["meta"]["init_from"]["optimizer"] is True
    capsys.readouterr()
    assert main([*_nifti_args(trained), "--vqgan", str(trained["vqgan"]), "--init-optimizer", "-o",
                 str(tmp_path / "x"), *FT_ARGS]) == 2
    assert "--init-optimizer needs --init-from" in capsys.readouterr().err


def test_diffusion_init_from_refusals(trained, tmp_path, capsys):
    from nnunet_promptlesion.cli.train_diffusion import main
    from nnunet_promptlesion.generator.vqgan import load_vqgan

    ck, vq = trained["checkpoint"], trained["vqgan"]
    base = [*_nifti_args(trained), *FT_ARGS]

    def refused(*extra) -> str:
        capsys.readouterr()
        assert main([*base, "-o", str(tmp_path / "refused"), *extra]) == 2
        assert not (tmp_path / "refused" / "checkpoint_latest.pt").exists()
        return capsys.readouterr().err

    # another kind
    assert "is a VQGAN checkpoint, but this training needs a diffusion checkpoint" in refused(
        "--vqgan", str(vq), "--init-from", str(vq))
    # other UNet widths, named field by field
    err = refused("--vqgan", str(vq), "--init-from", str(ck), "--channels", "16", "32", "64")
    assert "another architecture" in err and "channels: (16, 32, 32) in the checkpoint, (16, 32, 64) here" in err
    # other prompt type
    assert "prompt_type: 'onehot' in the checkpoint, 'mask' here" in refused(
        "--vqgan", str(vq), "--init-from", str(ck), "--prompt-type", "mask")
    # a VQGAN unrelated to the one the checkpoint was trained on: another latent space
    _, vq_meta = load_vqgan(vq)
    torch.manual_seed(9)
    other = tmp_path / "other_vq.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))), other, spacing=vq_meta["spacing"],
               intensity=IntensitySpace.from_dict(vq_meta["intensity"]), step=0, source={})
    err = refused("--vqgan", str(other), "--init-from", str(ck))
    assert "trained on the latents of VQGAN" in err and "fine-tuned from it" in err
    # another dimensionality (a 2D diffusion model for 3D data)
    from test_generator_2d import _diffusion_checkpoint

    flat_vq = tmp_path / "vq2d.pt"
    vq2_meta = save_vqgan(VQGAN(VQGANConfig.tiny2d()), flat_vq, spacing=(1.0, 1.0), intensity=IntensitySpace.hu_window(),
                          step=0, source={})
    d2 = _diffusion_checkpoint(tmp_path, flat_vq, vq2_meta, "tiny2d")
    assert "is a 2D diffusion model" in refused("--vqgan", str(vq), "--init-from", str(d2))


def test_diffusion_init_from_accepts_a_vqgan_fine_tuned_from_its_vqgan(trained, tmp_path):
    """The cross-dataset recipe: fine-tune the VQGAN (--init-from), then the diffusion model on its latents."""
    from nnunet_promptlesion.cli.train_diffusion import main

    ck, vq = trained["checkpoint"], trained["vqgan"]
    ds = trained["dataset"]
    src = NiftiPatchSource(ds / "imagesTr", spacing_mm=(2.5, 2.5, 3.0), label_folder=ds / "labelsTr")
    cfg = VQGANConfig.tiny(patch_size=(24, 24, 24))
    VQGANTrainer(cfg, _run(max_steps=2), src, None, tmp_path / "vq_ft", init_from=vq).fit()
    vq_ft = tmp_path / "vq_ft" / "checkpoint_final.pt"
    assert load_checkpoint(vq_ft)["meta"]["checkpoint_id"] != load_checkpoint(vq)["meta"]["checkpoint_id"]
    out = tmp_path / "df_ft"
    assert main([*_nifti_args(trained), "--vqgan", str(vq_ft), "--init-from", str(ck), "-o", str(out),
                 "--stop-after", "0", *FT_ARGS]) == 0
    assert "was fine-tuned from" in (out / "train.log").read_text()
    meta = load_checkpoint(out / "checkpoint_latest.pt")["meta"]
    assert meta["vqgan"]["checkpoint_id"] == load_checkpoint(vq_ft)["meta"]["checkpoint_id"]


# ------------------------------------------------------------------------------------------------ extra images
def test_extra_images_are_preprocessed_like_the_dataset(nnunet_paths, tmp_path, capsys):
    """Raw training scans given as extra images come out exactly as nnU-Net preprocessed them (spacing,
    CTNormalization, axis order); test scans are refused; the VQGAN trains on the combined source."""
    from nnunet_promptlesion.cli.train_vqgan import main
    from nnunet_promptlesion.generator.data import (CombinedPatchSource, ExtraImagesSource, PreprocessedPatchSource,
                                                    refuse_test_images)

    root, did, env = nnunet_paths
    raw = next((root / "raw").glob(f"Dataset{did}_*"))
    like = PreprocessedPatchSource(did, "3d_fullres", fold=0)
    extra = ExtraImagesSource(raw / "imagesTr", like, cache_folder=tmp_path / "cache")
    case = like.case_ids[0]
    ref = np.asarray(like.load_case(case).image, dtype=np.float32)
    got = extra.load_case(case).image
    assert got.shape == ref.shape and np.allclose(got, ref, atol=1e-5)
    assert extra.spacing == like.spacing and extra.intensity == like.intensity
    # the cache serves the next run the same array
    again = ExtraImagesSource(raw / "imagesTr", like, cache_folder=tmp_path / "cache").load_case(case).image
    assert isinstance(again, np.memmap) and np.array_equal(again, got)
    both = CombinedPatchSource([like, extra])
    assert len(both) == len(like) + len(extra) and f"extra1:{case}" in both.case_ids
    rng = np.random.default_rng(0)
    p = both.patch_around(f"extra1:{case}", (8, 8, 8), (16, 16, 16))
    q = like.patch_around(case, (8, 8, 8), (16, 16, 16))
    assert np.allclose(p.image, q.image, atol=1e-5)
    assert all(both.random_patch(rng, (16, 16, 16)).image.shape == (1, 16, 16, 16) for _ in range(3))

    # the dataset's held-out test scans are refused (by name and by content)
    with pytest.raises(ValueError, match="test case"):
        refuse_test_images(sorted((raw / "imagesTs").glob("*.nii.gz")), raw.name)
    with pytest.raises(ValueError, match="must not contain the experiment's held-out test cases"):
        ExtraImagesSource(raw / "imagesTs", like)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    t0 = sorted((raw / "imagesTs").glob("*.nii.gz"))[0]
    (renamed / "scan_0000.nii.gz").write_bytes(t0.read_bytes())
    assert main(["-d", str(did), "--extra-images", str(renamed), "-o", str(tmp_path / "r"), "--preset", "tiny"]) == 2
    assert "is the test scan" in capsys.readouterr().err

    out = tmp_path / "vq"
    rc = main(["-d", str(did), "-f", "all", "--extra-images", str(raw / "imagesTr"), "-o", str(out), "--preset", "tiny",
               "--patch-size", "16", "16", "16", "--steps", "1", "--batch-size", "1", "--eval-every", "0",
               "--num-eval-patches", "1", "--num-threads", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    meta = load_checkpoint(out / "checkpoint_final.pt")["meta"]
    assert meta["source"]["train"]["type"] == "combined"
    assert [p["type"] for p in meta["source"]["train"]["parts"]] == ["nnunet_preprocessed", "extra_images"]
    assert meta["intensity"] == like.intensity.as_dict()


# ------------------------------------------------------------------------------------------------ pretrain, 2D
from test_generator_2d import demo_2d  # noqa: E402,F401  (fixture: the CCTA phantom with the 2d_demo configuration)

TINY2D_ARGS = ["--preset", "tiny2d", "--vqgan-steps", "2", "--diffusion-steps", "2", "--device", "cpu",
               "--num-threads", "1",
               "--vqgan-args", "--batch-size 2 --eval-every 0 --checkpoint-every 2 --num-eval-patches 1 --no-progress",
               "--diffusion-args", "--batch-size 2 --eval-every 0 --checkpoint-every 2 --no-progress"]


def test_pretrain_vqgan_on_all_cases_then_diffusion_on_the_fold_and_fine_tuning(demo_2d, monkeypatch, capsys):
    """2d_demo: the VQGAN on every case (labels unused), the diffusion model on fold 0 only; then a diffusion model
    fine-tuned from that one with --vqgan (no VQGAN training), in its own folder."""
    from nnunet_promptlesion.cli.pretrain import main
    from nnunet_promptlesion.generator.data import PreprocessedPatchSource

    for k, v in demo_2d["paths"].items():
        monkeypatch.setenv(k, v)
    did, cfg = str(demo_2d["did"]), demo_2d["config"]
    res = Path(demo_2d["paths"]["nnUNet_results"]) / demo_2d["name"]
    assert main(["-d", did, "-c", cfg, "-f", "0", "--vqgan-fold", "all", *TINY2D_ARGS]) == 0, capsys.readouterr().err
    vq = res / f"promptlesion_vqgan__tiny2d__{cfg}__foldall" / "checkpoint_final.pt"
    df = res / f"promptlesion_diffusion__tiny2d__{cfg}__fold0__vqgan_foldall" / "checkpoint_final.pt"
    vq_meta, df_meta = load_checkpoint(vq)["meta"], load_checkpoint(df)["meta"]
    fold0 = PreprocessedPatchSource(did, cfg, fold=0)
    assert vq_meta["source"]["train"]["fold"] == "all"
    assert vq_meta["source"]["train"]["num_cases"] == len(fold0.train_ids) + len(fold0.val_ids)
    assert df_meta["source"]["fold"] == "0" and df_meta["source"]["num_cases"] == len(fold0.train_ids)
    assert df_meta["vqgan"]["checkpoint_id"] == vq_meta["checkpoint_id"] and df_meta["spatial_dims"] == 2

    # extra CT for a 2D configuration: nnU-Net's preprocessor of 2d_demo gives its in-plane grid and intensities
    from nnunet_promptlesion.generator.data import ExtraImagesSource

    raw = Path(demo_2d["paths"]["nnUNet_raw"]) / demo_2d["name"] / "imagesTr"
    extra = ExtraImagesSource(raw, fold0)
    case = fold0.case_ids[0]
    got, ref = extra.load_case(case).image, np.asarray(fold0.load_case(case).image)
    assert got.shape[2:] == ref.shape[2:] and extra.spatial_dims == 2
    if got.shape == ref.shape:  # same slice spacing as 3d_fullres, whose arrays 2d_demo trains on
        assert np.allclose(got, ref, atol=1e-5)
    assert extra.random_patch(np.random.default_rng(0), (32, 32)).image.shape == (1, 32, 32)

    capsys.readouterr()
    assert main(["-d", did, "-c", cfg, "-f", "0", "--vqgan", str(vq), "--diffusion-init-from", str(df),
                 *TINY2D_ARGS[:-4], "--diffusion-args", TINY2D_ARGS[-1]]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "train_vqgan" not in out  # the given VQGAN is used as it is
    ft = next(res.glob(f"promptlesion_diffusion__tiny2d__{cfg}__fold0__vqgan_*__init_*")) / "checkpoint_final.pt"
    ft_meta = load_checkpoint(ft)["meta"]
    assert ft_meta["init_from"]["checkpoint_id"] == df_meta["checkpoint_id"] and ft_meta["step"] == 2
    assert main(["-d", did, "-c", cfg, "--vqgan", str(vq), "--vqgan-fold", "all", "--dry-run"]) == 2
    assert "--vqgan uses a trained VQGAN as it is" in capsys.readouterr().err


def test_default_diffusion_folder_names_the_vqgan_and_the_start():
    """Recipes with another VQGAN or an --init-from start never share (and so never resume into) one folder."""
    from types import SimpleNamespace

    from nnunet_promptlesion.cli.train_diffusion import default_run_name

    args = SimpleNamespace(preset="cpu2d", configuration="2d_demo", fold="5")
    source = SimpleNamespace(dataset_folder=Path("/pre/Dataset501_PhantomCCTA"))
    part = lambda fold: {"type": "nnunet_preprocessed", "dataset": "Dataset501_PhantomCCTA",  # noqa: E731
                         "configuration": "2d_demo", "fold": fold}
    vq = lambda train: {"checkpoint_id": "sha256:abcdef0123456789", "source": {"train": train}}  # noqa: E731
    base = "promptlesion_diffusion__cpu2d__2d_demo__fold5"
    assert default_run_name(args, source, vq(part("5")), None) == base  # the fold's own VQGAN: as before
    assert default_run_name(args, source, {"checkpoint_id": "sha256:ab", "source": {}}, None) == base  # unknown
    assert default_run_name(args, source, vq(part("all")), None) == base + "__vqgan_foldall"
    assert default_run_name(args, source, vq({"type": "combined", "parts": [part("all"), {"type": "extra_images"}]}),
                            None) == base + "__vqgan_foldall+extra"
    assert default_run_name(args, source, vq({"type": "nifti_folder"}), {"checkpoint_id": "sha256:0011223344556677"}) \
        == base + "__vqgan_abcdef012345__init_001122334455"
