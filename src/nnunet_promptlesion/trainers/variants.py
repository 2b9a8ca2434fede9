"""Short PromptLesionTrainer variants, following nnU-Net's nnUNetTrainer_Xepochs pattern.

Also a matching plain nnU-Net baseline for the demo so both trainers get the same budget.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .checkpointing import AtomicCheckpointMixin
from .progress_plot import ThrottledProgressPlotMixin
from .promptlesion_trainer import PromptLesionTrainer


class _NoMirroringMixin:
    """No mirroring augmentation and no mirrored test-time augmentation (8x cheaper validation on a CPU),
    as nnU-Net's nnUNetTrainerNoMirroring does."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rot, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rot, dummy_2d, initial_patch_size, None


def _budget(trainer, epochs: int, iterations: int | None = None, val_iterations: int | None = None):
    trainer.num_epochs = epochs
    if iterations is not None:
        trainer.num_iterations_per_epoch = iterations
    if val_iterations is not None:
        trainer.num_val_iterations_per_epoch = val_iterations


class PromptLesionTrainer_1epoch(PromptLesionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, 1)


class PromptLesionTrainer_5epochs(PromptLesionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, 5)


class PromptLesionTrainer_50epochs(PromptLesionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, 50)


class PromptLesionTrainer_smoke(_NoMirroringMixin, PromptLesionTrainer):
    """1 epoch of 2 iterations + 1 validation iteration, no mirroring: checks the whole pipeline on a CPU."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, 1, 2, 1)


# The CPU demo budget: the same for the baseline and PromptLesion so the comparison is fair
# (both without mirroring, which makes their final validation 8x cheaper on a CPU). Sized for the demo's
# small-patch configuration (promptlesion_demo adds "3d_demo": 32^3 patch, batch 4, ~0.3 s per iteration
# on 2 cores): 300 iterations per training, 2 arms x 2 repeats, inside the 20-minute budget.
DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS = 6, 50, 2


class _NoSelfValidationMixin:
    """With fold "all" nnU-Net's final validation re-predicts the training cases, which measures nothing
    and costs minutes on a CPU; the demo evaluates held-out imagesTs instead. Other folds validate as usual."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        if str(self.fold) == "all":
            self.print_to_log_file("fold 'all': final validation on the training cases skipped "
                                   "(evaluate held-out cases with nnUNetv2_predict + promptlesion_evaluate)")
            return
        return super().perform_actual_validation(save_probabilities)


class nnUNetTrainer_promptlesionDemo(_NoSelfValidationMixin, _NoMirroringMixin, ThrottledProgressPlotMixin,
                                     AtomicCheckpointMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS)


class PromptLesionTrainer_demo(_NoSelfValidationMixin, _NoMirroringMixin, PromptLesionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS)
