"""Typed configuration: settings, lesion specs and experiment configs are checked by type and range through one
mechanism (nnunet_promptlesion.utils.schema); every error names the file, the key, the expected type and the value."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_promptlesion.experiments.config import ExperimentError, load_config, parse_budget
from nnunet_promptlesion.lesions.spec import MAX_RADIUS_MM, LesionClass, LesionSpec, LesionSpecError
from nnunet_promptlesion.trainers.settings import SETTINGS_ENV, PromptLesionSettings, SettingsError, load_settings
from nnunet_promptlesion.utils.schema import SchemaError, check_value

BIN = Path(sys.executable).parent

# (settings JSON, what the message must hold: key, expected type, the value as written)
BAD_SETTINGS = [
    ({"synthetic_fraction": "half"}, "key 'synthetic_fraction' must be a number in [0, 1], got \"half\""),
    ({"synthetic_fraction": 1.5}, "key 'synthetic_fraction' must be a number in [0, 1], got 1.5"),
    ({"blend_sigma_voxels": 1.0}, "key 'blend_sigma_voxels' must be a list of numbers >= 0, got 1.0"),
    ({"blend_sigma_voxels": [2, 1]}, "blend_sigma_voxels must be [lo, hi] with 0 <= lo <= hi"),
    ({"blend_sigma_voxels": [1]}, "blend_sigma_voxels must be [lo, hi]"),
    ({"index_cache": "no"}, "key 'index_cache' must be true or false, got \"no\""),
    ({"index_cache": 0}, "key 'index_cache' must be true or false, got 0"),
    ({"class_weights": "inverse"}, "key 'class_weights' must be one of ['inverse_frequency', 'uniform'] or a JSON object "
                                   "of numbers >= 0, got \"inverse\""),
    ({"class_weights": {"calcified_plaque": -1}}, "key 'class_weights.calcified_plaque' must be a number >= 0, got -1"),
    ({"class_weights": 3}, "key 'class_weights' must be one of ['inverse_frequency', 'uniform'] or a JSON object"),
    ({"centre_fraction": 0}, "key 'centre_fraction' must be a number in (0, 1], got 0"),
    ({"placement_tries": 0}, "key 'placement_tries' must be an integer >= 1, got 0"),
    ({"draw_tries": 2.5}, "key 'draw_tries' must be an integer >= 1, got 2.5"),
    ({"max_scan_cases": True}, "key 'max_scan_cases' must be an integer >= 1, got true"),
    ({"early_stopping_patience": 0}, "key 'early_stopping_patience' must be an integer >= 1 or null, got 0"),
    ({"lesion_spec": 5}, "key 'lesion_spec' must be a string or null, got 5"),
    ({"synthesizer": "gan"}, "unknown synthesizer 'gan'"),
    ({"steps": "fifty"}, "key 'steps' must be an integer, got \"fifty\""),              # a source's extra key
    ({"diffusion": ["a.pt"]}, "key 'diffusion' must be a string or null, got [\"a.pt\"]"),
    ({"colour": "red"}, "unknown settings ['colour']"),
]


@pytest.mark.parametrize("bad,expected", BAD_SETTINGS, ids=[next(iter(b)) + f"-{i}" for i, (b, _) in enumerate(BAD_SETTINGS)])
def test_settings_file_errors_name_file_key_type_and_value(tmp_path, monkeypatch, bad, expected):
    f = tmp_path / "arm_settings.json"
    f.write_text(json.dumps(bad))
    monkeypatch.setenv(SETTINGS_ENV, str(f))
    with pytest.raises(SettingsError) as e:
        load_settings(tmp_path)
    assert str(e.value).startswith(f"{f}: ") and expected in str(e.value), str(e.value)


def test_settings_top_level_and_good_values(tmp_path, monkeypatch):
    f = tmp_path / "s.json"
    monkeypatch.setenv(SETTINGS_ENV, str(f))
    for text, expected in (("[1, 2]", "must be a JSON object"), ("0.5", "must be a JSON object"),
                           ('{"synthetic_fraction": 0.5,}', "is not valid JSON")):
        f.write_text(text)
        with pytest.raises(SettingsError, match=expected):
            load_settings(tmp_path)
    monkeypatch.setenv(SETTINGS_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(SettingsError, match=f"{SETTINGS_ENV}=.*missing.json does not point to a file"):
        load_settings(tmp_path)
    # whole numbers where numbers are expected, and every boolean spelled as JSON, are accepted as they are
    s = PromptLesionSettings.from_dict({"synthetic_fraction": 1, "index_cache": False, "class_weights": {"a": 2},
                                        "blend_sigma_voxels": [0, 1], "online_warmup_s": 600, "steps": 3}, "x")
    assert s.synthetic_fraction == 1.0 and isinstance(s.synthetic_fraction, float) and s.index_cache is False
    assert s.class_weights == {"a": 2.0} and s.extra["online_warmup_s"] == 600.0 and s.extra["steps"] == 3
    # a fold is a string or an integer, as nnU-Net's -f takes it
    assert PromptLesionSettings.from_dict({"quality_fold": 0}, "x").extra["quality_fold"] == 0


def test_early_stopping_reads_a_list_settings_file_as_an_error(tmp_path, monkeypatch):
    from nnunet_promptlesion.trainers.early_stopping import EarlyStoppingConfigError, resolve_patience

    f = tmp_path / "s.json"
    f.write_text("[25]")
    monkeypatch.setenv(SETTINGS_ENV, str(f))
    monkeypatch.delenv("PROMPTLESION_EARLY_STOPPING_PATIENCE", raising=False)
    with pytest.raises(EarlyStoppingConfigError, match="must be a JSON object"):
        resolve_patience(tmp_path)


SPEC = {"name": "calcified_plaque", "label": 3, "parents": [1], "radius_mm": [[1.0, 2.0]]}
BAD_SPECS = [
    ({"label": "calcified"}, "key 'lesions[0].label' must be an integer >= 1, got \"calcified\""),
    ({"label": 2.5}, "key 'lesions[0].label' must be an integer >= 1, got 2.5"),
    ({"elastic": "no"}, "key 'lesions[0].elastic' must be true or false, got \"no\""),
    ({"may_leave_parent": "yes"}, "key 'lesions[0].may_leave_parent' must be true or false, got \"yes\""),
    ({"radius_mm": [[1.0, 500.0]]}, f"key 'lesions[0].radius_mm[0][1]' must be a number in (0, {MAX_RADIUS_MM:g}], got 500"),
    ({"radius_mm": [[0, 2]]}, "key 'lesions[0].radius_mm[0][0]' must be a number in (0, 100], got 0"),
    ({"radius_mm": 3}, "key 'lesions[0].radius_mm' must be a list of"),
    ({"radius_mm": [[1, 2, 3]]}, "key 'lesions[0].radius_mm[0]' must be [a number"),
    ({"radius_mm": [[2, 1]]}, "radius_mm must be a list of [min, max] with 0 < min <= max"),
    ({"parents": ["wall"]}, "key 'lesions[0].parents[0]' must be an integer >= 0, got \"wall\""),
    ({"shape": "blob"}, "key 'lesions[0].shape' must be one of ['ellipsoid', 'bank', 'mixed'], got \"blob\""),
    ({"bank_probability": 2}, "key 'lesions[0].bank_probability' must be a number in [0, 1], got 2"),
    ({"radius_weights": [-1]}, "key 'lesions[0].radius_weights[0]' must be a number >= 0, got -1"),
    ({"contrast_hu": [-60, "dark"]}, "key 'lesions[0].contrast_hu[1]' must be a number, got \"dark\""),
    ({"prompt": 7}, "key 'lesions[0].prompt' must be a string or null, got 7"),
    ({"colour": "red"}, "unknown keys ['lesions[0].colour']"),
]


@pytest.mark.parametrize("change,expected", BAD_SPECS, ids=[next(iter(c)) + f"-{i}" for i, (c, _) in enumerate(BAD_SPECS)])
def test_lesion_spec_errors_name_file_key_type_and_value(tmp_path, change, expected):
    f = tmp_path / "lesion_spec.json"
    f.write_text(json.dumps({"version": 1, "lesions": [{**SPEC, **change}]}))
    with pytest.raises(LesionSpecError) as e:
        LesionSpec.load(f)
    assert str(e.value).startswith(f"{f}: ") and expected in str(e.value), str(e.value)


def test_lesion_spec_top_level_shapes(tmp_path):
    f = tmp_path / "lesion_spec.json"
    for doc, expected in (({"lesions": {"a": SPEC}}, "key 'lesions' must be a list of JSON objects, got {"),
                          ({"lesions": [5]}, "key 'lesions[0]' must be a JSON object, got 5"),
                          ([SPEC], "needs a 'lesions' list"),
                          ({"lesions": [{"name": "a"}]}, "lesion #0 lacks the key(s) ['label', 'parents']"),
                          ({"version": 2, "lesions": [SPEC]}, "unsupported lesion spec version 2")):
        f.write_text(json.dumps(doc))
        with pytest.raises(LesionSpecError) as e:
            LesionSpec.load(f)
        assert expected in str(e.value), str(e.value)
    # the radius bound also holds for a spec built in Python; the largest DiffTumor class fits under it
    with pytest.raises(LesionSpecError, match="<= 100 mm"):
        LesionClass("big", 2, [1], radius_mm=[(10.0, 500.0)])
    assert LesionClass("large", 2, [1], radius_mm=[(24.0, 64.0)]).radius_mm == [(24.0, 64.0)]
    # converters observing huge tumours write ranges under the bound (else their own spec would be refused)
    from nnunet_promptlesion.dataset_conversion.staging import radius_ranges
    from nnunet_promptlesion.lesions.spec import radius_ranges_from_observed

    for ranges in (radius_ranges_from_observed([150.0, 320.0]), radius_ranges([40.0, 140.0], "late"),
                   radius_ranges_from_observed([90.0, 400.0] * 15)):
        assert all(0 < lo <= hi <= MAX_RADIUS_MM for lo, hi in ranges), ranges
        LesionClass("huge", 2, [1], radius_mm=ranges)


BASE_CONFIG = {"name": "x", "dataset": 501, "arms": [{"name": "a", "trainer": "nnUNetTrainer_earlyStopping"}]}
BAD_CONFIGS = [
    ({"budget": {"epochs": -1}}, "key 'budget.epochs' must be an integer >= 1, got -1"),
    ({"budget": {"iterations_per_epoch": "250"}}, "key 'budget.iterations_per_epoch' must be an integer >= 1, got \"250\""),
    ({"budget": {"mirroring": "no"}}, "key 'budget.mirroring' must be true or false, got \"no\""),
    ({"budget": {"early_stopping_patience": -3}}, "key 'budget.early_stopping_patience' must be an integer >= 0 or null"),
    ({"budget": [1]}, "key 'budget' must be a JSON object, got [1]"),
    ({"repeats": "3"}, "key 'repeats' must be an integer >= 1, got \"3\""),
    ({"jobs": 0}, "key 'jobs' must be an integer >= 1, got 0"),
    ({"seed": 1.5}, "key 'seed' must be an integer, got 1.5"),
    ({"folds": 0}, "key 'folds' must be a list of integers or strings, got 0"),
    ({"predict": {"disable_tta": "yes"}}, "key 'predict.disable_tta' must be true or false, got \"yes\""),
    ({"evaluation": {"nsd_tolerance_mm": 0}}, "key 'evaluation.nsd_tolerance_mm' must be a number > 0, got 0"),
    ({"evaluation": {"bootstrap": {"n": "many"}}}, "key 'evaluation.bootstrap.n' must be an integer >= 1, got \"many\""),
    ({"scarcity": {"class": "c", "keep_carriers": "2"}}, "key 'scarcity.keep_carriers' must be an integer >= 0, got \"2\""),
    ({"arms": [{"name": "a", "trainer": "T", "settings": 3}]}, "key 'arms[0].settings' must be a JSON object or a string"),
    ({"arms": [{"name": "a", "trainer": "T", "role": "control"}]}, "key 'arms[0].role' must be one of"),
    ({"arms": ["a"]}, "key 'arms[0]' must be a JSON object, got \"a\""),
    ({"env": {"nnUNet_n_proc_DA": [4]}}, "key 'env.nnUNet_n_proc_DA' must be a string or an integer or a number"),
]


@pytest.mark.parametrize("change,expected", BAD_CONFIGS, ids=[next(iter(c)) + f"-{i}" for i, (c, _) in enumerate(BAD_CONFIGS)])
def test_experiment_config_errors_name_file_key_type_and_value(tmp_path, change, expected):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({**BASE_CONFIG, **change}))
    with pytest.raises(ExperimentError) as e:
        load_config(str(f))
    assert str(e.value).startswith(f"{f}: ") and expected in str(e.value), str(e.value)


def test_experiment_config_top_level_settings_file_and_check_command(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text("[1]")
    with pytest.raises(ExperimentError, match="an experiment config must be a JSON object"):
        load_config(str(f))
    (tmp_path / "arm.json").write_text('{"synthetic_fraction": 0.5,')
    f.write_text(json.dumps({**BASE_CONFIG, "arms": [{"name": "a", "trainer": "T", "settings": "arm.json"}]}))
    with pytest.raises(ExperimentError, match=r"settings file .*arm.json is not valid JSON"):
        load_config(str(f))
    # `--check` refuses a negative budget (it used to pass), before nnU-Net is needed
    f.write_text(json.dumps({**BASE_CONFIG, "budget": {"epochs": -1}}))
    r = subprocess.run([str(BIN / "promptlesion_experiment"), str(f), "--check"], capture_output=True, text=True,
                       timeout=120, env={"PATH": str(BIN), "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path)})
    assert r.returncode == 2 and "key 'budget.epochs' must be an integer >= 1, got -1" in r.stderr, r.stderr
    # the command line's budget: integers, true/false, and 0/1 for the two switches (as documented)
    assert parse_budget(["epochs=3", "mirroring=0", "final_validation=true"], pytest.fail) == \
        {"epochs": 3, "mirroring": False, "final_validation": True}
    f.write_text(json.dumps(BASE_CONFIG))
    with pytest.raises(ExperimentError, match="key 'budget.save_every' must be an integer >= 1, got 0"):
        load_config(str(f), {"budget": {"save_every": 0}})


def test_schema_messages_and_conversions():
    assert check_value([1, 2], tuple[float, float], "k", "f") == (1.0, 2.0)
    assert check_value(None, int | None, "k", "f") is None
    with pytest.raises(SchemaError) as e:
        check_value(float("nan"), float, "k", "f.json")
    assert (e.value.source, e.value.key, e.value.expected) == ("f.json", "k", "a number")
    with pytest.raises(SchemaError, match="must be true or false"):
        check_value(1, bool, "k", "f")
