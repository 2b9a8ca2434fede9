"""What the cache and training sections share: an abdomen phantom planned and preprocessed by nnU-Net (or an existing
dataset, ``--nnunet-root``), the tiny plans in ``--tiny``, and the generators (an untrained VQGAN and a diffusion
model trained 2 steps; speed does not depend on the weights)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from nnunet_promptlesion.utils.env_names import ENV_SETTINGS

from .common import PHANTOM_ID, TINY_PLANS_FILE


def setup(suite) -> dict:
    """The phantom (or the --nnunet-root dataset), its plans and the two generators, made once per suite run and
    shared by the cache and training sections (``suite.setup_state``)."""
    if suite.setup_state is not None:
        return suite.setup_state
    t0 = time.monotonic()
    tiny = suite.args.tiny
    root = suite.work / "nnunet"
    os.environ.pop(ENV_SETTINGS, None)
    if suite.args.nnunet_root:
        # an existing planned + preprocessed dataset (read; the suite's outputs go to its own folders)
        ext = Path(suite.args.nnunet_root)
        os.environ.update(nnUNet_raw=str(ext / "raw"), nnUNet_preprocessed=str(ext / "preprocessed"),
                          nnUNet_results=str(root / "results"))
        hits = sorted((ext / "preprocessed").glob(f"Dataset{int(suite.args.dataset):03d}_*"))
        if not hits:
            raise FileNotFoundError(f"no Dataset{int(suite.args.dataset):03d}_* in {ext / 'preprocessed'}")
        pre = hits[0]
        desc = f"existing dataset {pre.name} from {ext}"
        t_ph = t_pp = time.monotonic()
    else:
        os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                          nnUNet_results=str(root / "results"))
        # the package's data and generator modules import nnU-Net and monai, which this section needs
        # (common.SECTION_NEEDS): imported when it runs, as in the sections
        from nnunet_promptlesion.dataset_conversion.phantoms import write_phantom_dataset

        n_cases = suite.args.phantom_cases or (5 if tiny else 10)
        preset = suite.args.phantom_preset
        raw = write_phantom_dataset("abdomen", PHANTOM_ID, n_cases, seed=0, n_test=0, output_root=root / "raw",
                                    overwrite=True, preset=preset, progress=False)
        desc = f"abdomen phantom, preset {preset}, {n_cases} training cases, dataset {raw.name}"
        t_ph = time.monotonic()
        n_proc = "1" if tiny else str(min(8, os.cpu_count() or 1))
        # nnU-Net's own planning and preprocessing (its console entry point, as a user runs it)
        code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                "plan_and_preprocess_entry as m; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; m()")
        p = subprocess.run([sys.executable, "-c", code, "-d", str(PHANTOM_ID), "-c", "3d_fullres", "-np", n_proc,
                            "-npfp", n_proc], env=dict(os.environ), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed: {p.stdout[-2000:]} {p.stderr[-2000:]}")
        t_pp = time.monotonic()
        pre = root / "preprocessed" / raw.name
    plans = "nnUNetPlans"
    if tiny:  # the test suite's cheap plan: same preprocessed data, 3 stages of 8/16/32 features, 24x32x32 patch
        spec = importlib.util.spec_from_file_location("_tiny_plans", TINY_PLANS_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        plans = mod.write_tiny_plans(pre)
    # generators: an untrained VQGAN saved with the dataset's spacing and intensity space (identity mapping), and
    # a diffusion model trained 2 steps by promptlesion_train_diffusion (a real checkpoint with its metadata)
    from nnunet_promptlesion.cli.train_diffusion import main as train_diffusion
    from nnunet_promptlesion.generator.data import PreprocessedPatchSource
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan

    gpreset = "tiny" if tiny else "paper"
    gsize = 24 if tiny else 96
    src = PreprocessedPatchSource(pre.name, fold=0, plans=plans)
    vq_path = root / "generator" / f"vqgan_{gpreset}.pt"
    vq_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_vqgan(VQGAN(VQGANConfig.from_preset(gpreset, patch_size=(gsize,) * 3)), vq_path, spacing=src.spacing,
               intensity=src.intensity, step=0, source=src.describe())
    ddir = root / "generator" / f"diffusion_{gpreset}"
    argv = ["-d", pre.name, "-f", "0", "-p", plans, "--vqgan", str(vq_path), "--preset", gpreset, "--steps", "2",
            "--eval-every", "0", "--checkpoint-every", "2", "--no-progress", "-o", str(ddir),
            "--device", str(suite.dev), "--prompt-type", suite.args.prompt_type, "--batch-size", "2",
            # lesion crops only: a small phantom has no lesion-free crop of the paper's 96^3
            "--healthy-fraction", "0"]
    if tiny:
        argv += ["--channels", "16", "32", "32"]
    if suite.dev.type == "cpu":
        argv += ["--num-threads", str(torch.get_num_threads())]
    with contextlib.redirect_stdout(sys.stderr):
        rc = train_diffusion(argv)
    if rc != 0:
        raise RuntimeError(f"promptlesion_train_diffusion {' '.join(argv)} failed")
    root.mkdir(parents=True, exist_ok=True)
    suite.setup_state = {"root": root, "pre": pre, "name": pre.name, "plans": plans, "generator_preset": gpreset,
                        "generator_patch": [gsize] * 3, "diffusion": ddir / "checkpoint_final.pt", "vqgan": vq_path,
                        "cache": None, "info": {
                            "phantom": desc,
                            "plans": plans, "phantom_seconds": round(t_ph - t0, 2),
                            "preprocess_seconds": round(t_pp - t_ph, 2),
                            "generator_seconds": round(time.monotonic() - t_pp, 2),
                            "generator": f"{gpreset} preset, {gsize}^3 patches, untrained (VQGAN initial weights, "
                                         "diffusion 2 training steps)"}}
    return suite.setup_state
