"""nnunet_promptlesion: prompt-conditioned lesion synthesis for nnU-Net v2 training.

Subpackages, lowest floor first; a module imports only from its own floor or the floors below it
(tests/test_layering.py checks this):
    utils               atomic writes, checkpoint loading, errors
    lesions             the lesion vocabulary: spec, mask shapes, blending
    generator           VQGAN autoencoder and PromptLesion latent diffusion
    placement           where a synthetic lesion goes: carrier index, Placement, the Placer (sibling of generator)
    synthesis           sample sources (rule-based, diffusion cache, online producer), space mapping, cache
    trainers            PromptLesionTrainer and its mixing data loader
    dataset_conversion  raw sources and procedural phantoms -> nnU-Net raw datasets + lesion spec
    evaluation          metrics, lesion-wise detection, statistics, realism
    experiments         arms x repeats through nnU-Net, reports
    cli                 console entry points: parse arguments, call the library
"""

__version__ = "0.1.0"
