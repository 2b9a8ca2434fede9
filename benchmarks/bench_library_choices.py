"""Hand-written evaluation pieces vs the maintained libraries that do the same job (issue 17 item 7).

Where a library does a job the package does by hand, measure both and use the library if it is at least
as correct. Two sections:

components  scipy.ndimage.label (what the package used) vs connected-components-3d (cc3d), full
            connectivity (26 in 3D, 8 in 2D), the package's lesion definition. Correct when the two
            labellings describe the same partition of the foreground (same count and a one-to-one map
            between label values). The package now uses cc3d (lesions/components.py).
surface     normalised surface Dice. The package used its own (crop to the union bounding box, scipy's
            distance transform): equal to MONAI's compute_surface_dice, 5.7x faster on a small lesion but
            2.2x slower on an organ-sized mask. It now calls MONAI on the cropped masks; this section
            compares that with MONAI on the whole volume. Correct when equal to 1e-6 (tests/test_evaluate.py
            checks it too).

Speed: median process CPU seconds over interleaved rounds, on masks shaped like the package's inputs.

    python benchmarks/bench_library_choices.py [--rounds 5] [--out benchmarks/results/library_choices.md]
"""
from __future__ import annotations

import argparse
import platform
import time
from importlib import metadata
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage


def scipy_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def cc3d_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = cc3d.connected_components(mask, connectivity=26 if mask.ndim == 3 else 8, return_N=True)
    return labels, int(n)


def same_partition(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> bool:
    """True when labellings ``a`` and ``b`` split the foreground into the same components."""
    if na != nb or not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]), axis=1)
    # a bijection between label values: every label of a meets exactly one label of b and vice versa
    return pairs.shape[1] == na and len(np.unique(pairs[0])) == na and len(np.unique(pairs[1])) == nb


def lesion_volume(shape, n_lesions, radius_range, rng) -> np.ndarray:
    """Elastic-ish ellipsoid lesions (voxels) scattered in ``shape``; some touch, as real lesions do."""
    mask = np.zeros(shape, dtype=bool)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for _ in range(n_lesions):
        c = [rng.integers(0, s) for s in shape]
        r = rng.uniform(*radius_range, size=len(shape))
        d = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r))
        mask |= d <= 1.0 + 0.3 * rng.standard_normal()
    return mask


def cases(rng) -> dict[str, np.ndarray]:
    return {
        "phantom 64x64x48, 6 lesions": lesion_volume((64, 64, 48), 6, (2, 8), rng),
        "CT-sized 512x512x160, 40 lesions": lesion_volume((512, 512, 160), 40, (3, 25), rng),
        "2D slices 512x512, 30 lesions": lesion_volume((512, 512), 30, (3, 25), rng),
        "noise 128^3, 30 % foreground": rng.random((128, 128, 128)) < 0.3,
    }


def cpu_seconds(fn, *args) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn(*args)
    return time.process_time() - t0, out


def monai_nsd(ref: np.ndarray, pred: np.ndarray, spacing, tol: float) -> float:
    import torch
    from monai.metrics import compute_surface_dice
    oh = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))
    return float(compute_surface_dice(oh(pred), oh(ref), class_thresholds=[tol], include_background=False,
                                      spacing=list(spacing)).item())


def surface_rows(rng, rounds: int) -> list[str]:
    from nnunet_promptlesion.evaluation.metrics import normalized_surface_dice
    spacing, tol = (0.8, 0.8, 2.5), 2.0
    shapes = {"lesion 40 voxels wide in 256x256x96": ((256, 256, 96), 1, (8, 20)),
              "liver-sized blob in 256x256x96": ((256, 256, 96), 1, (60, 90))}
    rows = []
    for name, (shape, n, radii) in shapes.items():
        ref = lesion_volume(shape, n, radii, rng)
        pred = np.roll(ref, 2, axis=0) | lesion_volume(shape, 1, (3, 6), rng)
        t_own, t_mon = [], []
        for _ in range(rounds):
            to, own = cpu_seconds(normalized_surface_dice, ref, pred, spacing, tol)
            tm, mon = cpu_seconds(monai_nsd, ref, pred, spacing, tol)
            t_own.append(to)
            t_mon.append(tm)
        mo, mm = float(np.median(t_own)), float(np.median(t_mon))
        rows.append(f"| {name} | {own:.6f} | {mon:.6f} | {'yes' if abs(own - mon) <= 1e-6 else 'NO'} | "
                    f"{mo * 1e3:.1f} | {mm * 1e3:.1f} | {mm / max(mo, 1e-9):.1f}x |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write a markdown table here as well")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    rows = []
    for name, mask in cases(rng).items():
        t_sp, t_cc = [], []
        for _ in range(a.rounds):
            ts, (ls, ns) = cpu_seconds(scipy_label, mask)
            tc, (lc, nc) = cpu_seconds(cc3d_label, mask)
            t_sp.append(ts)
            t_cc.append(tc)
        ok = same_partition(ls, ns, lc, nc)
        ms, mc = float(np.median(t_sp)), float(np.median(t_cc))
        rows.append(f"| {name} | {ns} | {'yes' if ok else 'NO'} | {ms * 1e3:.1f} | {mc * 1e3:.1f} | {ms / max(mc, 1e-9):.1f}x |")
    table = "\n".join([
        "| mask | components | same partition | scipy CPU ms | cc3d CPU ms | cc3d speed-up |",
        "|---|---|---|---|---|---|", *rows])
    table += "\n\n" + "\n".join([
        "| surfaces (spacing 0.8x0.8x2.5 mm, tolerance 2 mm) | package NSD (MONAI on the crop) | MONAI NSD, whole "
        "volume | equal | package CPU ms | whole-volume CPU ms | package speed-up |", "|---|---|---|---|---|---|---|", *surface_rows(rng, a.rounds)])
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
            f"{platform.processor() or 'cpu'}, numpy {np.__version__}, cc3d {metadata.version('connected-components-3d')}, "
            f"median of {a.rounds} interleaved rounds, process CPU time")
    print(head)
    print(table)
    if a.out:
        a.out.write_text(f"# Library choices: connected components and surface Dice\n\n"
                         f"`python benchmarks/bench_library_choices.py "
                         f"--rounds {a.rounds}`\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
