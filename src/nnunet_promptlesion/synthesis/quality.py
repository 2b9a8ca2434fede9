"""DiffAug/FreeTumor-style quality filter: keep a synthetic lesion only if a trained segmenter finds it.

``QualityFilter(model_folder, fold)`` loads a trained nnU-Net model (``$nnUNet_results/DatasetXXX/
TRAINER__PLANS__CONFIG``, ``fold_F/checkpoint_final.pth``) once, on the producer's / cache builder's device.
For every rendered lesion it cuts a patch of the model's patch size centred on the lesion from the
preprocessed case (the lesion pasted in), predicts it (one forward pass, no mirroring) and computes the IoU
between the predicted voxels of the lesion's label and the synthetic mask inside the lesion's neighbourhood
(its blend box grown by ``margin`` voxels, so real lesions elsewhere in the patch do not count). A sample is
kept when IoU >= ``min_iou`` (default 0.7, DiffAug's threshold).

The model must work in the run's preprocessed space: same configuration spacing, normalisation and
foreground intensity properties (checked at load). Weights are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Sequence

import nnunetv2
import numpy as np
import torch
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


class QualityModelError(RuntimeError):
    pass


def _safe_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - nnU-Net logs hold numpy scalars: allow exactly those types
        core = getattr(np, "_core", None) or getattr(np, "core")
        allowed = [np.dtype, np.float64, np.float32, np.int64, core.multiarray.scalar]
        try:
            allowed += [type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise QualityModelError(f"could not load {path} with weights_only=True: {e} (first error: {first})") from e


class QualityFilter:
    def __init__(self, model_folder: str | os.PathLike, fold="0", device: str = "cpu", min_iou: float = 0.7,
                 expect_plans: dict | None = None, configuration: str | None = None, margin: int = 2,
                 checkpoint_name: str = "checkpoint_final.pth"):
        folder = Path(model_folder)
        ck_path = folder / f"fold_{fold}" / checkpoint_name
        for f in (folder / "plans.json", folder / "dataset.json", ck_path):
            if not f.is_file():
                raise QualityModelError(f"quality model: {f} does not exist (quality_model must be an nnU-Net "
                                        "model folder such as $nnUNet_results/DatasetXXX/nnUNetTrainer__nnUNetPlans__3d_fullres)")
        plans = json.loads((folder / "plans.json").read_text())
        dataset_json = json.loads((folder / "dataset.json").read_text())
        ck = _safe_load(ck_path)
        config = ck["init_args"]["configuration"]
        pm = PlansManager(plans)
        cm = pm.get_configuration(config)
        if expect_plans is not None:
            run_cm = PlansManager(expect_plans).get_configuration(configuration or config)
            same = (np.allclose(cm.spacing, run_cm.spacing) and cm.normalization_schemes == run_cm.normalization_schemes
                    and plans.get("foreground_intensity_properties_per_channel")
                    == expect_plans.get("foreground_intensity_properties_per_channel")
                    and plans.get("transpose_forward") == expect_plans.get("transpose_forward"))
            if not same:
                raise QualityModelError(
                    f"quality model {folder} works in another preprocessed space (spacing {cm.spacing}, "
                    f"{cm.normalization_schemes}) than this run (spacing {run_cm.spacing}, {run_cm.normalization_schemes}); "
                    "train it with the same plans and configuration")
        self.label_manager = pm.get_label_manager(dataset_json)
        if self.label_manager.has_regions:
            raise QualityModelError("quality models trained on regions are not supported; use a label-based model")

        trainer_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
                                                    ck["trainer_name"], "nnunetv2.training.nnUNetTrainer")
        if trainer_class is None:
            # deferred: nnUNetTrainer's module loads matplotlib and pandas (~2 s CPU at import, measured here), for
            # a checkpoint whose trainer class nnU-Net does not ship
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as trainer_class
        n_in = determine_num_input_channels(pm, cm, dataset_json)

        n_out = self.label_manager.num_segmentation_heads
        if "plans_manager" in inspect.signature(trainer_class.build_network_architecture).parameters:
            net = trainer_class.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
        else:
            net = trainer_class.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                           cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                                           enable_deep_supervision=False)
        net.load_state_dict(ck["network_weights"])
        self.device = torch.device(device)
        self.network = net.to(self.device).eval()
        self.patch_size = tuple(int(p) for p in cm.patch_size)
        self.min_iou = float(min_iou)
        self.margin = int(margin)
        self.folder = folder

    def iou(self, rendered: Sequence, reader) -> list[float]:
        """IoU per rendered lesion (see the module docstring); ``reader``: a CaseReader over the carriers."""
        if not rendered:
            return []
        crops, masks, regions = [], [], []
        ps = np.asarray(self.patch_size)
        for r in rendered:
            lo = np.asarray(r.centre) - ps // 2
            img, _ = reader.crop(r.case, lo, ps)
            m = r.paste(img, lo)
            region = np.zeros(m.shape, bool)
            a = np.maximum(np.asarray(r.box_lo) - lo - self.margin, 0)
            b = np.minimum(np.asarray(r.box_lo) - lo + np.asarray(r.mask.shape) + self.margin, ps)
            region[tuple(slice(x, y) for x, y in zip(a, b))] = True
            crops.append(img)
            masks.append(m)
            regions.append(region)
        # One sample per forward pass under autocast (as nnU-Net's own training/inference on CUDA): a batch of
        # full-size fp32 patches next to the training process can take more GPU memory than the segmenter's step.
        pred = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            for crop in crops:
                logits = self.network(torch.from_numpy(crop[None]).to(self.device))
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                pred.append(logits[0].argmax(0).cpu().numpy())
        labels = self.label_manager.all_labels
        out = []
        for r, p, m, reg in zip(rendered, pred, masks, regions):
            found = (np.asarray(labels)[p] == r.label) & reg
            union = (found | m).sum()
            out.append(float((found & m).sum() / union) if union else 0.0)
        return out

    def accept(self, rendered: Sequence, reader) -> list[bool]:
        return [v >= self.min_iou for v in self.iou(rendered, reader)]
