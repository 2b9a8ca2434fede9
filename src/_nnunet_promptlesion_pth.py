"""Runs at interpreter start (via nnunet_promptlesion_extTrainer.pth).

Appends the folder holding the thin PromptLesionTrainer re-export module to the
``nnUNet_extTrainer`` search path so that ``nnUNetv2_train ... -tr PromptLesionTrainer`` finds it
with no manual step. Kept tiny: every Python process in the environment executes it, so it only
locates the package (find_spec does not import it) and never imports torch.
"""
import importlib.util
import os


def _register() -> None:
    try:
        spec = importlib.util.find_spec("nnunet_promptlesion")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    folder = os.path.join(list(spec.submodule_search_locations)[0], "trainers", "nnunet_ext")
    if not os.path.isdir(folder):
        return
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])


_register()
