# nnU-Net imports every module in this folder as a *top-level* module and then drops it from
# sys.modules. Classes defined here could not be pickled, so this file only re-exports classes
# that live (and pickle) under nnunet_promptlesion.trainers.
from nnunet_promptlesion.trainers.early_stopping import nnUNetTrainer_earlyStopping  # noqa: F401
from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer  # noqa: F401
from nnunet_promptlesion.trainers.variants import (  # noqa: F401
    PromptLesionTrainer_1epoch,
    PromptLesionTrainer_5epochs,
    PromptLesionTrainer_50epochs,
    PromptLesionTrainer_demo,
    PromptLesionTrainer_smoke,
    nnUNetTrainer_promptlesionDemo,
)
