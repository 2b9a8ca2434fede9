"""2D generators (issue 27, phase 1): the one VQGAN / PromptLesion definition built for 2D slices, checkpoints that
record their dimensionality, and promptlesion_pretrain on the demo's 2D configuration (CPU, tiny step counts)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import phantom_copy_2d
from nnunet_promptlesion.generator.diffusion.config import PromptVocabulary, make_config
from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet
from nnunet_promptlesion.generator.intensity import IntensitySpace
from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, load_vqgan, save_vqgan
from nnunet_promptlesion.utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

torch.set_num_threads(1)


def _convs(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))}


def _vqgan2d(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig.from_preset("tiny2d")).eval()


def test_vqgan_2d_forward_backward_losses_and_shapes():
    from nnunet_promptlesion.generator.vqgan.discriminator import VQGANDiscriminators, random_slice_indices
    from nnunet_promptlesion.generator.vqgan.losses import VQGANLoss
    from nnunet_promptlesion.generator.vqgan.perceptual import build_perceptual
    from nnunet_promptlesion.generator.vqgan.train import ssim_nd

    cfg = VQGANConfig.from_preset("tiny2d", disc_start=0)
    assert cfg.spatial_dims == 2 and cfg.latent_shape == (8, 8, 8)
    assert VQGANConfig.from_preset("cpu2d").latent_shape == (8, 8, 8)
    assert VQGANConfig.from_preset("gpu2d").latent_shape == (8, 24, 24)
    torch.manual_seed(0)
    model, discs = VQGAN(cfg), VQGANDiscriminators(cfg)
    assert _convs(model) == {nn.Conv2d} and _convs(discs) == {nn.Conv2d} and discs.disc3d is None
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, commit, info = model(x)
    assert recon.shape == x.shape and info["indices"].shape == (2, 8, 8)
    loss = VQGANLoss(cfg, build_perceptual())
    idx = random_slice_indices(x)
    g, logs = loss.generator(x, recon, commit, discs, idx, step=0)
    g.backward()
    assert torch.isfinite(g) and {"l1", "perceptual", "g_adv2d", "feature_matching"} <= set(logs)
    assert "g_adv3d" not in logs  # no volume discriminator for slices
    assert all(p.grad is not None for p in model.encoder.parameters())
    d, dlogs = loss.discriminator(x, recon, discs, idx)
    d.backward()
    assert torch.isfinite(d) and "d_3d" not in dlogs and dlogs["d_total"] == dlogs["d_2d"]
    assert all(p.grad is not None for p in discs.disc2d.parameters() if p.requires_grad)
    model.eval()
    z = model.encode_latent(x)
    assert z.shape == (2, 8, 8, 8)
    assert model.decode_latent(z).shape == x.shape
    noise = torch.rand(2, 1, 32, 32) * 2 - 1  # a 2D SSIM: 1 for equal slices, ~0 for independent noise
    assert ssim_nd(x, x) == pytest.approx(1.0, abs=1e-5) and ssim_nd(x, noise) < 0.1 < 0.9 < ssim_nd(x, x + 0.1 * noise)
    with pytest.raises(ValueError, match="2D VQGAN takes"):
        model.encode(torch.zeros(1, 1, 32, 32, 32))
    # the 3D presets are unchanged
    assert VQGANConfig.from_preset("paper").latent_shape == (8, 24, 24, 24)
    assert _convs(VQGAN(VQGANConfig.tiny())) == {nn.Conv3d}


@pytest.mark.parametrize("prompt_type", ["onehot", "mask"])
def test_diffusion_2d_forward_training_step_and_ddim_sampling(prompt_type):
    from nnunet_promptlesion.generator.diffusion.inpaint import encode_inputs, generate_latents, inpaint_lesions
    from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
    from nnunet_promptlesion.generator.diffusion.train import diffusion_loss

    vq = _vqgan2d()
    cfg = make_config("tiny2d", num_classes=2, prompt_type=prompt_type, per_class_mask=True)
    torch.manual_seed(1)
    model = PromptLesionUNet(cfg)
    assert cfg.spatial_dims == 2 and _convs(model) == {nn.Conv2d}
    assert len(model.inject) == 3  # the prompt still enters at three decoder levels
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    mask = torch.zeros_like(x)
    mask[:, :, 12:18, 13:19] = 1
    batch = {"image": x, "mask": mask, "parent": mask.clone(), "prompt": torch.tensor([0, 1, 2, 1])}
    schedule = NoiseSchedule.from_config(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, logs = diffusion_loss(model, vq, schedule, cfg, batch, "cpu", torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and torch.isfinite(logs["mse_lesion"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    enc = encode_inputs(vq, x, mask, mask)
    assert enc["z"].shape == (4, 8, 8, 8) and enc["region"].shape == (4, 1, 8, 8)
    # DDIM with classifier-free guidance (two passes per step, the null token in the second)
    z = generate_latents(model, schedule, enc["z"], enc["region"], batch["prompt"], "ddim", 3, guidance=2.0,
                         generator=torch.Generator().manual_seed(0), context=enc["context"], parent=enc["parent"],
                         generate=enc["generate"])
    assert z.shape == (4, 8, 8, 8) and torch.isfinite(z).all()
    keep = enc["generate"] < 0.5
    assert torch.equal(z[keep.expand_as(z)], enc["z"][keep.expand_as(z)])
    out = inpaint_lesions(vq, model, x, mask, batch["prompt"], steps=2, generator=torch.Generator().manual_seed(0),
                          blend_sigma=1.0)
    assert out.shape == x.shape
    far = torch.ones_like(mask, dtype=torch.bool)
    far[:, :, 6:24, 7:25] = False  # beyond the blend margin of sigma 1
    assert torch.equal(out[far], x[far])
    with pytest.raises(ValueError, match=r"2D generator needs .*\(B, 1, H, W\)"):
        inpaint_lesions(vq, model, x[:, :, None], mask[:, :, None], batch["prompt"], steps=1)


def _diffusion_checkpoint(tmp_path: Path, vq_path: Path, vq_meta: dict, preset: str) -> Path:
    from nnunet_promptlesion.generator.diffusion.checkpoint import build_meta

    cfg = make_config(preset, num_classes=1)
    model = PromptLesionUNet(cfg)
    vocab = PromptVocabulary(["healthy", "lesion"], [0, 2])
    patch = vq_meta["config"]["patch_size"]
    meta = build_meta(cfg, vocab, vq_meta, vq_path, patch, 0, {"type": "test"}, model.state_dict())
    path = tmp_path / f"diffusion_{preset}.pt"
    save_checkpoint({"meta": meta, "model": model.state_dict()}, path)
    return path


def test_checkpoints_record_spatial_dims_and_refuse_the_other_dimensionality(tmp_path):
    from nnunet_promptlesion.generator.diffusion.checkpoint import load_diffusion, load_generator_pair

    space = IntensitySpace.hu_window(-175, 250)
    p2, p3 = tmp_path / "vq2d.pt", tmp_path / "vq3d.pt"
    save_vqgan(_vqgan2d(), p2, spacing=(0.5, 0.5), intensity=space, step=0, source={"type": "test"})
    save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(16, 16, 16))), p3, spacing=(1, 1, 1), intensity=space, step=0,
               source={"type": "test"})
    m2, meta2 = load_vqgan(p2, expect_spatial_dims=2)
    assert meta2["spatial_dims"] == 2 and meta2["spacing"] == [0.5, 0.5] and m2.config.patch_size == (32, 32)
    assert load_checkpoint(p2)["meta"]["spatial_dims"] == 2
    with pytest.raises(CheckpointError, match=r"vq2d.pt is a 2D VQGAN .* but a 3D one is needed"):
        load_vqgan(p2, expect_spatial_dims=3)
    with pytest.raises(CheckpointError, match=r"is a 3D VQGAN .* but a 2D one is needed"):
        load_vqgan(p3, expect_spatial_dims=2)
    # a checkpoint written before the field existed is read as 3D
    old = load_checkpoint(p3)
    del old["meta"]["spatial_dims"]
    save_checkpoint(old, p3)
    assert load_vqgan(p3, expect_spatial_dims=3)[1]["spatial_dims"] == 3
    with pytest.raises(CheckpointError, match="3D VQGAN"):
        load_vqgan(p3, expect_spatial_dims=2)

    d2 = _diffusion_checkpoint(tmp_path, p2, meta2, "tiny2d")
    model, meta = load_diffusion(d2, expect_spatial_dims=2)
    assert meta["spatial_dims"] == 2 and model.config.spatial_dims == 2
    with pytest.raises(CheckpointError, match=r"is a 2D diffusion model .* but a 3D one is needed"):
        load_diffusion(d2, expect_spatial_dims=3)
    vq, _, model, meta, vocab = load_generator_pair(d2, expect_spatial_dims=2)
    assert vq.spatial_dims == 2 and vocab.names == ["healthy", "lesion"]
    with pytest.raises(CheckpointError, match="2D"):
        load_generator_pair(d2, expect_spatial_dims=3)
    # a 2D diffusion model paired with a 3D VQGAN is refused, naming both
    with pytest.raises(CheckpointError, match=r"2D diffusion model but VQGAN .*vq3d.pt is 3D"):
        load_generator_pair(d2, p3)
    # old 3D diffusion checkpoints (no field) are 3D
    d3 = _diffusion_checkpoint(tmp_path, p3, load_vqgan(p3)[1], "tiny")
    st = load_checkpoint(d3)
    del st["meta"]["spatial_dims"]
    save_checkpoint(st, d3)
    assert load_diffusion(d3, expect_spatial_dims=3)[1]["spatial_dims"] == 3
    with pytest.raises(CheckpointError, match="3D diffusion model"):
        load_diffusion(d3, expect_spatial_dims=2)


# ------------------------------------------------------------------------------------------------ 2d_demo
@pytest.fixture(scope="module")
def demo_2d(ccta_dataset, tmp_path_factory):
    """A private copy of the session CCTA phantom (raw + preprocessed) with promptlesion_demo's 2d_demo
    configuration added (inheriting 3d_fullres's preprocessed data, 32 x 32 slices), as the demo does."""
    from nnunet_promptlesion.cli.demo import DEMO_CONFIGURATION

    name, paths = phantom_copy_2d(ccta_dataset, tmp_path_factory.mktemp("demo2d"), DEMO_CONFIGURATION)
    return {"did": ccta_dataset[1], "name": name, "paths": paths, "config": DEMO_CONFIGURATION}


def test_2d_configuration_gives_slices_of_the_folds_training_cases(demo_2d, monkeypatch):
    from nnunet_promptlesion.generator.data import PreprocessedPatchSource
    from nnunet_promptlesion.generator.diffusion.data import LesionCropSampler
    from nnunet_promptlesion.lesions.spec import LesionSpec

    for k, v in demo_2d["paths"].items():
        monkeypatch.setenv(k, v)
    src2 = PreprocessedPatchSource(demo_2d["did"], demo_2d["config"], fold=0)
    src3 = PreprocessedPatchSource(demo_2d["did"], "3d_fullres", fold=0)
    assert src2.spatial_dims == 2 and src2.spacing == src3.spacing[1:]
    assert src2.case_ids == src3.case_ids and not set(src2.case_ids) & set(src2.val_ids)
    rng = np.random.default_rng(0)
    lab = max(l for l in src3.load_case(src3.case_ids[0]).class_locations)
    for _ in range(5):
        p = src2.random_patch(rng, (32, 32), {lab: 1.0}, oversample_rate=1.0)
        assert p.image.shape == p.seg.shape == (1, 32, 32) and (p.seg == lab).any()
        # the patch is a (y, x) window of one slice of the 3D array, same values as the 3D path's one-slice crop
        q = src3.patch_around(p.case_id, (p.start[0], p.start[1] + 16, p.start[2] + 16), (1, 32, 32))
        assert np.array_equal(p.image, q.image[:, 0]) and np.array_equal(p.seg, q.seg[:, 0])
    spec = LesionSpec.load(Path(demo_2d["paths"]["nnUNet_raw"]) / demo_2d["name"] / "lesion_spec.json")
    sampler = LesionCropSampler(src2, spec, PromptVocabulary.from_lesion_spec(spec), (32, 32))
    assert sampler.available
    for pid in sampler.available:
        c = sampler.lesion_crop(rng, pid)
        assert c.image.shape == c.mask.shape == (1, 32, 32) and c.mask.any() and c.case_id in src2.case_ids
    h = sampler.healthy_crop(rng)
    assert h.prompt == 0 and h.mask.shape == (1, 32, 32) and h.mask.any()
    with pytest.raises(ValueError, match="3 axes but the source is 2D"):
        LesionCropSampler(src2, spec, PromptVocabulary.from_lesion_spec(spec), (32, 32, 32))


def test_pretrain_2d_demo_end_to_end(demo_2d, monkeypatch, capsys):
    """promptlesion_pretrain -c 2d_demo trains a 2D VQGAN and a 2D diffusion model on the 2d_demo slices; a 3D
    preset is refused for it, and a 2D VQGAN is refused for the 3D configuration."""
    from nnunet_promptlesion.cli.pretrain import main
    from nnunet_promptlesion.cli.train_diffusion import main as train_diffusion

    for k, v in demo_2d["paths"].items():
        monkeypatch.setenv(k, v)
    did, cfg = str(demo_2d["did"]), demo_2d["config"]
    assert main(["-d", did, "-c", cfg, "--dry-run"]) == 0
    assert f"promptlesion_vqgan__cpu2d__{cfg}__fold0" in capsys.readouterr().out  # the 2D CPU preset by default
    assert main(["-d", did, "-c", cfg, "--preset", "tiny", "--dry-run"]) == 2
    assert "preset 'tiny' is 3D but configuration '2d_demo' is 2D" in capsys.readouterr().err
    rc = main(["-d", did, "-c", cfg, "-f", "0", "--preset", "tiny2d", "--vqgan-steps", "3", "--diffusion-steps", "3",
               "--device", "cpu", "--num-threads", "1",
               "--vqgan-args", "--disc-start 1 --batch-size 2 --eval-every 3 --checkpoint-every 3 "
                               "--num-eval-patches 1 --no-progress",
               "--diffusion-args", "--batch-size 2 --eval-every 3 --eval-steps 2 --checkpoint-every 3 --no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    res = Path(demo_2d["paths"]["nnUNet_results"]) / demo_2d["name"]
    vq_ck = res / f"promptlesion_vqgan__tiny2d__{cfg}__fold0" / "checkpoint_final.pt"
    df_ck = res / f"promptlesion_diffusion__tiny2d__{cfg}__fold0" / "checkpoint_final.pt"
    vq_meta = load_checkpoint(vq_ck)["meta"]
    df_meta = load_checkpoint(df_ck, kind="promptlesion_diffusion")["meta"]
    assert vq_meta["spatial_dims"] == df_meta["spatial_dims"] == 2 and vq_meta["step"] == df_meta["step"] == 3
    assert vq_meta["source"]["train"]["configuration"] == cfg and len(vq_meta["spacing"]) == 2
    assert df_meta["spacing"] == vq_meta["spacing"] and df_meta["patch_size"] == [32, 32]
    log = [json.loads(l) for l in (vq_ck.parent / "train_log.jsonl").read_text().splitlines()]
    assert any("g_adv2d" in r for r in log) and any("eval_ssim" in r for r in log)
    assert list((df_ck.parent / "samples").glob("step00000003_*.png"))
    assert json.loads(out.out.strip().splitlines()[-1])["diffusion"] == str(df_ck.resolve())
    # a 2D VQGAN cannot serve the 3D configuration (and the reverse is refused the same way)
    assert train_diffusion(["-d", did, "-c", "3d_fullres", "--vqgan", str(vq_ck), "--steps", "1",
                            "-o", str(res / "x")]) == 2
    assert "is a 2D VQGAN" in capsys.readouterr().err
