"""The training loop, readable top to bottom.

``training_step`` is a function of (batch, state): it draws σ_v and σ_a, noises both modalities,
asks the denoiser for both velocities and returns the per-modality losses. ``Trainer`` wraps it
with accumulation, the regularisers (silence / audio DOP for audio-free batches, dop / blank / prior
divergence), clipping, the audio loss balancer, the audio supervision monitor, validation, checkpoints
and metrics; every side effect (console, progress, ComfyUI events, Cancel) goes through ``TrainCallbacks``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.files import save_network
from ..adapters.network import LoRANetwork, build_lora
from ..backends.interface import DenoiserInput, TextContext, video_token_count
from ..backends.text_connectors import ConnectorStack
from ..config import Config, ConfigError
from ..data.batch_sampler import AudioAwareBatchSampler
from ..data.batches import Batch, LatentSample, apply_caption_keep, collate, content_digest, truncate_audio
from ..io_utils import append_jsonl, atomic_write_text, read_jsonl, remove_stale_temporaries
from .batch_draws import BatchDraws, batch_mean, draw_batch
from .conditioning import (
    check_samples,
    condition_inputs,
    lora_metadata,
    trains_audio_only,
)
from .distributed import World, dropout_seed
from .losses import AudioLossBalancer, audio_padding_mask, elementwise_loss, masked_per_sample_loss
from .monitor import AudioSupervisionMonitor
from .optim import build_optimizer, build_scheduler, enter_training, evaluation_weights, optimizer_warnings
from .preservation import Preservation, SilenceLatents, SilenceSource, audio_dop_draws, audio_dop_loss, require_silence
from .representation import DualTimestep, RepresentationAlignment
from .state import find_latest_state, load_state, save_state
from .stopping import StopRequest
from .timesteps import add_noise, velocity_target
from .validation import validation_losses

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_UPDATING = "updating"  # Trainer._step_start while the optimizer applies a step


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite losses); the message says why."""


@dataclass
class StepLosses:
    loss_video: torch.Tensor | None  # scalar, weighted per sample by the dataset weights; None: audio-only mode
    loss_audio: torch.Tensor | None  # real cached audio only
    sigma_video: torch.Tensor  # [B]
    sigma_audio: torch.Tensor | None  # σ of the real audio
    loss_silence: torch.Tensor | None = None  # audio.missing_audio = silence: the silence target's loss (unweighted)
    inputs: DenoiserInput | None = None  # what the denoiser saw (the regularisers reuse it)
    pred_video: torch.Tensor | None = None
    pred_audio: torch.Tensor | None = None


def training_step(batch: Batch, denoiser, config: Config, generator: torch.Generator, device: torch.device, autocast_dtype,
                  *, silence: SilenceLatents | None = None, connectors: ConnectorStack | None = None,
                  dual_timestep: DualTimestep | None = None, draws: BatchDraws | None = None) -> StepLosses:
    """Flow matching on both modalities with their own σ: x_σ = (1-σ)x0 + σε, target ε - x0.

    ``silence``: an audio-free batch gets the encoded silence as its audio target. ``connectors``: the text
    context is computed from the batch's pre-connector features (connector training). ``dual_timestep``:
    Self-Flow's per-token video σ (``representation.py``). The training mode
    (``conditioning``: first frame, IC-LoRA guide, ID-LoRA reference, audio-only stand-in) decides what else the
    model sees and which tokens count in the loss. ``draws``: the batch's random numbers, drawn by the caller (a
    rank's rows of the global batch, whose size divides the losses); default: drawn here from ``generator``."""
    loss_cfg = config.loss
    video = batch.video.to(device, torch.float32)
    real_audio = batch.audio is not None
    if real_audio:
        audio = batch.audio.to(device, torch.float32)
    elif silence is not None:
        audio = silence.for_batch(batch).to(device)
    else:
        audio = None
    if draws is None:
        draws = draw_batch(batch, config, generator, audio_shape=None if audio is None else tuple(audio.shape))
    sigma_video, sigma_audio = draws.sigma_video, draws.sigma_audio
    noise_video = draws.noise_video.to(device)
    video_sigma_in = sigma_video.to(device)
    if dual_timestep is not None:
        noisy_video, video_sigma_in = dual_timestep.noise(video, noise_video, video_sigma_in, generator)
    else:
        noisy_video = add_noise(video, noise_video, video_sigma_in)
    noisy_audio = noise_audio = None
    if audio is not None:
        noise_audio = draws.noise_audio.to(device)
        noisy_audio = add_noise(audio, noise_audio, sigma_audio.to(device))

    dtype = autocast_dtype or torch.float32
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        text = _batch_text(batch, device, dtype, connectors)
    if draws.caption_keep is not None:
        text = apply_caption_keep(text, draws.caption_keep)
    conditioned = condition_inputs(
        batch, config.conditioning.mode, video, noisy_video.to(dtype), video_sigma_in,
        None if noisy_audio is None else noisy_audio.to(dtype), None if sigma_audio is None else sigma_audio.to(device),
        text, draws.first_frame,
    )
    inputs = conditioned.inputs
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred_video, pred_audio = denoiser(inputs)

    loss_video = None
    if conditioned.train_video:
        per_sample_video = masked_per_sample_loss(
            elementwise_loss(pred_video, velocity_target(video, noise_video), loss_cfg.type, loss_cfg.huber_delta),
            conditioned.video_loss_mask,
        )
        loss_video = batch_mean(per_sample_video * batch.video_loss_weight.to(device), draws.total)
    loss_audio = loss_silence = None
    if audio is not None:
        elem = elementwise_loss(pred_audio, velocity_target(audio, noise_audio), loss_cfg.type, loss_cfg.huber_delta)
        if real_audio:
            per_sample_audio = masked_per_sample_loss(elem, audio_padding_mask(audio, batch.audio_valid_frames))
            loss_audio = batch_mean(per_sample_audio * batch.audio_loss_weight.to(device), draws.total)
        else:
            loss_silence = batch_mean(masked_per_sample_loss(elem, None), draws.total)
    return StepLosses(loss_video, loss_audio, sigma_video, sigma_audio if real_audio else None, loss_silence,
                      inputs, pred_video, pred_audio)


def _batch_text(batch: Batch, device: torch.device, dtype: torch.dtype, connectors: ConnectorStack | None) -> TextContext:
    if connectors is None:
        return batch.text.to(device, dtype)
    # Connector training: the contexts come from the cached pre-connector features, with gradients. The
    # features stay fp32 (the connectors' additive mask uses the dtype's largest value).
    return connectors(batch.text_features.to(device, torch.float32))


class TrainCallbacks:
    """Side effects of the loop. Subclass and override what you need; all default to nothing."""

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_step(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_log(self, trainer: "Trainer", line: str) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", lora_path: Path, state_path: Path) -> None: ...

    def on_warning(self, trainer: "Trainer", message: str) -> None: ...

    def on_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...

    def extra_metrics(self, trainer: "Trainer", metrics: dict) -> dict:
        """Values to add to this step's metrics row before it is written (e.g. validation samples)."""
        return {}


class CallbackList(TrainCallbacks):
    """Several callbacks as one: every hook goes to each in order; extra metrics are merged."""

    def __init__(self, *callbacks: TrainCallbacks | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_start(self, trainer):
        for c in self.callbacks:
            c.on_start(trainer)

    def on_step(self, trainer, metrics):
        for c in self.callbacks:
            c.on_step(trainer, metrics)

    def on_log(self, trainer, line):
        for c in self.callbacks:
            c.on_log(trainer, line)

    def on_checkpoint(self, trainer, lora_path, state_path):
        for c in self.callbacks:
            c.on_checkpoint(trainer, lora_path, state_path)

    def on_warning(self, trainer, message):
        for c in self.callbacks:
            c.on_warning(trainer, message)

    def on_end(self, trainer, result):
        for c in self.callbacks:
            c.on_end(trainer, result)

    def extra_metrics(self, trainer, metrics):
        merged: dict = {}
        for c in self.callbacks:
            merged.update(c.extra_metrics(trainer, {**metrics, **merged}))
        return merged


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    lora_path: Path | None
    state_path: Path | None
    final_loss_video: float | None
    final_loss_audio: float | None
    warnings: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    completed: bool = True
    stopped_by: str | None = None  # why the run stopped before until_step (SIGINT, SIGTERM, ComfyUI Cancel, ...)


@dataclass
class _StepTally:
    """What the micro-batches of one optimizer step add up (sums over micro-batches; audio sums only over
    those with real audio)."""

    video: float = 0.0
    video_batches: int = 0  # micro-batches with a video loss (none in the audio-only mode)
    audio: float = 0.0
    weighted_audio: float = 0.0
    sigma_video: float = 0.0
    sigma_audio: float = 0.0
    batches: int = 0
    audio_batches: int = 0
    extras: dict[str, list[float]] = field(default_factory=dict)  # raw regulariser losses, one per micro-batch that had it
    extra_objective: float = 0.0
    regularizer: str | None = None
    ids: list[str] = field(default_factory=list)
    data_time: float = 0.0
    lr: float = 0.0
    lr_groups: dict[str, float] = field(default_factory=dict)


class Trainer:
    """One training run.

    Optional inputs the pipeline provides: ``validation_samples`` (held-out items for the validation loss),
    ``silence_audio_latent`` (the audio VAE's encoding of silence, ``[8, T, 16]`` or ``T -> [8, T, 16]``; needed
    by audio.missing_audio = silence / audio_dop), ``preservation_contexts`` (``{"class": ctx, "blank": ctx}``
    for preservation.dop / blank) and ``text_connectors`` (diffusers' ``LTX2TextConnectors``, for
    network.connectors; the samples then carry ``text_features``). ``stop``: the run stops at the next step
    boundary once it is requested (``stopping.py``; the CLI's signal handlers and ComfyUI's Cancel use it).
    ``world``: this process' rank in a run with several (``distributed.py``; torchrun); only rank 0 writes files
    and calls ``callbacks``."""

    def __init__(self, config: Config, denoiser, samples: list[LatentSample], run_dir: str | Path,
                 callbacks: TrainCallbacks | None = None, *, validation_samples: list[LatentSample] | None = None,
                 silence_audio_latent: SilenceSource | None = None,
                 preservation_contexts: dict[str, TextContext] | None = None, text_connectors=None,
                 stop: StopRequest | None = None, world: World | None = None):
        self.config = config
        self.denoiser = denoiser
        self.run_dir = Path(run_dir)
        self.world = world or World()
        self.callbacks = (callbacks if self.world.is_main else None) or TrainCallbacks()
        self.stop = stop or StopRequest()
        self.stop.agree_with(self.world.stop_reason)
        self.warnings: list[str] = []
        self.device = self.world.device if self.world.distributed else _resolve_device(config.train.device)
        precision = config.train.mixed_precision
        self.autocast_dtype = None if precision == "fp32" else PRECISION_DTYPES[precision]
        # fp16 gradients underflow without loss scaling; the scaler runs on CUDA and on the CPU alike.
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

        audio_cfg = config.audio
        validation_samples = list(validation_samples or [])
        if audio_cfg.bucket_strategy == "truncate":
            samples = [truncate_audio(s, audio_cfg.bucket_interval_seconds) for s in samples]
            validation_samples = [truncate_audio(s, audio_cfg.bucket_interval_seconds) for s in validation_samples]
        self.samples = samples
        self.validation_samples = validation_samples

        self.with_audio = config.dataset.with_audio and any(s.audio is not None for s in samples)
        if config.dataset.with_audio and not self.with_audio:
            self._warn("dataset.with_audio is on but no sample has cached audio: this is a video-only run "
                       "(audio and cross-modal modules are left untouched). Check the cache report.")
        for message in check_samples(config.conditioning.mode, samples + validation_samples,
                                     config.dataset.reference_downscale):
            self._warn(message)
        self.silence = require_silence(config, silence_audio_latent) if self.with_audio else None
        if config.audio.missing_audio != "skip" and not self.with_audio:
            self._warn(f"audio.missing_audio = {config.audio.missing_audio!r} does nothing in a video-only run (no audio "
                       "module is adapted)")
        self.preservation = Preservation(config, preservation_contexts)
        self.connectors = self._connector_stack(text_connectors)
        # A backend whose host manages weight placement (ComfyUI's partial loading) places itself.
        place_on = getattr(denoiser, "place_on", None)
        place_on(self.device) if place_on is not None else denoiser.module.to(self.device)
        self.network: LoRANetwork = build_lora(denoiser, config.network, with_audio=self.with_audio, connectors=self.connectors,
                                               audio_only=trains_audio_only(config.conditioning.mode, samples))
        self.network.to(self.device)
        # CREPA / Self-Flow (inert when both are off): their projectors train in the same optimizer.
        self.representation = RepresentationAlignment(config, denoiser, self.device)
        if self.representation.active and self.world.distributed:
            # Their extra noise draws and feature means are per rank: one process would train something else.
            raise ConfigError("crepa.enabled / self_flow.enabled: not available under torchrun yet (their draws and "
                              "terms are per process); train with one process, or turn them off")
        self.optimizer = build_optimizer(self.network, config.optimizer, config.schedule, self.device,
                                         self.representation.parameter_groups(config.optimizer))
        for message in optimizer_warnings(config.optimizer):
            self._warn(message)
        enter_training(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config.train.steps, config.schedule)
        self.balancer = AudioLossBalancer(config.loss)
        # Every rank draws the same global batches (ranks x batch_size samples) and trains its rows of each.
        self.sampler = AudioAwareBatchSampler(
            samples, self.global_batch_size, config.train.seed, accumulation=config.train.gradient_accumulation,
            batch_probability=audio_cfg.batch_probability, min_audio_per_accum=audio_cfg.min_batches_per_accum,
        )
        if self.sampler.tilted and not self.sampler.has_audio:
            self._warn("audio.batch_probability / audio.min_batches_per_accum are set but no training sample has audio: "
                       "every batch is audio-free")
        self.monitor = AudioSupervisionMonitor(audio_cfg, samples) if config.dataset.with_audio else None
        self.generator = torch.Generator().manual_seed(config.train.seed)
        torch.manual_seed(config.train.seed)  # dropout and anything else on the global RNG
        self.step = 0
        self.consecutive_nonfinite = 0
        self.resumed_from: int | None = None
        self.last_lora: Path | None = None
        self.last_state: Path | None = None
        self._last_losses: tuple[float | None, float | None] = (None, None)
        self._content_digest: str | None = None
        # Inside train_step: what the step changes before its optimizer update, as it was at the step's start
        # (None between steps; UPDATING during the update itself). An exception in the middle of a step then
        # saves the last completed step, never a half step.
        self._step_start: dict | str | None = None

    @property
    def global_batch_size(self) -> int:
        """Samples per micro-batch over all ranks: what one process trains with the same results."""
        return self.config.train.batch_size * self.world.size

    def _connector_stack(self, text_connectors) -> ConnectorStack | None:
        if self.config.network.connectors == "off":
            return None
        if text_connectors is None:
            return None  # build_lora names what is missing
        lacking = [s.id for s in self.samples + self.validation_samples if s.text_features is None]
        if lacking:
            raise ConfigError(
                f"network.connectors = {self.config.network.connectors!r} needs pre-connector text features for every item; "
                f"{len(lacking)} lack them (first: {lacking[0]}). Re-run `cache` with connector training on"
            )
        return ConnectorStack(text_connectors).to(self.device)

    # ---- resume ---------------------------------------------------------------------------------

    def try_resume(self, state_folder: str | Path | None = None) -> int | None:
        """Load the given state folder, or the latest one in the run directory. Returns the step."""
        if self.world.is_main:
            remove_stale_temporaries(self.run_dir / "lora")
        folder = Path(state_folder) if state_folder else find_latest_state(self.run_dir)
        if folder is None:
            return None
        saved = load_state(folder)
        expected = self._resume_fingerprint()
        stored = saved.extra.get("resume_fingerprint") or {}
        if stored != expected:
            differing = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
            if differing == ["batch_size"]:
                raise TrainingError(
                    f"{folder}: this state was trained with a global batch of {stored['batch_size']} samples and this "
                    f"run has {expected['batch_size']} ({self.world.size} rank(s) x train.batch_size "
                    f"{self.config.train.batch_size}): set train.batch_size so that ranks x batch_size = "
                    f"{stored['batch_size']} to continue it (or pass --no-resume to start over)"
                )
            raise TrainingError(
                f"{folder}: this state was saved by a run with a different model, network or dataset (differs: "
                f"{', '.join(differing)}); use a new output.dir, or pass --no-resume to start over in this one"
            )
        missing = set(self.network.state_dict()) ^ set(saved.adapter)
        if missing:
            raise TrainingError(f"{folder}: adapter tensors do not match this network ({sorted(missing)[:3]} ...)")
        self.network.load_state_dict(saved.adapter)
        self.representation.load_state_dict(saved.regularizers, str(folder))
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.extra["scheduler"])
        self.balancer.load_state_dict(saved.extra["balancer"])
        self.sampler.load_state_dict(saved.extra["sampler"])
        if self.monitor is not None and saved.extra.get("monitor") is not None:
            self.monitor.load_state_dict(saved.extra["monitor"])
        enter_training(self.optimizer)
        if self.scaler is not None and saved.extra.get("scaler"):
            self.scaler.load_state_dict(saved.extra["scaler"])
        self.generator.set_state(saved.rng["generator"])
        torch.set_rng_state(saved.rng["torch_cpu"])
        if "torch_cuda" in saved.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved.rng["torch_cuda"])
        self.consecutive_nonfinite = int(saved.extra["consecutive_nonfinite"])
        self.step = saved.step
        self.resumed_from = saved.step
        self.last_state = folder
        self.last_lora = self._lora_path(saved.step)
        if self.world.is_main:
            self._truncate_metrics(saved.step)
            self.last_lora = self._ensure_lora(saved.step)
        return saved.step

    def _ensure_lora(self, step: int) -> Path:
        """The LoRA of a saved step, written now from the loaded state when a kill after the state's write lost
        it (the state is written first; see ``save_checkpoint``)."""
        path = self._lora_path(step)
        if not path.is_file():
            self._export_lora(path)
            self._warn(f"{path.name} was missing (the run was stopped while exporting it): written from the state "
                       f"of step {step}")
        return path

    def _resume_fingerprint(self) -> dict:
        c = self.config
        return {
            "base": self.denoiser.fingerprint(),
            "network": c.network.__dict__,
            # What the run trains on, in order (content, not file names): a repaired or moved cache that holds
            # the same latents resumes; any other data does not.
            "samples": self._samples_digest(),
            # The global batch: a state resumes with any number of ranks that trains the same batches.
            "batch_size": self.global_batch_size,
            "seed": c.train.seed,
            "optimizer": [c.optimizer.name] + [g["name"] for g in self.optimizer.param_groups],
            "sampling": [c.audio.batch_probability, c.audio.min_batches_per_accum, c.train.gradient_accumulation],
            # Only when a training mode is on, so the states of plain runs keep resuming.
            **({"conditioning": c.conditioning.__dict__} if c.conditioning != type(c.conditioning)() else {}),
            **{name: getattr(c, name).__dict__ for name in ("crepa", "self_flow") if getattr(c, name).enabled},
        }

    def _samples_digest(self) -> str:
        if self._content_digest is None:
            self._content_digest = content_digest(self.samples)
        return self._content_digest

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        if path.exists():
            atomic_write_text(path, "".join(_json_line(r) for r in rows))

    # ---- checkpoints ----------------------------------------------------------------------------

    def _step_state(self) -> dict:
        """What one step changes before its optimizer update: the random streams, the data order, the balancer,
        the supervision monitor and the non-finite counter (the weights, the optimizer, the schedule and the loss
        scale change only in the update)."""
        rng = {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        return {
            "rng": rng,
            "balancer": self.balancer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "monitor": None if self.monitor is None else self.monitor.state_dict(),
            "consecutive_nonfinite": self.consecutive_nonfinite,
        }

    def save_checkpoint(self, step_state: dict | None = None) -> tuple[Path, Path] | None:
        """Write the resumable state and the LoRA of the current step. ``step_state``: the ``_step_state()`` of
        this step boundary when the live one has moved on (an exception in the middle of the next step). Only rank
        0 writes (every rank holds the same state); the others return None."""
        if not self.world.is_main:
            return None
        cfg = self.config
        step_state = step_state or self._step_state()
        extra = {
            "scheduler": self.scheduler.state_dict(),
            "balancer": step_state["balancer"],
            "sampler": step_state["sampler"],
            "monitor": step_state["monitor"],
            "consecutive_nonfinite": step_state["consecutive_nonfinite"],
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "resume_fingerprint": self._resume_fingerprint(),
        }
        # The state holds the training weights; the exported file the weights to use (a schedule-free
        # optimizer's average), so the state is written first. A kill between the two leaves a state without
        # its LoRA, which try_resume writes from the state.
        state_path = save_state(self.run_dir, self.step, self.network.state_dict(), self.optimizer, step_state["rng"],
                                extra, keep=cfg.output.keep_states, regularizers=self.representation.state_dict())
        lora_path = self._lora_path(self.step)
        self._export_lora(lora_path)
        self.last_lora, self.last_state = lora_path, state_path
        self.callbacks.on_checkpoint(self, lora_path, state_path)
        return lora_path, state_path

    def _lora_path(self, step: int) -> Path:
        return self.run_dir / "lora" / f"{self.config.output.name}_{step:06d}.safetensors"

    def _export_lora(self, path: Path) -> None:
        cfg = self.config
        with evaluation_weights(self.optimizer, self._trained_parameters()):
            save_network(self.network, path, config_json=cfg.to_json(), base_fingerprint=self.denoiser.fingerprint(),
                         step=self.step, version=cfg.model.version, dtype=cfg.output.save_dtype,
                         lora_format=cfg.output.lora_format, extra_metadata=lora_metadata(cfg))

    def validate(self) -> dict:
        """Per-modality validation loss at the fixed σ set (``val_loss_video`` / ``val_loss_audio``)."""
        text_for_batch = None
        if self.connectors is not None:
            text_for_batch = lambda batch: self.connectors(batch.text_features.to(self.device, torch.float32))  # noqa: E731
        with evaluation_weights(self.optimizer, self._trained_parameters()):
            result = validation_losses(self.validation_samples, self.denoiser, self.network, self.config, self.device,
                                       self.autocast_dtype, text_for_batch)
        return {"val_loss_video": result.loss_video, "val_loss_audio": result.loss_audio}

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, until_step: int | None = None) -> TrainResult:
        """Train up to ``until_step`` (default: train.steps). Saves a checkpoint every ``output.save_every``
        steps, at the end, and when stopped: a requested stop (``self.stop``: Ctrl-C, SIGTERM, ComfyUI Cancel) is
        taken between two steps; an exception inside a step (a second Ctrl-C, Cancel inside a ComfyUI op, an
        error) saves the last completed step. Either way the saved state is a step boundary of the straight run,
        so resuming from it continues bit for bit."""
        cfg = self.config
        target = min(until_step or cfg.train.steps, cfg.train.steps)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json", cfg.to_json() + "\n")
        # train.num_threads is process-wide in torch: set for this run only (inside ComfyUI it is the server's).
        threads_before = torch.get_num_threads()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        try:
            return self._run(target)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, target: int) -> TrainResult:
        cfg = self.config
        if self.step >= cfg.train.steps:
            self._warn(f"the run is already at step {self.step} (train.steps = {cfg.train.steps}): nothing to train; "
                       f"its LoRA is {self.last_lora or self._lora_path(self.step)}. Raise train.steps to train further")
        self._step_start = None  # between steps (an earlier run may have ended inside one)
        hint = "every rank must read the same cache and run directory (on a filesystem all nodes share)"
        self.world.require_same("the training data", int(self._samples_digest()[:15], 16), hint)
        self.world.require_same("the step to start from", self.step, hint)
        self.callbacks.on_start(self)
        self.network.train()
        saved_at = self.step
        stopped_by = None
        try:
            while self.step < target:
                if self.stop.should_stop():
                    stopped_by = self.stop.reason
                    break
                metrics = self.train_step()
                if metrics is None:
                    continue  # skipped (non-finite); the counter guards against endless skipping
                every = cfg.validation.every_steps
                if self.world.is_main and self.validation_samples and every and (self.step % every == 0 or self.step == target):
                    metrics.update(self.validate())
                metrics.update(self.callbacks.extra_metrics(self, metrics))
                if self.world.is_main:
                    append_jsonl(self.run_dir / "metrics.jsonl", metrics)
                self.callbacks.on_step(self, metrics)
                if self.step % cfg.logging.log_every == 0 or self.step == target:
                    self.callbacks.on_log(self, format_log_line(metrics, cfg.train.steps))
                if self.step % cfg.output.save_every == 0 or self.step == target:
                    self.save_checkpoint()
                    saved_at = self.step
            if stopped_by is not None and self.step > saved_at:
                self.save_checkpoint()
        except TrainingError:
            raise  # the last good checkpoint stays as it is
        except KeyboardInterrupt:
            self._save_last_completed_step(saved_at)
            if not self.stop.requested:
                raise  # no stop handler ran (library use): the caller decides
            stopped_by = self.stop.reason  # a second signal: stop at once, the last completed step is saved
        except BaseException:
            # ComfyUI's Cancel raised inside an op, or an error: keep what was learned up to the last completed step.
            self._save_last_completed_step(saved_at)
            raise
        result = TrainResult(
            run_dir=self.run_dir, step=self.step, lora_path=self.last_lora, state_path=self.last_state,
            final_loss_video=self._last_losses[0], final_loss_audio=self._last_losses[1],
            warnings=list(self.warnings), resumed_from=self.resumed_from, completed=self.step >= cfg.train.steps,
            stopped_by=stopped_by,
        )
        self.callbacks.on_end(self, result)
        return result

    def _save_last_completed_step(self, saved_at: int) -> None:
        if self.step <= saved_at:
            return  # that step's state is on disk already
        if self._step_start == _UPDATING:
            self._warn(f"stopped during the optimizer update of step {self.step + 1}: the state of step {saved_at} "
                       "is the last one kept")
            return
        self.save_checkpoint(self._step_start)  # None between steps: the live state is the boundary

    def train_step(self) -> dict | None:
        """One optimizer step: forward and backward over ``train.gradient_accumulation`` micro-batches, then
        clipping, the optimizer and the schedule. Returns the step's metrics row, or None when the step was
        skipped (a non-finite loss or gradient; ``_skip_nonfinite`` counts those). ``run`` calls it in a loop,
        and the benchmark times exactly this."""
        self._step_start = self._step_state()
        if self.world.distributed:
            torch.manual_seed(dropout_seed(self.config.train.seed, self.step, self.world.rank))
        metrics = self._train_step()
        self._step_start = None  # a step boundary again (also after a skipped step)
        return metrics

    def _train_step(self) -> dict | None:
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        tally = _StepTally()
        for _ in range(self.config.train.gradient_accumulation):
            if not self._micro_batch(tally):
                return None
        grad_norm = self._apply_gradients(tally)
        if grad_norm is None:
            return None
        return self._step_metrics(tally, grad_norm, time.perf_counter() - started)

    def _micro_batch(self, tally: "_StepTally") -> bool:
        """Forward and backward of one micro-batch, its losses added to ``tally``; False when the step must
        be skipped (a non-finite loss). With several ranks this rank trains its rows of the global batch and
        every value that is tallied, balanced or checked is the global batch's (``distributed.py``)."""
        cfg = self.config
        accum = cfg.train.gradient_accumulation
        missing_audio = cfg.audio.missing_audio if self.silence is not None else "skip"
        t0 = time.perf_counter()
        batch_samples = [self.samples[i] for i in self.sampler.next_batch()]
        rows = self.world.rows(len(batch_samples))
        mine = batch_samples[rows]
        # A rank with an empty share still draws the global batch's random numbers, from a batch of its shapes.
        batch = collate(mine or batch_samples[:1])
        tally.data_time += time.perf_counter() - t0
        tally.ids.extend(s.id for s in batch_samples)
        audio_batch = batch.audio is not None  # one bucket: the same for every row of the global batch
        if self.monitor is not None:
            self._check_supervision(batch_samples, supervised=audio_batch)
        silence = self.silence if missing_audio == "silence" else None
        audio_target = batch.audio if audio_batch else None if silence is None else silence.for_batch(batch)
        draws = draw_batch(batch, cfg, self.generator, audio_shape=None if audio_target is None else tuple(audio_target.shape),
                           total=len(batch_samples))
        share = len(mine) / len(batch_samples)  # for terms that are means over this rank's rows
        losses = None
        terms: list[tuple[str, torch.Tensor, float]] = []  # terms on the main forward's graph (one backward with it)
        if mine:
            with self.representation.capture(self.denoiser, video_token_count(batch.video)) as features:
                losses = training_step(batch, self.denoiser, cfg, self.generator, self.device, self.autocast_dtype,
                                       silence=silence, connectors=self.connectors, draws=draws.rows(rows),
                                       dual_timestep=self.representation.dual_timestep)
            if losses.loss_silence is not None:
                terms.append(("silence", losses.loss_silence, cfg.audio.silence_weight))
            if self.preservation.cfg.prior_divergence:
                distance = self.preservation.prior_divergence(losses.inputs, losses.pred_video, losses.pred_audio,
                                                              self.denoiser, self.network, self.device, self.autocast_dtype)
                terms.append(("prior_divergence", _rows_share(distance, share), -self.preservation.weight("prior_divergence")))
            # CREPA / Self-Flow (one process only: the Trainer refuses them under torchrun).
            terms += self.representation.terms(features, losses.inputs, self.denoiser, self.network, self.step, self.device,
                                               self.autocast_dtype)
        local = dict.fromkeys(["video", "audio", "silence", "prior_divergence", *self.representation.term_names])
        if losses is not None:
            local.update(video=_value(losses.loss_video), audio=_value(losses.loss_audio))
            local.update({name: _value(value) for name, value, _ in terms})
        values = self.world.sum_values(local)
        # No video loss in the audio-only mode: the balancer then keeps audio_weight.
        video_value, audio_value = values["video"], values["audio"]
        if any(v is not None and not math.isfinite(v) for v in (video_value, audio_value)):
            self._skip_nonfinite(tally.ids, video_value, audio_value)
            return False
        weight = self.balancer.update(video_value, audio_value)
        if audio_value is not None:
            tally.audio += audio_value
            tally.weighted_audio += weight * audio_value
            tally.sigma_audio += draws.sigma_audio.mean().item()
            tally.audio_batches += 1
        term_weights = {"silence": cfg.audio.silence_weight, "prior_divergence": -self.preservation.weight("prior_divergence")}
        term_weights.update({name: w for name, _, w in terms if name not in term_weights})  # CREPA / Self-Flow weights
        recorded = [(name, values[name], w) for name, w in term_weights.items() if values[name] is not None]
        if values["silence"] is not None:
            tally.regularizer = "silence"
        if not self._record_extras([(name, value) for name, value, _ in recorded], tally.extras, tally.ids):
            return False
        tally.extra_objective += sum(w * v for _, v, w in recorded)
        if video_value is not None:
            tally.video += video_value
            tally.video_batches += 1
        tally.sigma_video += draws.sigma_video.mean().item()
        tally.batches += 1
        if losses is not None:
            total = cfg.loss.video_weight * losses.loss_video if losses.loss_video is not None else torch.zeros((), device=self.device)
            if losses.loss_audio is not None:
                total = total + weight * losses.loss_audio
            for _, value, term_weight in terms:
                total = total + term_weight * value
            self._backward(total / accum)

        # Terms with their own forwards, each backpropagated at once.
        separate_weights: dict[str, float] = {}
        if missing_audio == "audio_dop" and not audio_batch:
            separate_weights["audio_dop"] = cfg.audio.audio_dop_multiplier
            tally.regularizer = "audio_dop"
            dop_sigma, dop_noise = audio_dop_draws(batch, self.silence, cfg, self.generator, total=len(batch_samples))
        for name in self.preservation.prompt_loss_names:
            separate_weights[name] = self.preservation.weight(name)
        if not separate_weights:
            return True
        separate: dict[str, torch.Tensor] = {}
        if losses is not None:
            if "audio_dop" in separate_weights:
                dop = audio_dop_loss(losses.inputs, batch, self.denoiser, self.network, self.silence, cfg, self.generator,
                                     self.device, self.autocast_dtype, draws=(dop_sigma[rows], dop_noise[rows]))
                separate["audio_dop"] = _rows_share(dop, share)
            for name, value in self.preservation.prompt_losses(losses.inputs, self.denoiser, self.network, self.device,
                                                               self.autocast_dtype).items():
                separate[name] = _rows_share(value, share)
        values = self.world.sum_values({name: _value(separate.get(name)) for name in separate_weights})
        for name, term_weight in separate_weights.items():
            if not self._record_extras([(name, values[name])], tally.extras, tally.ids):
                return False
            if name in separate:
                self._backward(term_weight * separate[name] / accum)
            tally.extra_objective += term_weight * values[name]
        return True

    def _apply_gradients(self, tally: "_StepTally") -> torch.Tensor | None:
        """Clip, step the optimizer and the schedule; the gradient norm, or None when it is not finite (the
        step is skipped)."""
        self.world.sum_gradients(self._trained_parameters())
        params = [p for p in self._trained_parameters() if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            what = "gradient norm"
            if self.scaler:
                # fp16 overflow: the scaler backs off (update() also clears the unscale_ record of this step).
                self.scaler.update()
                what = f"gradient norm (fp16 overflow; loss scale now {self.scaler.get_scale():g})"
            self._skip_nonfinite(tally.ids, float("nan"), None, what=what)
            return None
        tally.lr = self._base_lr()
        tally.lr_groups = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self._step_start = _UPDATING
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.consecutive_nonfinite = 0
        return grad_norm

    def _step_metrics(self, tally: "_StepTally", grad_norm: torch.Tensor, step_time: float) -> dict:
        """The metrics.jsonl row of the step just taken."""
        n, an = tally.batches, tally.audio_batches
        loss_video = tally.video / tally.video_batches if tally.video_batches else None
        loss_audio = tally.audio / an if an else None
        weighted_audio = tally.weighted_audio / an if an else None
        self._last_losses = (loss_video, loss_audio)
        extras = tally.extras
        regularizer_values = extras.get("silence", []) + extras.get("audio_dop", [])
        return {
            "step": self.step,
            "loss": self.config.loss.video_weight * (loss_video or 0.0) + (weighted_audio or 0.0) + tally.extra_objective / n,
            "loss_video": loss_video,
            "loss_audio": loss_audio,
            "loss_audio_weighted": weighted_audio,
            "audio_weight": self.balancer.weight if an else None,
            "sigma_video": tally.sigma_video / n,
            "sigma_audio": tally.sigma_audio / an if an else None,
            "lr": tally.lr,
            "lr_groups": tally.lr_groups if len(tally.lr_groups) > 1 else None,
            "grad_norm": float(grad_norm),
            "audio_supervised": an > 0,
            "audio_batches": an,
            "regularizer": tally.regularizer,
            "loss_regularizer": sum(regularizer_values) / len(regularizer_values) if regularizer_values else None,
            "loss_dop": _mean(extras.get("dop")),
            "loss_blank": _mean(extras.get("blank")),
            "loss_prior_divergence": _mean(extras.get("prior_divergence")),
            **{f"loss_{name}": _mean(extras.get(name)) for name in self.representation.term_names},
            "val_loss_video": None,
            "val_loss_audio": None,
            "step_time_s": step_time,
            "data_time_s": tally.data_time,
            "peak_mem_bytes": _peak_memory_bytes(self.device),
            "items": tally.ids,
        }

    def _trained_parameters(self) -> list[torch.Tensor]:
        """Everything the optimizer trains: the adapter and the regularisers' projectors."""
        return list(self.network.parameters()) + self.representation.parameters()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _record_extras(self, values: list[tuple[str, float]], extras: dict[str, list[float]], ids: list[str]) -> bool:
        """Store the raw values of regulariser terms; False (after skipping the step) when one is not finite."""
        for name, number in values:
            if not math.isfinite(number):
                self._skip_nonfinite(ids, float("nan"), None, what=f"{name} loss")
                return False
            extras.setdefault(name, []).append(number)
        return True

    def _base_lr(self) -> float:
        for group in self.optimizer.param_groups:
            if group.get("name") == "base":
                return group["lr"]
        return self.optimizer.param_groups[0]["lr"]

    def _check_supervision(self, batch_samples: list[LatentSample], supervised: bool) -> None:
        check = self.monitor.observe(batch_samples, supervised)
        if check is None:
            return
        if self.config.audio.supervision_mode == "error":
            raise TrainingError(f"step {self.step + 1}: {check.message} (audio.supervision_mode = \"error\"; "
                                "\"warn\" only reports it)")
        self._warn(f"step {self.step + 1}: {check.message}")

    def _skip_nonfinite(self, ids: list[str], video_value: float, audio_value: float | None, what: str = "loss") -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_nonfinite += 1
        limit = self.config.train.max_consecutive_nonfinite
        message = (f"step {self.step + 1}: non-finite {what} (video={video_value}, audio={audio_value}) on batch "
                   f"{', '.join(ids)}; step skipped ({self.consecutive_nonfinite}/{limit} in a row)")
        self._warn(message)
        if self.consecutive_nonfinite >= limit:
            last = f" The last good checkpoint is {self.last_state}." if self.last_state else ""
            raise TrainingError(
                f"{limit} consecutive non-finite steps: training stopped.{last} Lower optimizer.lr, use "
                "train.mixed_precision = \"bf16\" instead of fp16, or check the cached latents of the batches named above."
            )

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.callbacks.on_warning(self, message)


def format_log_line(metrics: dict, total_steps: int) -> str:
    audio = metrics["loss_audio"]
    if audio is None:
        audio_part = "[audio] no audio in this step"
        if metrics.get("regularizer"):
            audio_part += f" ({metrics['regularizer']} regulariser {metrics['loss_regularizer']:.5f})"
    else:
        video = "none (audio-only)" if metrics["loss_video"] is None else f"{metrics['loss_video']:.5f}"
        audio_part = (f"[audio] raw={audio:.5f}, weighted={metrics['loss_audio_weighted']:.5f}, "
                      f"video={video}, weight={metrics['audio_weight']:.3f}")
    line = (f"step {metrics['step']}/{total_steps} {audio_part} | σ_v={metrics['sigma_video']:.3f}"
            + (f" σ_a={metrics['sigma_audio']:.3f}" if metrics['sigma_audio'] is not None else "")
            + f" lr={metrics['lr']:.2e} ({metrics['step_time_s']:.2f} s/step)")
    if metrics.get("val_loss_video") is not None:
        line += f" | val video={metrics['val_loss_video']:.5f}"
        if metrics.get("val_loss_audio") is not None:
            line += f" audio={metrics['val_loss_audio']:.5f}"
    elif metrics.get("val_loss_audio") is not None:  # audio-only mode
        line += f" | val audio={metrics['val_loss_audio']:.5f}"
    return line


def _value(loss: torch.Tensor | None) -> float | None:
    return None if loss is None else loss.detach().item()


def _rows_share(loss: torch.Tensor, share: float) -> torch.Tensor:
    """A mean over this rank's rows as its part of the global batch's mean (all rows of a batch have one shape)."""
    return loss if share == 1 else loss * share


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: the process' peak resident set (ru_maxrss is in KiB on Linux, bytes on macOS). The resource module is
    # Unix-only: on Windows the figure is unknown (null in metrics.jsonl) and the node pack still imports.
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _json_line(row: dict) -> str:
    return json.dumps(row, default=str) + "\n"
