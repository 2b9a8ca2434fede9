"""nnU-Net trainers with lesion synthesis. Found by ``-tr NAME`` through ``nnUNet_extTrainer``."""
