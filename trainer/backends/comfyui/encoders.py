"""The trainer's ``Encoders`` over ComfyUI's objects: the video VAE (``VAE`` from a checkpoint loader), the
LTX-2 audio VAE (``VAE`` from ``LTXVAudioVAELoader``) and the Gemma text encoder (``CLIP`` from
``LTXAVTextEncoderLoader``), plus the MODEL whose text connectors turn CLIP output into the context the
denoiser consumes.

Video. ``VAE.encode`` takes ``[F, H, W, 3]`` pixels in [0, 1] and returns the normalised posterior mean
``[1, 128, F', H/32, W/32]`` (``VideoVAE.encode``: mean, then per-channel statistics). ComfyUI silently
crops anything that is not a multiple of 32 pixels or 8n+1 frames, so both are checked first.

Audio. ComfyUI's ``VAE.encode`` is not used for audio: it crops the waveform to a multiple of 4096
samples and resamples from an assumed 44.1 kHz. The audio VAE's own ``AudioVAE.encode(waveform,
sample_rate)`` is called instead on 16 kHz stereo: log-mel as ComfyUI computes it, the causal encoder,
``DiagonalGaussianDistribution.mode()`` (the posterior MEAN, never a sample) and the per-channel
normalisation the LTXAV model expects, all in float32.

Text. ``CLIP`` gives the conditioning tensor (for ``LTXAVTEModel``: projected Gemma features before the
connectors, flagged ``unprocessed_ltxav_embeds``); ``text_context_from_conditioning`` runs the MODEL's
connectors as ``LTXAV.extra_conds`` does at sampling time.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

import torch

from ...config import ConfigError
from ..fingerprint import config_dict, loaded_file_sizes, remembered, weights_identity
from ..interface import (
    AUDIO_LATENT_CHANNELS,
    AUDIO_LATENT_MEL_BINS,
    AUDIO_SAMPLE_RATE,
    VIDEO_LATENT_CHANNELS,
    EncodedAudio,
    TextContext,
    encode_padded_audio,
)
from .denoiser import ltxav_diffusion_model, text_context_from_conditioning
from .env import import_model_management

VIDEO_SPATIAL_COMPRESSION = 32
VIDEO_TEMPORAL_COMPRESSION = 8
CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.")


def check_video_vae(vae) -> None:
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, VideoVAE):
        found = type(model).__name__ if model is not None else type(vae).__name__
        raise ConfigError(
            f"the vae input holds {found}, not the LTX-2 video VAE; connect the VAE output of the checkpoint loader "
            "that loaded the LTX-2 model"
        )
    if vae.latent_channels != VIDEO_LATENT_CHANNELS or vae.spacial_compression_encode() != VIDEO_SPATIAL_COMPRESSION:
        raise ConfigError(
            f"the video VAE has {vae.latent_channels} latent channels and {vae.spacial_compression_encode()}x spatial "
            "compression; LTX-2's has 128 and 32x"
        )


def check_audio_vae(audio_vae) -> None:
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE

    model = getattr(audio_vae, "first_stage_model", None)
    if not isinstance(model, AudioVAE):
        found = type(model).__name__ if model is not None else type(audio_vae).__name__
        raise ConfigError(
            f"the audio_vae input holds {found}, not the LTX-2 audio VAE; load it with 'Load LTXV Audio VAE' "
            "(LTXVAudioVAELoader)"
        )
    if model.sample_rate != AUDIO_SAMPLE_RATE:
        raise ConfigError(
            f"the audio VAE expects {model.sample_rate} Hz input; the trainer's audio pipeline (and LTX-2) uses "
            f"{AUDIO_SAMPLE_RATE} Hz"
        )
    if model.latent_channels != AUDIO_LATENT_CHANNELS or model.latent_frequency_bins != AUDIO_LATENT_MEL_BINS:
        raise ConfigError(
            f"the audio VAE gives {model.latent_channels}x{model.latent_frequency_bins} latents; LTX-2's are "
            f"{AUDIO_LATENT_CHANNELS}x{AUDIO_LATENT_MEL_BINS}"
        )


def check_clip(clip) -> None:
    from comfy.text_encoders.lt import LTXAVTEModel

    model = getattr(clip, "cond_stage_model", None)
    if not isinstance(model, LTXAVTEModel):
        found = type(model).__name__ if model is not None else type(clip).__name__
        raise ConfigError(
            f"the clip input holds {found}, not the LTX-2 audio-video text encoder; load it with "
            "'Load LTXV Audio Text Encoder' (LTXAVTextEncoderLoader)"
        )


# ---- audio ----------------------------------------------------------------------------------------


def audio_latent_count(audio_vae, num_samples: int) -> int:
    """Latent frames the audio VAE gives for ``num_samples`` samples at its input rate: centred STFT frames
    (``1 + S // hop``), then the causal encoder's ``ceil(/4)`` time compression."""
    from comfy.ldm.lightricks.vae.audio_vae import LATENT_DOWNSAMPLE_FACTOR

    mel_frames = 1 + int(num_samples) // audio_vae.first_stage_model.mel_hop_length
    return math.ceil(mel_frames / LATENT_DOWNSAMPLE_FACTOR)


@torch.no_grad()
def encode_audio(audio_vae, waveform: torch.Tensor) -> torch.Tensor:
    """``[B, 2, S]`` at 16 kHz → ``[B, 8, T, 16]`` float32: posterior mean, normalised (see module docstring)."""
    check_audio_vae(audio_vae)
    if waveform.ndim != 3 or waveform.shape[1] != 2:
        raise ValueError(f"audio must be stereo [B, 2, samples] at {AUDIO_SAMPLE_RATE} Hz, got {tuple(waveform.shape)}")
    mm = import_model_management()
    mm.load_models_gpu([audio_vae.patcher], force_full_load=True)
    model = audio_vae.first_stage_model
    dtype = next(model.autoencoder.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(
            f"the audio VAE runs in {dtype}; audio latents must be encoded in float32 (load the audio VAE without a "
            "dtype override)"
        )
    device = audio_vae.device
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        latents = model.encode(waveform.to(device=device, dtype=torch.float32), sample_rate=AUDIO_SAMPLE_RATE)
    expected = audio_latent_count(audio_vae, waveform.shape[-1])
    if latents.shape[2] != expected:
        raise RuntimeError(
            f"the audio VAE returned {latents.shape[2]} latent frames for {waveform.shape[-1]} samples; the trainer "
            f"expects {expected} (1 + S // hop, then ceil(/4)): this audio VAE's framing is not LTX-2's"
        )
    return latents.float()


@torch.no_grad()
def decode_audio(audio_vae, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Normalised ``[B, 8, T, 16]`` → (waveform ``[B, 2, S]`` float32 on the CPU, vocoder output rate)."""
    check_audio_vae(audio_vae)
    if latents.ndim != 4 or latents.shape[1] != AUDIO_LATENT_CHANNELS or latents.shape[3] != AUDIO_LATENT_MEL_BINS:
        raise ValueError(f"audio latents must be [B, 8, T, 16], got {tuple(latents.shape)}")
    waveform = audio_vae.decode(latents.float())  # ComfyUI returns [B, S, C]
    return waveform.movedim(-1, 1).float().cpu(), int(audio_vae.first_stage_model.output_sample_rate)


# ---- video ----------------------------------------------------------------------------------------


def check_video_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"video frames must be [B, 3, F, H, W], got {tuple(frames.shape)}")
    _, _, count, height, width = frames.shape
    if (count - 1) % VIDEO_TEMPORAL_COMPRESSION:
        raise ValueError(f"video has {count} frames; the LTX-2 VAE needs 8n+1 (1, 9, 17, 25, ...)")
    if height % VIDEO_SPATIAL_COMPRESSION or width % VIDEO_SPATIAL_COMPRESSION:
        raise ValueError(f"video is {width}x{height}; width and height must be multiples of 32")


@torch.no_grad()
def encode_video(vae, frames: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` in [-1, 1] → ``[B, 128, F', H/32, W/32]`` float32 (normalised posterior mean)."""
    check_video_vae(vae)
    check_video_frames(frames)
    latents = []
    for clip in frames:
        pixels = ((clip.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # [F, H, W, 3] in [0, 1]
        latents.append(vae.encode(pixels).float())
    return torch.cat(latents)


@torch.no_grad()
def decode_video(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised ``[B, 128, F', H', W']`` → ``[B, 3, 8(F'-1)+1, 32H', 32W']`` in [-1, 1] (float32, CPU)."""
    check_video_vae(vae)
    if latents.ndim != 5 or latents.shape[1] != VIDEO_LATENT_CHANNELS:
        raise ValueError(f"video latents must be [B, 128, F', H', W'], got {tuple(latents.shape)}")
    pixels = vae.decode(latents)  # [B, F, H, W, 3] in [0, 1]
    return (pixels.float().cpu() * 2 - 1).permute(0, 4, 1, 2, 3).contiguous()


# ---- text -----------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompt(clip, model_patcher, prompt: str) -> TextContext:
    """One prompt → ``TextContext`` (batch 1), through CLIP and the MODEL's text connectors."""
    check_clip(clip)
    encoded = clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)
    # The connectors live in the MODEL: load it (with any patches) as a sampler would before they run.
    import_model_management().load_models_gpu([model_patcher])
    return text_context_from_conditioning(
        model_patcher, encoded["cond"], unprocessed=bool(encoded.get("unprocessed_ltxav_embeds", False))
    )


def stack_text(contexts: list[TextContext]) -> TextContext:
    """Batch contexts; shorter ones are padded at the end with mask 0 (prompts over 1024 tokens differ)."""
    length = max(c.video.shape[1] for c in contexts)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))

    return TextContext(
        video=torch.cat([pad(c.video) for c in contexts]),
        audio=torch.cat([pad(c.audio) for c in contexts]),
        mask=torch.cat([torch.nn.functional.pad(c.mask, (0, length - c.mask.shape[1])) for c in contexts]),
    )


# ---- the Encoders object ----------------------------------------------------------------------------


class ComfyEncoders:
    """The trainer's ``Encoders`` (see ``trainer/backends/interface.py``) on ComfyUI objects."""

    def __init__(self, model_patcher, vae, audio_vae, clip):
        ltxav_diffusion_model(model_patcher)
        check_video_vae(vae)
        check_audio_vae(audio_vae)
        check_clip(clip)
        self.model_patcher = model_patcher
        self.vae = vae
        self.audio_vae = audio_vae
        self.clip = clip
        self.audio_sample_rate: int = AUDIO_SAMPLE_RATE
        self._fingerprint: str | None = None

    # video
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        # The cache encodes one clip per call: ComfyUI's Cancel stops it before the next clip.
        import_model_management().throw_exception_if_processing_interrupted()
        return encode_video(self.vae, frames)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_video(self.vae, latents)

    # audio
    def audio_latent_frames(self, num_samples: int) -> int:
        return audio_latent_count(self.audio_vae, num_samples)

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        return encode_audio(self.audio_vae, waveform)

    def encode_audio_padded(self, waveform: torch.Tensor, valid_samples: Sequence[int]) -> EncodedAudio:
        """``encode_audio`` of a padded batch, with the latent frames of each sample that come from real audio."""
        return encode_padded_audio(self, waveform, valid_samples)

    def decode_audio(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        return decode_audio(self.audio_vae, latents)

    # text
    def encode_text(self, prompts: list[str]) -> TextContext:
        return stack_text([encode_prompt(self.clip, self.model_patcher, p) for p in prompts])

    # bookkeeping
    def fingerprint(self) -> str:
        """Identity of everything a cached latent depends on: both VAEs and the text encoder (class, config and
        ``weights_identity``: keys, shapes, dtypes, loaded file sizes and a fixed sample of values), the
        tokenizer, the MODEL's text-connector weights as they run and the audio settings. Each part is
        remembered per loaded object, so a queue that reuses the loaders' objects reads no weight again."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            audio = self.audio_vae.first_stage_model
            settings = {"audio": "posterior-mean", "sample_rate": audio.sample_rate, "hop": audio.mel_hop_length,
                        "mel_bins": audio.mel_bins, "n_fft": audio.preprocessor.n_fft}
            h.update(json.dumps(settings, sort_keys=True).encode())
            h.update(loaded_identity(self.vae.first_stage_model, self.vae.patcher).encode())
            h.update(loaded_identity(audio, self.audio_vae.patcher).encode())
            h.update(loaded_identity(self.clip.cond_stage_model, self.clip.patcher).encode())
            h.update(_tokenizer_digest(self.clip).encode())
            h.update(_connector_identity(self.model_patcher).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def loaded_identity(module: torch.nn.Module, patcher) -> str:
    """Class, config and ``weights_identity`` of a module a ComfyUI loader built, remembered per module."""

    def compute() -> str:
        h = hashlib.sha256(type(module).__name__.encode())
        h.update(json.dumps(config_dict(module), sort_keys=True, default=str).encode())
        h.update(weights_identity(module.state_dict().items(), loaded_file_sizes(patcher)).encode())
        return h.hexdigest()[:16]

    return remembered(module, "weights", compute)


def _tokenizer_digest(clip) -> str:
    h = hashlib.sha256()
    state = clip.tokenizer.state_dict() if hasattr(clip.tokenizer, "state_dict") else {}
    for key in sorted(state):
        value = state[key]
        data = value.numpy().tobytes() if torch.is_tensor(value) else value if isinstance(value, bytes) else repr(value).encode()
        h.update(key.encode() + b"|" + data)
    return h.hexdigest()[:16]


def _connector_identity(model_patcher) -> str:
    """The text connectors' weights as they run (loaded, with the MODEL's patches applied): remembered per
    model and set of patches."""
    import_model_management().load_models_gpu([model_patcher])
    diffusion_model = ltxav_diffusion_model(model_patcher)

    def compute() -> str:
        state = diffusion_model.state_dict()
        return weights_identity((k, v) for k, v in state.items() if k.startswith(CONNECTOR_PREFIXES))

    return remembered(diffusion_model, f"connectors {getattr(model_patcher, 'patches_uuid', '')}", compute)
