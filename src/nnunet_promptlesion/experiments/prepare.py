"""An experiment's dataset made from its source data: convert, plan, add CPU-sized configurations, preprocess.

A config may carry a ``"prepare"`` section so that one command takes a user from source files to the report
(the shipped ``sarcoma`` config does this for ../shared/data/ibsi_sts)::

    "prepare": {
      "convert": ["nifti", "--images", "${PROMPTLESION_IBSI_STS}/imagesTr", "--masks", "...", "--test-cases", "15"],
      "configurations": [
        {"name": "3d_cpu", "kind": "coarse", "base": "3d_fullres", "spacing_factor": [1, 2, 2]},
        {"name": "2d_cpu", "kind": "2d", "base": "3d_cpu", "patch_size": [96, 96], "batch_size": 8,
         "features": [16, 32, 64, 128]}
      ]
    }

Steps, each skipped when its output is complete (so an interrupted preparation resumes):

1. ``promptlesion_convert <convert...> -d <dataset id>`` unless ``nnUNet_raw/DatasetXXX_*`` exists (the converter
   writes it atomically: the folder exists only when complete). ``${VAR}`` is replaced by the environment
   variable VAR; a missing variable is an error naming it.
2. ``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity --no_pp``: nnU-Net's fingerprint and plans,
   without preprocessing 3d_fullres (the CPU configurations below have their own data).
3. The configurations, added to the plans file the nnU-Net way (:mod:`.plans_configs`): ``"coarse"`` = a 3-D
   configuration with its own spacing (``spacing_factor`` x the base's, nnU-Net axis order z, y, x) and its own
   preprocessed data; ``"2d"`` = slices of a 3-D configuration's data with a small patch and network.
4. ``nnUNetv2_preprocess -d ID -c NAME`` for every ``"coarse"`` configuration (nnU-Net's own resampling and
   CT normalisation), recorded in ``nnUNet_preprocessed/DatasetXXX/promptlesion_prepared.json`` with the
   configuration it was made for, so a changed configuration is preprocessed again.

Logs go to ``<log_dir>/prepare_<step>.log``.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from ..utils.atomic import write_json_atomic
from .plans_configs import PlansConfigError, add_2d_configuration, add_coarse_configuration
from .processes import run_command

PREPARE_KEYS = {"convert", "configurations"}
CONFIGURATION_KINDS = {"coarse": {"name", "kind", "base", "spacing_factor", "patch_size"},
                       "2d": {"name", "kind", "base", "patch_size", "batch_size", "features"}}
RECORD = "promptlesion_prepared.json"


class PrepareError(RuntimeError):
    """The preparation cannot run as configured; the message says what to fix."""


def check_prepare(section, where: str) -> dict:
    """Validate a ``"prepare"`` section (types and keys); returns it unchanged. ``where`` names the config file."""
    if not isinstance(section, dict):
        raise PrepareError(f"{where}: \"prepare\" must be an object with keys {sorted(PREPARE_KEYS)}, got "
                           f"{type(section).__name__}")
    unknown = set(section) - PREPARE_KEYS
    if unknown:
        raise PrepareError(f"{where}: prepare has unknown keys {sorted(unknown)}; known: {sorted(PREPARE_KEYS)}")
    conv = section.get("convert")
    if conv is not None and (not isinstance(conv, list) or not conv or not all(isinstance(a, str) for a in conv)):
        raise PrepareError(f"{where}: prepare.convert must be a list of promptlesion_convert arguments (strings), "
                           f"e.g. [\"nifti\", \"--images\", \"...\"], got {conv!r}")
    confs = section.get("configurations", [])
    if not isinstance(confs, list):
        raise PrepareError(f"{where}: prepare.configurations must be a list, got {type(confs).__name__}")
    for i, c in enumerate(confs):
        if not isinstance(c, dict) or c.get("kind") not in CONFIGURATION_KINDS or not isinstance(c.get("name"), str):
            raise PrepareError(f"{where}: prepare.configurations[{i}] needs a \"name\" (string) and a \"kind\" "
                               f"({' or '.join(CONFIGURATION_KINDS)}), got {c!r}")
        extra = set(c) - CONFIGURATION_KINDS[c["kind"]]
        if extra:
            raise PrepareError(f"{where}: prepare.configurations[{i}] ('{c['name']}', kind {c['kind']}) has unknown "
                               f"keys {sorted(extra)}; known: {sorted(CONFIGURATION_KINDS[c['kind']])}")
        for key in ("spacing_factor", "patch_size", "features"):
            v = c.get(key)
            if v is not None and (not isinstance(v, list) or not all(isinstance(x, (int, float)) and
                                                                     not isinstance(x, bool) and x > 0 for x in v)):
                raise PrepareError(f"{where}: prepare.configurations[{i}].{key} must be a list of positive numbers, "
                                   f"got {v!r}")
        bs = c.get("batch_size")
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise PrepareError(f"{where}: prepare.configurations[{i}].batch_size must be an integer >= 1, got {bs!r}")
    return section


def _expand_env(arg: str, where: str) -> str:
    def sub(m):
        v = os.environ.get(m.group(1))
        if v is None:
            raise PrepareError(f"{where}: prepare.convert uses ${{{m.group(1)}}}, but the environment variable "
                               f"{m.group(1)} is not set")
        return v
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, arg)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _raw_folder(dataset_id: int) -> Path | None:
    raw = Path(os.environ["nnUNet_raw"])
    found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    return found[0] if found else None


def prepare_dataset(section: dict, dataset, log_dir: Path, where: str = "config",
                    say: Callable[[str], None] = print, n_proc: int = 2) -> None:
    """Run the preparation steps for ``dataset`` (an id); see the module docstring. Needs nnUNet_raw and
    nnUNet_preprocessed set."""
    check_prepare(section, where)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise PrepareError(f"prepare needs the environment variable {var} (nnU-Net's folders)")
    try:
        dataset_id = int(str(dataset))
    except ValueError:
        raise PrepareError(f"{where}: a config with \"prepare\" needs a numeric dataset id (the converter's -d), got "
                           f"'{dataset}'") from None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if env.get("nnUNet_n_proc_DA") == "0":
        # nnU-Net's planner sets torch's threads to nnUNet_n_proc_DA (2.8: set_num_threads(0) raises); the variable
        # only matters for training's data loading, so planning and preprocessing run without it
        env.pop("nnUNet_n_proc_DA")
    log_dir = Path(log_dir)

    def step(name: str, cmd: list[str]) -> None:
        log = log_dir / f"prepare_{name}.log"
        say(f"[prepare] {name}: {' '.join(cmd)} (log: {log})")
        rc = run_command(cmd, env, log)
        if rc != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise PrepareError(f"prepare step '{name}' failed (exit {rc}); full log: {log}\n{tail}")

    raw = _raw_folder(dataset_id)
    if raw is not None:
        say(f"[prepare] 1/4 converted dataset exists: {raw}")
    elif section.get("convert"):
        args = [_expand_env(a, where) for a in section["convert"]]
        step("convert", [_bin("promptlesion_convert"), *args, "-d", str(dataset_id), "--no-progress"])
        raw = _raw_folder(dataset_id)
        if raw is None:
            raise PrepareError(f"promptlesion_convert finished but wrote no Dataset{dataset_id:03d}_* folder in "
                               f"{os.environ['nnUNet_raw']}")
    else:
        raise PrepareError(f"dataset {dataset_id} is not in nnUNet_raw ({os.environ['nnUNet_raw']}) and the config's "
                           "prepare section has no \"convert\"")
    pre = Path(os.environ["nnUNet_preprocessed"]) / raw.name
    plans_file = pre / "nnUNetPlans.json"
    if plans_file.is_file():
        say(f"[prepare] 2/4 nnU-Net plans exist: {plans_file}")
    else:
        step("plan", [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "--verify_dataset_integrity",
                      "--no_pp", "-npfp", str(n_proc)])
    record_file = pre / RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    for i, c in enumerate(section.get("configurations", [])):
        try:
            if c["kind"] == "coarse":
                want = add_coarse_configuration(plans_file, c["name"], c.get("base", "3d_fullres"),
                                                c.get("spacing_factor", [1, 2, 2]), c.get("patch_size"))
            else:
                want = add_2d_configuration(plans_file, c["name"], c.get("base", "3d_fullres"),
                                            batch_size=c.get("batch_size", 8), features=c.get("features", [16, 32, 64, 128]),
                                            patch_size=c.get("patch_size", [96, 96]))
        except PlansConfigError as e:
            raise PrepareError(f"{where}: prepare.configurations[{i}]: {e}") from None
        say(f"[prepare] 3/4 configuration '{c['name']}' ({c['kind']}) in {plans_file.name}: patch {want['patch_size']}"
            + (f", spacing {[round(s, 3) for s in want['spacing']]} mm" if "spacing" in want else ""))
        if c["kind"] != "coarse":
            continue
        data = pre / want["data_identifier"]
        if record.get(c["name"]) == want and data.is_dir():
            say(f"[prepare] 4/4 '{c['name']}' preprocessed: {data}")
            continue
        step(f"preprocess_{c['name']}", [_bin("nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", c["name"],
                                         "-np", str(n_proc)])
        record[c["name"]] = want
        write_json_atomic(record, record_file)
