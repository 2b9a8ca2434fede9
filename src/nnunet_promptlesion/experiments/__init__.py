"""Experiments: run arms x repeats of nnU-Net trainings and compare them (``promptlesion_experiment``)."""
