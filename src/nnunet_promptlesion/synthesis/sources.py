"""Where PromptLesionTrainer's synthetic samples come from: one interface for every synthesizer.

A synthetic sample is born in one direction, driven by the loader
(:meth:`PromptLesionDataLoader.synthesize <nnunet_promptlesion.trainers.mixing_loader.PromptLesionDataLoader.synthesize>`,
inside nnU-Net's forked loader workers); the source never calls the loader::

    loader: class drawn                    (class probabilities)
    loader: fresh Placement                -> source.submit(placement, rng)   only if source.wants_placement(class)
    source.pick(class, rng)                -> a lesion the source rendered ahead of time, or None
    loader: Placement (+ carrier crops)    around the picked lesion, or a fresh one (healthy carrier patch cut
                                           around a parent-structure voxel, lesion mask drawn inside the parent)
    source.render(placement, data, seg)    -> the carrier crop with the lesion painted in, or None
    loader: label written                  (``write_label``: under the mask, never over another label or -1)

A :class:`Placement` holds everything needed to rebuild the carrier and the mask later (case, crop box, lesion
box, compact mask, seed) and, for a picked lesion, the lesion itself (``rendered``). The rule-based source paints
fresh placements in the worker; the diffusion sources render batched on a GPU elsewhere (a cache built ahead of
time, or a producer process fed with submitted placements) and paste what they picked: never a model in a
forked worker.

``None`` from ``render`` (or no placement) makes the loader retry (``draw_tries`` times) and then fill the slot
with a real sample, counted in the per-epoch log.

Lifetime (owned by the trainer): the source is built in the main process by :func:`build_source`
before the worker processes fork, gets :meth:`SampleSource.attach` once the loader exists (start a
producer here; a producer's start-up may ask the loader for placements with ``loader.offer_placement``),
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

#: Modules imported by :func:`load_builtin_sources`; each registers its sources on import.
BUILTIN_SOURCE_MODULES: tuple[str, ...] = (
    "nnunet_promptlesion.synthesis.rule_based",
    "nnunet_promptlesion.synthesis.diffusion_source",
)

Box = tuple[tuple[int, int], ...]


@dataclass
class Placement:
    """Where a synthetic lesion goes; enough to rebuild carrier and mask from the preprocessed case.

    case: carrier case identifier (nnU-Net preprocessed dataset).
    bbox: crop of the (initial, pre-augmentation) patch in the case's voxel grid, ``[[lo, hi], ...]``
        per spatial axis (a list of lists, as acvl_utils' ``crop_and_pad_nd`` wants it; may extend past the
        volume: the crop is padded, data 0, seg -1).
    class_idx: index into the lesion spec's ``lesions``; label: the label value written into the seg.
    lesion_box: tight box of the lesion inside the patch (patch voxel coordinates).
    lesion_mask: bool, shape of ``lesion_box``: the lesion voxels (already inside the allowed region:
        the parent, plus background when the class may leave its parent; never another label or padding).
    centre: the lesion centre voxel in patch coordinates.
    seed: a seed for rendering (diffusion noise, texture) so a placement renders reproducibly.
    rendered: the lesion already rendered into the case (a ``RenderedLesion`` from a cache or a producer) that
        this placement was cut around, or None for a fresh placement.
    """

    case: str
    bbox: list[list[int]]
    class_idx: int
    label: int
    lesion_box: Box
    lesion_mask: np.ndarray
    centre: tuple[int, ...]
    seed: int
    rendered: Any = None

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return tuple(int(hi - lo) for lo, hi in self.bbox)

    @property
    def lesion_slices(self) -> tuple[slice, ...]:
        """Slices of the lesion box in patch coordinates."""
        return tuple(slice(lo, hi) for lo, hi in self.lesion_box)

    def mask(self) -> np.ndarray:
        """The lesion mask as a bool array of the patch shape."""
        out = np.zeros(self.patch_shape, dtype=bool)
        out[self.lesion_slices] = self.lesion_mask
        return out

    def lesion_box_in_case(self) -> Box:
        """The lesion box in the case's voxel grid."""
        return tuple((int(b[0] + lo), int(b[0] + hi)) for b, (lo, hi) in zip(self.bbox, self.lesion_box))

    @classmethod
    def from_mask(cls, case: str, bbox, class_idx: int, label: int, mask: np.ndarray, centre, seed: int,
                  rendered: Any = None) -> "Placement":
        """Build from a patch-shaped bool mask (must hold at least one voxel)."""
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0) + 1
        box = tuple((int(a), int(b)) for a, b in zip(lo, hi))
        return cls(case=case, bbox=[[int(a), int(b)] for a, b in bbox], class_idx=int(class_idx),
                   label=int(label), lesion_box=box,
                   lesion_mask=np.ascontiguousarray(mask[tuple(slice(a, b) for a, b in box)]),
                   centre=tuple(int(c) for c in centre), seed=int(seed), rendered=rendered)


@dataclass
class SyntheticSample:
    """One synthetic sample before nnU-Net's transforms.

    data: (C, *patch) float32 carrier with the lesion rendered in; seg: (1, *patch) int16 with the lesion
    label written (see ``PromptLesionDataLoader.write_label``); placement: where and what.
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
    ``print``-like function writing to the training log.
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
