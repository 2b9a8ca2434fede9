"""A generator checkpoint's stored weight hash (meta.checkpoint_id) is verified on load: a bit flipped on disk in
a file of the right size is refused instead of synthesizing with weights nobody trained."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_promptlesion.generator.intensity import IntensitySpace
from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, load_vqgan, save_vqgan
from nnunet_promptlesion.utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, weights_id


def _flip_inside_tensor(path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes where torch.save stored them (uncompressed in the zip)."""
    raw = bytearray(path.read_bytes())
    needle = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()[:64]
    at = raw.find(needle)
    assert at > 0, "tensor bytes not found in the file"
    raw[at + 17] ^= 0x04
    path.write_bytes(bytes(raw))


def test_bit_flipped_vqgan_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny(patch_size=(16, 16, 16)))
    ck = tmp_path / "vq.pt"
    save_vqgan(model, ck, spacing=(1.0, 1.0, 1.0), intensity=IntensitySpace.hu_window(-175, 250), step=0,
               source={"train": {}, "eval": {}})
    load_vqgan(ck)                                       # intact: loads
    size = ck.stat().st_size
    big = max(model.state_dict().values(), key=lambda t: t.numel())
    _flip_inside_tensor(ck, big)
    assert ck.stat().st_size == size
    with pytest.raises(CheckpointError, match=r"vq.pt: its weights do not match the checkpoint_id stored with them"):
        load_vqgan(ck)
    # the raw state still loads when asked not to verify (e.g. to inspect a damaged file)
    assert "model" in load_checkpoint(ck, verify=False)


def test_ema_weights_are_what_a_training_checkpoint_id_names(tmp_path):
    """Diffusion training checkpoints hash their EMA weights (the ones sampling uses); either copy may carry it."""
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ck = tmp_path / "d.pt"
    save_checkpoint({"meta": {"kind": "x", "checkpoint_id": weights_id(ema.state_dict())},
                     "model": model.state_dict(), "ema": ema.state_dict()}, ck)
    load_checkpoint(ck, kind="x")
    with torch.no_grad():
        ema.weight[0, 0] += 1.0
    save_checkpoint({"meta": {"kind": "x", "checkpoint_id": weights_id(model.state_dict()) + "0"},
                     "model": model.state_dict(), "ema": ema.state_dict()}, ck)
    with pytest.raises(CheckpointError, match="do not match the checkpoint_id"):
        load_checkpoint(ck, kind="x")
    assert np.isfinite(float(next(iter(load_checkpoint(ck, verify=False)["model"].values())).sum()))
