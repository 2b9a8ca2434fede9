"""Options every generator training command shares: checkpoints, logging, resume, device and threads."""
from __future__ import annotations

import argparse


def add_run_options(group: argparse._ArgumentGroup, eval_what: str) -> None:
    """Add the shared run options to ``group``; ``eval_what`` says what an evaluation of this model writes."""
    group.add_argument("--eval-every", type=int, default=1000, help=f"steps between {eval_what} (default 1000)")
    group.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    group.add_argument("--keep-every", type=int, default=0,
                       help="also keep checkpoint_stepN.pt every N steps (default 0: off)")
    group.add_argument("--log-every", type=int, default=10, help="steps between JSON-lines log records (default 10)")
    group.add_argument("--stop-after", type=int, default=None,
                       help="stop after this step (checkpoint written) without changing the schedule")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")
    group.add_argument("--num-threads", type=int, default=None, help="torch CPU threads per process")
    group.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --output-dir")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
