"""Where a synthetic lesion goes: the carrier index and the one placement rule.

A synthetic sample passes three places: where it goes (here), how it looks (the sample sources in
:mod:`nnunet_promptlesion.synthesis`), how it enters the batch (:mod:`nnunet_promptlesion.trainers.mixing_loader`).

    index       the start-up scan of the training cases: healthy carrier centres per parent label, the real
                lesions' counts, intensity statistics and mask bank (cached next to the preprocessed data)
    placement   :class:`~.placement.Placement`: case, crop box, lesion box and mask, seed
    placer      :class:`~.placer.Placer`: carrier, allowed region, mask, crops, label; used by the training
                loader, the cache builder and single-CT synthesis (on in-memory cases)

Imports only :mod:`nnunet_promptlesion.lesions` and :mod:`nnunet_promptlesion.utils`.
"""
