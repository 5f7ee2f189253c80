"""The LTX-2 audio front-end: 16 kHz stereo waveform → log-mel spectrogram ``[B, 2, T_mel, 64]``.

Pure torch (``torch.stft`` and a Slaney mel filterbank built here), so nothing depends on torchaudio
or FFmpeg at run time. The settings are the ones the LTX-2 audio VAE was trained with (ComfyUI's
``AudioPreprocessor`` and ltx-core): n_fft = window = 1024 (periodic Hann), hop 160, centred frames
with reflect padding, magnitude (power 1), 64 Slaney-scale bins with Slaney area normalisation,
0-8 kHz, then ``log(clamp(mel, 1e-5))``.

Centred frames give ``1 + S // 160`` mel frames for ``S`` samples (≈100 per second). The causal audio
VAE halves time twice (``ceil``), so ``ceil(T_mel / 4)`` latents: 1 s of audio → 26 latents, and
the decoder maps ``T`` latents back to ``4·T - 3`` mel frames.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class MelSettings:
    """Everything that defines the log-mel input of the audio VAE (also part of the encoder fingerprint)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-5
    vae_time_downsample: int = 4  # the audio VAE's time compression

    def as_dict(self) -> dict:
        return asdict(self)


LTX2_MEL = MelSettings()


def mel_frame_count(num_samples: int, settings: MelSettings = LTX2_MEL) -> int:
    """Mel frames for ``num_samples`` samples with centred STFT frames."""
    return 1 + int(num_samples) // settings.hop_length


def audio_latent_count(num_samples: int, settings: MelSettings = LTX2_MEL) -> int:
    """Audio latents the causal VAE gives for ``num_samples`` samples (25 per second, plus one)."""
    return math.ceil(mel_frame_count(num_samples, settings) / settings.vae_time_downsample)


def to_stereo(waveform: torch.Tensor) -> torch.Tensor:
    """``[B, C, S]`` → ``[B, 2, S]``: mono is duplicated, more than two channels are averaged to mono
    and duplicated (with a warning: the channel layout is unknown here, so no surround downmix)."""
    if waveform.ndim != 3:
        raise ValueError(f"audio waveform must be [batch, channels, samples], got shape {tuple(waveform.shape)}")
    channels = waveform.shape[1]
    if channels == 2:
        return waveform
    if channels == 1:
        return waveform.expand(-1, 2, -1)
    if channels == 0:
        raise ValueError("audio waveform has 0 channels")
    warnings.warn(
        f"audio has {channels} channels; averaging them to mono and duplicating to stereo for the LTX-2 audio "
        "VAE (downmix to stereo when decoding the media to keep the stereo image)",
        stacklevel=2,
    )
    return waveform.mean(dim=1, keepdim=True).expand(-1, 2, -1)


def _hz_to_slaney_mel(freq: torch.Tensor) -> torch.Tensor:
    # Slaney's auditory-toolbox scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above.
    linear_step = 200.0 / 3.0
    break_hz = 1000.0
    break_mel = break_hz / linear_step
    log_step = math.log(6.4) / 27.0
    return torch.where(
        freq < break_hz,
        freq / linear_step,
        break_mel + torch.log(torch.clamp(freq, min=break_hz) / break_hz) / log_step,
    )


def _slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear_step = 200.0 / 3.0
    break_hz = 1000.0
    break_mel = break_hz / linear_step
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < break_mel, mel * linear_step, break_hz * torch.exp(log_step * (mel - break_mel)))


@lru_cache(maxsize=8)
def slaney_mel_filterbank(n_freqs: int, sample_rate: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular mel filters ``[n_freqs, n_mels]`` (float64, CPU) on the Slaney scale, each filter
    scaled to unit area (Slaney normalisation: 2 / bandwidth in Hz)."""
    fft_freqs = torch.linspace(0.0, sample_rate / 2.0, n_freqs, dtype=torch.float64)
    mel_edges = torch.linspace(
        float(_hz_to_slaney_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(_hz_to_slaney_mel(torch.tensor(f_max, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz_edges = _slaney_mel_to_hz(mel_edges)  # left edge, centre, right edge of every filter
    widths = hz_edges[1:] - hz_edges[:-1]
    offsets = hz_edges.unsqueeze(0) - fft_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    area_norm = 2.0 / (hz_edges[2:] - hz_edges[:-2])
    return filters * area_norm.unsqueeze(0)


def log_mel_spectrogram(
    waveform: torch.Tensor, sample_rate: int, settings: MelSettings = LTX2_MEL
) -> torch.Tensor:
    """Stereo waveform ``[B, C, S]`` at ``sample_rate`` → log-mel ``[B, 2, T_mel, n_mels]`` in float32.

    Mono is duplicated and >2 channels downmixed (see ``to_stereo``); resampling is the media
    layer's job, so a rate other than ``settings.sample_rate`` is an error.
    """
    if sample_rate != settings.sample_rate:
        raise ValueError(
            f"audio is at {sample_rate} Hz but the LTX-2 audio VAE needs {settings.sample_rate} Hz; "
            "resample it first (the media loader does this when decoding)"
        )
    waveform = to_stereo(waveform)
    batch, channels, num_samples = waveform.shape
    min_samples = settings.n_fft // 2 + 1  # reflect padding of centred frames needs this many
    if num_samples < min_samples:
        raise ValueError(
            f"audio clip has {num_samples} samples ({1000.0 * num_samples / sample_rate:.1f} ms); the log-mel "
            f"front-end needs at least {min_samples} samples — drop the audio of clips this short"
        )
    signal = waveform.to(torch.float32).reshape(batch * channels, num_samples)
    if not torch.isfinite(signal).all():
        raise ValueError("audio waveform contains NaN or infinite samples; the decoded audio is corrupt")
    window = torch.hann_window(settings.n_fft, periodic=True, dtype=torch.float32, device=signal.device)
    spectrum = torch.stft(
        signal,
        n_fft=settings.n_fft,
        hop_length=settings.hop_length,
        win_length=settings.n_fft,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    magnitude = spectrum.abs()  # [B·C, n_freqs, T_mel], power 1
    filters = slaney_mel_filterbank(
        settings.n_fft // 2 + 1, settings.sample_rate, settings.n_mels, settings.f_min, settings.f_max
    ).to(device=signal.device, dtype=torch.float32)
    mel = torch.einsum("nft,fm->ntm", magnitude, filters)
    log_mel = torch.log(torch.clamp(mel, min=settings.log_floor))
    return log_mel.reshape(batch, channels, log_mel.shape[1], settings.n_mels)
