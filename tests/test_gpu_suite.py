"""benchmarks/gpu_suite.py --tiny on the CPU: every section leaves its figures (or, for CUDA-only parts, a skip with
its reason) in the results files, so the one GPU command cannot rot between GPU runs."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"
SECTIONS = ["env", "cuda_tests", "sampler", "cache", "training", "vqgan", "sampler_compiled"]
ARMS = ["nnUNetTrainer", "PromptLesionTrainer[diffusion_online]", "PromptLesionTrainer[diffusion_cache]",
        "PromptLesionTrainer[rule_based]"]


def _suite(args: list, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(ccta_dataset, tmp_path_factory):
    """One --tiny run on the session's CCTA phantom (planned and preprocessed by nnU-Net once per session)."""
    root, did, _ = ccta_dataset
    out = tmp_path_factory.mktemp("gpu_suite_out")
    p = _suite(["--tiny", "--device", "cpu", "--out", out, "--nnunet-root", root, "--dataset", did, "--budget-min", 20])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(out.glob("gpu_*.json"))
    assert [f.name for f in files] == ["gpu_cpu-tiny.json"], files
    return json.loads(files[0].read_text()), (out / "gpu_cpu-tiny.md").read_text(), p.stdout


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_every_section_leaves_figures_or_a_reason(tiny_run):
    res, md, stdout = tiny_run
    assert list(res["sections"]) == SECTIONS
    for name in SECTIONS:
        assert f"[gpu_suite] {name}: " in stdout
        assert f"## {name}: {res['sections'][name]['status']}" in md
    assert res["command"].startswith("python benchmarks/gpu_suite.py --tiny --device cpu") and res["command"] in md
    assert res["date_utc"] and res["versions"]["torch"] == torch.__version__

    env = res["sections"]["env"]
    assert env["status"] == "ok" and env["sdpa_backends"]["math"] == "ok" and _positive(env["matmul_tflops"]["tflops"])

    cuda = res["sections"]["cuda_tests"]
    names = [t["name"] for t in cuda["tests"]]
    assert len(names) >= 2 and any("fused_sdpa" in n for n in names) and any("host_sync" in n for n in names), names
    if torch.cuda.is_available():
        assert cuda["status"] == "ok", cuda
    else:  # pytest collected the CUDA-only tests and skipped them: recorded as a skip with pytest's reasons
        assert cuda["status"] == "skipped" and "CUDA" in cuda["reason"], cuda
        assert all(t["outcome"] == "skipped" for t in cuda["tests"])

    comp = res["sections"]["sampler_compiled"]
    assert comp["status"] == "skipped" and "--tiny" in comp["reason"]


@pytest.mark.slow
def test_sampler_and_vqgan_figures(tiny_run):
    res, md, _ = tiny_run
    s = res["sections"]["sampler"]
    assert s["status"] == "ok" and s["preset"] == "tiny"
    rows = {(r["guidance"], r["batch"]): r for r in s["rows"]}
    assert set(rows) == {(1.0, 1), (1.0, 2), (2.0, 1), (2.0, 2)}, list(rows)
    for r in rows.values():
        assert all(_positive(r[k]) for k in ("per_step_seconds", "fixed_seconds", "ddpm400_volumes_per_min",
                                             "ddim50_volumes_per_min", "tflops_achieved", "peak_memory_mb"))
        # same per-step cost, 8x fewer steps: DDIM-50 must extrapolate to more volumes per minute than DDPM-400
        assert r["ddim50_volumes_per_min"] > r["ddpm400_volumes_per_min"]
        assert r["percent_of_peak"] == "unknown"  # no bf16 peak is known for a CPU
    for b in (1, 2):  # guidance > 1 runs the denoiser twice per step: exactly twice the counted FLOPs
        assert rows[(2.0, b)]["flops_per_step"] == 2 * rows[(1.0, b)]["flops_per_step"]
    assert rows[(1.0, 2)]["flops_per_step"] == 2 * rows[(1.0, 1)]["flops_per_step"]
    assert "| DDPM-400 vol/min |" in md.split("## sampler: ok")[1]

    v = res["sections"]["vqgan"]
    assert v["status"] == "ok" and [r["batch"] for r in v["rows"]] == [1, 2]
    for r in v["rows"]:
        assert all(_positive(r[k]) for k in ("encode_seconds", "decode_seconds", "encode_peak_mib", "decode_peak_mib"))
        assert r["latent_shape"][1:] == [8, 8, 8]  # 32^3 patch, 4x downsampling


@pytest.mark.slow
def test_cache_and_training_ratios(tiny_run):
    res, md, _ = tiny_run
    c = res["sections"]["cache"]
    assert c["status"] == "ok", c
    assert c["samples"] == 2 * c["classes"] and c["classes"] == 2  # CCTA phantom: calcified + non-calcified plaque
    assert _positive(c["volumes_per_min_rendering"]) and _positive(c["volumes_per_min_whole_command"])

    t = res["sections"]["training"]
    assert t["status"] == "ok", t
    assert list(t["arms"]) == ARMS and t["timed_iterations"] == 2
    for name in ARMS:
        a = t["arms"][name]
        assert _positive(a["median_iteration_s"]) and _positive(a["ratio_to_nnUNetTrainer"]) and a["losses_finite"]
        assert a["timed_iterations"] == 2
    assert t["arms"]["nnUNetTrainer"]["ratio_to_nnUNetTrainer"] == 1.0
    # the diffusion arms really drew from their sources (not the rule-based fallback)
    online = t["arms"]["PromptLesionTrainer[diffusion_online]"]["promptlesion_stats"]
    assert online["loader"].get("diffusion_online/diffusion", 0) >= 1 and online["source"]["producer_alive"]
    cached = t["arms"]["PromptLesionTrainer[diffusion_cache]"]["promptlesion_stats"]
    assert cached["loader"].get("diffusion_cache/draws", 0) >= 1
    assert "ratio to nnUNetTrainer" in md


def test_section_that_does_not_fit_the_budget_is_skipped_with_its_reason(tmp_path):
    p = _suite(["--tiny", "--device", "cpu", "--out", tmp_path, "--sections", "vqgan,sampler_compiled",
                "--budget-min", 0.01], timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_cpu-tiny.json").read_text())
    assert list(res["sections"]) == ["vqgan", "sampler_compiled"]
    v = res["sections"]["vqgan"]
    assert v["status"] == "skipped" and "estimated" in v["reason"] and "budget" in v["reason"], v
