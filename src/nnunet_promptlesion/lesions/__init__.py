"""The lesion vocabulary shared by the generator and the synthesis layer.

A lesion spec (classes, parents, sizes in mm), the mask shapes drawn from it and the blending of a
painted lesion into its context. Both :mod:`nnunet_promptlesion.generator` (training crops, latent
inpainting) and :mod:`nnunet_promptlesion.synthesis` (sample sources) import from here; nothing here
imports either of them.
"""
