"""promptlesion_experiment: the synthetic-pretraining arm (stage 1 on synthetic samples only, stage 2 on the real scarce
set from stage 1's weights through nnU-Net's -pretrained_weights). A file of its own so that pytest-xdist (--dist
loadfile) can run its real nnU-Net training beside test_experiment.py's."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from nnunet_promptlesion.experiments.config import ExperimentError, load_config, stage_epochs
from nnunet_promptlesion.experiments.runner import ExperimentRunner
from test_experiment import _config, _scripted_experiment


PRETRAIN_ARM = {"name": "pre", "trainer": "nnUNetTrainer_earlyStopping", "pretrain": {"epochs": 1}}


def test_pretrain_arm_config_refusals_name_the_key_and_the_fix(tmp_path):
    """A synthetic-pretraining arm's split of the budget is checked when the config is read: exactly one of
    pretrain.epochs / pretrain.fraction, both stages at least one epoch, a budget with epochs to split, synthesis
    settings under "pretrain" (the fine-tuning trains on real data), role "arm"."""
    base = {"name": "real_only", "role": "baseline", "trainer": "nnUNetTrainer_earlyStopping"}
    budget = {"epochs": 4, "iterations_per_epoch": 1}

    def load(arm: dict, **kw):
        return load_config(str(_config(tmp_path, 501, "nnUNetPlans", [base, arm], **{"budget": budget, **kw})))

    def refused(arm: dict, *expected: str, **kw) -> None:
        with pytest.raises(ExperimentError) as e:
            load(arm, **kw)
        for s in expected:
            assert s in str(e.value), str(e.value)

    refused({**PRETRAIN_ARM, "pretrain": {}}, "arm 'pre'", "needs exactly one of \"epochs\"", "or \"fraction\"")
    refused({**PRETRAIN_ARM, "pretrain": {"epochs": 1, "fraction": 0.5}}, "needs exactly one of",
            "got ['epochs', 'fraction']")
    refused({**PRETRAIN_ARM, "pretrain": {"epochs": 4}}, "pretrain.epochs 4 gives 4 synthetic-only epochs of the "
            "budget's 4", "pretraining 1 to 3 epochs")
    refused({**PRETRAIN_ARM, "pretrain": {"fraction": 0.1}}, "pretrain.fraction 0.1 gives 0 synthetic-only epochs")
    refused({**PRETRAIN_ARM, "pretrain": {"fraction": 1.0}}, "key 'arms[1].pretrain.fraction'", "(0, 1)")
    refused({**PRETRAIN_ARM, "pretrain": {"epochs": "half"}}, "key 'arms[1].pretrain.epochs'", "\"half\"")
    refused({**PRETRAIN_ARM, "pretrain": {"epoch": 2}}, "unknown pretrain keys ['epoch']")
    refused({**PRETRAIN_ARM, "pretrain": 0.5}, "key 'arms[1].pretrain'")
    refused(PRETRAIN_ARM, "splits the budget's \"epochs\"", "--budget epochs=N", budget={"iterations_per_epoch": 1})
    refused(PRETRAIN_ARM, "raise budget.epochs to 2 or more", budget={"epochs": 1})
    refused({**PRETRAIN_ARM, "settings": {"synthesizer": "rule_based"}}, "put the synthesis settings in \"pretrain\"")
    refused({**PRETRAIN_ARM, "name": "real_only2", "role": "ceiling"}, "must have role \"arm\"",
            scarcity={"class": "x", "keep_carriers": 1})
    refused({**PRETRAIN_ARM, "pretrain": {"epochs": 1, "settings": "nope.json"}}, "pretrain settings file",
            "nope.json not found")
    # the split: half up, the rest to the fine-tuning; synthetic only unless a share is named; recorded in the config
    cfg = load({**PRETRAIN_ARM, "pretrain": {"fraction": 0.5, "settings": {"synthesizer": "rule_based"}}},
               budget={"epochs": 7})
    arm = cfg.arms[1]
    assert stage_epochs(arm.pretrain, cfg.budget) == (4, 3)
    assert arm.pretrain["settings"] == {"synthetic_fraction": 1.0, "synthesizer": "rule_based"}
    assert arm.pretrain["trainer"] == "PromptLesionTrainer" and arm.settings is None
    assert cfg.to_dict()["arms"][1]["pretrain"] == {"trainer": "PromptLesionTrainer", "fraction": 0.5,
                                                    "settings": {"synthetic_fraction": 1.0, "synthesizer": "rule_based"}}
    share = load({**PRETRAIN_ARM, "pretrain": {"epochs": 3, "settings": {"synthetic_fraction": 0.5}}}).arms[1]
    assert share.pretrain["settings"] == {"synthetic_fraction": 0.5} and stage_epochs(share.pretrain, budget) == (3, 1)
    # --budget epochs=N re-splits a fraction, and refuses an epoch count the new budget cannot hold
    assert stage_epochs(load_config(str(tmp_path / "config.json"), {"budget": {"epochs": 10}}).arms[1].pretrain,
                        {"epochs": 10}) == (3, 7)
    with pytest.raises(ExperimentError, match="pretrain.epochs 3 gives 3 synthetic-only epochs of the budget's 3"):
        load_config(str(tmp_path / "config.json"), {"budget": {"epochs": 3}})


def test_pretrain_arm_end_to_end_stages_share_the_budget_and_report_as_one_arm(nnunet_paths, tmp_path, capsys):
    """Real nnU-Net, 2 epochs x 1 iteration: the synthetic-pretraining arm trains stage 1 (PromptLesionTrainer,
    synthetic samples only) for 1 epoch and stage 2 (the baseline's trainer, real only) for 1 epoch from stage 1's
    final weights through nnU-Net's -pretrained_weights; the report has one row for it, tested against the baseline.
    Another pretraining recipe is refused naming stage 1 and the fine-tuning made from it. (Resuming after kills:
    test_pretrain_arm_resumes_a_killed_stage_without_retraining_or_using_an_unfinished_one.)"""
    from nnunet_promptlesion.cli.experiment import main

    root, did, env = nnunet_paths
    base = {"name": "real_only", "role": "baseline", "trainer": "nnUNetTrainer_earlyStopping"}
    budget = {"epochs": 2, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "early_stopping_patience": 0,
              "mirroring": False, "save_every": 1, "final_validation": False}
    cfg_path = _config(tmp_path, did, "nnUNetPlans", [base, PRETRAIN_ARM], repeats=1, budget=budget,
                       checkpoint="checkpoint_final.pth",
                       predict={"disable_tta": True, "save_probabilities": False, "npp": 0, "nps": 0})
    out = tmp_path / "out"
    # the stages' trainers are checked before anything runs: stage 1 must synthesize, stage 2 must not
    bad = [{**PRETRAIN_ARM, "name": "syn_finetune", "trainer": "PromptLesionTrainer"},
           {**PRETRAIN_ARM, "name": "real_pretrain", "pretrain": {"epochs": 1, "trainer": "nnUNetTrainer_earlyStopping"}},
           {**PRETRAIN_ARM, "name": "bad_settings", "pretrain": {"epochs": 1, "settings": {"synthesizer": "gan"}}}]
    (tmp_path / "bad").mkdir()
    with pytest.raises(ExperimentError) as e:
        ExperimentRunner(load_config(str(_config(tmp_path / "bad", did, "nnUNetPlans", [base, *bad], budget=budget))),
                         tmp_path / "refused").check()
    assert "arm 'syn_finetune': trainer 'PromptLesionTrainer' synthesizes, but a pretrain arm fine-tunes on real " \
           "data only" in str(e.value)
    assert "arm 'real_pretrain' pretrain: trainer 'nnUNetTrainer_earlyStopping' is not a PromptLesionTrainer: the " \
           "pretraining needs one" in str(e.value)
    assert "arm 'bad_settings' pretrain" in str(e.value) and "unknown synthesizer 'gan'" in str(e.value)
    capsys.readouterr()
    main([str(cfg_path), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "arm pre: 1 epochs PromptLesionTrainer, synthesizer rule_based, batch 2 = 0 real + 2 synthetic, then 1 " \
           "epochs nnUNetTrainer_earlyStopping (real data only) from its final weights" in printed, printed
    order = [l.split("] ", 1)[1].split(" ...")[0] for l in printed.splitlines()
             if l.startswith("[experiment ") and l.endswith(" ...")]
    assert [s for s in order if "arm=pre" in s] == ["pretrain arm=pre repeat=0 fold=0", "train    arm=pre repeat=0 fold=0",
                                                    "predict  arm=pre repeat=0", "evaluate arm=pre repeat=0"]
    assert "train    arm=pre repeat=0 fold=0: trained, from the weights of its 1 synthetic-only epochs" in printed
    rd = out / "runs" / "pre" / "repeat_0"
    ds = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    fd1 = rd / "pretrain" / "nnUNet_results" / ds / "PromptLesionTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    fd2 = rd / "nnUNet_results" / ds / "nnUNetTrainer_earlyStopping__nnUNetPlans__3d_fullres" / "fold_0"
    # stage 1 read synthetic-only settings; stage 2 none (real data only)
    assert json.loads((rd / "pretrain" / "settings.json").read_text()) == {"synthetic_fraction": 1.0}
    assert not (rd / "settings.json").exists()
    # nnU-Net's own loader took stage 1's final weights into stage 2
    log2 = (rd / "logs" / "train_fold0.log").read_text().splitlines()
    loaded = [l for l in log2 if "Loading pretrained weights from file" in l]
    assert len(loaded) == 1 and str(fd1 / "checkpoint_final.pth") in loaded[0], loaded
    # the encoder came over (nnU-Net lists what it transferred), the segmentation head did not (nnU-Net's rule)
    listed = log2[log2.index(loaded[0]):]
    assert any(l.startswith("encoder.stages.0") for l in listed) and not any("seg_layers" in l for l in listed)
    assert "Loading pretrained weights" not in (rd / "pretrain" / "logs" / "train_fold0.log").read_text()
    # the epochs of the two stages add up to the budget, at the budget's iterations per epoch (nnU-Net's own logs)
    epochs = [sum(bool(re.search(r": Epoch \d+ *$", l)) for f in fd.glob("training_log_*.txt")
                  for l in f.read_text().splitlines()) for fd in (fd1, fd2)]
    assert epochs == [1, 1] and sum(epochs) == budget["epochs"]
    rec1 = json.loads((rd / "pretrain" / "train_fold0.inputs.json").read_text())["inputs"]
    rec2 = json.loads((rd / "train_fold0.inputs.json").read_text())["inputs"]
    assert rec1["stage"] == {"name": "pretrain", "epochs": 1} and rec1["trainer"] == "PromptLesionTrainer"
    assert rec2["stage"]["name"] == "finetune" and rec2["stage"]["epochs"] + rec2["stage"]["pretrain_epochs"] == 2
    base_rec = json.loads((out / "runs" / "real_only" / "repeat_0" / "train_fold0.inputs.json").read_text())["inputs"]
    assert rec1["seed"] == rec2["seed"] == base_rec["seed"] == 0 and rec1["budget"] == base_rec["budget"]
    # one arm in the report: its row in every class table, paired against the baseline
    comp = json.loads((out / "results" / "comparison.json").read_text())
    for cls, rows in comp["table"].items():
        assert list(rows) == ["real_only", "pre"], cls
    assert any((row.get("test") or {}).get("n") for rows in comp["table"].values() for a, row in rows.items()
               if a == "pre")
    report = (out / "results" / "report.txt").read_text()
    assert "pre: repeat 0 fold 0 nnUNetTrainer_earlyStopping 2 epochs x 1 iterations, seed 0 (synthetic-only " \
           "pretraining PromptLesionTrainer 1 epochs, then this trainer 1 epochs on real data from its weights)" in report
    assert "Budget: 2 epochs x 1 iterations" in report

    # another pretraining recipe: refused, naming stage 1 and the fine-tuning made from it
    changed = {**json.loads(cfg_path.read_text())}
    changed["arms"] = [base, {**PRETRAIN_ARM, "pretrain": {"epochs": 1, "settings": {"synthetic_fraction": 0.5}}}]
    p = tmp_path / "changed.json"
    p.write_text(json.dumps(changed))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(p), "-o", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "pretrain arm=pre repeat=0 fold=0: settings.synthetic_fraction 1.0 -> 0.5" in err, err
    assert "train arm=pre repeat=0 fold=0: stage.pretrained_digest changed" in err
    assert "real_only" not in err


class FakeTrainings(ExperimentRunner):
    """nnU-Net's trainings replaced by their products: a training command writes checkpoint_final.pth into its fold
    folder, or with ``kill`` set checkpoint_latest.pth and then raises KeyboardInterrupt (a kill mid-training).
    Every command is recorded with the epochs and results folder it was given; prediction and evaluation are no-ops."""
    kill = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.commands: list[dict] = []

    def check(self):
        return []

    def _run(self, cmd, env, log):
        fold = cmd[cmd.index("-m") + 4]
        fd = Path(env["nnUNet_results"]) / self.dataset_name / \
            f"{cmd[cmd.index('-tr') + 1]}__{self.cfg.plans}__{self.cfg.configuration}" / f"fold_{fold}"
        self.commands.append({"cmd": cmd, "epochs": env["PROMPTLESION_NUM_EPOCHS"], "results": env["nnUNet_results"],
                              "settings": env.get("PROMPTLESION_SETTINGS"),
                              "final_validation": env.get("PROMPTLESION_FINAL_VALIDATION")})
        fd.mkdir(parents=True, exist_ok=True)
        if self.kill:
            (fd / "checkpoint_latest.pth").write_bytes(b"")
            raise KeyboardInterrupt
        (fd / "checkpoint_latest.pth").unlink(missing_ok=True)   # as nnU-Net at the end of a training
        (fd / "checkpoint_final.pth").write_bytes(b"")
        return 0

    def predict(self, arm, r):
        return "predicted"

    def evaluate(self, arm, r):
        return "evaluated"


def test_pretrain_arm_resumes_a_killed_stage_without_retraining_or_using_an_unfinished_one(tmp_path, monkeypatch):
    """The synthetic-pretraining arm's two trainings, with nnU-Net's trainings faked (their checkpoints): each stage
    gets its share of the epochs and its own results folder; stage 2 starts from stage 1's checkpoint_final.pth through
    -pretrained_weights. Killed in stage 2, a re-run resumes it (--c, without -pretrained_weights, which nnU-Net refuses
    with --c) and never trains stage 1 again; killed in stage 1, stage 2 refuses to start from its checkpoint_latest and
    the re-run finishes stage 1 (--c) first; a finished stage 2 needs no stage 1 any more."""
    cfg_path, env = _scripted_experiment(tmp_path, ["real_only"], jobs=1, repeats=1)
    cfg = json.loads(cfg_path.read_text())
    cfg.update(budget={"epochs": 5, "iterations_per_epoch": 1, "final_validation": True},
               arms=[{**PRETRAIN_ARM, "pretrain": {"fraction": 0.4, "settings": {"synthesizer": "rule_based"}}}])
    cfg_path.write_text(json.dumps(cfg))
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(k, env[k])
    plans = tmp_path / "pre" / "Dataset999_Scripted" / "nnUNetPlans.json"
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({"configurations": {"3d_fullres": {"data_identifier": "d", "architecture": {}}}}))
    (plans.parent / "dataset.json").write_text("{}")
    (plans.parent / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    out = tmp_path / "out"
    lines: list[str] = []

    def runner(kill: bool = False) -> FakeTrainings:
        r = FakeTrainings(load_config(str(cfg_path)), out, log=lines.append)
        r.kill = kill
        return r

    def steps(r: FakeTrainings) -> list[str]:
        lines.clear()
        r.run(report=False)
        return [l.split("] ", 1)[1] for l in lines if l.startswith("[experiment ") and not l.endswith(" ...")]

    rd = out / "runs" / "pre" / "repeat_0"
    fd1 = rd / "pretrain" / "nnUNet_results" / "Dataset999_Scripted" / "PromptLesionTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    fd2 = rd / "nnUNet_results" / "Dataset999_Scripted" / "nnUNetTrainer_earlyStopping__nnUNetPlans__3d_fullres" / "fold_0"
    ckpt1 = str(fd1 / "checkpoint_final.pth")

    # killed in stage 2: stage 1 (2 of the 5 epochs, own results folder, synthetic-only settings) finished
    r = runner()
    r.prepare()
    arm = r.cfg.arms[0]
    assert r.pretrain(arm, 0, "0") == "trained"
    (c1,) = r.commands
    assert c1["epochs"] == "2" and c1["results"] == str(rd / "pretrain" / "nnUNet_results")
    assert c1["final_validation"] == "0"   # its validation predictions would serve nothing
    assert "-pretrained_weights" not in c1["cmd"] and "--c" not in c1["cmd"]
    assert json.loads(Path(c1["settings"]).read_text()) == {"synthetic_fraction": 1.0, "synthesizer": "rule_based"}
    r.kill = True
    with pytest.raises(KeyboardInterrupt):
        r.train(arm, 0, "0")
    c2 = r.commands[-1]
    assert c2["epochs"] == "3" and c2["results"] == str(rd / "nnUNet_results") and c2["settings"] is None
    assert c2["final_validation"] == "1"   # the config's: stage 2's validation is what postprocessing decides on
    assert c2["cmd"][c2["cmd"].index("-pretrained_weights") + 1] == ckpt1
    assert (fd2 / "checkpoint_latest.pth").is_file() and not (rd / "train_fold0.complete").exists()
    r = runner()
    assert steps(r)[:2] == ["pretrain arm=pre repeat=0 fold=0: skipped (finished) (0 s)",
                            "train    arm=pre repeat=0 fold=0: resumed with --c (0 s)"]
    (c,) = r.commands
    assert "--c" in c["cmd"] and "-pretrained_weights" not in c["cmd"] and c["epochs"] == "3"

    # killed in stage 1: its checkpoint_latest is no pretrained model
    shutil.rmtree(fd1)
    shutil.rmtree(fd2)
    for f in (rd / "pretrain" / "train_fold0.complete", rd / "train_fold0.complete"):
        f.unlink()
    r = runner(kill=True)
    with pytest.raises(KeyboardInterrupt):
        r.pretrain(arm, 0, "0")
    assert (fd1 / "checkpoint_latest.pth").is_file() and not (fd1 / "checkpoint_final.pth").exists()
    r.kill = False
    n = len(r.commands)
    with pytest.raises(ExperimentError, match="needs the finished synthetic pretraining"):
        r.train(arm, 0, "0")
    assert len(r.commands) == n and not fd2.exists()
    r = runner()
    assert steps(r)[:2] == [
        "pretrain arm=pre repeat=0 fold=0: resumed with --c (0 s)",
        "train    arm=pre repeat=0 fold=0: trained, from the weights of its 2 synthetic-only epochs (0 s)"]
    assert "--c" in r.commands[0]["cmd"] and r.commands[1]["cmd"][-2:] == ["-pretrained_weights", ckpt1]

    # stage 2 finished: stage 1 is not needed again, even without its folder
    shutil.rmtree(rd / "pretrain")
    (rd / "predictions").mkdir(exist_ok=True)
    r = runner()
    assert steps(r)[:2] == ["pretrain arm=pre repeat=0 fold=0: skipped (its fine-tuning finished) (0 s)",
                            "train    arm=pre repeat=0 fold=0: skipped (finished) (0 s)"]
    assert r.commands == []
