"""Section ``cache``: a small diffusion cache built from the phantom by promptlesion_build_cache's code (volumes/min).
The training section builds one the same way when this section did not run."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time

import torch

from .common import md_table, sig
from .phantom import setup


def build_cache(suite, sec: dict | None = None) -> dict:
    """A cache for the phantom's fold 0 through promptlesion_build_cache's code; returns its figures."""
    st = setup(suite)
    # nnU-Net and monai through the package: imported when the section runs (see phantom.py)
    from nnunet_promptlesion.cli import build_cache as bc

    tiny = suite.args.tiny
    per_class = suite.args.cache_per_class or (2 if tiny else 16)
    steps = suite.args.synthesis_steps or (2 if tiny else 50)
    batch = 2 if tiny else 16
    out = st["root"] / "cache"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["-d", st["name"], "-f", "0", "-p", st["plans"], "--diffusion", str(st["diffusion"]),
            "--per-class", str(per_class), "--steps", str(steps), "--batch", str(batch),
            "--shard-size", str(max(per_class, batch)), "--device", str(suite.dev), "--no-progress", "-o", str(out)]
    if suite.dev.type == "cpu":
        argv += ["--num-threads", str(torch.get_num_threads())]
    try:  # the library function promptlesion_build_cache runs, where it exists; else the command's main()
        from nnunet_promptlesion.synthesis.cache_build import CacheBuildConfig
        from nnunet_promptlesion.synthesis.cache_build import build_cache as library_build
    except ImportError:
        library_build = None
    t0 = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        if library_build is not None:
            cfg = CacheBuildConfig(**vars(bc.build_parser().parse_args(argv)))
            library_build(cfg, save_montage=None, announce=lambda msg: None)
            via, rc = "nnunet_promptlesion.synthesis.cache_build.build_cache (no montage)", 0
        else:
            via, rc = "nnunet_promptlesion.cli.build_cache.main", bc.main(argv)
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"build_cache {' '.join(argv)} returned {rc}")
    man = json.loads((out / "manifest.json").read_text())
    n = sum(man.get("counts", {}).values())
    lb = man.get("last_build", {})
    st["cache"] = out
    return {"command": "promptlesion_build_cache " + " ".join(argv), "via": via, "samples": n, "classes": len(man.get("counts", {})),
            "sampler": f"ddim {steps}", "batch": batch, "render_seconds": round(lb.get("seconds", float("nan")), 2),
            "volumes_per_min_rendering": lb.get("volumes_per_min_rank0"),
            "command_seconds": round(wall, 2), "volumes_per_min_whole_command": 60.0 * n / wall if wall > 0 else None,
            "volume": f"one {st['generator_preset']} generator patch ({'x'.join(map(str, st['generator_patch']))} voxels)"}


def run(suite, sec: dict) -> None:
    st = setup(suite)
    sec["setup"] = st["info"]
    sec.update(build_cache(suite, sec))


def summary(sec: dict) -> dict:
    if "samples" not in sec:
        return {}
    return {k: sig(sec.get(k)) for k in ("samples", "volumes_per_min_rendering", "volumes_per_min_whole_command")}


def markdown(sec: dict) -> list[str]:
    L: list[str] = []
    if "samples" in sec:
        L.append(f"Phantom: {sec['setup']['phantom']}; generator: {sec['setup']['generator']}; set-up: phantom "
                 f"{sec['setup']['phantom_seconds']} s, nnU-Net preprocessing {sec['setup']['preprocess_seconds']} s, "
                 f"generators {sec['setup']['generator_seconds']} s.")
        L.append("")
        L.append(f"`{sec['command']}` (run in-process through `{sec.get('via')}`)")
        L.append("")
        L += md_table(["samples", "classes", "sampler", "batch", "render s", "vol/min (rendering)",
                       "command s", "vol/min (whole command)"],
                      [[sec["samples"], sec["classes"], sec["sampler"], sec["batch"], sec["render_seconds"],
                        sec["volumes_per_min_rendering"], sec["command_seconds"],
                        sec["volumes_per_min_whole_command"]]])
        L.append(f"\nA volume is {sec['volume']}.")
    return L
