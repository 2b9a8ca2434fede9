"""Runs at interpreter start (via nnunet_promptlesion_extTrainer.pth) in wheel installs.

Appends the folder holding the thin PromptLesionTrainer re-export module to the
``nnUNet_extTrainer`` search path so that ``nnUNetv2_train ... -tr PromptLesionTrainer``
finds it with no manual step. Kept tiny and import-free (no torch) because every Python
process in the environment executes it.
"""
import os


def _register() -> None:
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_promptlesion", "trainers", "nnunet_ext")
    if not os.path.isdir(folder):
        return
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])


_register()
