"""PromptLesionTrainer: nnU-Net training with class-balanced synthetic lesions mixed into every batch.

Use it like any nnU-Net trainer::

    nnUNetv2_train DATASET 3d_fullres FOLD -tr PromptLesionTrainer

Only the *training* data loader changes (see :mod:`.mixing_loader`); plans, transforms, loss,
validation, checkpoints and inference are nnU-Net's own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from ..synthesis.lesion_spec import LESION_SPEC_FILENAME, LesionSpec
from ..synthesis.masks import MaskSampler
from ..synthesis.rule_based import RuleBasedSynthesizer
from .lesion_index import LesionIndex, build_lesion_index, class_probabilities
from .mixing_loader import PromptLesionDataLoader
from .settings import PromptLesionSettings, load_settings


class PromptLesionConfigError(RuntimeError):
    """The dataset or settings cannot be used for lesion synthesis; the message says what to fix."""


class PromptLesionTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.promptlesion_settings, self.promptlesion_settings_source = load_settings(self.preprocessed_dataset_folder_base)
        self.lesion_index: LesionIndex | None = None

    # ---------------------------------------------------------------- set-up checks
    def _find_lesion_spec(self) -> Path:
        s = self.promptlesion_settings
        candidates = [Path(s.lesion_spec)] if s.lesion_spec else [
            Path(self.preprocessed_dataset_folder_base) / LESION_SPEC_FILENAME,
            Path(os.environ.get("nnUNet_raw", "")) / self.plans_manager.dataset_name / LESION_SPEC_FILENAME,
        ]
        for c in candidates:
            if c.is_file():
                return c
        raise PromptLesionConfigError(
            f"no lesion spec found (looked at {[str(c) for c in candidates]}). PromptLesionTrainer learns the dataset's "
            f"lesion classes from {LESION_SPEC_FILENAME}: it is written by promptlesion_make_phantoms and "
            "promptlesion_convert; write one by hand (see README) or set 'lesion_spec' in promptlesion_settings.json.")

    def load_lesion_spec(self) -> LesionSpec:
        path = self._find_lesion_spec()
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

    def initialize(self):
        if not self.was_initialized:
            self.check_ct_normalisation()
            self.promptlesion_spec = self.load_lesion_spec()
        super().initialize()

    # ---------------------------------------------------------------- synthesis
    def build_synthesizer(self, index: LesionIndex):
        s = self.promptlesion_settings
        sampler = MaskSampler(self.configuration_manager.spacing, bank=index.bank)
        return RuleBasedSynthesizer(sampler, index.stats, blend_sigma_voxels=tuple(s.blend_sigma_voxels))

    def build_lesion_index(self, dataset_tr) -> LesionIndex:
        s = self.promptlesion_settings
        return build_lesion_index(dataset_tr, dataset_tr.identifiers, self.promptlesion_spec,
                                  spacing=self.configuration_manager.spacing,
                                  patch_size=self.configuration_manager.patch_size,
                                  centre_fraction=s.centre_fraction, max_cases=s.max_scan_cases,
                                  progress=self.local_rank == 0)

    def _class_probabilities(self, index: LesionIndex) -> np.ndarray:
        probs = class_probabilities(index.spec, index.counts, self.promptlesion_settings.class_weights)
        if self.promptlesion_settings.synthesizer == "rule_based":
            no_stats = [l.name for l, p in zip(index.spec.lesions, probs) if p > 0 and index.stats[l.label].n == 0]
            if no_stats:
                raise PromptLesionConfigError(
                    f"rule-based synthesis learns each class's intensity from real lesions, but the training cases of "
                    f"fold {self.fold} hold none of {no_stats}. Give these classes weight 0 in 'class_weights' "
                    "(promptlesion_settings.json) or remove them from lesion_spec.json.")
        return probs

    def build_train_loader(self, dataset_tr, initial_patch_size, tr_transforms):
        s = self.promptlesion_settings
        self.lesion_index = index = self.build_lesion_index(dataset_tr)
        probs = self._class_probabilities(index)
        n_syn = s.n_synthetic(self.batch_size)
        self.print_to_log_file(
            f"PromptLesion: settings from {self.promptlesion_settings_source}: {json.dumps(s.__dict__)}\n"
            f"PromptLesion: batch {self.batch_size} = {self.batch_size - n_syn} real + {n_syn} synthetic; "
            f"class probabilities {dict(zip([l.name for l in index.spec.lesions], np.round(probs, 4).tolist()))}\n"
            f"PromptLesion: lesion index {json.dumps(index.summary())}", also_print_to_console=True)
        return PromptLesionDataLoader(dataset_tr, self.batch_size, initial_patch_size,
                                      self.configuration_manager.patch_size, self.label_manager, index=index,
                                      synthesizer=self.build_synthesizer(index), class_probs=probs,
                                      n_synthetic=n_syn, centre_fraction=s.centre_fraction,
                                      oversample_foreground_percent=self.oversample_foreground_percent,
                                      transforms=tr_transforms)

    def get_dataloaders(self):
        # Same steps as nnUNetTrainer.get_dataloaders; only the training loader differs.
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
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
