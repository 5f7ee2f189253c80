"""Validation during training: hear the LoRA as it learns.

``ValidationSampler`` is a ``TrainCallbacks``: every ``every_n_steps`` optimizer steps it

- generates audio+video for fixed prompts and seeds with the LoRA on and, same seed and prompt, off
  (the base model), and writes ``samples/step_<n>/prompt<i>_{lora,base}.mp4`` (audio muxed in) and
  ``.wav`` under the output folder (the run directory by default);
- scores both against the dataset's voice (``voice_score.VoiceReference``), when a reference is given;
- measures the video and audio flow-matching losses at one fixed σ with fixed noise on a few cached
  items (validation items when there are any), so the curve moves only with the weights, not with
  the random σ and noise of the training steps;
- appends one line to ``validation.jsonl`` and returns the values, flat, for ``metrics.jsonl``.

The base model does not change during training, so its samples and losses are computed once and
reused. Global RNG state is saved and restored around each validation, so training with and without
validation sees the same dropout and a resumed run stays bit-for-bit.

Costs two sampling runs per prompt per validation (one after the first): off by default on CPU
(``default_every_n_steps``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..data.batches import LatentSample, collate
from ..data.media.audio import resample
from ..data.media.encode import write_av_file, write_wav
from ..io_utils import append_jsonl, atomic_write_text, read_jsonl
from ..training.conditioning import condition_inputs, generation_inputs
from ..training.loop import TrainCallbacks
from ..training.losses import audio_padding_mask, elementwise_loss, masked_per_sample_loss
from ..training.timesteps import add_noise, velocity_target
from .generation import SampleRequest, sample_av
from .previews import frames_uint8  # the decoded-video → uint8 frames conversion the A/B samples use
from .voice_score import VoiceReference, VoiceScoreError

VALIDATION_LOG = "validation.jsonl"
SAMPLES_FOLDER = "samples"
GPU_EVERY_N_STEPS = 250
PREVIEW_AUDIO_RATE = 48000  # the mp4's AAC track (matches the cache previews and A/B samples)
MODES = ("lora", "base")


def default_every_n_steps(device: torch.device | str) -> int:
    """Validation interval when the config does not set one: every 250 steps on a GPU, off (0) on CPU,
    where sampling costs as much as many training steps. ``device`` may be ``train.device``'s "auto"."""
    if str(device) == "auto":
        return GPU_EVERY_N_STEPS if torch.cuda.is_available() else 0
    return GPU_EVERY_N_STEPS if torch.device(device).type == "cuda" else 0


def step_folder_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class PromptSamples:
    """The A/B pair of one prompt at one validation step. Paths are relative to the output folder."""

    index: int
    prompt: str
    seed: int
    files: dict[str, dict[str, str]]  # {"lora": {"mp4", "wav"}, "base": {...}}
    voice: dict[str, dict] | None = None  # {"lora": VoiceScore dict, "base": ...} or None
    voice_error: str | None = None  # why this prompt has no voice score


@dataclass
class ValidationResult:
    step: int
    voice_score_lora: float | None  # mean over prompts
    voice_score_base: float | None
    voice_gain: float | None  # lora - base
    voice_speech_detected: bool | None  # True only when every scored sample held speech
    voice_note: str | None  # why there is no voice score, or what to keep in mind reading it
    voice_reference_similarity: float | None  # the dataset's own clips against the reference (the ceiling)
    audio_loss_fixed_sigma: float | None  # with the LoRA; None when no item has audio
    audio_loss_fixed_sigma_base: float | None
    video_loss_fixed_sigma: float
    video_loss_fixed_sigma_base: float
    fixed_sigma: float
    loss_items: list[str]
    loss_on: str  # "validation" (held-out items) or "training" (no validation items were given)
    samples: list[PromptSamples] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files(self) -> list[str]:
        return [path for s in self.samples for mode in MODES for path in s.files.get(mode, {}).values()]

    def to_row(self) -> dict:
        """The ``validation.jsonl`` line."""
        row = asdict(self)
        row["files"] = self.files
        return row

    def metrics_fields(self) -> dict:
        """Flat ``val_*`` values to merge into this step's ``metrics.jsonl`` row (and the live chart)."""
        return {
            "val_voice_score_lora": self.voice_score_lora,
            "val_voice_score_base": self.voice_score_base,
            "val_voice_gain": self.voice_gain,
            "val_audio_loss_fixed_sigma": self.audio_loss_fixed_sigma,
            "val_audio_loss_fixed_sigma_base": self.audio_loss_fixed_sigma_base,
            "val_video_loss_fixed_sigma": self.video_loss_fixed_sigma,
            "val_video_loss_fixed_sigma_base": self.video_loss_fixed_sigma_base,
        }


@dataclass
class _Decoded:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    audio: np.ndarray  # float32 [C, S]
    rate: int


class ValidationSampler(TrainCallbacks):
    """Periodic A/B samples, voice scores and fixed-σ losses during training (see the module doc).

    ``encoders``: the run's encoders (text, video VAE decode, audio VAE + vocoder decode).
    ``prompts``: fixed prompts (include the trigger word). ``seeds``: one seed for every prompt, or
    one per prompt. ``reference``: the dataset voice, or None for no voice score. ``out_dir``: where
    ``samples/`` and ``validation.jsonl`` go (default: the trainer's run directory). ``loss_samples``:
    cached items for the fixed-σ losses (default: the first ``max_loss_samples`` distinct training
    items). ``every_n_steps`` = 0 turns validation off. ``reference_note``: why there is no reference
    (e.g. resemblyzer missing), written into every line instead of the generic reason.
    """

    def __init__(
        self,
        encoders,
        prompts: Sequence[str],
        *,
        every_n_steps: int,
        seeds: Sequence[int] = (0,),
        reference: VoiceReference | None = None,
        out_dir: str | Path | None = None,
        sample_steps: int = 20,
        seconds: float | None = None,
        fixed_sigma: float = 0.5,
        loss_samples: Sequence[LatentSample] | None = None,
        max_loss_samples: int = 4,
        noise_seed: int = 0,
        reference_note: str | None = None,
    ):
        prompts = [str(p) for p in prompts]
        if every_n_steps < 0:
            raise ValueError(f"validation every_n_steps must be >= 0 (0 = off), got {every_n_steps}")
        if every_n_steps and not prompts:
            raise ValueError("validation needs at least one prompt (include the trigger word)")
        if any(not p.strip() for p in prompts):
            raise ValueError("validation prompts must not be empty")
        seeds = [int(s) for s in seeds]
        if len(seeds) not in (1, len(prompts)):
            raise ValueError(f"give one validation seed for all prompts or one per prompt: {len(prompts)} prompts, "
                             f"{len(seeds)} seeds")
        if not 0.0 < fixed_sigma < 1.0:
            raise ValueError(f"validation fixed_sigma must be inside (0, 1), got {fixed_sigma}")
        if sample_steps < 1:
            raise ValueError(f"validation sample_steps must be >= 1, got {sample_steps}")
        if max_loss_samples < 1:
            raise ValueError(f"validation max_loss_samples must be >= 1, got {max_loss_samples}")
        self.encoders = encoders
        self.prompts = prompts
        self.seeds = seeds * len(prompts) if len(seeds) == 1 else seeds
        self.every_n_steps = int(every_n_steps)
        self.reference = reference
        self.reference_note = reference_note
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.sample_steps = int(sample_steps)
        self.seconds = seconds
        self.fixed_sigma = float(fixed_sigma)
        self.loss_samples = list(loss_samples) if loss_samples is not None else None
        self.max_loss_samples = int(max_loss_samples)
        self.noise_seed = int(noise_seed)
        self.results: list[ValidationResult] = []
        self._last_step: int | None = None
        self._texts: list | None = None
        self._base_samples: dict[int, _Decoded] = {}
        self._base_losses: tuple[float, float | None] | None = None

    # ---- callbacks -------------------------------------------------------------------------------

    def on_start(self, trainer) -> None:
        if self.out_dir is None:
            self.out_dir = Path(trainer.run_dir)
        # A resumed run re-does the steps after its state: drop their validation lines (as the loop
        # does for metrics.jsonl), so the log has one line per step.
        log = self.out_dir / VALIDATION_LOG
        if log.exists():
            rows = [r for r in read_jsonl(log) if r.get("step", 0) <= trainer.step]
            atomic_write_text(log, "".join(_json_line(r) for r in rows))

    def extra_metrics(self, trainer, metrics: dict) -> dict:
        """For a loop that merges callback values into the step's metrics row before writing it:
        runs the validation when it is due and returns its ``val_*`` fields (else an empty dict)."""
        if not self.is_due(trainer.step):
            return {}
        result = self._validate_or_warn(trainer)
        return result.metrics_fields() if result is not None else {}

    def on_step(self, trainer, metrics: dict) -> None:
        if self.is_due(trainer.step):
            self._validate_or_warn(trainer)

    def is_due(self, step: int) -> bool:
        return bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0 and step != self._last_step

    def _validate_or_warn(self, trainer) -> "ValidationResult | None":
        """A failed validation (out of memory while sampling, a broken decoder) must not end a long run:
        it becomes a training warning and an ``error`` line in validation.jsonl, and training goes on."""
        try:
            return self.validate(trainer)
        except Exception as exc:
            step = int(trainer.step)
            self._last_step = step
            message = (f"validation at step {step} failed and was skipped ({type(exc).__name__}: {exc}); "
                       "training goes on")
            out_dir = self.out_dir if self.out_dir is not None else Path(trainer.run_dir)
            append_jsonl(out_dir / VALIDATION_LOG, {"step": step, "error": message})
            trainer.warnings.append(message)
            trainer.callbacks.on_warning(trainer, message)
            return None

    # ---- one validation ----------------------------------------------------------------------------

    def validate(self, trainer) -> ValidationResult:
        """Run one validation now, write its files and ``validation.jsonl`` line, and return it."""
        started = time.perf_counter()
        out_dir = self.out_dir if self.out_dir is not None else Path(trainer.run_dir)
        step = int(trainer.step)
        # Sampling and decoding may draw from the global RNG: keep training's stream untouched.
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _network_eval(trainer.network):
            losses = self._fixed_sigma_losses(trainer)
            samples = self._write_samples(trainer, out_dir, step)
        result = ValidationResult(
            step=step,
            **self._voice_summary(samples),
            audio_loss_fixed_sigma=losses["lora"][1],
            audio_loss_fixed_sigma_base=losses["base"][1],
            video_loss_fixed_sigma=losses["lora"][0],
            video_loss_fixed_sigma_base=losses["base"][0],
            fixed_sigma=self.fixed_sigma,
            loss_items=losses["items"],
            loss_on=losses["on"],
            samples=samples,
            seconds=round(time.perf_counter() - started, 3),
        )
        append_jsonl(out_dir / VALIDATION_LOG, result.to_row())
        self.results.append(result)
        self._last_step = step
        return result

    # ---- samples ------------------------------------------------------------------------------------

    def _request(self, trainer, index: int) -> SampleRequest:
        d = trainer.config.dataset
        frames = d.frames if self.seconds is None else max(1, int(round(self.seconds * d.target_fps)) // 8 * 8 + 1)
        if self._texts is None:
            self._texts = [self.encoders.encode_text([p]) for p in self.prompts]
        fields = dict(
            text=self._texts[index],
            latent_frames=(frames - 1) // 8 + 1,
            latent_height=d.height // 32,
            latent_width=d.width // 32,
            audio_frames=self.encoders.audio_latent_frames(int(round(frames / d.target_fps * 16000))),
            fps=d.target_fps,
            steps=self.sample_steps,
            seed=self.seeds[index],
        )
        # The training mode's conditioning (first frame, reference, stand-in size), from the first training item.
        fields.update(generation_inputs(trainer.config, trainer.samples[0]))
        return SampleRequest(**fields)

    def _generate(self, trainer, index: int, multiplier: float) -> _Decoded:
        trainer.network.set_multiplier(multiplier)
        video_latent, audio_latent = sample_av(trainer.denoiser, self._request(trainer, index), trainer.device)
        frames = frames_uint8(self.encoders.decode_video(video_latent)[0])
        waveform, rate = self.encoders.decode_audio(audio_latent)
        return _Decoded(frames, waveform[0].float().cpu().numpy(), int(rate))

    def _write_samples(self, trainer, out_dir: Path, step: int) -> list[PromptSamples]:
        folder = out_dir / SAMPLES_FOLDER / step_folder_name(step)
        fps = int(round(trainer.config.dataset.target_fps))
        results = []
        for index, prompt in enumerate(self.prompts):
            decoded = {"lora": self._generate(trainer, index, 1.0)}
            if index not in self._base_samples:
                self._base_samples[index] = self._generate(trainer, index, 0.0)
            decoded["base"] = self._base_samples[index]
            files = {}
            for mode, sample in decoded.items():
                stem = folder / f"prompt{index}_{mode}"
                wav = write_wav(stem.with_suffix(".wav"), sample.audio, sample.rate)
                mp4 = write_av_file(stem.with_suffix(".mp4"), sample.frames, fps,
                                    resample(sample.audio, sample.rate, PREVIEW_AUDIO_RATE), PREVIEW_AUDIO_RATE)
                files[mode] = {"mp4": _relative(mp4, out_dir), "wav": _relative(wav, out_dir)}
            entry = PromptSamples(index, prompt, self.seeds[index], files)
            if self.reference is not None:
                try:
                    gain = self.reference.score_ab(decoded["lora"].audio, decoded["base"].audio, decoded["lora"].rate)
                    entry.voice = {"lora": gain.lora_detail.to_dict(), "base": gain.base_detail.to_dict()}
                except VoiceScoreError as exc:  # e.g. a silent sample: no score for it, and the reason
                    entry.voice_error = str(exc)
            results.append(entry)
        return results

    def _voice_summary(self, samples: list[PromptSamples]) -> dict:
        if self.reference is None:
            note = self.reference_note or "no voice reference was given (needs `pip install resemblyzer` and clips with speech)"
            return {"voice_score_lora": None, "voice_score_base": None, "voice_gain": None,
                    "voice_speech_detected": None, "voice_note": note, "voice_reference_similarity": None}
        scored = [s.voice for s in samples if s.voice is not None]
        if not scored:
            errors = "; ".join(s.voice_error for s in samples if s.voice_error)
            return {"voice_score_lora": None, "voice_score_base": None, "voice_gain": None,
                    "voice_speech_detected": None, "voice_note": f"no sample could be scored: {errors}",
                    "voice_reference_similarity": self.reference.typical_similarity}
        lora = float(np.mean([v["lora"]["similarity"] for v in scored]))
        base = float(np.mean([v["base"]["similarity"] for v in scored]))
        speech = all(v[m]["speech_detected"] for v in scored for m in MODES)
        note = None if speech else ("no speech detected in some samples (noise, silence): those scores say little "
                                    "about the voice")
        if len(scored) < len(samples):
            note = (note + "; " if note else "") + f"{len(samples) - len(scored)} prompt(s) could not be scored"
        return {"voice_score_lora": lora, "voice_score_base": base, "voice_gain": lora - base,
                "voice_speech_detected": speech, "voice_note": note,
                "voice_reference_similarity": self.reference.typical_similarity}

    # ---- losses at a fixed σ ----------------------------------------------------------------------

    def _loss_items(self, trainer) -> tuple[list[LatentSample], str]:
        if self.loss_samples:
            return self.loss_samples[: self.max_loss_samples], "validation"
        distinct: dict[str, LatentSample] = {}
        for sample in trainer.samples:  # repeats appear several times: take each item once
            distinct.setdefault(sample.id, sample)
        return list(distinct.values())[: self.max_loss_samples], "training"

    def _fixed_sigma_losses(self, trainer) -> dict:
        items, on = self._loss_items(trainer)
        lora = fixed_sigma_losses(trainer, items, self.fixed_sigma, self.noise_seed, multiplier=1.0)
        if self._base_losses is None:
            self._base_losses = fixed_sigma_losses(trainer, items, self.fixed_sigma, self.noise_seed, multiplier=0.0)
        return {"lora": lora, "base": self._base_losses, "items": [s.id for s in items], "on": on}


def fixed_sigma_losses(trainer, samples: Sequence[LatentSample], sigma: float, noise_seed: int, *,
                       multiplier: float = 1.0) -> tuple[float, float | None]:
    """Mean (video, audio) velocity loss over ``samples`` with σ_v = σ_a = ``sigma`` and the noise
    of item i drawn from seed ``noise_seed + i``: the same inputs every time, so only the weights
    change the result. Audio is None when no sample has audio. Runs with the adapter at ``multiplier``."""
    if not samples:
        raise ValueError("fixed-σ validation loss: no cached items to evaluate on")
    config, device = trainer.config, trainer.device
    loss_cfg = config.loss
    video_losses, audio_losses = [], []
    trainer.network.set_multiplier(multiplier)
    for index, sample in enumerate(samples):
        generator = torch.Generator().manual_seed(noise_seed + index)
        video = sample.video[None].to(device, torch.float32)
        noise_video = torch.randn(video.shape, generator=generator).to(device)
        sigma_t = torch.full((1,), float(sigma), device=device)
        audio = noisy_audio = noise_audio = None
        if sample.audio is not None:
            audio = sample.audio[None].to(device, torch.float32)
            noise_audio = torch.randn(audio.shape, generator=generator).to(device)
            noisy_audio = add_noise(audio, noise_audio, sigma_t)
        dtype = trainer.autocast_dtype or torch.float32
        # The training mode's references, as in training.
        conditioned = condition_inputs(
            collate([sample]), config.conditioning.mode, video, add_noise(video, noise_video, sigma_t).to(dtype), sigma_t,
            None if noisy_audio is None else noisy_audio.to(dtype), None if audio is None else sigma_t,
            sample.text.select(None).to(device, dtype),
        )
        with torch.autocast(device.type, dtype=trainer.autocast_dtype, enabled=trainer.autocast_dtype is not None):
            pred_video, pred_audio = trainer.denoiser(conditioned.inputs)
        if conditioned.train_video:  # never the audio-only stand-in
            video_elem = elementwise_loss(pred_video, velocity_target(video, noise_video), loss_cfg.type, loss_cfg.huber_delta)
            video_losses.append(float(masked_per_sample_loss(video_elem, None)[0]))
        if audio is not None:
            mask = audio_padding_mask(audio, torch.tensor([sample.audio_valid_frames]))
            audio_elem = elementwise_loss(pred_audio, velocity_target(audio, noise_audio), loss_cfg.type, loss_cfg.huber_delta)
            audio_losses.append(float(masked_per_sample_loss(audio_elem, mask)[0]))
    return (float(np.mean(video_losses)) if video_losses else None), (float(np.mean(audio_losses)) if audio_losses else None)


@contextmanager
def _network_eval(network) -> Iterator[None]:
    """Adapter in eval mode (no dropout) for the duration; its multiplier and mode restored after."""
    previous, was_training = network.multiplier, network.training
    network.eval()
    try:
        yield
    finally:
        network.set_multiplier(previous)
        network.train(was_training)


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _json_line(row: dict) -> str:
    import json

    return json.dumps(row, default=str) + "\n"
