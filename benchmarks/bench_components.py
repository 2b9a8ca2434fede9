"""Connected components: scipy.ndimage.label (what the package used) vs connected-components-3d (cc3d).

Issue 17 item 7: where a maintained library does a job the package does by hand, measure both and use the
library if it is at least as correct. Both are run with full connectivity (26 in 3D, 8 in 2D), the
package's lesion definition. Correctness: the two labellings must describe the same partition of the
foreground (same number of components, and a one-to-one map between their label values); speed: median
process CPU seconds over rounds, interleaved, on masks shaped like the package's inputs (lesion masks on a
phantom volume, a CT-sized volume with a few dozen lesions, a 2D slice stack, random noise as a worst case).

    python benchmarks/bench_components.py [--rounds 5] [--out benchmarks/results/components.md]
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


def cpu_seconds(fn, mask) -> tuple[float, tuple]:
    t0 = time.process_time()
    out = fn(mask)
    return time.process_time() - t0, out


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
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
            f"{platform.processor() or 'cpu'}, numpy {np.__version__}, cc3d {metadata.version('connected-components-3d')}, "
            f"median of {a.rounds} interleaved rounds, process CPU time")
    print(head)
    print(table)
    if a.out:
        a.out.write_text(f"# Connected components: scipy vs cc3d\n\n`python benchmarks/bench_components.py "
                         f"--rounds {a.rounds}`\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
