"""promptlesion_env: print the shell line that makes nnU-Net find the PromptLesion trainers.

Wheel and editable installs of nnunet_promptlesion register the trainer folder automatically
(a .pth file extends ``nnUNet_extTrainer`` at interpreter start). For any other set-up (source
tree on PYTHONPATH, frozen environments) run::

    eval "$(promptlesion_env)"
"""
import argparse
import os
import shlex

import nnunet_promptlesion


def trainer_folder() -> str:
    return os.path.join(os.path.dirname(nnunet_promptlesion.__file__), "trainers", "nnunet_ext")


def main(argv=None) -> None:
    argparse.ArgumentParser(
        prog="promptlesion_env",
        description="Print `export nnUNet_extTrainer=...` so that `nnUNetv2_train ... -tr PromptLesionTrainer` "
                    "finds the trainers. Usage: eval \"$(promptlesion_env)\"").parse_args(argv)
    folder = trainer_folder()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    print("export nnUNet_extTrainer=" + shlex.quote(os.pathsep.join(current + [folder])))


if __name__ == "__main__":
    main()
