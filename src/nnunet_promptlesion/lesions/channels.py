"""Which output channel of an nnU-Net network predicts a lesion label.

Used where the network's output is read per lesion class: the synthetic-validation gauge during training
(:mod:`nnunet_promptlesion.trainers.synthetic_validation`) and the softmax inside real test lesions read from
``--save_probabilities`` files (:mod:`nnunet_promptlesion.evaluation.transfer`). It takes nnU-Net's
``LabelManager`` (any object with its ``has_regions``, ``all_labels``, ``foreground_regions`` and
``regions_class_order``), so this module imports no nnU-Net code.
"""
from __future__ import annotations

from typing import Sequence


def class_channels(label_manager, labels: Sequence[int]) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Lesion label -> (network output channel, labels that channel predicts).

    Label-based datasets: the channel of the label in ``label_manager.all_labels`` (softmax, argmax). Region-based
    datasets (sigmoid per region, channels in ``foreground_regions`` order): the region that nnU-Net writes as this
    label (``regions_class_order``), else the smallest region holding the label.
    """
    out = {}
    if not label_manager.has_regions:
        all_labels = [int(v) for v in label_manager.all_labels]
        for l in labels:
            if int(l) not in all_labels:
                raise ValueError(f"lesion label {l} is not a label of the dataset ({all_labels})")
            out[int(l)] = (all_labels.index(int(l)), (int(l),))
        return out
    regions = [tuple(int(v) for v in (r if isinstance(r, (tuple, list)) else (r,)))
               for r in label_manager.foreground_regions]
    order = [int(v) for v in (label_manager.regions_class_order or [])]
    for l in labels:
        l = int(l)
        if l in order and l in regions[order.index(l)]:
            k = order.index(l)
        else:
            holding = [i for i, r in enumerate(regions) if l in r]
            if not holding:
                raise ValueError(f"lesion label {l} is in none of the dataset's regions {regions}")
            k = min(holding, key=lambda i: len(regions[i]))
        out[l] = (k, regions[k])
    return out
