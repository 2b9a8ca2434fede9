"""Diffusion lesions as PromptLesionTrainer sample sources: ``diffusion_cache`` and ``diffusion_online``.

``"synthesizer": "diffusion_cache"``, ``"cache": FOLDER``
    Samples from a cache built by ``promptlesion_build_cache`` for this dataset/plans/configuration/fold (the
    fingerprint is checked at start-up). The cache is loaded once in the trainer process before nnU-Net forks
    its workers; a worker draws a cached lesion of the drawn class, crops the carrier patch around it from the
    preprocessed case (the lesion centre at a random position inside the patch's central region, as for
    rule-based lesions) and pastes the stored voxels: everything outside the blend support is the case's own.

``"synthesizer": "diffusion_online"``, ``"diffusion": CHECKPOINT``
    A producer process (spawned) owns the generator on ``"synthesis_device"`` (default: the training device)
    and keeps a shared-memory ring of freshly rendered lesions (:mod:`.online_producer`). Each
    draw in a worker submits one fresh placement of the placer (healthy carrier, mask inside the parent) as a
    request without waiting and picks a ready ring sample of the drawn class, which the placer cuts a carrier
    around. Start-up places requests with the same placer (the context's ``placer``) and waits (at most
    ``"online_warmup_s"``) until every drawn class has a sample and refuses to train if one has none: there is
    no silent fallback to rule-based lesions. A producer that reports an error or dies stops training (the
    trainer checks it every iteration) with the producer's traceback. Under DDP only ranks with synthetic slots
    start a producer, each on its own training device (a "cuda..." ``"synthesis_device"`` means the rank's
    device). ``"producer_duty_cycle"`` bounds the producer's share of the GPU (see :mod:`.online_producer`);
    ``"baseline_iterations"`` iterations at the start run with rendering paused, and the trainer logs every
    epoch's iteration time as a ratio to them.

Both sources render into every channel only for single-channel CT; a multi-channel dataset is refused.

2D configurations (e.g. the demo's ``2d_demo``) take 2D generators: lesions are placed by the 2D placer (a mask in
one (y, x) slice) and rendered in plane on that slice of the preprocessed case, exactly where the 2D trainer's
patch lies. A generator of the other dimensionality is refused at start-up, naming both. ``"sampler"`` is one of
``ddpm``, ``ddim``, ``dpmpp``, ``unipc`` (``generator.diffusion.sampler_defaults``); ``"steps"`` counts model
evaluations (ddpm ignores it and runs all T steps).

Attribute prompts (a checkpoint trained with ``--attributes``): ``"attribute_mix"`` in the settings (else the lesion
spec's per-class ``attribute_mix``) requests bins per class. ``diffusion_online`` draws each fresh lesion's bins from
it, the placer draws its mask in the requested radius bin, and the producer renders it with those bins; a mix the
checkpoint cannot honour (no attributes, another bin count, an unknown class) is refused at start-up.
``diffusion_cache`` refuses a cache built with another mix than the settings name (``promptlesion_build_cache`` reads
the settings' mix).

Both take the optional DiffAug-style quality filter (``"quality_model"``, ``"quality_fold"``,
``"quality_min_iou"``): the online producer applies it to every rendered lesion; a cache must have been built
with the same filter (``--quality-model``), else start-up refuses it.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..generator.diffusion.config import PromptVocabulary
from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from ..lesions.blending import blend_margin
from ..placement.placement import Placement
from ..utils.errors import PromptLesionConfigError
from ..utils.lifetime import raise_if_terminated, spawn_without_main
from .cache import CacheError, LesionCache, run_fingerprint
from ..lesions.attributes import AttributeBins
from .diffusion_render import AttributeRequests, LesionRequest
from .online_producer import COUNTERS, ProducerConfig, ProducerDeadError, RingSpec, SharedRing, producer_main
from .sources import SampleSource, SourceContext, register_source
from .space import GridSpec, SpaceMapping, SpaceMismatchError, prompt_ids_for

# The cache, the space mapping, the producer, blending and checkpoint loading are imported where they are used:
# settings validation imports this module for its settings keys, and they would add ~2.7 s (torch) and ~0.35 s
# (scipy.ndimage) to that (measured).

QUALITY_SETTINGS = {"quality_model": None, "quality_fold": "0", "quality_min_iou": 0.7}
CACHE_SETTINGS = {"cache": None, **QUALITY_SETTINGS}
ONLINE_SETTINGS = {"diffusion": None, "vqgan": None, "synthesis_device": None, "sampler": DEFAULT_SAMPLER,
                   "steps": DEFAULT_STEPS,
                   "guidance": 1.0, "online_batch": 8, "ring_slots_per_class": 16, "online_warmup_s": 300.0,
                   "producer_threads": 1, "producer_duty_cycle": 0.2, "ring_lock_timeout_s": 60.0,
                   "baseline_iterations": 10, **QUALITY_SETTINGS}


def _config_error(msg: str) -> Exception:
    return PromptLesionConfigError(msg)


def _quality_cfg(extra: dict) -> dict | None:
    if not extra.get("quality_model"):
        return None
    return {"model": str(Path(extra["quality_model"]).resolve()), "fold": str(extra.get("quality_fold", "0")),
            "min_iou": float(extra.get("quality_min_iou", 0.7))}


def _paste_rendered(placement: Placement, data: np.ndarray) -> np.ndarray | None:
    """Render = paste the lesion the loader placed the carrier around (shared by both sources), in place."""
    if placement.rendered is None:
        return None  # a fresh placement: these sources only serve lesions they rendered ahead of time
    placement.rendered.paste(data, [b[0] for b in placement.bbox])
    return data


def _check_dims(ctx: SourceContext, name: str, spatial_dims: int, what: str) -> None:
    """Refuse a generator (or a cache of one) whose dimensionality is not the configuration's, naming both."""
    dims = len(ctx.patch_size)
    conf = getattr(ctx.trainer, "configuration_name", "?")
    if int(spatial_dims) != dims:
        raise _config_error(
            f"'{name}': {what} is {spatial_dims}D (trained on {'2D slices' if spatial_dims == 2 else '3D patches'}), "
            f"but configuration '{conf}' is {dims}D (patch size {list(ctx.patch_size)}). Train the generators on "
            f"this configuration (promptlesion_pretrain -c {conf}) or train a {spatial_dims}D configuration.")


def _check_channels(ctx: SourceContext, name: str) -> None:
    if len(ctx.intensity) > 1:
        # the generators are single-channel CT models: pasting into channel 0 only would leave the other channels
        # lesion-free under a lesion label
        raise _config_error(f"'{name}' renders single-channel CT, but this dataset has {len(ctx.intensity)} input "
                            "channels. Use the rule_based synthesizer (it paints every channel) or a one-channel "
                            "dataset.")


def _run_fingerprint(ctx: SourceContext) -> dict:
    t = ctx.trainer
    tr, _ = t.do_split()
    return run_fingerprint(t.plans_manager.plans, t.configuration_name, t.fold, tr, t.plans_manager.dataset_name,
                           data_folder=t.preprocessed_dataset_folder, labels=t.dataset_json.get("labels"),
                           lesion_spec=ctx.spec.to_dict())


# ---------------------------------------------------------------------------------------------- cache
class DiffusionCacheSource(SampleSource):
    name = "diffusion_cache"

    def __init__(self, ctx: SourceContext):
        _check_channels(ctx, self.name)
        folder = ctx.settings.extra.get("cache")
        if not folder:
            raise _config_error("'synthesizer': 'diffusion_cache' needs \"cache\": \"<folder>\" in "
                                "promptlesion_settings.json (the folder promptlesion_build_cache printed)")
        try:
            self.cache = LesionCache(folder)
            self.cache.check_run(_run_fingerprint(ctx))
        except CacheError as e:
            raise _config_error(str(e)) from e
        gen_patch = self.cache.manifest.get("generator", {}).get("patch_size") or [0, 0, 0]
        _check_dims(ctx, self.name, len(gen_patch), f"cache {folder} (generator patch {list(gen_patch)})")
        want_q = _quality_cfg(ctx.settings.extra)
        have_q = self.cache.manifest.get("build", {}).get("quality")
        if want_q is not None and (have_q is None or have_q["model"] != want_q["model"] or str(have_q["fold"]) != want_q["fold"]
                                   or float(have_q["min_iou"]) > want_q["min_iou"] + 1e-9):
            raise _config_error(f"the settings ask for the quality filter {want_q}, but cache {folder} was built with "
                                f"{have_q}. Rebuild it with promptlesion_build_cache --quality-model ... (the filter "
                                "runs when the cache is built).")
        want_mix = ctx.settings.attribute_mix
        have_mix = self.cache.manifest.get("build", {}).get("attribute_mix") or {}
        if want_mix:
            try:
                want_mix = ctx.spec.normalise_mix(want_mix, "attribute_mix")
            except ValueError as e:
                raise _config_error(str(e)) from e
            if json.dumps(want_mix, sort_keys=True) != json.dumps(have_mix, sort_keys=True):
                raise _config_error(f"the settings ask for the attribute mix {json.dumps(want_mix)}, but cache {folder} "
                                    f"was built with {json.dumps(have_mix) if have_mix else 'none'}. Rebuild it with "
                                    "promptlesion_build_cache (it reads the settings' attribute_mix).")
        self.spec = ctx.spec
        self._draws: dict[str, int] = {}
        ctx.log(f"PromptLesion: diffusion cache {folder}: {json.dumps(self.cache.manifest.get('counts'))} samples per "
                f"class label, {self.cache.nbytes() / 2**20:.1f} MiB, generator "
                f"{self.cache.manifest['generator'].get('diffusion_checkpoint_id')}")

    def check(self, index, class_probs: np.ndarray) -> None:
        missing = [l.name for l, p in zip(self.spec.lesions, class_probs) if p > 0 and self.cache.count(l.label) == 0]
        if missing:
            raise _config_error(f"lesion cache {self.cache.folder} holds no sample of {missing}, which this run draws. "
                                "Rebuild it including these classes or give them weight 0 in 'class_weights'.")

    def pick(self, class_idx: int, rng: np.random.Generator):
        label = self.spec.lesions[class_idx].label
        n = self.cache.count(label)
        if not n:
            return None
        k = int(rng.integers(n))
        self._draws["draws"] = self._draws.get("draws", 0) + 1
        return self.cache.get(label, k)

    def render(self, placement: Placement, data: np.ndarray, seg: np.ndarray) -> np.ndarray | None:
        return _paste_rendered(placement, data)

    def worker_stats(self) -> dict[str, float]:
        out, self._draws = self._draws, {}
        return out

    def epoch_stats(self) -> dict[str, Any]:
        return {"cache": str(self.cache.folder), "samples_per_label": self.cache.manifest.get("counts")}

    def describe(self) -> str:
        return f"diffusion_cache ({self.cache.folder})"


# ---------------------------------------------------------------------------------------------- online
class DiffusionOnlineSource(SampleSource):
    name = "diffusion_online"

    def __init__(self, ctx: SourceContext):
        _check_channels(ctx, self.name)
        ex = ctx.settings.extra
        try:
            check_sampler(str(ex["sampler"]), ex["steps"])
        except ValueError as e:
            raise _config_error(f"'{self.name}': {e}") from e
        if not ex.get("diffusion"):
            raise _config_error("'synthesizer': 'diffusion_online' needs \"diffusion\": \"<checkpoint_final.pt>\" in "
                                "promptlesion_settings.json (promptlesion_train_diffusion / promptlesion_pretrain output)")
        if not Path(ex["diffusion"]).is_file():
            raise _config_error(f"diffusion checkpoint {ex['diffusion']} does not exist")
        t = ctx.trainer
        self.spec = ctx.spec
        self.log = ctx.log
        self.placer = ctx.placer  # places the warm-up's requests (attach), as the loader places later ones
        # The generator geometry decides the ring's slot size: read it from the checkpoint's metadata only.
        # (deferred: torch, ~1 s CPU at import; settings validation imports this module to register its settings)
        from ..utils.checkpoint import load_checkpoint

        meta = load_checkpoint(ex["diffusion"], map_location="cpu", kind="promptlesion_diffusion")["meta"]
        _check_dims(ctx, self.name, int(meta.get("spatial_dims", 3)), f"diffusion model {ex['diffusion']}")
        bins = AttributeBins.from_dict(meta["attribute_bins"]) if meta.get("attribute_bins") else None
        mix = ctx.settings.attribute_mix if ctx.settings.attribute_mix is not None else ctx.spec.attribute_mix()
        try:
            self.attribute_requests = AttributeRequests(ctx.spec, bins, mix, "attribute_mix", ex["diffusion"])
        except ValueError as e:
            raise _config_error(str(e)) from e
        if ex.get("quality_model") and len(ctx.patch_size) == 2:
            raise _config_error("the quality filter (quality_model) runs on 3D crops; it is not available for 2D "
                                "configurations yet: drop quality_model")
        plans = t.plans_manager.plans
        try:
            mapping = SpaceMapping(GridSpec.from_nnunet(plans, t.configuration_name), GridSpec.from_generator_meta(meta),
                                   meta["patch_size"])
        except SpaceMismatchError as e:
            raise _config_error(str(e)) from e
        margin = blend_margin(max(ctx.settings.blend_sigma_voxels))
        max_vox = int(np.prod(mapping.footprint() + 2 * margin + 2))
        device = ex.get("synthesis_device") or str(t.device)
        if getattr(t, "is_ddp", False) and device.startswith("cuda") and device != str(t.device):
            # one producer per rendering rank, on that rank's own GPU: "cuda:0" in a settings file shared by all
            # ranks must not stack every rank's generator on GPU 0
            ctx.log(f"PromptLesion: synthesis_device {device!r} under DDP: the producer of rank {t.local_rank} "
                    f"runs on this rank's device {t.device}")
            device = str(t.device)
        tr, _ = t.do_split()
        self.train_ids = sorted(tr)
        self.labels = [l.label for l in ctx.spec.lesions]
        self._ctx = mp.get_context("spawn")
        self.lock = self._ctx.Lock()
        self.lock_timeout_s = float(ex["ring_lock_timeout_s"])
        self.ring_spec = RingSpec(name=f"pl_ring_{os.getpid()}_{uuid.uuid4().hex[:8]}", labels=self.labels,
                                  slots_per_class=int(ex["ring_slots_per_class"]), max_voxels=max_vox)
        self.ring = None
        try:
            self.ring = SharedRing(self.ring_spec, self.lock, create=True, cases=self.train_ids,
                                   lock_timeout_s=self.lock_timeout_s)
        except ValueError as e:  # /dev/shm too small: refused before anything is written into it
            raise _config_error(str(e)) from e
        self.baseline_iterations = int(ex["baseline_iterations"])
        self.requests = self._ctx.Queue(maxsize=max(4 * int(ex["online_batch"]), 8))
        self.status = self._ctx.Queue()
        self.cfg = ProducerConfig(diffusion=str(Path(ex["diffusion"]).resolve()),
                                  vqgan=str(Path(ex["vqgan"]).resolve()) if ex.get("vqgan") else None, device=device,
                                  sampler=str(ex["sampler"]), steps=int(ex["steps"]), guidance=float(ex["guidance"]),
                                  batch=int(ex["online_batch"]), plans=plans, configuration=t.configuration_name,
                                  data_folder=str(t.preprocessed_dataset_folder), train_ids=self.train_ids,
                                  spec=ctx.spec.to_dict(), parent_pid=os.getpid(),
                                  num_threads=int(ex["producer_threads"]), quality=_quality_cfg(ex),
                                  duty_cycle=float(ex["producer_duty_cycle"]), lock_timeout_s=self.lock_timeout_s)
        if not 0.0 < self.cfg.duty_cycle <= 1.0:
            raise _config_error(f"producer_duty_cycle must lie in (0, 1], got {self.cfg.duty_cycle}")
        self.warmup_s = float(ex["online_warmup_s"])
        self.sigma_range = tuple(float(v) for v in ctx.settings.blend_sigma_voxels)
        self.process = None
        self.producer_error: str | None = None
        self.identity: dict | None = None
        self._owner_pid = os.getpid()
        self._local: dict[str, float] = {}
        self._class_probs = None
        self._epoch_t = time.time()
        self.log(f"PromptLesion: online diffusion on {device}: ring {self.ring_spec.n_slots} slots "
                 f"({self.ring_spec.slots_per_class} per class, {max_vox} voxels each, "
                 f"{self.ring_spec.layout()['_size'][0] / 2**20:.1f} MiB shared), mapping {json.dumps(mapping.describe())}")

    # -------------------------------------------------------------- lifetime (main process)
    def check(self, index, class_probs: np.ndarray) -> None:
        from ..utils.checkpoint import load_checkpoint  # deferred: torch, see __init__

        self._class_probs = np.asarray(class_probs, float)
        meta = load_checkpoint(self.cfg.diffusion, map_location="cpu", kind="promptlesion_diffusion")["meta"]
        drawn = [l.label for l, p in zip(self.spec.lesions, class_probs) if p > 0]
        try:
            prompt_ids_for(self.spec, PromptVocabulary.from_dict(meta["vocabulary"]), drawn)
        except SpaceMismatchError as e:
            raise _config_error(str(e)) from e

    def attach(self, loader) -> None:
        """Start the producer and warm the ring up with placements of the context's placer (``loader`` unused: a
        source never calls the loader)."""
        if self.placer is None:
            raise ValueError("diffusion_online places its warm-up requests with the training placer: the source "
                             "context must carry it ('placer')")

        self.process = self._ctx.Process(target=producer_main, name="promptlesion-producer", daemon=True,
                                         args=(self.cfg, self.ring_spec, self.lock, self.requests, self.status))
        with spawn_without_main():  # the producer needs torch and the generator, not nnUNetv2_train's imports
            self.process.start()
        self.log(f"PromptLesion: producer pid {self.process.pid} loading the generator")
        t0 = time.time()
        while True:
            msg = self._poll_status(timeout=1.0)
            if msg == "ready":
                break
            if self.producer_error:
                self.close()
                raise _config_error(f"the diffusion producer failed to start: {self.producer_error}")
            if not self.process.is_alive():
                self.close()
                raise _config_error("the diffusion producer exited during start-up (see above)")
            if time.time() - t0 > max(self.warmup_s, 60.0):
                self.close()
                raise _config_error("the diffusion producer did not start within the warm-up time")
        # warm-up: requests for every drawn class, then wait (bounded) until each has a ready sample
        rng = np.random.default_rng(12345)
        drawn = [i for i, p in enumerate(self._class_probs if self._class_probs is not None else
                                         np.ones(len(self.spec.lesions))) if p > 0]
        deadline = time.time() + self.warmup_s
        while time.time() < deadline:
            missing = [i for i in drawn if self.ring.ready(self.spec.lesions[i].label) == 0]
            if not missing:
                break
            for i in missing:
                if self.wants_placement(i):
                    placed = self.placer.place(i, rng, **self.placement_options(i, rng))
                    if placed is not None:
                        self.submit(placed[0], rng)
            self._poll_status(timeout=0.5)
            self.raise_if_failed()
            raise_if_terminated()
        ready = {l.name: self.ring.ready(l.label) for l in self.spec.lesions}
        empty = [self.spec.lesions[i].name for i in drawn if self.ring.ready(self.spec.lesions[i].label) == 0]
        if empty:
            raise _config_error(
                f"the diffusion producer rendered no sample of {empty} within online_warmup_s = {self.warmup_s:.0f} s "
                f"(ring {ready}). This run draws these classes and would train on no diffusion lesion of them: raise "
                "\"online_warmup_s\", check that their parents exist in the training cases, or give them weight 0 "
                "in 'class_weights'.")
        self.log(f"PromptLesion: producer ready ({json.dumps(self.identity)}); ring after warm-up {ready} "
                 f"in {time.time() - t0:.1f} s")
        self.ring.snapshot_and_reset()  # warm-up does not count towards epoch 1
        # nor do the warm-up's placements (made here, in the main process): counters left in this process would
        # be inherited by every forked worker and reported once per worker in epoch 1
        self.worker_stats()
        self.placer.take_stats()
        if self.baseline_iterations > 0:
            self.pause(True)  # rendering paused while the trainer times its baseline iterations

    def pause(self, paused: bool) -> None:
        """Pause (True) or resume rendering; the ring keeps serving what it holds."""
        if self.ring is not None:
            self.ring.set_flag("pause", 1 if paused else 0)

    def raise_if_failed(self) -> None:
        """Raise ProducerDeadError with the producer's traceback if it reported an error or is no longer alive.

        Called by the trainer at every iteration (a non-blocking queue poll and a waitpid): a failed producer
        stops training at once instead of leaving a stale ring to be reused for the rest of the run."""
        if os.getpid() != self._owner_pid:
            return
        while self._poll_status(timeout=0.0) is not None:
            pass
        pid = self.process.pid if self.process is not None else None
        if self.producer_error:
            raise ProducerDeadError(f"the diffusion producer (pid {pid}) failed; its traceback:\n{self.producer_error}")
        if self.process is not None and not self.process.is_alive():
            code = self.process.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            raise ProducerDeadError(
                f"the diffusion producer (pid {pid}) {how} without reporting an error (SIGKILL, the OOM killer?). "
                "Training stops rather than reuse its last samples for the rest of the run; fix the cause and "
                "resume with nnUNetv2_train ... --c.")

    def _poll_status(self, timeout: float) -> str | None:
        try:
            kind, payload = self.status.get(timeout=timeout)
        except queue_mod.Empty:
            return None
        except (EOFError, OSError):
            return None
        if kind == "ready":
            self.identity = payload
        elif kind == "error":
            self.producer_error = payload
            self.log(f"PromptLesion: producer error: {payload}")
        return kind

    def close(self) -> None:
        if os.getpid() != self._owner_pid:
            return
        if self.ring is not None:
            self.ring.set_flag("stop", 1)  # a flag, not an Event: see online_producer's module docstring
        p, self.process = self.process, None
        if p is not None:
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in (self.requests, self.status):
            try:
                q.cancel_join_thread()
                q.close()
            except Exception:  # noqa: BLE001
                pass
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def __getstate__(self):
        # spawned loader workers (rare on Linux) re-attach to the ring by name
        d = dict(self.__dict__)
        d["ring"] = None
        d["process"] = None
        d["log"] = None  # the trainer's logger is a closure over the trainer; workers do not log
        return d

    # -------------------------------------------------------------- workers
    def _attach_ring(self):
        if self.ring is None:
            # requests are best effort: a worker must never wait at exit for its queue feeder, which blocks on a
            # full pipe once the producer is gone
            self.requests.cancel_join_thread()

            self.ring = SharedRing(self.ring_spec, self.lock, create=False, cases=self.train_ids,
                                   lock_timeout_s=self.lock_timeout_s)
        return self.ring

    def wants_placement(self, class_idx: int) -> bool:
        if self.requests.full():
            # the producer is saturated: the loader skips the placement work (a carrier crop and a mask)
            self._local["requests_dropped"] = self._local.get("requests_dropped", 0) + 1
            return False
        return True

    def placement_options(self, class_idx: int, rng: np.random.Generator) -> dict:
        """The requested attribute bins of the next lesion of ``class_idx`` (drawn from the attribute mix) and the
        radius range its mask must have; nothing without a mix (no random numbers drawn)."""
        if not self.attribute_requests.active:
            return {}
        radius, attrs = self.attribute_requests.draw(class_idx, rng)
        return {"radius_range_mm": radius, "attributes": attrs}

    def submit(self, pl: Placement, rng: np.random.Generator) -> None:
        """Queue a fresh placement for the producer (without waiting)."""
        sigma = float(rng.uniform(*self.sigma_range))
        req = LesionRequest.from_placement(pl, sigma)
        try:
            self.requests.put_nowait(req)
            self._local["requests"] = self._local.get("requests", 0) + 1
        except queue_mod.Full:
            self._local["requests_dropped"] = self._local.get("requests_dropped", 0) + 1

    def pick(self, class_idx: int, rng: np.random.Generator):
        ring = self._attach_ring()
        r = ring.take(self.spec.lesions[class_idx].label, rng)
        if r is None:
            # warm-up left >= 1 sample of every drawn class and slots are only ever overwritten: an empty class
            # here is a class warm-up did not cover, never something to paper over with another synthesizer
            raise ProducerDeadError(f"the online ring holds no sample of class "
                                    f"'{self.spec.lesions[class_idx].name}', which this run draws")
        self._local["diffusion"] = self._local.get("diffusion", 0) + 1
        return r

    def render(self, placement: Placement, data: np.ndarray, seg: np.ndarray) -> np.ndarray | None:
        return _paste_rendered(placement, data)

    def worker_stats(self) -> dict[str, float]:
        out, self._local = self._local, {}
        return out

    def epoch_stats(self) -> dict[str, Any]:
        if self.ring is None:
            return {"producer": "closed"}
        self._poll_status(timeout=0.0)
        c, cc, ready = self.ring.snapshot_and_reset()
        d = dict(zip(COUNTERS, c.tolist()))
        draws = max(d["draws"], 1.0)
        now = time.time()
        out = {"producer_alive": bool(self.process is not None and self.process.is_alive()),
               "rendered": int(d["rendered"]), "rendered_per_s": d["rendered"] / max(now - self._epoch_t, 1e-9),
               "draws": int(d["draws"]), "reuse_rate": d["reused_draws"] / draws,
               "mean_age_s": d["age_sum_s"] / draws, "max_age_s": d["age_max_s"],
               "empty_class_draws": int(d["empty_class"]), "did_not_fit": int(d["did_not_fit"]),
               "producer_busy_s": d["producer_busy_s"],
               "ring_ready": {l.name: r for l, r in zip(self.spec.lesions, ready)}}
        if self.cfg.quality:
            out["quality_acceptance"] = {l.name: (cc[i, 2] / cc[i, 1] if cc[i, 1] else None)
                                         for i, l in enumerate(self.spec.lesions)}
        if self.producer_error:
            out["producer_error"] = self.producer_error.splitlines()[0]
        self._epoch_t = now
        return out

    def describe(self) -> str:
        return f"diffusion_online ({self.cfg.diffusion} on {self.cfg.device}, {self.cfg.sampler} {self.cfg.steps})"


register_source("diffusion_cache", DiffusionCacheSource, settings=CACHE_SETTINGS)
register_source("diffusion_online", DiffusionOnlineSource, settings=ONLINE_SETTINGS)
