"""nnunet_promptlesion: prompt-conditioned lesion synthesis for nnU-Net v2 training.

Subpackages (data flows one way, top to bottom):
    dataset_conversion  raw sources and procedural phantoms -> nnU-Net raw datasets + lesion spec
    generator           VQGAN autoencoder and PromptLesion latent diffusion
    synthesis           lesion masks, placement, blending, synthesizers, cache
    trainers            PromptLesionTrainer and its mixing data loader
    evaluation          metrics and benchmarks
"""

__version__ = "0.1.0"
