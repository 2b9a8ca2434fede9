"""Smaller refusals and warnings: each names its cause (issue 25). A cache built for another configuration names
that, not a lesion_spec that did not change; the demo checks its config before any work; promptlesion_realism names
its own --settings option; a trainer's refusal lands in its training log; a generator used on CT of a very different
spacing says so with both spacings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent


def test_cache_difference_names_the_configuration_not_an_unchanged_spec():
    from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpec
    from nnunet_promptlesion.synthesis.cache import describe_difference, fingerprint_difference

    spec = LesionSpec([LesionClass("a", 2, [1], radius_mm=[(1.0, 2.0)])]).to_dict()   # tuples, as made in a run
    want = {"configuration": "3d_fullres", "lesion_spec": spec, "labels": {"a": 2}}
    have = json.loads(json.dumps({**want, "configuration": "2d"}))                     # lists, as read from disk
    assert fingerprint_difference(have, want) == ["configuration"]
    msg = describe_difference(have, want)
    assert "configuration: cache \"2d\", this run \"3d_fullres\"" in msg and "lesion_spec" not in msg
    assert fingerprint_difference(json.loads(json.dumps(want)), want) == []


def test_demo_refuses_a_bad_config_before_making_anything(tmp_path):
    work = tmp_path / "demo"
    for cfg, expected in (("typo", "config 'typo' is neither a file nor a shipped config"),
                          (None, "key 'budget.epochs' must be an integer >= 1, got -1")):
        args = ["--config", cfg] if cfg else ["--budget", "epochs=-1"]
        r = subprocess.run([str(BIN / "promptlesion_demo"), "--work-dir", str(work), *args], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and expected in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
        assert not (work / "nnUNet_raw").exists() and "1/4" not in r.stdout, "work started before the config check"


def test_realism_names_its_own_settings_option(nnunet_paths, tmp_path):
    root, did, env = nnunet_paths
    r = subprocess.run([str(BIN / "promptlesion_realism"), "-d", str(did), "--settings", str(tmp_path / "missing.json"),
                        "-o", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and f"--settings {tmp_path / 'missing.json'} does not point to a file" in r.stderr, r.stderr
    assert "PROMPTLESION_SETTINGS" not in r.stderr


def test_a_trainer_refusal_lands_in_its_training_log(nnunet_paths, tmp_path, monkeypatch):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
    from nnunet_promptlesion.trainers.settings import SETTINGS_ENV, SettingsError
    from nnunet_promptlesion.utils.errors import PromptLesionConfigError

    root, did, env = nnunet_paths
    pre = next((root / "preprocessed").glob(f"Dataset{did}_*"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    settings = tmp_path / "s.json"
    monkeypatch.setenv(SETTINGS_ENV, str(settings))

    def trainer():
        plans = load_json(str(pre / "nnUNetPlans.json"))
        plans["continue_training"] = False
        return PromptLesionTrainer(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))

    def logs() -> str:
        return "".join(f.read_text() for f in (tmp_path / "results").rglob("training_log_*.txt"))

    settings.write_text(json.dumps({"synthetic_fraction": "half"}))
    with pytest.raises(SettingsError):
        trainer()
    assert "PromptLesionTrainer stopped: SettingsError:" in logs() and "key 'synthetic_fraction'" in logs()
    settings.write_text(json.dumps({"lesion_spec": str(tmp_path / "no_spec.json")}))
    t = trainer()
    with pytest.raises(PromptLesionConfigError):
        t.initialize()
    assert "PromptLesionTrainer stopped: PromptLesionConfigError: no lesion spec found" in logs()
    # the plain baseline's experiment controls (a bad budget variable) likewise
    from nnunet_promptlesion.trainers.early_stopping import EarlyStoppingConfigError, nnUNetTrainer_earlyStopping

    monkeypatch.delenv(SETTINGS_ENV)
    monkeypatch.setenv("PROMPTLESION_NUM_EPOCHS", "ten")
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    base = nnUNetTrainer_earlyStopping(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")),
                                       device=torch.device("cpu"))
    with pytest.raises(EarlyStoppingConfigError):
        base.initialize()
    assert "nnUNetTrainer_earlyStopping stopped: EarlyStoppingConfigError: environment variable " \
           "PROMPTLESION_NUM_EPOCHS='ten' must be an integer" in logs()


def test_spacing_far_from_the_generators_is_named_with_both_spacings(tmp_path, monkeypatch):
    """promptlesion_synthesize with a generator trained at 0.5 mm on 0.8 x 0.8 x 3 mm CT, and promptlesion_reconstruct
    with a 1 mm VQGAN on 3 mm CT: a warning with both spacings (and the resampled grid), kept in the report."""
    import nibabel as nib
    import torch

    from test_synthesize import _nnunet_generator_pair, _tiny_ct

    from nnunet_promptlesion.cli.synthesize import main
    from nnunet_promptlesion.generator.data import spacing_mismatch
    from nnunet_promptlesion.generator.diffusion import inpaint
    from nnunet_promptlesion.generator.intensity import IntensitySpace
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan
    from nnunet_promptlesion.synthesis.reconstruct import reconstruct_nifti

    assert spacing_mismatch((1.0, 1.0, 2.0), (1.0, 1.0, 1.0)) is None          # up to 2x apart: fine
    assert "ratio (1, 1, 0.4)" in spacing_mismatch((1.0, 1.0, 0.2), (1.0, 1.0, 0.5))

    ck = _nnunet_generator_pair(tmp_path, (0.5, 0.5, 0.5), (0, 1, 2))
    _tiny_ct(tmp_path)
    monkeypatch.setattr(inpaint, "inpaint_lesions", lambda vq, m, image, *a, **k: (image, image.clone(), None))
    with pytest.warns(UserWarning, match=r"ct.nii.gz has spacing \(3, 0.8, 0.8\) mm, the generator was trained at "
                                         r"\(0.5, 0.5, 0.5\) mm"):
        assert main(["-i", str(tmp_path / "ct.nii.gz"), "--parent-mask", str(tmp_path / "organ.nii.gz"),
                     "--parent-label", "1", "--prompt", "tumor", "--mask", str(tmp_path / "lesion.nii.gz"),
                     "--diffusion", str(ck), "--device", "cpu", "-o", str(tmp_path / "out")]) == 0
    assert "the generator was trained at" in json.loads((tmp_path / "out" / "ct_synthesis.json").read_text())[
        "spacing_warning"]

    torch.manual_seed(0)
    vq = tmp_path / "vq1mm.pt"
    save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(16, 16, 16))), vq, spacing=(1.0, 1.0, 1.0),
               intensity=IntensitySpace.hu_window(-175, 250), step=0, source={"train": {}, "eval": {}})
    ct = np.full((8, 8, 6), 40, np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([3.0, 3.0, 3.0, 1.0])), str(tmp_path / "coarse.nii.gz"))
    with pytest.warns(UserWarning, match=r"coarse.nii.gz has spacing \(3, 3, 3\) mm, the generator was trained at "
                                         r"\(1, 1, 1\) mm .* its \[8, 8, 6\] voxels become \[24, 24, 18\]"):
        report = reconstruct_nifti(tmp_path / "coarse.nii.gz", vq, tmp_path / "rec.nii.gz", device="cpu",
                                   progress=False)
    assert "[24, 24, 18]" in report["spacing_warning"]


def test_a_training_without_a_record_is_never_reported_as_this_configs(tmp_path, monkeypatch):
    """An experiment folder from an older version (a finished training, no inputs record) or a training run by hand
    into it: the runner cannot know what it was trained from, so it refuses it as changed instead of skipping it."""
    from nnunet_promptlesion.experiments.config import ExperimentError, load_config
    from nnunet_promptlesion.experiments.runner import ExperimentRunner

    pre = tmp_path / "pre" / "Dataset999_Old"
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"data_identifier": "d",
                                                                                        "architecture": {}}}}))
    (pre / "dataset.json").write_text("{}")
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    for k, v in (("nnUNet_raw", tmp_path / "raw"), ("nnUNet_preprocessed", tmp_path / "pre")):
        monkeypatch.setenv(k, str(v))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"name": "old", "dataset": "Dataset999_Old", "folds": [0], "repeats": 1, "device": "cpu",
                               "arms": [{"name": "a", "trainer": "nnUNetTrainer_earlyStopping"}]}))
    runner = ExperimentRunner(load_config(str(cfg)), tmp_path / "out")
    arm = runner.cfg.arms[0]
    fd = runner.fold_dir(arm, 0, "0")
    fd.mkdir(parents=True)
    (fd / "checkpoint_final.pth").write_bytes(b"")
    runner._train_marker(arm, 0, "0").write_text("done\n")        # what an older version left
    assert not runner._train_finished(arm, 0, "0")
    [(kind, _, r, fold, why)] = runner.changed_steps()
    assert (kind, r, fold) == ("train", 0, "0") and "no record of what it was trained from" in why
    with pytest.raises(ExperimentError, match=r"(?s)train arm=a repeat=0 fold=0: no record .*--retrain-changed"):
        runner._settle_changed_steps()
    runner.retrain_changed = True
    runner._settle_changed_steps()                                   # cleared: it trains again from scratch
    assert not fd.exists() and not runner._train_marker(arm, 0, "0").exists() and runner.changed_steps() == []


def test_a_generator_or_spec_changed_at_the_same_path_changes_the_trainings_inputs(tmp_path, monkeypatch):
    """The settings name files (a generator checkpoint, a lesion spec): a file retrained or edited in place is another
    input even though the settings text is the same; the dataset's own lesion_spec.json counts for PromptLesion arms."""
    from nnunet_promptlesion.experiments.config import load_config
    from nnunet_promptlesion.experiments.runner import ExperimentRunner

    pre = tmp_path / "pre" / "Dataset998_Files"
    pre.mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"data_identifier": "d",
                                                                                        "architecture": {}}}}))
    (pre / "dataset.json").write_text("{}")
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    (pre / "lesion_spec.json").write_text('{"lesions": []}')
    gen = tmp_path / "gen.pt"
    gen.write_bytes(b"weights v1")
    for k, v in (("nnUNet_raw", tmp_path / "raw"), ("nnUNet_preprocessed", tmp_path / "pre")):
        monkeypatch.setenv(k, str(v))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"name": "files", "dataset": "Dataset998_Files", "folds": [0], "repeats": 1,
                               "arms": [{"name": "gen", "trainer": "PromptLesionTrainer",
                                         "settings": {"synthesizer": "diffusion_online", "diffusion": str(gen)}},
                                        {"name": "base", "trainer": "nnUNetTrainer_earlyStopping"}]}))

    def runner():
        return ExperimentRunner(load_config(str(cfg)), tmp_path / "out")

    r = runner()
    for arm in r.cfg.arms:
        r._train_record(arm, 0, "0").parent.mkdir(parents=True, exist_ok=True)
        r._train_record(arm, 0, "0").write_text(json.dumps({"inputs": r.train_inputs(arm, 0, "0")}))
    assert set(r.train_inputs(r.cfg.arms[0], 0, "0")["synthesis_files"]) == {"diffusion", "lesion_spec"}
    assert "synthesis_files" not in r.train_inputs(r.cfg.arms[1], 0, "0")     # the baseline synthesizes nothing
    assert runner().changed_steps() == []
    gen.write_bytes(b"weights v2")                                               # retrained into the same file
    (pre / "lesion_spec.json").write_text('{"lesions": [], "version": 1}')       # the spec edited
    [(kind, arm, _, _, why)] = runner().changed_steps()
    assert (kind, arm.name) == ("train", "gen")
    assert why == "synthesis_files.diffusion changed; synthesis_files.lesion_spec changed"
