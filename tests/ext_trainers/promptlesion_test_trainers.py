"""Test-only trainers, found by nnUNetv2_train through nnUNet_extTrainer (tests/diffusion_fixtures.py adds this folder).

PromptLesionTrainer_checked records every training batch (synthetic share, drawn class labels, whether the
drawn label is in the sample's target after nnU-Net's transforms) to promptlesion_batches.jsonl in its output
folder and skips nnU-Net's final validation. PromptLesionTrainer_crash raises in the first epoch end, after the sample source has started.
"""
import json
import os

from nnunet_promptlesion.trainers.variants import PromptLesionTrainer_smoke


class PromptLesionTrainer_checked(PromptLesionTrainer_smoke):
    def perform_actual_validation(self, save_probabilities: bool = False):
        # The sample sources only touch training batches; nnU-Net's final validation (unchanged by this
        # package, covered by test_install / test_trainer) costs minutes per case on a busy 2-core machine.
        self.print_to_log_file("PromptLesionTrainer_checked: final validation skipped (test trainer)")

    def train_step(self, batch: dict) -> dict:
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        rec = {"synthetic": int(batch["synthetic"].sum()), "batch": int(target.shape[0]), "samples": []}
        for i, key in enumerate(batch["keys"]):
            if str(key).startswith("synthetic:"):
                label = int(str(key).rsplit("label", 1)[1])
                rec["samples"].append({"label": label, "in_target": bool((target[i] == label).any())})
        with open(os.path.join(self.output_folder, "promptlesion_batches.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        return super().train_step(batch)


class PromptLesionTrainer_crash(PromptLesionTrainer_smoke):
    def on_epoch_end(self):
        raise RuntimeError("deliberate crash for the producer-lifetime test")
