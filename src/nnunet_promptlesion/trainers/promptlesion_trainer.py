"""PromptLesionTrainer: nnU-Net training with class-balanced synthetic lesions mixed into every batch.

Use it like any nnU-Net trainer::

    nnUNetv2_train DATASET 3d_fullres FOLD -tr PromptLesionTrainer

Only the *training* data loader changes (see :mod:`.mixing_loader`); plans, transforms, loss,
validation, checkpoints and inference are nnU-Net's own.
"""
from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import distributed as dist

from ..lesions.spec import LESION_SPEC_FILENAME, LesionSpec, dataset_spec_folders, find_lesion_spec
from ..lesions.masks import MaskSampler
from ..placement.index import (INDEX_DIRNAME, LesionIndex, build_lesion_index, class_probabilities, index_fingerprint,
                               load_or_build_index)
from ..placement.placer import NnunetCases, Placer
from ..synthesis.sources import SampleSource, SourceContext, build_source
from ..utils.errors import PromptLesionConfigError
from ..utils.lifetime import children_die_with_this_process, raise_if_terminated, sigterm_as_keyboard_interrupt
from .mixing_loader import STATS_KEY, PromptLesionDataLoader, synthetic_slots_per_rank
from .synthetic_validation import SyntheticValidation, prepare_synthetic_validation
from .early_stopping import EarlyStoppingMixin
from .settings import load_settings
from .transforms import training_transforms

__all__ = ["PromptLesionTrainer", "PromptLesionConfigError"]


class PromptLesionTrainer(EarlyStoppingMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        try:
            self.promptlesion_settings, self.promptlesion_settings_source = load_settings(
                self.preprocessed_dataset_folder_base)
        except Exception as e:
            self._log_refusal(e)
            raise
        self.lesion_index: LesionIndex | None = None
        self.promptlesion_source: SampleSource | None = None
        self._promptlesion_epoch_stats: Counter = Counter()
        self.promptlesion_index_origin: str | None = None
        # transfer gauge A: pseudo-Dice on held-back synthetic samples (never read by nnU-Net's selection)
        self.promptlesion_gauges: SyntheticValidation | None = None
        # iteration timing (see _promptlesion_time_iteration)
        self._pl_last_iter_t: float | None = None
        self._pl_iter_times: list[float] = []
        self._pl_base_times: list[float] = []
        self._pl_baseline: float | None = None
        self._pl_baseline_done = False

    # ---------------------------------------------------------------- set-up checks
    def load_lesion_spec(self) -> LesionSpec:
        path = find_lesion_spec(
            dataset_spec_folders(self.preprocessed_dataset_folder_base), given=self.promptlesion_settings.lesion_spec,
            error=PromptLesionConfigError,
            hint=f"PromptLesionTrainer learns the dataset's lesion classes from {LESION_SPEC_FILENAME}: it is written "
                 "by promptlesion_make_phantoms and promptlesion_convert; write one by hand (see README) or set "
                 "'lesion_spec' in promptlesion_settings.json.")
        spec = LesionSpec.load(path)
        spec.validate_against_dataset(self.dataset_json, source=f"the dataset.json of {self.plans_manager.dataset_name}")
        return spec

    def check_ct_normalisation(self) -> None:
        schemes = self.configuration_manager.normalization_schemes
        if not schemes or any(s != "CTNormalization" for s in schemes):
            raise PromptLesionConfigError(
                f"PromptLesionTrainer needs CT data, but configuration '{self.configuration_name}' normalises its "
                f"channels with {schemes}. Set channel_names to {{\"0\": \"CT\"}} in dataset.json and re-run "
                "nnUNetv2_plan_and_preprocess.")

    def check_configuration(self) -> None:
        """Refuse configurations the synthetic-sample path cannot serve, before anything is built."""
        if self.is_cascaded:
            raise PromptLesionConfigError(
                f"PromptLesionTrainer does not support the cascade ('{self.configuration_name}' uses the segmentation of "
                f"'{self.configuration_manager.previous_stage_name}' as input): a synthetic lesion has no previous-stage "
                "prediction, so the network would learn that lesions are absent from that input. Train 3d_fullres "
                "(or 3d_lowres, 2d) with PromptLesionTrainer instead.")
        dims = len(self.configuration_manager.patch_size)
        if dims not in (2, 3):
            raise PromptLesionConfigError(f"configuration '{self.configuration_name}' has a {dims}-D patch; "
                                          "PromptLesionTrainer supports 2D and 3D configurations")

    def promptlesion_setup(self) -> None:
        """The checks and state PromptLesion needs before nnU-Net's initialize() (refusals happen here)."""
        self.check_configuration()
        self.check_ct_normalisation()
        self.promptlesion_spec = self.load_lesion_spec()
        # nnU-Net rewrites the oversampling rate per DDP rank for its last-33%-of-the-batch rule; the real
        # share here is oversampled per sample, at the configured (global) rate.
        self._promptlesion_oversample = float(self.oversample_foreground_percent)

    def initialize(self):
        if not self.was_initialized:
            try:
                self.promptlesion_setup()
            except Exception as e:
                self._log_refusal(e)
                raise
        super().initialize()

    def _log_refusal(self, e: BaseException) -> None:
        """The error in the training log too: nnU-Net opens the log with its header before our checks run, and a
        log that stops after the header gives no hint why (the message otherwise goes to the console only)."""
        try:
            self.print_to_log_file(f"PromptLesionTrainer stopped: {type(e).__name__}: {e}", also_print_to_console=False)
        except Exception:  # noqa: BLE001 - an unwritable log must not hide the error itself
            pass

    # ---------------------------------------------------------------- synthesis
    def _intensity_properties(self) -> list[dict]:
        props = self.plans_manager.plans.get("foreground_intensity_properties_per_channel", {})
        return [props[k] for k in sorted(props, key=int)] if props else []

    def build_lesion_index(self, dataset_tr) -> LesionIndex:
        """The start-up scan, loaded from / saved to the cache next to the preprocessed data (rank 0 builds)."""
        s = self.promptlesion_settings
        cm = self.configuration_manager
        ids = list(dataset_tr.identifiers)

        def build():
            return build_lesion_index(dataset_tr, ids, self.promptlesion_spec, spacing=cm.spacing,
                                      patch_size=cm.patch_size, centre_fraction=s.centre_fraction,
                                      max_cases=s.max_scan_cases, progress=self.local_rank == 0)

        path = None
        fingerprint = ""
        if s.index_cache:
            fingerprint = index_fingerprint(self.preprocessed_dataset_folder, ids, self.promptlesion_spec, cm.spacing,
                                            cm.patch_size, s.centre_fraction, s.max_scan_cases)
            path = Path(self.preprocessed_dataset_folder_base) / INDEX_DIRNAME / \
                f"{cm.data_identifier}__fold{self.fold}__{fingerprint[:16]}.pkl"
        world = dist.get_world_size() if self.is_ddp else 1
        index, how = load_or_build_index(path, fingerprint, build, rank=self.local_rank, world_size=world)
        self.promptlesion_index_origin = how
        if how == "built" and path is not None:
            # one cache file per configuration and fold: drop those of earlier specs/settings/preprocessings
            for old in path.parent.glob(f"{cm.data_identifier}__fold{self.fold}__*.pkl"):
                if old != path:
                    old.unlink(missing_ok=True)
        self.print_to_log_file(f"PromptLesion: lesion index {how}" + (f" ({path})" if path else "") +
                               f"; scan {json.dumps(index.scan_info)}", also_print_to_console=True)
        return index

    def _class_probabilities(self, index: LesionIndex) -> np.ndarray:
        return class_probabilities(index.spec, index.counts, self.promptlesion_settings.class_weights)

    def synthetic_per_batch(self) -> int:
        """Synthetic samples in this rank's batch; with DDP the configured share holds over the global batch."""
        s = self.promptlesion_settings
        if not self.is_ddp:
            n = s.n_synthetic(self.batch_size)
            layout = f"batch {self.batch_size} = {self.batch_size - n} real + {n} synthetic"
            total, n_global = self.batch_size, n
        else:
            sizes = [None] * dist.get_world_size()
            dist.all_gather_object(sizes, int(self.batch_size))
            total = int(sum(sizes))
            n_global = s.n_synthetic(total)
            per_rank = synthetic_slots_per_rank(sizes, n_global)
            n = per_rank[self.local_rank]
            layout = (f"global batch {total} over {len(sizes)} ranks (per rank {sizes}) = {total - n_global} real + "
                      f"{n_global} synthetic; synthetic per rank {per_rank}; this rank {self.local_rank}: "
                      f"{self.batch_size - n} real + {n} synthetic")
        self.print_to_log_file(f"PromptLesion: {layout}", also_print_to_console=True)
        if n_global == 0 and float(s.synthetic_fraction) > 0:
            self.print_to_log_file(
                f"PromptLesion: WARNING synthetic_fraction {s.synthetic_fraction} x global batch {total} rounds to 0 "
                "synthetic samples: this run trains on real samples only. Raise the batch size or synthetic_fraction.",
                also_print_to_console=True)
        return n

    def build_sample_source(self, index: LesionIndex, initial_patch_size, n_synthetic: int,
                            placer: Placer | None = None) -> SampleSource:
        """The configured source; a rank without synthetic slots (``n_synthetic`` 0) never draws, so it gets the
        rule-based source instead: no generator, producer or cache is started for it (DDP)."""
        s = self.promptlesion_settings
        cm = self.configuration_manager
        name = s.synthesizer
        log = lambda msg: self.print_to_log_file(msg, also_print_to_console=True)
        if n_synthetic == 0 and name != "rule_based":
            log(f"PromptLesion: no synthetic slot on this rank; '{name}' not started")
            name, log = "rule_based", lambda msg: None
        ctx = SourceContext(settings=s, spec=self.promptlesion_spec, index=index, spacing=tuple(cm.spacing),
                            patch_size=tuple(cm.patch_size), initial_patch_size=tuple(initial_patch_size),
                            intensity=self._intensity_properties(), trainer=self, log=log, placer=placer)
        return build_source(name, ctx)

    def build_train_loader(self, dataset_tr, initial_patch_size, tr_transforms):
        s = self.promptlesion_settings
        cm = self.configuration_manager
        self.lesion_index = index = self.build_lesion_index(dataset_tr)
        # fold "all": carriers held back for synthetic validation leave the index training places lesions with
        self.promptlesion_gauges, index = prepare_synthetic_validation(self, index)
        probs = self._class_probabilities(index)
        placer = Placer.for_training(NnunetCases(dataset_tr), index, MaskSampler(cm.spacing, bank=index.bank),
                                     initial_patch_size, cm.patch_size, s.centre_fraction, s.placement_tries)
        self.close_sample_source()
        n_syn = self.synthetic_per_batch()
        source = self.build_sample_source(index, initial_patch_size, n_syn, placer)
        self.promptlesion_source = source
        source.check(index, probs)
        self.print_to_log_file(
            f"PromptLesion: settings from {self.promptlesion_settings_source}: {json.dumps(s.to_json_dict())}\n"
            f"PromptLesion: source {source.describe()}; class probabilities "
            f"{dict(zip([l.name for l in index.spec.lesions], np.round(probs, 4).tolist()))}\n"
            f"PromptLesion: lesion index {json.dumps(index.summary())}", also_print_to_console=True)
        loader = PromptLesionDataLoader(
            dataset_tr, self.batch_size, initial_patch_size, self.configuration_manager.patch_size, self.label_manager,
            placer=placer, source=source, class_probs=probs, n_synthetic=n_syn,
            oversample_foreground_percent=getattr(self, "_promptlesion_oversample", self.oversample_foreground_percent),
            transforms=tr_transforms, draw_tries=s.draw_tries)
        source.attach(loader)
        return loader

    def close_sample_source(self) -> None:
        src, self.promptlesion_source = self.promptlesion_source, None
        if src is not None:
            src.close()

    # ---------------------------------------------------------------- per-epoch accounting
    def train_step(self, batch: dict) -> dict:
        raise_if_terminated()  # a SIGTERM whose raise was swallowed (see utils.lifetime)
        src = self.promptlesion_source
        if src is not None:
            src.raise_if_failed()  # a failed online producer stops training here, with its traceback
        self._promptlesion_time_iteration()
        stats = batch.pop(STATS_KEY, None)
        if stats:
            self._promptlesion_epoch_stats.update(stats)
        return super().train_step(batch)

    #: iterations at the start of training not used for the baseline (cudnn autotuning, torch.compile, first
    #: batches from cold workers)
    _PL_BASELINE_SKIP = 3

    def _promptlesion_time_iteration(self) -> None:
        """Wall time between consecutive train steps (data wait + step), for the iteration-time ratio.

        Baseline: a source that renders in the background (``baseline_iterations`` > 0) starts with rendering
        paused; iterations ``_PL_BASELINE_SKIP+1 .. _PL_BASELINE_SKIP+baseline_iterations`` of the first epoch
        are timed like that (the loader still serves ring samples: no rendering, same data path), then rendering
        resumes. Every epoch's median iteration time is logged as a ratio to the baseline's median."""
        now = time.perf_counter()
        last, self._pl_last_iter_t = self._pl_last_iter_t, now
        if last is None:
            return
        dt = now - last
        src = self.promptlesion_source
        n_base = int(src.baseline_iterations) if src is not None else 0
        if not self._pl_baseline_done and n_base > 0:
            self._pl_iter_times.append(dt)
            if len(self._pl_iter_times) > self._PL_BASELINE_SKIP:
                self._pl_base_times.append(dt)
            if len(self._pl_base_times) >= n_base:
                self._promptlesion_finish_baseline()
            return
        self._pl_iter_times.append(dt)

    def _promptlesion_finish_baseline(self) -> None:
        src = self.promptlesion_source
        self._pl_baseline_done = True
        if src is not None:
            src.pause(False)
        self._pl_iter_times = []
        if self._pl_base_times:
            self._pl_baseline = float(np.median(self._pl_base_times))
            self.print_to_log_file(
                f"PromptLesion: no-rendering baseline {self._pl_baseline:.3f} s per iteration (median of "
                f"{len(self._pl_base_times)} iterations with the producer paused); rendering resumed",
                also_print_to_console=True)
        else:
            self.print_to_log_file("PromptLesion: epoch too short to time a no-rendering baseline; rendering resumed",
                                   also_print_to_console=True)

    def _promptlesion_log_iteration_time(self) -> None:
        times, self._pl_iter_times, self._pl_last_iter_t = self._pl_iter_times, [], None
        src = self.promptlesion_source
        if not self._pl_baseline_done and src is not None and src.baseline_iterations > 0:
            self._promptlesion_finish_baseline()  # epoch shorter than the baseline: use what was timed
            return
        if not times:
            return
        med = float(np.median(times))
        msg = f"PromptLesion: iteration time {med:.3f} s (median of {len(times)})"
        if self._pl_baseline:
            ratio = med / self._pl_baseline
            msg += f" = {ratio:.2f}x the no-rendering baseline {self._pl_baseline:.3f} s"
            if ratio > 1.3:
                msg += (" (WARNING above 1.3x: lower \"producer_duty_cycle\" or \"online_batch\", or render ahead "
                        "with promptlesion_build_cache)")
        self.print_to_log_file(msg, also_print_to_console=True)

    def promptlesion_epoch_summary(self) -> dict:
        """This epoch's loader counters summed over batches, workers (and DDP ranks), and the source's stats."""
        counts = dict(self._promptlesion_epoch_stats)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, counts)
            total: Counter = Counter()
            for g in gathered:
                total.update(g)
            counts = dict(total)
        out = {"loader": {k: counts[k] for k in sorted(counts)}}
        if self.promptlesion_source is not None:
            out["source"] = self.promptlesion_source.epoch_stats()
        return out

    def on_epoch_end(self):
        self._promptlesion_log_iteration_time()
        summary = self.promptlesion_epoch_summary()
        self._promptlesion_epoch_stats.clear()
        loader = summary["loader"]
        fallback = loader.get("fallback_real", 0)
        self.print_to_log_file(f"PromptLesion: epoch stats {json.dumps(summary, default=str)}" +
                               (f" ({fallback} synthetic slot(s) filled with real samples after failed placements)"
                                if fallback else ""))
        if self.promptlesion_gauges is not None and self.local_rank == 0:
            self.promptlesion_gauges.run_epoch(self)  # own log lines / JSON / plot; nnU-Net's logger untouched
        super().on_epoch_end()

    def on_train_end(self):
        try:
            super().on_train_end()
        finally:
            self.close_sample_source()

    def run_training(self):
        # The source may own processes or files (a producer, an open cache): they end with the run, also when
        # it crashes or is interrupted. SIGTERM (kill, docker stop, pre-emption) is handled like Ctrl-C, so the
        # same clean-up runs; loader workers forked from here end with this process even if it is SIGKILLed.
        children_die_with_this_process()
        previous = sigterm_as_keyboard_interrupt()
        try:
            super().run_training()
        except BaseException as e:
            if isinstance(e, Exception):   # refusals when the loader is built, and failures mid-run (not Ctrl-C)
                self._log_refusal(e)
            src = self.promptlesion_source
            if src is not None and type(e).__name__ != "ProducerDeadError":
                src.raise_if_failed()  # a worker's lock timeout or a dead augmenter: name the producer's failure
            raise e
        finally:
            try:
                self.close_sample_source()
            finally:
                self._promptlesion_finish_loaders()
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

    def _promptlesion_finish_loaders(self) -> None:
        """Stop nnU-Net's loader workers (on_train_end does this only when training ends normally)."""
        for name in ("dataloader_train", "dataloader_val"):
            dl = getattr(self, name, None)
            if dl is not None and hasattr(dl, "_finish"):
                try:
                    dl._finish()
                except Exception:  # noqa: BLE001 - already finished / broken queues: the processes are what matters
                    pass

    def get_dataloaders(self):
        # Same steps as nnUNetTrainer.get_dataloaders; only the training loader differs.
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        initial_patch_size, tr_transforms = training_transforms(self)
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        val_transforms = self.get_validation_transforms(
            self._get_deep_supervision_scales(), is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = self.build_train_loader(dataset_tr, initial_patch_size, tr_transforms)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_train, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, num_cached=max(6, n_proc // 2),
                                                    seeds=None, pin_memory=pin, wait_time=0.002)
            mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2),
                                                  num_cached=max(3, n_proc // 4), seeds=None, pin_memory=pin,
                                                  wait_time=0.002)
        _ = next(mt_train)
        _ = next(mt_val)
        return mt_train, mt_val
