"""nnU-Net's training transforms for a trainer, assembled in one place.

PromptLesionTrainer's data loaders, the loader benchmark and the tests all need the training pipeline exactly as
``nnUNetTrainer.get_dataloaders`` builds it (nnunetv2 2.8); a copy that drifts (e.g. forgets the regions or the
ignore label) would test or time another pipeline than the one training runs.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def training_transforms(trainer: nnUNetTrainer):
    """(initial patch size, training transforms) of an initialized nnU-Net trainer.

    Rotation, dummy-2D augmentation, mirroring and the initial patch size come from the trainer's
    ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` (so trainer variants that override it apply);
    deep supervision scales, mask-for-normalisation, foreground labels, regions and the ignore label from its
    configuration and label manager. The initial patch size is the larger crop (voxels, the configuration's axis
    order) the loader cuts before spatial augmentation brings it to the patch size.
    """
    cm, lm = trainer.configuration_manager, trainer.label_manager
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transforms = trainer.get_training_transforms(
        cm.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
        ignore_label=lm.ignore_label)
    return initial_patch_size, transforms
