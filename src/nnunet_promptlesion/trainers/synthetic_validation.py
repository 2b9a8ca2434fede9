"""Transfer gauge A: pseudo-Dice on *synthetic* validation samples, per lesion class, every epoch.

nnU-Net's pseudo-Dice measures the network on real validation patches. Next to it this module measures the
same network on a fixed set of synthetic samples made by the run's own sample source: a class the network
segments on synthetic samples but not on real ones has a *realism gap*; a class it segments on neither has a
*budget gap* (see :mod:`nnunet_promptlesion.evaluation.transfer` for the verdict).

Design
------
- **Fixed set.** ``N`` samples per lesion class (``PROMPTLESION_SYNTHETIC_VALIDATION_SAMPLES``, default 4) are
  drawn once, at the end of the first epoch, from the trainer's sample source through the loader's own path
  (``PromptLesionDataLoader.synthesize(class_idx, rng)``: placement, the source's rendering, the label) with a
  generator seeded with :data:`SEED`. Every epoch evaluates
  the same samples, so epochs are comparable; a continued run (``--c``) draws the same set again.
- **Held-back carriers.** The samples are placed on carriers that training synthesis does not use:
  fold 0..4: carriers of the fold's validation cases (a start-up scan of those cases, cached next to the
  training index); fold ``"all"``: every :data:`HOLD_BACK_EVERY`-th case of the sorted training cases (at
  least one), whose carriers are then removed from the training loader's carrier pools. A parent structure
  whose carriers would all be held back keeps them for training and is shared (``"held_back": false`` in the
  JSON). Sources that render on carriers of their own (``diffusion_cache``, ``diffusion_online``: cached or
  producer-rendered lesions on training cases) cannot be moved: their samples keep the source's carriers.
- **Never in nnU-Net's selection.** Values go to the training log, ``progress_promptlesion.png`` and
  :data:`GAUGES_FILENAME` only; nnU-Net's logger keys (``mean_fg_dice``, ``ema_fg_dice``,
  ``dice_per_class_or_region``), from which checkpoint_best, the EMA and early stopping are derived, are read
  (to print the real pseudo-Dice next to the synthetic one) and never written. The forward passes run without
  gradients in eval mode and consume no global random state.
- **Metric.** Per class, over its samples: the network's prediction of the class's output channel
  (argmax for label-based datasets, sigmoid > 0.5 of the class's region for region-based ones) against the
  synthetic lesion mask; voxels of real lesions of the same channel, nnU-Net's -1 padding and the ignore
  label are left out. pseudo-Dice = 2 TP / (2 TP + FP + FN) summed over the samples (nnU-Net's global
  pseudo-Dice). Also the median over samples of the max and mean softmax (sigmoid) inside the synthetic lesion,
  comparable with the softmax inside real test lesions (gauge B).

Environment: ``PROMPTLESION_SYNTHETIC_VALIDATION=0`` switches the gauge (and the fold-"all" hold-back) off;
``PROMPTLESION_SYNTHETIC_VALIDATION_FORCE=<float>`` (tests only) replaces every synthetic pseudo-Dice by that
value, to show that nothing nnU-Net selects on depends on it.

Arrays follow nnU-Net's preprocessed layout: data (C, X, Y, Z), seg (1, X, Y, Z) in voxels; 2D
configurations use (C, X, Y) network inputs cut from the pseudo-3D patches of the loader.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..lesions.channels import class_channels
from ..lesions.masks import MaskSampler
from ..placement.index import INDEX_DIRNAME, LesionIndex, NoHealthyRegionError, build_lesion_index, \
    index_fingerprint, load_or_build_index
from ..placement.placer import NnunetCases, Placer
from ..synthesis.sources import SynthesisError
from ..utils.atomic import atomic_path, write_json_atomic
from .mixing_loader import PromptLesionDataLoader

GAUGES_FILENAME = "promptlesion_gauges.json"
PLOT_FILENAME = "progress_promptlesion.png"
GAUGES_VERSION = 1
ENV_ENABLE = "PROMPTLESION_SYNTHETIC_VALIDATION"
ENV_SAMPLES = "PROMPTLESION_SYNTHETIC_VALIDATION_SAMPLES"
ENV_FORCE = "PROMPTLESION_SYNTHETIC_VALIDATION_FORCE"
#: seed of the generator that draws the fixed synthetic validation set
SEED = 12345
DEFAULT_SAMPLES_PER_CLASS = 4
#: fold "all": every HOLD_BACK_EVERY-th training case (sorted) lends its carriers to validation only
HOLD_BACK_EVERY = 5
#: sources whose samples are placed fresh by the placer (so held-back carriers apply)
PLACEMENT_SOURCES = ("rule_based",)

__all__ = ["GAUGES_FILENAME", "PLOT_FILENAME", "SyntheticValidation", "prepare_synthetic_validation", "load_gauges",
           "synthetic_summary", "ENV_ENABLE", "ENV_SAMPLES", "ENV_FORCE", "SEED"]


def _enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def _samples_per_class() -> int:
    v = os.environ.get(ENV_SAMPLES, "").strip()
    if not v:
        return DEFAULT_SAMPLES_PER_CLASS
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"environment variable {ENV_SAMPLES}={v!r} must be a positive integer") from None
    if n < 1:
        raise ValueError(f"environment variable {ENV_SAMPLES}={n} must be >= 1 (set {ENV_ENABLE}=0 to switch off)")
    return n


def _forced_value() -> float | None:
    v = os.environ.get(ENV_FORCE, "").strip()
    return float(v) if v else None


# ---------------------------------------------------------------------------------------------- carriers
def _without_cases(index: LesionIndex, cases: set[str]) -> tuple[LesionIndex, dict[int, list], set[int]]:
    """(training index without the carriers of ``cases``, held-back carriers per parent, shared parents).

    A parent whose carriers all lie in ``cases`` keeps them for training (shared with validation)."""
    train, held, shared = {}, {}, set()
    for p, entries in index.carriers.items():
        keep = [e for e in entries if e[0] not in cases]
        out = [e for e in entries if e[0] in cases]
        if not keep or not out:
            train[p], held[p] = list(entries), list(entries)
            shared.add(p)
        else:
            train[p], held[p] = keep, out
    return dataclasses.replace(index, carriers=train), held, shared


def _validation_carriers(trainer, index: LesionIndex) -> tuple[dict[int, list], set[int], str]:
    """Carriers of the fold's validation cases per parent (training carriers for parents they lack)."""
    s = trainer.promptlesion_settings
    cm = trainer.configuration_manager
    _, val_keys = trainer.do_split()
    ids = sorted(val_keys)
    ds = trainer.dataset_class(trainer.preprocessed_dataset_folder, ids)
    fp = index_fingerprint(trainer.preprocessed_dataset_folder, ids, index.spec, cm.spacing, cm.patch_size,
                           s.centre_fraction, s.max_scan_cases)
    path = Path(trainer.preprocessed_dataset_folder_base) / INDEX_DIRNAME / \
        f"{cm.data_identifier}__synval_fold{trainer.fold}__{fp[:16]}.pkl" if s.index_cache else None

    def build():
        return build_lesion_index(ds, ids, index.spec, spacing=cm.spacing, patch_size=cm.patch_size,
                                  centre_fraction=s.centre_fraction, max_cases=s.max_scan_cases, progress=False)

    try:
        val_index, how = load_or_build_index(path, fp if path else "", build)
        if how == "built" and path is not None:
            for old in path.parent.glob(f"{cm.data_identifier}__synval_fold{trainer.fold}__*.pkl"):
                if old != path:
                    old.unlink(missing_ok=True)
        carriers = val_index.carriers
    except NoHealthyRegionError:
        # some class has no healthy carrier in the validation cases: all classes use training carriers
        # (marked "held_back": false)
        carriers = {}
    held, shared = {}, set()
    for p, entries in index.carriers.items():
        v = carriers.get(p, [])
        held[p] = list(v) if v else list(entries)
        if not v:
            shared.add(p)
    return held, shared, f"validation cases of fold {trainer.fold}"


def prepare_synthetic_validation(trainer, index: LesionIndex) -> tuple["SyntheticValidation | None", LesionIndex]:
    """(the gauge or None when switched off, the index the training loader places lesions with).

    Called once by the trainer right after its start-up scan, before the training loader exists.
    """
    if not _enabled():
        trainer.print_to_log_file(f"PromptLesion gauges: synthetic validation off ({ENV_ENABLE}=0)",
                                  also_print_to_console=True)
        return None, index
    n = _samples_per_class()
    source_name = trainer.promptlesion_settings.synthesizer
    train_index = index
    if source_name not in PLACEMENT_SOURCES:
        held, shared, how = dict(index.carriers), set(index.carriers), \
            f"the '{source_name}' source renders on its own training carriers"
    elif str(trainer.fold) == "all":
        cases = sorted({c for entries in index.carriers.values() for c, _ in entries})
        chosen = set(cases[::HOLD_BACK_EVERY]) if len(cases) > 1 else set()
        train_index, held, shared = _without_cases(index, chosen)
        how = f"every {HOLD_BACK_EVERY}th carrier case of the training cases (fold all), not used by training synthesis"
    else:
        held, shared, how = _validation_carriers(trainer, index)
    val_index = dataclasses.replace(index, carriers=held)
    gauge = SyntheticValidation(trainer, val_index, shared, how, n)
    trainer.print_to_log_file(f"PromptLesion gauges: synthetic validation, {n} samples per class, seed {SEED}, "
                              f"carriers {json.dumps(gauge.design['carriers'])}", also_print_to_console=True)
    return gauge, train_index


# ---------------------------------------------------------------------------------------------- the gauge
@dataclasses.dataclass
class _Sample:
    data: np.ndarray      # (C, *patch) float32, network input
    target: np.ndarray    # (*patch) bool: the synthetic lesion
    valid: np.ndarray     # (*patch) bool: voxels that count
    case: str = ""        # carrier case


class SyntheticValidation:
    """The fixed synthetic validation set of one training run and its per-epoch record (see module docstring)."""

    def __init__(self, trainer, val_index: LesionIndex, shared_parents: set[int], how: str, samples_per_class: int):
        self.index = val_index
        self.spec = val_index.spec
        self.samples_per_class = int(samples_per_class)
        lm = trainer.label_manager
        self.has_regions = bool(lm.has_regions)
        self.channels = class_channels(lm, [l.label for l in self.spec.lesions])
        self.ignore_label = lm.ignore_label
        self.source_name = trainer.promptlesion_settings.synthesizer
        carriers = {}
        for l in self.spec.lesions:
            pool = val_index.carrier_pool(l)
            carriers[l.name] = {"held_back": not any(p in shared_parents for p in l.parents),
                                "cases": sorted({c for c, _ in pool}), "how": how}
        self.design = {"samples_per_class": self.samples_per_class, "seed": SEED, "carriers": carriers}
        self.samples: dict[str, list[_Sample]] | None = None
        self.record: dict[str, Any] = {
            "version": GAUGES_VERSION, "trainer": type(trainer).__name__, "fold": str(trainer.fold),
            "source": self.source_name, "design": self.design,
            "classes": [{"name": l.name, "label": l.label, "channel": self.channels[l.label][0]}
                        for l in self.spec.lesions],
            "epochs": []}
        self._resumed = False

    # ------------------------------------------------------------------ the fixed set
    def _loader(self, trainer):
        tr, val = trainer.do_split()
        ids = sorted(set(tr) | set(val))
        ds = trainer.dataset_class(trainer.preprocessed_dataset_folder, ids)
        cm = trainer.configuration_manager
        s = trainer.promptlesion_settings
        ps = tuple(int(p) for p in cm.patch_size)
        k = len(self.spec.lesions)
        placer = Placer.for_training(NnunetCases(ds), self.index, MaskSampler(cm.spacing, bank=self.index.bank), ps,
                                     ps, s.centre_fraction, s.placement_tries)
        return PromptLesionDataLoader(ds, 1, ps, ps, trainer.label_manager, placer=placer,
                                      source=trainer.promptlesion_source, class_probs=np.full(k, 1.0 / k),
                                      n_synthetic=1, transforms=None, draw_tries=s.draw_tries)

    def draw_set(self, trainer) -> dict[str, list[_Sample]]:
        """Draw the fixed set (seeded) through the trainer's source; classes that cannot be made get none."""
        source = trainer.promptlesion_source
        if source is None:
            raise RuntimeError("synthetic validation needs the trainer's sample source (built with the training loader)")
        loader = self._loader(trainer)
        rng = np.random.default_rng(SEED)
        out: dict[str, list[_Sample]] = {}
        two_d = loader.patch_size_was_2d
        tries = max(1, loader.draw_tries) * 2
        # a class training never synthesizes (class weight 0) is not drawn here either: its source may have
        # no appearance for it (e.g. no real lesion of it left in a scarce training set)
        train_probs = trainer._class_probabilities(getattr(trainer, "lesion_index", None) or self.index)
        for ci, lesion in enumerate(self.spec.lesions):
            _, region = self.channels[lesion.label]
            got: list[_Sample] = []
            if train_probs[ci] <= 0:
                out[lesion.name] = got
                continue
            for _ in range(self.samples_per_class):
                for _ in range(tries):
                    try:
                        smp = loader.synthesize(ci, rng)  # the training path: loader places, source renders
                    except SynthesisError:
                        smp = None
                    if smp is not None:
                        break
                if smp is None:
                    continue
                data = np.asarray(smp.data, dtype=np.float32)
                seg = np.asarray(smp.seg[0])
                target = smp.placement.mask() & (seg == lesion.label)
                valid = (seg != -1) & ~(np.isin(seg, region) & ~target)
                if self.ignore_label is not None:
                    valid &= seg != self.ignore_label
                if two_d:
                    data, target, valid = data[:, 0], target[0], valid[0]
                if target.any():
                    got.append(_Sample(np.ascontiguousarray(data), target, valid, smp.placement.case))
            out[lesion.name] = got
        self.design["drawn_cases"] = {k: [s.case for s in v] for k, v in out.items()}
        return out

    # ------------------------------------------------------------------ per epoch
    def measure(self, trainer) -> dict[str, dict]:
        """This epoch's synthetic numbers per class (network in eval mode, no gradients)."""
        net = trainer.network
        # rank 0 alone runs this: no DDP wrapper (no collectives), and the eager module rather than a torch.compile
        # one (another input shape would trigger a recompilation); both share the trained weights
        if getattr(trainer, "is_ddp", False) and hasattr(net, "module"):
            net = net.module
        net = getattr(net, "_orig_mod", net)
        was_training = net.training
        net.eval()
        dev = trainer.device
        out = {}
        try:
            with torch.no_grad():
                for lesion in self.spec.lesions:
                    ch, _ = self.channels[lesion.label]
                    tp = fp = fn = 0
                    maxp, meanp = [], []
                    for s in self.samples[lesion.name]:
                        x = torch.from_numpy(s.data)[None].to(dev)
                        with torch.autocast(dev.type, enabled=True) if dev.type == "cuda" else _null():
                            logits = net(x)
                        if isinstance(logits, (list, tuple)):
                            logits = logits[0]
                        logits = logits[0].float()
                        if self.has_regions:
                            prob = torch.sigmoid(logits[ch])
                            pred = prob > 0.5
                        else:
                            prob = torch.softmax(logits, 0)[ch]
                            pred = logits.argmax(0) == ch
                        prob, pred = prob.cpu().numpy(), pred.cpu().numpy()
                        t, v = s.target, s.valid
                        tp += int((pred & t & v).sum())
                        fp += int((pred & ~t & v).sum())
                        fn += int((~pred & t & v).sum())
                        inside = prob[t & v]
                        if inside.size:
                            maxp.append(float(inside.max()))
                            meanp.append(float(inside.mean()))
                    n = len(self.samples[lesion.name])
                    dice = 2 * tp / (2 * tp + fp + fn) if n and (tp + fp + fn) else None
                    out[lesion.name] = {"pseudo_dice": dice, "tp": tp, "fp": fp, "fn": fn, "samples": n,
                                        "max_prob_median": float(np.median(maxp)) if maxp else None,
                                        "mean_prob_median": float(np.median(meanp)) if meanp else None}
        finally:
            net.train(was_training)
        forced = _forced_value()
        if forced is not None:
            for v in out.values():
                v["pseudo_dice"] = forced
        return out

    def real_pseudo_dice(self, trainer) -> dict[str, dict]:
        """nnU-Net's own pseudo-Dice of this epoch per lesion class (read from its logger, never written)."""
        try:
            per = trainer.logger.get_value("dice_per_class_or_region", step=trainer.current_epoch)
        except (IndexError, KeyError):
            per = None
        out = {}
        for lesion in self.spec.lesions:
            ch, _ = self.channels[lesion.label]
            i = ch if self.has_regions else ch - 1
            v = float(per[i]) if per is not None and 0 <= i < len(per) else None
            out[lesion.name] = {"pseudo_dice": None if v is None or math.isnan(v) else v}
        return out

    def _resume(self, trainer, path: Path) -> None:
        # a continued run keeps the epochs it already has (nnU-Net's --c restarts at trainer.current_epoch)
        self._resumed = True
        if trainer.current_epoch > 0 and path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                return
            self.record["epochs"] = [e for e in old.get("epochs", []) if e.get("epoch", 1 << 30) < trainer.current_epoch]

    def run_epoch(self, trainer) -> dict:
        """Measure, log, write the JSON and the plot for ``trainer.current_epoch``; returns the epoch record."""
        t0 = time.perf_counter()
        out_dir = Path(trainer.output_folder)
        if not self._resumed:
            self._resume(trainer, out_dir / GAUGES_FILENAME)
        if self.samples is None:
            self.samples = self.draw_set(trainer)
            trainer.print_to_log_file(
                "PromptLesion gauges: synthetic validation set " +
                json.dumps({k: len(v) for k, v in self.samples.items()}) + " samples per class")
        syn = self.measure(trainer)
        real = self.real_pseudo_dice(trainer)
        try:
            ema = float(trainer.logger.get_value("ema_fg_dice", step=trainer.current_epoch))
        except (IndexError, KeyError):
            ema = None
        rec = {"epoch": int(trainer.current_epoch), "synthetic": syn, "real": real, "ema_fg_dice": ema,
               "seconds": round(time.perf_counter() - t0, 3)}
        self.record["epochs"] = [e for e in self.record["epochs"] if e["epoch"] != rec["epoch"]] + [rec]
        fmt = lambda d: json.dumps({k: None if v["pseudo_dice"] is None else round(v["pseudo_dice"], 4)
                                    for k, v in d.items()})
        trainer.print_to_log_file(f"PromptLesion gauges: epoch {rec['epoch']} synthetic pseudo-Dice {fmt(syn)} | "
                                  f"real pseudo-Dice {fmt(real)} | synthetic max softmax (median) " +
                                  json.dumps({k: None if v["max_prob_median"] is None else round(v["max_prob_median"], 4)
                                              for k, v in syn.items()}))
        write_json_atomic(self.record, out_dir / GAUGES_FILENAME)
        plot_gauges(self.record, out_dir / PLOT_FILENAME)
        return rec


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------------- outputs
def plot_gauges(record: dict, path: str | os.PathLike) -> None:
    """Synthetic (dashed) and real (solid) pseudo-Dice per lesion class over the epochs, one colour per class."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt  # after use("agg")

    epochs = record["epochs"]
    # nnU-Net's logger sets a global seaborn theme (font scale 2.5) for its own 30 x 54 inch figure: not for ours
    with plt.style.context("default"):
        _plot(record, epochs, plt, path)


def _plot(record, epochs, plt, path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [e["epoch"] for e in epochs]
    for i, c in enumerate(record["classes"]):
        col = f"C{i}"
        for kind, ls in (("real", "-"), ("synthetic", "--")):
            y = [np.nan if e[kind][c["name"]]["pseudo_dice"] is None else e[kind][c["name"]]["pseudo_dice"]
                 for e in epochs]
            ax.plot(x, y, ls=ls, color=col, marker="o", ms=3, label=f"{c['name']} ({kind})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("pseudo-Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"PromptLesion gauges ({record['source']}): real vs synthetic validation")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def load_gauges(fold_dir: str | os.PathLike) -> dict | None:
    """The gauge record of a fold folder (or the JSON file itself), or None when there is none."""
    p = Path(fold_dir)
    if p.is_dir():
        p = p / GAUGES_FILENAME
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def synthetic_summary(record: dict | None, epoch: str | int = "last") -> dict[str, dict] | None:
    """{class: {"pseudo_dice", "max_prob_median", "mean_prob_median", "samples", "epoch"}} of one epoch.

    epoch: "last"; "best" = the epoch whose weights checkpoint_best.pth holds (the first maximum of nnU-Net's
    ema_fg_dice as recorded in the file); or an epoch number. None for a missing record.
    """
    if not record or not record.get("epochs"):
        return None
    eps = sorted(record["epochs"], key=lambda e: e["epoch"])
    if epoch == "last":
        e = eps[-1]
    elif epoch == "best":
        vals = [e["ema_fg_dice"] if e.get("ema_fg_dice") is not None and math.isfinite(e["ema_fg_dice"]) else -np.inf
                for e in eps]
        e = eps[int(np.argmax(vals))]
    else:
        match = [x for x in eps if x["epoch"] == int(epoch)]
        if not match:
            raise KeyError(f"epoch {epoch} is not in the gauge record (epochs {[x['epoch'] for x in eps]})")
        e = match[0]
    return {name: {**{k: v.get(k) for k in ("pseudo_dice", "max_prob_median", "mean_prob_median", "samples")},
                   "epoch": e["epoch"]}
            for name, v in e["synthetic"].items()}
