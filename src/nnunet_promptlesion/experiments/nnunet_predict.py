"""``nnUNetv2_predict`` as the experiment runner starts it: nnU-Net's own entry point, with torch's CPU threads
capped when ``PROMPTLESION_TORCH_THREADS`` is set (see :mod:`.torch_threads`).

``python -m nnunet_promptlesion.experiments.nnunet_predict <nnUNetv2_predict arguments>``
"""
from __future__ import annotations

import sys

from nnunetv2.inference.predict_from_raw_data import predict_entry_point

from .torch_threads import cap_torch_threads


def main() -> None:
    cap_torch_threads()
    sys.argv[0] = "nnUNetv2_predict"
    sys.exit(predict_entry_point())


if __name__ == "__main__":
    main()
