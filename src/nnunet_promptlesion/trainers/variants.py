"""Short PromptLesionTrainer variants, following nnU-Net's nnUNetTrainer_Xepochs pattern.

Also a matching plain nnU-Net baseline for the demo so both trainers get the same budget.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .promptlesion_trainer import PromptLesionTrainer


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


class PromptLesionTrainer_smoke(PromptLesionTrainer):
    """1 epoch of 2 iterations + 1 validation iteration: checks the whole pipeline in seconds on a CPU."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, 1, 2, 1)


# The CPU demo budget: the same for the baseline and PromptLesion so the comparison is fair.
DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS = 10, 25, 3


class nnUNetTrainer_promptlesionDemo(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS)


class PromptLesionTrainer_demo(PromptLesionTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _budget(self, DEMO_EPOCHS, DEMO_ITERATIONS, DEMO_VAL_ITERATIONS)
