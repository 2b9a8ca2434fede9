"""Names of the environment variables through which the experiment runner steers the processes it starts.

The runner (experiments) sets them in the environment of ``nnUNetv2_train`` / ``nnUNetv2_predict``; the
trainers and the runner's nnU-Net entry points read them. Both sides use these constants, so that a renamed
variable cannot leave one side reading a name the other no longer sets. Defined here, on the lowest floor,
because every floor that reads or sets one may import utils.
"""
from __future__ import annotations

#: the PromptLesion settings file of a training (trainers.settings)
ENV_SETTINGS = "PROMPTLESION_SETTINGS"

# Per-run controls of trainers.early_stopping.EarlyStoppingMixin, set from the experiment's "budget" and seed.
ENV_PATIENCE = "PROMPTLESION_EARLY_STOPPING_PATIENCE"
ENV_EPOCHS = "PROMPTLESION_NUM_EPOCHS"
ENV_ITERATIONS = "PROMPTLESION_NUM_ITERATIONS_PER_EPOCH"
ENV_VAL_ITERATIONS = "PROMPTLESION_NUM_VAL_ITERATIONS_PER_EPOCH"
ENV_SAVE_EVERY = "PROMPTLESION_SAVE_EVERY"
ENV_SEED = "PROMPTLESION_SEED"
ENV_MIRRORING = "PROMPTLESION_MIRRORING"

#: "0": skip nnU-Net's final validation (experiments.nnunet_train)
ENV_FINAL_VALIDATION = "PROMPTLESION_FINAL_VALIDATION"
#: cap on torch's CPU threads in the runner's nnU-Net entry points (experiments.torch_threads)
ENV_TORCH_THREADS = "PROMPTLESION_TORCH_THREADS"
