"""Where PromptLesionTrainer's synthetic samples come from: one interface for every synthesizer.

A synthetic sample passes three places, each answering one question:

    where it goes          :mod:`nnunet_promptlesion.placement` (the ``Placer``: carrier case and centre from the
                           carrier index, lesion mask inside the allowed region, carrier crops, the label)
    how it looks           the sources (this module's :class:`SampleSource` and its implementations)
    how it enters a batch  :mod:`nnunet_promptlesion.trainers.mixing_loader` (class sampling, synthetic slots,
                           nnU-Net's transforms)

It is born in one direction, driven by the loader
(:meth:`PromptLesionDataLoader.synthesize <nnunet_promptlesion.trainers.mixing_loader.PromptLesionDataLoader.synthesize>`,
inside nnU-Net's forked loader workers); the source never calls the loader::

    loader: class drawn                    (class probabilities)
    placer: fresh Placement                -> source.submit(placement, rng)   only if source.wants_placement(class)
    source.pick(class, rng)                -> a lesion the source rendered ahead of time, or None
    placer: Placement (+ carrier crops)    around the picked lesion, or a fresh one (healthy carrier patch cut
                                           around a parent-structure voxel, lesion mask drawn inside the parent)
    source.render(placement, data, seg)    -> the carrier crop with the lesion painted in, or None
    placer: label written                  (``write_label``: under the mask, never over another label or -1)

A :class:`Placement` holds everything needed to rebuild the carrier and the mask later (case, crop box, lesion
box, compact mask, seed) and, for a picked lesion, the lesion itself (``rendered``). The rule-based source paints
fresh placements in the worker; the diffusion sources render batched on a GPU elsewhere (a cache built ahead of
time, or a producer process fed with submitted placements) and paste what they picked: never a model in a
forked worker.

``None`` from ``render`` (or no placement) makes the loader retry (``draw_tries`` times) and then fill the slot
with a real sample, counted in the per-epoch log.

Lifetime (owned by the trainer): the source is built in the main process by :func:`build_source`
before the worker processes fork, gets :meth:`SampleSource.attach` once the loader exists (start a
producer here; a producer's start-up places its warm-up requests with the context's ``placer``),
reports :meth:`SampleSource.worker_stats` from inside the workers (summed per epoch
by the trainer through the batches) and :meth:`SampleSource.epoch_stats` from the main process, and
gets :meth:`SampleSource.close` when training ends, also after an exception.

Adding a source (e.g. ``"diffusion_cache"``)::

    from nnunet_promptlesion.synthesis.sources import register_source

    class MySource(SampleSource):        # implement render(); pick/wants_placement/submit to render ahead
        ...

    def _build(ctx: SourceContext) -> SampleSource: ...
    register_source("diffusion_cache", _build, settings={"cache": None})

and add the defining module to :data:`BUILTIN_SOURCE_MODULES` so that settings validation finds it.
``settings`` declares extra keys of ``promptlesion_settings.json`` with their defaults; they are read
back with ``ctx.settings.extra["cache"]``.

Axis order everywhere: nnU-Net's preprocessed grid (after ``transpose_forward``): data (C, X, Y, Z),
seg (1, X, Y, Z), boxes ``[[lo, hi], ...]`` per spatial axis, half-open, in voxels. 2D configurations
use the same pseudo-3D layout with axis 0 of extent 1 (nnU-Net's own loader does the same).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..placement.placement import Placement

#: Modules imported by :func:`load_builtin_sources`; each registers its sources on import.
BUILTIN_SOURCE_MODULES: tuple[str, ...] = (
    "nnunet_promptlesion.synthesis.rule_based",
    "nnunet_promptlesion.synthesis.diffusion_source",
)


@dataclass
class SyntheticSample:
    """One synthetic sample before nnU-Net's transforms.

    data: (C, *patch) float32 carrier with the lesion rendered in; seg: (1, *patch) int16 with the lesion
    label written (see :meth:`~nnunet_promptlesion.placement.placer.Placer.write_label`); placement: where and what.
    """

    data: np.ndarray
    seg: np.ndarray
    placement: Placement

    @property
    def case(self) -> str:
        return self.placement.case

    @property
    def label(self) -> int:
        return self.placement.label

    @property
    def bbox(self) -> list[list[int]]:
        return self.placement.bbox

    @property
    def mask(self) -> np.ndarray:
        return self.placement.mask()


class SynthesisError(RuntimeError):
    """No synthetic sample could be made (e.g. no placement for the class: no parent voxel in the centre region)."""


class SampleSource(ABC):
    """Produces synthetic samples for :class:`~nnunet_promptlesion.trainers.mixing_loader.PromptLesionDataLoader`.

    Built in the main process, used (after fork, or after pickling under the spawn start method) in
    every loader worker. Keep instances cheap to pickle and never hold CUDA state in them.

    Only :meth:`render` is required; every other method has a default that does nothing, so the trainer calls
    them on any source. A source that renders in the background (a producer process) overrides
    :meth:`raise_if_failed`, :meth:`pause` and :attr:`baseline_iterations`.
    """

    name: str = "?"
    #: iterations at the start of training timed with rendering paused (:meth:`pause`), as the trainer's
    #: no-rendering baseline for the logged iteration-time ratio; 0: no baseline (nothing renders in the background)
    baseline_iterations: int = 0

    @abstractmethod
    def render(self, placement: Placement, data: np.ndarray, seg: np.ndarray) -> np.ndarray | None:
        """The carrier crop ``data`` (C, *patch) float32 with the lesion of ``placement`` painted in, or None.

        Runs in a loader worker. ``seg`` (1, *patch) is the carrier's segmentation (read only: the loader writes
        the label). ``data`` belongs to the caller and may be painted in place and returned. Return None (do not
        raise) when this placement cannot be rendered.
        """

    def pick(self, class_idx: int, rng: np.random.Generator):
        """A lesion of class ``class_idx`` this source rendered ahead of time (a ``RenderedLesion`` in a case's
        voxel grid) for the loader to cut a carrier around, or None: the loader places a fresh lesion."""
        return None

    def wants_placement(self, class_idx: int) -> bool:
        """Whether the source takes a fresh placement of ``class_idx`` now (:meth:`submit`): e.g. a producer
        with room in its request queue. Asked before the loader does the placement work."""
        return False

    def placement_options(self, class_idx: int, rng: np.random.Generator) -> dict:
        """Keyword arguments for ``Placer.place`` of a fresh placement submitted to this source: e.g. a requested
        radius range and attribute bins (attribute prompts). Default: none."""
        return {}

    def submit(self, placement: Placement, rng: np.random.Generator) -> None:
        """Take a fresh placement to render ahead of time (it comes back later through :meth:`pick`)."""

    def check(self, index, class_probs: np.ndarray) -> None:
        """Raise a ``PromptLesionConfigError``-like error if classes drawn with p > 0 cannot be made.

        Called once in the main process after the start-up scan, before training starts.
        """

    def attach(self, loader) -> None:
        """Called once in the main process when the loader exists, before workers start."""

    def worker_stats(self) -> dict[str, float]:
        """Counters accumulated in this worker since the last call (the call resets them).

        Summed over batches and workers by the trainer and logged per epoch.
        """
        return {}

    def epoch_stats(self) -> dict[str, Any]:
        """Main-process statistics logged at the end of every epoch (e.g. reuse rate, acceptance)."""
        return {}

    def raise_if_failed(self) -> None:
        """Raise the failure of background rendering, if it failed. Called by the trainer before every training
        step (so a dead producer stops training with its own traceback) and when training fails."""

    def pause(self, paused: bool) -> None:
        """Stop (True) or resume (False) background rendering. The trainer resumes it after the
        :attr:`baseline_iterations` no-rendering baseline; a source that starts paused does so in :meth:`attach`."""

    def close(self) -> None:
        """Release processes, files, GPU memory. Called when training ends, also after an exception."""

    def describe(self) -> str:
        return self.name


@dataclass
class SourceContext:
    """What a source factory may use; filled by the trainer in the main process.

    settings: PromptLesionSettings (``settings.extra`` holds registered extra keys); spec: LesionSpec;
    index: LesionIndex (start-up scan); spacing: mm per voxel of the configuration (nnU-Net axis order;
    2 values for 2D configurations); patch_size / initial_patch_size: voxels; intensity: per-channel
    CTNormalization properties from the plans (``mean``, ``std``, ``percentile_00_5``, ``percentile_99_5``
    in HU); trainer: the nnU-Net trainer (plans, configuration, fold, device, output folders); log: a
    ``print``-like function writing to the training log; placer: the
    :class:`~nnunet_promptlesion.placement.placer.Placer` the loader places with (a source that renders ahead
    of time places its warm-up requests with it).
    """

    settings: Any
    spec: Any
    index: Any
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    initial_patch_size: tuple[int, ...]
    intensity: list[dict]
    trainer: Any = None
    log: Callable[[str], None] = print
    placer: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class _Registration:
    factory: Callable[[SourceContext], SampleSource]
    settings: dict


_REGISTRY: dict[str, _Registration] = {}
_builtins_loaded = False


def register_source(name: str, factory: Callable[[SourceContext], SampleSource], settings: dict | None = None) -> None:
    """Make ``"synthesizer": name`` available; ``settings``: extra settings keys and their defaults."""
    _REGISTRY[name] = _Registration(factory, dict(settings or {}))


def load_builtin_sources() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in BUILTIN_SOURCE_MODULES:
            importlib.import_module(mod)


def available_sources() -> list[str]:
    load_builtin_sources()
    return sorted(_REGISTRY)


def registered_settings() -> dict[str, tuple[str, Any]]:
    """Extra settings keys of all registered sources: key -> (source name, default)."""
    load_builtin_sources()
    return {k: (name, v) for name, reg in _REGISTRY.items() for k, v in reg.settings.items()}


def build_source(name: str, ctx: SourceContext) -> SampleSource:
    load_builtin_sources()
    if name not in _REGISTRY:
        raise KeyError(f"unknown synthesizer '{name}' (available: {available_sources()})")
    return _REGISTRY[name].factory(ctx)
