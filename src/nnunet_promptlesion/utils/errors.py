"""Errors PromptLesionTrainer raises before training starts; each message says what to change."""


class PromptLesionConfigError(RuntimeError):
    """The dataset, configuration or settings cannot be used for lesion synthesis; the message says what to fix."""
