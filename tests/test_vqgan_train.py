"""VQGAN training: overfitting, exact resume, 2-process gloo DDP (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from nnunet_promptlesion.generator.data import NiftiPatchSource
from nnunet_promptlesion.generator.vqgan import VQGANConfig, load_vqgan
from nnunet_promptlesion.generator.vqgan.train import VQGANRunConfig, VQGANTrainer, psnr
from nnunet_promptlesion.utils.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_vqgan_helpers import write_nifti_dataset  # noqa: E402

torch.set_num_threads(1)  # the test machine is shared; one thread per process avoids oversubscription


def _source(tmp_path, n=4, shape=(16, 16, 16)):
    img, lab = write_nifti_dataset(tmp_path / "data", n, shape=shape, texture_hu=15, noise_hu=2)
    return NiftiPatchSource(img, (1.0, 1.0, 1.0), label_folder=lab)


def test_tiny_overfits_a_handful_of_patches(tmp_path):
    # Four 16^3 phantom volumes: every patch is a whole volume, so the model sees 4 fixed patches.
    src = _source(tmp_path)
    cfg = VQGANConfig.tiny(patch_size=(16, 16, 16), lr=1e-3, disc_start=10**9)
    run = VQGANRunConfig(max_steps=200, batch_size=4, eval_every=200, checkpoint_every=200, log_every=50,
                         num_eval_patches=2, progress=False, seed=0)
    tr = VQGANTrainer(cfg, run, src, None, tmp_path / "run", resume=False)
    x = torch.cat([torch.from_numpy(src.patch_around(c, (8, 8, 8), cfg.patch_size).image)[None] for c in src.case_ids])

    def measure():
        y = tr.model.reconstruct(x)
        return float((x - y).abs().mean()), psnr(x, y)

    l1_0, psnr_0 = measure()
    tr.fit()
    tr.model.eval()
    l1_1, psnr_1 = measure()
    codes = tr.model.quantizer.nearest_codes(tr.model.encode(x).movedim(1, -1).reshape(-1, 8)).unique().numel()
    print(f"overfit: L1 {l1_0:.3f} -> {l1_1:.3f}, PSNR {psnr_0:.2f} -> {psnr_1:.2f} dB, {codes} codes")
    assert l1_1 * 5 <= l1_0, f"L1 fell only {l1_0 / l1_1:.1f}x"
    assert psnr_1 - psnr_0 >= 8.0
    # 4 patches x 4^3 latent tokens = 256 tokens. Measured here: 66 distinct codes with dead-code restart,
    # 54 with restart_every=0, so the floor of 60 fails when the restart does not work.
    assert codes >= 60
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    ev = [r for r in log if "eval_psnr" in r]
    assert ev and ev[-1]["step"] == 200 and "eval_ssim" in ev[-1] and "eval_code_usage" in ev[-1]
    assert any("l1" in r and "perplexity" in r and "active_codes" in r for r in log)
    assert (tmp_path / "run" / "recon_step00000200.png").stat().st_size > 1000
    _, meta = load_vqgan(tmp_path / "run" / "checkpoint_final.pt", expect_preset="tiny",
                         expect_intensity=src.intensity)
    assert meta["step"] == 200 and "weight-free" in meta["perceptual"]


def _small_run(**kw):
    base = dict(max_steps=6, batch_size=2, eval_every=6, checkpoint_every=3, log_every=1, num_eval_patches=1,
                progress=False, save_png=False, seed=3)
    base.update(kw)
    return VQGANRunConfig(**base)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    src = _source(tmp_path, shape=(20, 20, 20))
    # adversarial terms from step 2 and codebook restarts every 2 steps: all state must survive the restart
    cfg = VQGANConfig.tiny(patch_size=(16, 16, 16), disc_start=2, restart_every=2)
    a = VQGANTrainer(cfg, _small_run(), src, None, tmp_path / "a", resume=False)
    a.fit()
    b1 = VQGANTrainer(cfg, _small_run(stop_after=3), src, None, tmp_path / "b", resume=True)
    b1.fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoint_latest.pt")["step"] == 3
    b2 = VQGANTrainer(cfg, _small_run(), src, None, tmp_path / "b", resume=True)
    assert b2.step == 3
    b2.fit()
    sa = load_checkpoint(tmp_path / "a" / "checkpoint_final.pt")
    sb = load_checkpoint(tmp_path / "b" / "checkpoint_final.pt")
    assert sa["step"] == sb["step"] == 6
    for part in ("model", "discriminators"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), f"{part}.{k} differs after resume"
    assert sa["meta"]["checkpoint_id"] == sb["meta"]["checkpoint_id"]
    # the adversarial and restart paths really ran
    log = [json.loads(l) for l in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert any("d_total" in r for r in log) and any(r.get("restarted_codes", 0) > 0 for r in log)
    # another preset in the same folder is refused
    import pytest

    from nnunet_promptlesion.utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="preset"):
        VQGANTrainer(VQGANConfig.paper(), _small_run(), src, None, tmp_path / "b", resume=True)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from nnunet_promptlesion.generator.data import NiftiPatchSource
    from nnunet_promptlesion.generator.vqgan import VQGANConfig
    from nnunet_promptlesion.generator.vqgan.train import VQGANRunConfig, VQGANTrainer
    img, out = sys.argv[1], sys.argv[2]
    src = NiftiPatchSource(img, (1.0, 1.0, 1.0))
    cfg = VQGANConfig.tiny(patch_size=(16, 16, 16), disc_start=1, restart_every=1)
    run = VQGANRunConfig(max_steps=3, batch_size=1, eval_every=3, checkpoint_every=3, log_every=1,
                         num_eval_patches=1, progress=False, save_png=False, device="cpu")
    tr = VQGANTrainer(cfg, run, src, None, out, resume=False)
    first = tr.source.random_patch(__import__("numpy").random.default_rng(tr.env.rank), cfg.patch_size)
    init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    torch.save({"model": tr.model.state_dict(), "discs": tr.discs.state_dict(), "init": init,
                "world": tr.env.world_size, "data_rng": tr.np_rng.bit_generator.state["state"]["state"] % 2**60},
               f"{out}/rank{tr.env.rank}.pt")
    tr.close()
""")


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    img, _ = write_nifti_dataset(tmp_path / "data", 3, shape=(20, 20, 20), labels=False)
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(img), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["data_rng"] != r1["data_rng"], "ranks must draw different patches"
    changed = False
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), f"model {k} differs between ranks"
        changed |= not torch.equal(v, r0["init"][k])
    assert changed, "training did not change the weights"
    for k, v in r0["discs"].items():
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics are per rank between DDP buffer broadcasts
        assert torch.equal(v, r1["discs"][k]), f"discriminator {k} differs between ranks"
    ck = load_checkpoint(out / "checkpoint_final.pt", kind="vqgan")
    assert ck["step"] == 3 and len(ck["rng"]) == 2 and ck["meta"]["world_size"] == 2
