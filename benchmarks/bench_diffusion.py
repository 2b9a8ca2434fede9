"""Benchmark PromptLesion synthesis speed: volumes per minute for 96^3 patches (DDPM-400 and DDIM-50).

One "volume" is the full inpainting pipeline of :func:`inpaint_lesions` for a 96^3 patch: VQGAN encode
(-> 8 x 24^3 latents), K denoiser evaluations at 24^3, VQGAN decode with the codebook snap, blending.
Untrained weights (speed does not depend on them). The per-step time is measured over ``--measure-steps``
sampler steps; the fixed part (encode + decode + blend) is measured separately, and

    volumes/min = 60 * batch / (fixed + K * per_step)

for K = 400 (DDPM, the paper's setting) and K = 50 (DDIM). ``--full`` additionally runs DDIM-50 end to
end as a check of the extrapolation. Paper reference: 3.1 volumes/min (400 steps, V100).

    python benchmarks/bench_diffusion.py --preset tiny --batch 1 --threads 2
    python benchmarks/bench_diffusion.py --preset paper --batch 4 --device cuda
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "paper"], default="tiny", help="diffusion and VQGAN preset")
    ap.add_argument("--batch", type=int, default=1, help="volumes per batch")
    ap.add_argument("--size", type=int, default=96, help="patch side in voxels (default 96)")
    ap.add_argument("--measure-steps", type=int, default=10, help="sampler steps timed for the per-step cost")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also run DDIM-50 end to end")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    from nnunet_promptlesion.generator.diffusion.config import make_config
    from nnunet_promptlesion.generator.diffusion.inpaint import blend, inpaint_lesions, latent_region
    from nnunet_promptlesion.generator.diffusion.samplers import ddim_sample, guided_eps_fn
    from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
    from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet, parameter_report
    from nnunet_promptlesion.generator.train_utils import autocast
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    s = args.size
    vq = VQGAN(VQGANConfig.from_preset(args.preset, patch_size=(s, s, s))).to(dev).eval()
    cfg = make_config(args.preset, num_classes=2)
    model = PromptLesionUNet(cfg).to(dev).eval()
    sched = NoiseSchedule.from_config(cfg, dev)
    b = args.batch
    img = torch.rand(b, 1, s, s, s, device=dev) * 2 - 1
    mask = torch.zeros_like(img)
    c = s // 2
    mask[:, :, c - 8:c + 8, c - 8:c + 8, c - 8:c + 8] = 1
    ids = torch.ones(b, dtype=torch.long, device=dev)
    ac = (lambda: autocast(dev))
    res = {"preset": args.preset, "batch": b, "patch": [s] * 3, "device": str(dev), "threads": args.threads,
           "parameters": parameter_report(model), "vqgan_parameters": vq.num_parameters()}
    with torch.no_grad():
        # warm-up (allocator, kernels)
        inpaint_lesions(vq, model, img, mask, ids, steps=1, schedule=sched, autocast=ac)
        sync(dev)
        t0 = time.perf_counter()
        with ac():
            z = vq.encode_latent(img).float()
            region = latent_region(mask, vq.downsample_factor, z.shape[2:])
            dec = vq.decode_latent(z).float()
        out = blend(img, dec, mask, 1.0)
        sync(dev)
        fixed = time.perf_counter() - t0
        res["latent_shape"] = list(z.shape[1:])
        eps = guided_eps_fn(model, (1 - region) * z, region, ids, 1.0, autocast=ac)
        zt = torch.randn_like(z)
        sync(dev)
        t0 = time.perf_counter()
        ddim_sample(eps, sched, zt, steps=args.measure_steps, known=z, keep=1 - region, clip_x0=1.0)
        sync(dev)
        per_step = (time.perf_counter() - t0) / args.measure_steps
        res.update(fixed_seconds=fixed, per_step_seconds=per_step)
        for name, k in (("ddpm400", 400), ("ddim50", 50)):
            res[f"{name}_volumes_per_min"] = 60.0 * b / (fixed + k * per_step)
        if args.full:
            t0 = time.perf_counter()
            inpaint_lesions(vq, model, img, mask, ids, steps=50, schedule=sched, autocast=ac)
            sync(dev)
            res["ddim50_measured_volumes_per_min"] = 60.0 * b / (time.perf_counter() - t0)
        if dev.type == "cuda":
            res["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    res["paper_reference_volumes_per_min"] = 3.1
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
