"""promptlesion_train_diffusion on phantom lesions (CPU): loss falls, checkpoint metadata, PNGs, exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import shared_folder

torch.set_num_threads(1)  # robust under CPU contention (other test runs in parallel)

TRAIN_STEPS = 30
# small UNet widths keep the CPU test fast; the architecture is the tiny preset's otherwise
TRAIN_ARGS = ["--preset", "tiny", "--channels", "16", "32", "32", "--batch-size", "4", "--lr", "3e-3",
              "--num-threads", "1", "--no-progress", "--eval-steps", "2", "--seed", "0"]


def make_phantoms_and_vqgan(base: Path) -> tuple[Path, Path]:
    """A 4-case abdomen phantom (NIfTI, 2.5 x 2.5 x 3 mm) and a tiny VQGAN checkpoint for 24^3 patches."""
    from nnunet_promptlesion.dataset_conversion.phantoms import write_phantom_dataset
    from nnunet_promptlesion.generator.intensity import IntensitySpace
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan

    ds = base / "Dataset901_PhantomAbdomen"
    if not ds.is_dir():
        ds = write_phantom_dataset("abdomen", 901, 4, seed=0, n_test=0, output_root=base, progress=False)
    vq = base / "vqgan_tiny24.pt"
    if not vq.is_file():
        import numpy as np

        from nnunet_promptlesion.generator.data import NiftiPatchSource

        torch.manual_seed(0)
        # Untrained encoder/decoder (a fixed random autoencoder is enough to learn and test the latent
        # diffusion), but the EMA codebook is fitted to phantom latents (forward passes in training mode,
        # with dead-code restarts) so that snapping keeps distinct latents distinct.
        model = VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24)))
        src = NiftiPatchSource(ds / "imagesTr", spacing_mm=(2.5, 2.5, 3.0), label_folder=ds / "labelsTr")
        rng = np.random.default_rng(0)
        model.train()
        with torch.no_grad():
            for _ in range(12):
                x = torch.from_numpy(np.stack([src.random_patch(rng, (24, 24, 24), {4: 1, 5: 1}, 0.5).image for _ in range(4)]))
                model(x)
        save_vqgan(model.eval(), vq, spacing=(2.5, 2.5, 3.0),
                   intensity=IntensitySpace.hu_window(-175, 250), step=0, source={"type": "test"})
    return ds, vq


def build_trained_run(tmp_path_factory) -> dict:
    """Train (once per test run, shared by the xdist workers; read only) a tiny diffusion model; returns paths."""
    from nnunet_promptlesion.cli.train_diffusion import main

    with shared_folder(tmp_path_factory, "generator") as base:
        ds, vq = make_phantoms_and_vqgan(base)
        out = base / "diffusion_run"
        if not (out / "checkpoint_final.pt").is_file():
            rc = main(["--nifti-folder", str(ds / "imagesTr"), "--label-folder", str(ds / "labelsTr"), "--vqgan",
                       str(vq), "-o", str(out), "--steps", str(TRAIN_STEPS), "--eval-every", str(TRAIN_STEPS),
                       "--checkpoint-every", str(TRAIN_STEPS), "--log-every", "1", *TRAIN_ARGS])
            assert rc == 0
    return {"dataset": ds, "vqgan": vq, "run": out, "checkpoint": out / "checkpoint_final.pt"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_trained_run(tmp_path_factory)


def _log(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]


def test_tiny_model_loss_falls_on_phantom_lesions(trained):
    log = _log(trained["run"])
    ev = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}
    assert set(ev) == {0, TRAIN_STEPS}
    # fixed crops, timesteps and noise: the EMA model's loss must drop by at least 20%
    assert ev[TRAIN_STEPS] < 0.8 * ev[0], ev
    train = [r["loss"] for r in log if "loss" in r]
    assert len(train) == TRAIN_STEPS
    assert sum(train[-10:]) / 10 < 0.8 * sum(train[:3]) / 3


def test_checkpoint_metadata_pngs_and_prompts(trained):
    from nnunet_promptlesion.generator.diffusion.checkpoint import load_generator_pair
    from nnunet_promptlesion.generator.diffusion.inpaint import inpaint_lesions
    from nnunet_promptlesion.utils.checkpoint import load_checkpoint

    state = load_checkpoint(trained["checkpoint"], kind="promptlesion_diffusion")
    meta = state["meta"]
    assert meta["vocabulary"]["names"] == ["healthy", "liver_tumor", "kidney_tumor", "pancreas_tumor"]
    assert meta["vocabulary"]["labels"] == [0, 4, 5, 6]
    assert meta["prompt_type"] == "onehot"
    # the CFG null token is its own id after the classes; the MaskTransformer channel layout is recorded
    assert meta["format_version"] == 2 and meta["null_prompt_id"] == 4
    assert meta["mask_prompt_channels"] == ["parent", "region", "class:liver_tumor", "class:kidney_tumor",
                                            "class:pancreas_tumor"]
    assert meta["schedule"]["timesteps"] == 400 and meta["schedule"]["alpha_bar_T"] < 1e-3
    assert meta["spacing"] == [2.5, 2.5, 3.0] and meta["patch_size"] == [24, 24, 24]
    assert meta["source"]["type"] == "nifti_folder" and meta["step"] == TRAIN_STEPS
    assert {"ema", "opt", "rng", "model"} <= set(state)
    vq_state = load_checkpoint(trained["vqgan"], kind="vqgan")
    assert meta["vqgan"]["checkpoint_id"] == vq_state["meta"]["checkpoint_id"]
    pngs = sorted(p.name for p in (trained["run"] / "samples").glob("*.png"))
    assert pngs == [f"step{TRAIN_STEPS:08d}_{i:02d}_{n}.png" for i, n in
                    enumerate(["healthy", "liver_tumor", "kidney_tumor", "pancreas_tumor"])]

    vqgan, _, model, meta2, vocab = load_generator_pair(trained["checkpoint"])
    assert meta2["weights"] == "ema"
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 24, 24, 24, generator=g).expand(3, -1, -1, -1, -1) * 2 - 1
    mask = torch.zeros_like(img)
    mask[:, :, 8:16, 8:16, 8:16] = 1
    outs = inpaint_lesions(vqgan, model, img, mask, torch.tensor([1, 2, 3]), steps=3,
                           generator=torch.Generator().manual_seed(5))
    for i in range(3):
        for j in range(i + 1, 3):  # same image, mask and noise: only the prompt differs
            assert (outs[i] - outs[j]).abs().max() > 1e-3


def test_exact_resume(tmp_path, trained):
    from nnunet_promptlesion.cli.train_diffusion import main
    from nnunet_promptlesion.utils.checkpoint import load_checkpoint

    ds, vq = trained["dataset"], trained["vqgan"]
    common = ["--nifti-folder", str(ds / "imagesTr"), "--label-folder", str(ds / "labelsTr"), "--vqgan", str(vq),
              "--steps", "3", "--eval-every", "0", "--checkpoint-every", "0", "--log-every", "1",
              *TRAIN_ARGS, "--batch-size", "2"]  # the last --batch-size wins
    assert main([*common, "-o", str(tmp_path / "straight")]) == 0
    assert main([*common, "-o", str(tmp_path / "resumed"), "--stop-after", "1"]) == 0
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint_latest.pt")["step"] == 1
    assert main([*common, "-o", str(tmp_path / "resumed")]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_final.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint_final.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    la = [r["loss"] for r in _log(tmp_path / "straight") if "loss" in r]
    lb = [r["loss"] for r in _log(tmp_path / "resumed") if "loss" in r]
    assert la == lb and len(la) == 3


def test_cli_errors(tmp_path, trained, capsys):
    from nnunet_promptlesion.cli.train_diffusion import main

    ds, vq = trained["dataset"], trained["vqgan"]
    rc = main(["--nifti-folder", str(ds / "imagesTr"), "--label-folder", str(ds / "labelsTr"), "--vqgan", str(vq),
               "--lesion-spec", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x"), "--steps", "1"])
    assert rc == 2 and "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--nifti-folder", str(ds / "imagesTr"), "--vqgan", str(vq), "-o", str(tmp_path / "x")])
    rc = main(["--nifti-folder", str(ds / "imagesTr"), "--label-folder", str(ds / "labelsTr"),
               "--vqgan", str(trained["checkpoint"]), "-o", str(tmp_path / "x")])
    assert rc == 2 and "not a VQGAN checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "torchrun" in capsys.readouterr().out


@pytest.mark.slow
def test_train_from_nnunet_preprocessed_with_mask_prompt(tmp_path, trained, monkeypatch, capsys):
    """-d path: nnU-Net preprocessing of the phantom, fold 'all', MaskTransformer prompt, per-class mask."""
    import os
    import shutil
    import subprocess
    import sys

    from nnunet_promptlesion.cli.train_diffusion import main
    from nnunet_promptlesion.generator.data import PreprocessedPatchSource
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan
    from nnunet_promptlesion.utils.checkpoint import load_checkpoint

    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res")}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    shutil.copytree(trained["dataset"], tmp_path / "raw" / trained["dataset"].name)
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    r = subprocess.run([str(exe), "-d", "901", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    src = PreprocessedPatchSource(901, fold="all")
    torch.manual_seed(0)
    vq = tmp_path / "vq_pre.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))), vq, spacing=src.spacing, intensity=src.intensity,
               step=0, source=src.describe())
    args = ["-d", "901", "-f", "all", "--steps", "2", "--eval-every", "2", "--prompt-type", "mask", "--per-class-mask",
            *TRAIN_ARGS]
    assert main([*args, "--vqgan", str(vq)]) == 0
    ck = tmp_path / "res" / "Dataset901_PhantomAbdomen" / "promptlesion_diffusion__tiny__3d_fullres__foldall" / "checkpoint_final.pt"
    meta = load_checkpoint(ck, kind="promptlesion_diffusion")["meta"]
    assert meta["source"]["type"] == "nnunet_preprocessed" and meta["prompt_type"] == "mask"
    assert meta["intensity"]["kind"] == "nnunet_ct" and meta["spacing"] == list(src.spacing)
    assert meta["lesion_spec"]["lesions"][0]["name"] == "liver_tumor"  # found in nnUNet_raw
    # a VQGAN trained in another intensity space (HU window) is refused with a clear message
    assert main([*args, "--vqgan", str(trained["vqgan"]), "-o", str(tmp_path / "other")]) == 2
    assert "intensity space" in capsys.readouterr().err
