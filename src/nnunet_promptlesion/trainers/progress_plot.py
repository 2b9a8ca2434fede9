"""nnU-Net's progress plot drawn at most as often as it is cheap against the epochs it reports.

nnU-Net redraws ``progress.png`` after every epoch: a 30 x 54 inch figure (3000 x 5400 pixels), about 1.5 CPU-s
on one core of a 2-core machine. Next to a GPU epoch of minutes that is nothing; next to the few-second epochs
of a CPU smoke run, a tiny-budget experiment or the test suite it is the largest cost of an epoch (measured: a
2-D demo epoch of one iteration 0.2 s, its plot 1.4 s). :class:`ThrottledProgressPlotMixin` skips a redraw while
less than ``cost / progress_plot_max_share`` seconds have passed since the last one ended, and draws once more
at the end of training, so the final ``progress.png`` holds every epoch. With epochs longer than that interval
(15 s at the default share 0.1) every epoch is drawn, exactly as in nnU-Net.
"""
from __future__ import annotations

import time
from typing import Callable


class ProgressPlotThrottle:
    """Wraps a ``plot(output_folder)`` callable; calls it when due, remembers a skipped call for :meth:`flush`.

    Due: the first call, and any call at least ``cost / max_share`` seconds (wall clock) after the previous
    drawing ended, ``cost`` being that drawing's duration. ``max_share=None`` draws on every call."""

    def __init__(self, plot: Callable[[str], None], max_share: float | None = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        if max_share is not None and not 0 < max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1] or None, got {max_share!r}")
        self._plot, self.max_share, self._clock = plot, max_share, clock
        #: seconds the last drawing took; calls so far, and how many of them were skipped
        self.cost = 0.0
        self.calls = self.skipped = 0
        self._last_end: float | None = None
        self._pending: str | None = None

    def __call__(self, output_folder: str) -> None:
        self.calls += 1
        if (self.max_share is not None and self._last_end is not None
                and self._clock() - self._last_end < self.cost / self.max_share):
            self._pending = output_folder
            self.skipped += 1
            return
        self._draw(output_folder)

    def flush(self) -> None:
        """Draw the last skipped call's plot now, if there is one."""
        if self._pending is not None:
            self._draw(self._pending)

    def _draw(self, output_folder: str) -> None:
        t0 = self._clock()
        self._plot(output_folder)
        self._last_end = self._clock()
        self.cost = self._last_end - t0
        self._pending = None


class ThrottledProgressPlotMixin:
    """Put before the nnU-Net trainer class: ``class MyTrainer(ThrottledProgressPlotMixin, nnUNetTrainer)``.

    Set ``progress_plot_max_share = None`` in a subclass to draw after every epoch as nnU-Net does."""

    #: the most of a training's wall time its progress plots may take (see the module docstring)
    progress_plot_max_share: float | None = 0.1

    def on_train_start(self):
        super().on_train_start()
        # nnU-Net's on_epoch_end calls self.logger.plot_progress_png(folder): the instance attribute shadows the
        # logger's method for this trainer only; logging, checkpoints and --c go to the logger as before. (Not in
        # __init__: nnU-Net records its __init__ arguments by name, so a mixin cannot take *args there.)
        if not isinstance(self.logger.plot_progress_png, ProgressPlotThrottle):
            self.logger.plot_progress_png = ProgressPlotThrottle(self.logger.plot_progress_png,
                                                                 self.progress_plot_max_share)

    def on_train_end(self):
        super().on_train_end()
        plot = self.logger.plot_progress_png
        if self.local_rank == 0 and isinstance(plot, ProgressPlotThrottle):
            plot.flush()
            if plot.skipped:
                self.print_to_log_file(f"progress.png: {plot.skipped} of {plot.calls} epoch "
                                       f"redraws skipped (each took {plot.cost:.1f} s; see "
                                       "nnunet_promptlesion.trainers.progress_plot), redrawn at the end")


__all__ = ["ProgressPlotThrottle", "ThrottledProgressPlotMixin"]
