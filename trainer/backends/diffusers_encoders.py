"""The headless ``Encoders``: diffusers' LTX-2 video VAE, audio VAE, vocoder, plus a text source.

Latent conventions follow diffusers' ``LTX2Pipeline`` (and ComfyUI, which agrees):

- video: posterior mean of ``AutoencoderKLLTX2Video``, normalised per channel,
  ``(z - latents_mean) · scaling_factor / latents_std`` → ``[B, 128, F', H/32, W/32]``;
- audio: log-mel (``audio_frontend``) → ``AutoencoderKLLTX2Audio`` encoder → posterior MEAN (never a
  sample: the cache must be deterministic) → ``(z - latents_mean) / latents_std``. The audio VAE keeps
  its statistics in the packed token layout ``[B, T, C·M]`` (128 = 8 channels x 16 mel bins), so they
  are applied as a ``[C, M]`` grid here. Audio always runs in float32.

Every method returns tensors on the device of the module that produced them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import ConfigError, TinyModelConfig
from .audio_frontend import LTX2_MEL, MelSettings, audio_latent_count, log_mel_spectrogram
from .fingerprint import module_fingerprint
from .interface import (
    AUDIO_LATENT_CHANNELS,
    AUDIO_LATENT_MEL_BINS,
    VIDEO_LATENT_CHANNELS,
    EncodedAudio,
    TextContext,
    encode_padded_audio,
)
from .text_encoder import (
    REAL_MAX_TEXT_LENGTH,
    TextSource,
    build_tiny_text_encoder,
    load_text_encoder,
)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PIPELINE_SUBFOLDERS = ("vae", "audio_vae", "vocoder", "connectors", "text_encoder", "tokenizer")


class DiffusersEncoders:
    """``Encoders`` on diffusers' LTX-2 components. ``text`` is a ``TextEncoder`` or ``PrecomputedText``."""

    def __init__(self, video_vae: nn.Module, audio_vae: nn.Module, vocoder: nn.Module, text: TextSource,
                 version: str):
        from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE

        if version not in ("2.0", "2.3"):
            raise ConfigError(f"model.version must be '2.0' or '2.3', got {version!r}")
        if text.version != version:
            raise ConfigError(f"model.version is {version!r} but the text source is for LTX-{text.version}")
        has_bwe = isinstance(vocoder, LTX2VocoderWithBWE)
        if has_bwe != (version == "2.3"):
            found = "2.3" if has_bwe else "2.0"
            raise ConfigError(
                f"model.version is {version!r} but the vocoder is {type(vocoder).__name__} (LTX-{found}); "
                f"set model.version = \"{found}\" or use the matching vocoder"
            )
        self.mel = _mel_settings_for(audio_vae)
        _check_video_vae(video_vae)
        self.video_vae = video_vae.eval().requires_grad_(False)
        # Audio latents are encoded in float32 (bf16 rounding of the posterior mean is audible after decoding); the audio VAE is small, so keep it there.
        self.audio_vae = audio_vae.eval().requires_grad_(False).float()
        self.vocoder = vocoder.eval().requires_grad_(False)
        self.text = text
        self.version = version
        self.audio_sample_rate: int = self.mel.sample_rate

    # ---- video ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1], F = 8n+1, H and W multiples of 32 → ``[B, 128, F', H/32, W/32]``
        (float32, posterior mean, normalised)."""
        self._check_frames(frames)
        device, dtype = _device_dtype(self.video_vae)
        posterior = self.video_vae.encode(frames.to(device=device, dtype=dtype)).latent_dist
        return self._normalise_video(posterior.mean.float())

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 128, F', H', W']`` → frames ``[B, 3, 8(F'-1)+1, 32H', 32W']`` in [-1, 1] (float32)."""
        if latents.ndim != 5 or latents.shape[1] != VIDEO_LATENT_CHANNELS:
            raise ValueError(f"video latents must be [B, 128, F', H', W'], got {tuple(latents.shape)}")
        device, dtype = _device_dtype(self.video_vae)
        z = self._denormalise_video(latents.to(device=device, dtype=torch.float32)).to(dtype)
        # Decoder timestep conditioning: the pipeline's default decode timestep is 0 with no added noise.
        temb = torch.zeros(z.shape[0], device=device, dtype=dtype) if self.video_vae.config.timestep_conditioning else None
        frames = self.video_vae.decode(z, temb).sample
        return frames.float().clamp(-1.0, 1.0)

    def _normalise_video(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._video_stats(z)
        return (z - mean) * self.video_vae.config.scaling_factor / std

    def _denormalise_video(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._video_stats(z)
        return z * std / self.video_vae.config.scaling_factor + mean

    def _video_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return (self.video_vae.latents_mean.to(like).view(shape), self.video_vae.latents_std.to(like).view(shape))

    def _check_frames(self, frames: torch.Tensor) -> None:
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"video frames must be [B, 3, F, H, W], got {tuple(frames.shape)}")
        _, _, count, height, width = frames.shape
        spatial = self.video_vae.spatial_compression_ratio
        temporal = self.video_vae.temporal_compression_ratio
        if (count - 1) % temporal != 0:
            raise ValueError(f"video has {count} frames; the LTX-2 VAE needs {temporal}n+1 (1, 9, 17, 25, ...)")
        if height % spatial or width % spatial:
            raise ValueError(f"video is {width}x{height}; width and height must be multiples of {spatial}")
        low, high = float(frames.min()), float(frames.max())
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"video frames range over [{low:.3g}, {high:.3g}]; expected [-1, 1] (map uint8 pixels with x/127.5 - 1)"
            )

    # ---- audio ----------------------------------------------------------------------------------

    def audio_latent_frames(self, num_samples: int) -> int:
        """Latent frames the audio VAE gives for ``num_samples`` samples at ``audio_sample_rate``."""
        return audio_latent_count(num_samples, self.mel)

    @torch.no_grad()
    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[B, C, S]`` at 16 kHz (C = 2; mono duplicated, more channels downmixed) → ``[B, 8, T, 16]``
        float32: posterior mean, normalised. T = ceil((1 + S // 160) / 4) ≈ 25 per second."""
        device = next(self.audio_vae.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):  # stay in float32 under a caller's autocast
            mel = log_mel_spectrogram(waveform.to(device), self.audio_sample_rate, self.mel)
            posterior = self.audio_vae.encode(mel).latent_dist
            z = posterior.mean.float()
        self._check_audio_latents(z)
        mean, std = self._audio_stats(z)
        return (z - mean) / std

    def encode_audio_padded(self, waveform: torch.Tensor, valid_samples: Sequence[int]) -> EncodedAudio:
        """``encode_audio`` for a batch padded to a common length, with the number of latent frames of
        each sample that come from its real audio (the rest encode the padding). The encoder is causal
        in time; only the centred STFT window of the last valid frame reaches 32 ms into the padding."""
        return encode_padded_audio(self, waveform, valid_samples)

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Normalised ``[B, 8, T, 16]`` → (waveform ``[B, 2, S]`` float32, vocoder output rate).
        T latents give 4T-3 mel frames, i.e. (4T-3)·10 ms of audio."""
        self._check_audio_latents(latents)
        device = next(self.audio_vae.parameters()).device
        z = latents.to(device=device, dtype=torch.float32)
        mean, std = self._audio_stats(z)
        with torch.autocast(device_type=device.type, enabled=False):
            mel = self.audio_vae.decode(z * std + mean).sample  # [B, 2, 4T-3, 64]
        vocoder_device, vocoder_dtype = _device_dtype(self.vocoder)
        waveform = self.vocoder(mel.to(device=vocoder_device, dtype=vocoder_dtype))
        return waveform.float(), self.output_sample_rate

    @property
    def output_sample_rate(self) -> int:
        return int(self.vocoder.config.output_sampling_rate)

    def _audio_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Stored for the packed token layout [B, T, C·M] (index c·M + m): reshape to the [C, M] grid.
        grid = (1, AUDIO_LATENT_CHANNELS, 1, AUDIO_LATENT_MEL_BINS)
        return (self.audio_vae.latents_mean.to(like).view(grid), self.audio_vae.latents_std.to(like).view(grid))

    @staticmethod
    def _check_audio_latents(latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != AUDIO_LATENT_CHANNELS or latents.shape[3] != AUDIO_LATENT_MEL_BINS:
            raise ValueError(f"audio latents must be [B, 8, T, 16], got {tuple(latents.shape)}")

    # ---- text -----------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> TextContext:
        return self.text.encode_text(prompts)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Short stable hash of every encoder's class, config and exact weights, the audio front-end
        settings and the text source: any change invalidates cached latents."""
        h = hashlib.sha256()
        h.update(json.dumps({"version": self.version, "mel": self.mel.as_dict(), "audio": "posterior-mean"},
                            sort_keys=True).encode())
        for module in (self.video_vae, self.audio_vae, self.vocoder):
            h.update(module_fingerprint(module).encode())
        h.update(self.text.fingerprint().encode())
        return h.hexdigest()[:16]

    def to(self, device) -> "DiffusersEncoders":
        self.video_vae.to(device)
        self.audio_vae.to(device)
        self.vocoder.to(device)
        if hasattr(self.text, "to"):
            self.text.to(device)
        return self


# ---- checks -------------------------------------------------------------------------------------


def _mel_settings_for(audio_vae: nn.Module) -> MelSettings:
    """The front-end is LTX-2's; refuse an audio VAE configured for anything else."""
    cfg = audio_vae.config
    expected = dict(sample_rate=LTX2_MEL.sample_rate, mel_hop_length=LTX2_MEL.hop_length, mel_bins=LTX2_MEL.n_mels,
                    latent_channels=AUDIO_LATENT_CHANNELS, in_channels=2)
    wrong = {k: cfg.get(k) for k, v in expected.items() if cfg.get(k) != v}
    if wrong:
        raise ConfigError(f"the audio VAE config has {wrong}; the LTX-2 audio VAE needs {expected}")
    stats = audio_vae.latents_mean.numel()
    if stats != AUDIO_LATENT_CHANNELS * AUDIO_LATENT_MEL_BINS:
        raise ConfigError(
            f"the audio VAE's latents_mean has {stats} entries; LTX-2 stores 128 (8 channels x 16 mel bins)"
        )
    return LTX2_MEL


def _check_video_vae(video_vae: nn.Module) -> None:
    cfg = video_vae.config
    if cfg.latent_channels != VIDEO_LATENT_CHANNELS:
        raise ConfigError(f"the video VAE has {cfg.latent_channels} latent channels; LTX-2's has 128")
    if video_vae.spatial_compression_ratio != 32 or video_vae.temporal_compression_ratio != 8:
        raise ConfigError(
            f"the video VAE compresses {video_vae.spatial_compression_ratio}x spatially and "
            f"{video_vae.temporal_compression_ratio}x in time; LTX-2's compresses 32x and 8x"
        )


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


# ---- the embedded tiny encoders -------------------------------------------------------------------


def tiny_video_vae_config(version: str) -> dict:
    """LTX-2's video VAE layout (patch 4, four 2x down blocks: 32x space, 8x time, 128 latent
    channels) with narrow blocks and one layer each. The decoder follows each version's layout."""
    common = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=VIDEO_LATENT_CHANNELS,
        block_out_channels=(16, 32, 64, 128),
        # The first block's resnets run at the latent width (128) on the full patched grid, which is
        # 80 % of the encoder's FLOPs: the tiny VAE has none there.
        layers_per_block=(0, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
        encoder_spatial_padding_mode="zeros",
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    if version == "2.0":
        return dict(
            common,
            decoder_block_out_channels=(16, 32, 64),
            decoder_layers_per_block=(1, 1, 1, 1),
            decoder_spatio_temporal_scaling=(True, True, True),
            decoder_inject_noise=(False, False, False, False),
            upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
            upsample_residual=(True, True, True),
            upsample_factor=(2, 2, 2),
            decoder_spatial_padding_mode="reflect",
        )
    return dict(
        common,
        decoder_block_out_channels=(16, 32, 32, 64),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_spatio_temporal_scaling=(True, True, True, True),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
        upsample_residual=(False, False, False, False),
        upsample_factor=(2, 2, 1, 2),
        decoder_spatial_padding_mode="zeros",
    )


def tiny_audio_vae_config() -> dict:
    """LTX-2's audio VAE (causal in time, pixel norm, 8x16 latents, two 2x downsamplings) with no
    resnets in the encoder levels (the mid block keeps its two) and one per decoder level.
    ``base_channels`` stays 128 because diffusers sizes the latent statistics buffers by it, and
    LTX-2 stores 128 statistics (8 channels x 16 mel bins); ch_mult 1 keeps the levels narrow."""
    return dict(
        base_channels=128,
        output_channels=2,
        ch_mult=(1, 1, 1),
        num_res_blocks=0,
        attn_resolutions=None,
        in_channels=2,
        resolution=256,
        latent_channels=AUDIO_LATENT_CHANNELS,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=LTX2_MEL.sample_rate,
        mel_hop_length=LTX2_MEL.hop_length,
        is_causal=True,
        mel_bins=LTX2_MEL.n_mels,
        double_z=True,
    )


def tiny_vocoder_config(version: str) -> dict:
    """LTX-2.0: HiFi-GAN, 240x upsampling of 100 Hz mel frames → 24 kHz. LTX-2.3: a 160x stage to
    16 kHz, then bandwidth extension (causal mel of the 16 kHz output at hop 80, 240x) → 48 kHz.
    Same activations and output rates as the real vocoders, fewer and narrower layers."""
    stage = dict(
        in_channels=2 * LTX2_MEL.n_mels,
        out_channels=2,
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3]],
    )
    if version == "2.0":
        return dict(
            stage,
            hidden_channels=32,
            upsample_kernel_sizes=[12, 15, 16],
            upsample_factors=[6, 5, 8],
            act_fn="leaky_relu",
            leaky_relu_negative_slope=0.1,
            antialias=False,
            final_act_fn="tanh",
            final_bias=True,
            output_sampling_rate=24000,
        )
    return dict(
        stage,
        hidden_channels=32,
        upsample_kernel_sizes=[11, 8, 16],
        upsample_factors=[5, 4, 8],
        act_fn="snakebeta",
        antialias=True,
        antialias_ratio=2,
        antialias_kernel_size=12,
        final_act_fn=None,
        final_bias=False,
        bwe_in_channels=2 * LTX2_MEL.n_mels,
        bwe_hidden_channels=16,
        bwe_out_channels=2,
        bwe_upsample_kernel_sizes=[12, 15, 16],
        bwe_upsample_factors=[6, 5, 8],
        bwe_resnet_kernel_sizes=[3],
        bwe_resnet_dilations=[[1, 3]],
        bwe_act_fn="snakebeta",
        bwe_antialias=True,
        bwe_antialias_ratio=2,
        bwe_antialias_kernel_size=12,
        bwe_final_act_fn=None,
        bwe_final_bias=False,
        filter_length=512,
        hop_length=80,
        window_length=512,
        num_mel_channels=LTX2_MEL.n_mels,
        input_sampling_rate=16000,
        output_sampling_rate=48000,
    )


def build_tiny_encoders(version: str, tiny: TinyModelConfig, seed: int = 0) -> DiffusersEncoders:
    """Seeded random-weight encoders whose contexts and latents fit ``tiny_transformer_config(version, tiny)``.
    Each component has its own seed, so the same arguments always give the same weights."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    if version not in ("2.0", "2.3"):
        raise ConfigError(f"model.version must be '2.0' or '2.3', got {version!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        video_vae = AutoencoderKLLTX2Video(**tiny_video_vae_config(version))
        _randomise_latent_statistics(video_vae)
        torch.manual_seed(seed + 1)
        audio_vae = AutoencoderKLLTX2Audio(**tiny_audio_vae_config())
        _randomise_latent_statistics(audio_vae)
        torch.manual_seed(seed + 2)
        if version == "2.0":
            vocoder = LTX2Vocoder(**tiny_vocoder_config(version))
        else:
            vocoder = LTX2VocoderWithBWE(**tiny_vocoder_config(version))
            _fill_bwe_analysis_buffers(vocoder)
    text = build_tiny_text_encoder(version, tiny, seed=seed + 3)
    return DiffusersEncoders(video_vae, audio_vae, vocoder, text, version)


def _randomise_latent_statistics(vae: nn.Module) -> None:
    # Real checkpoints carry dataset statistics; identity statistics would leave normalisation untested.
    with torch.no_grad():
        vae.latents_mean.copy_(0.1 * torch.randn_like(vae.latents_mean))
        vae.latents_std.copy_(0.5 + torch.rand_like(vae.latents_std))


def _fill_bwe_analysis_buffers(vocoder: nn.Module) -> None:
    """The BWE vocoder's causal STFT basis and mel filterbank are checkpoint buffers (zeros when
    built from config): fill them with a Hann-windowed DFT and the Slaney filterbank so the tiny
    vocoder really analyses its first-stage output. (``inverse_basis`` is not used by diffusers' forward.)"""
    from .audio_frontend import slaney_mel_filterbank

    cfg = vocoder.config
    n_fft = cfg.filter_length
    n_freqs = n_fft // 2 + 1
    window = torch.hann_window(cfg.window_length, periodic=True, dtype=torch.float64)
    if cfg.window_length < n_fft:
        window = torch.nn.functional.pad(window, (0, n_fft - cfg.window_length))
    angles = 2.0 * torch.pi * torch.outer(torch.arange(n_freqs, dtype=torch.float64),
                                          torch.arange(n_fft, dtype=torch.float64)) / n_fft
    basis = torch.cat([torch.cos(angles) * window, -torch.sin(angles) * window]).unsqueeze(1)
    filters = slaney_mel_filterbank(n_freqs, cfg.input_sampling_rate, cfg.num_mel_channels, 0.0,
                                    cfg.input_sampling_rate / 2.0)
    with torch.no_grad():
        vocoder.mel_stft.stft_fn.forward_basis.copy_(basis.float())
        vocoder.mel_stft.mel_basis.copy_(filters.T.float())


# ---- loading a diffusers-format pipeline folder ---------------------------------------------------


def load_encoders(
    folder: str | Path,
    version: str,
    text_encoder_path: str | Path | None = None,
    precision: str = "bf16",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    device: str | torch.device = "cpu",
    max_text_length: int = REAL_MAX_TEXT_LENGTH,
) -> DiffusersEncoders:
    """Encoders from a local diffusers LTX-2 / LTX-2.3 pipeline folder (``vae/``, ``audio_vae/``,
    ``vocoder/``, ``connectors/``, ``text_encoder/``, ``tokenizer/``), never downloading.

    ``text_encoder_path``: a Gemma-3 folder to use instead of ``text_encoder/`` (its tokenizer is
    used when it has one). ``precision`` sets the video VAE, vocoder, Gemma and connectors dtype; the
    audio VAE always runs in float32. 8-bit / 4-bit Gemma needs CUDA and bitsandbytes.
    """
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    if version not in ("2.0", "2.3"):
        raise ConfigError(f"model.version must be '2.0' or '2.3', got {version!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"encoder precision {precision!r} is not allowed; choose one of {', '.join(PRECISIONS)}")
    if load_in_8bit and load_in_4bit:
        raise ConfigError("choose one of load_in_8bit and load_in_4bit for the text encoder, not both")
    quantization = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None
    dtype = PRECISIONS[precision]

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: LTX-2 pipeline folder not found")
    text_dir = Path(text_encoder_path) if text_encoder_path is not None else root / "text_encoder"
    tokenizer_dir = text_dir if text_encoder_path is not None and _has_tokenizer(text_dir) else root / "tokenizer"
    required = {"vae": root / "vae", "audio_vae": root / "audio_vae", "vocoder": root / "vocoder",
                "connectors": root / "connectors"}
    missing = [f"{name}/" for name, path in required.items() if not (path / "config.json").is_file()]
    if not (text_dir / "config.json").is_file():
        missing.append(str(text_dir) if text_encoder_path is not None else "text_encoder/")
    if not _has_tokenizer(tokenizer_dir):
        missing.append("tokenizer/")
    if missing:
        raise ConfigError(
            f"{root}: missing {', '.join(missing)} (each needs its config.json and weights); expected a diffusers "
            f"LTX-2 pipeline folder with {', '.join(s + '/' for s in PIPELINE_SUBFOLDERS)}"
        )

    vocoder_class = _check_folder_version(root, version, {"LTX2Vocoder": LTX2Vocoder, "LTX2VocoderWithBWE": LTX2VocoderWithBWE})
    common = dict(local_files_only=True)
    video_vae = AutoencoderKLLTX2Video.from_pretrained(str(root / "vae"), torch_dtype=dtype, **common)
    audio_vae = AutoencoderKLLTX2Audio.from_pretrained(str(root / "audio_vae"), torch_dtype=torch.float32, **common)
    vocoder = vocoder_class.from_pretrained(str(root / "vocoder"), torch_dtype=dtype, **common)
    text = load_text_encoder(text_dir, tokenizer_dir, root / "connectors", version, dtype=dtype,
                             quantization=quantization, device=device, max_length=max_text_length)
    encoders = DiffusersEncoders(video_vae, audio_vae, vocoder, text, version)
    encoders.video_vae.to(device)
    encoders.audio_vae.to(device)
    encoders.vocoder.to(device)
    return encoders


def _check_folder_version(root: Path, version: str, vocoder_classes: dict) -> type:
    """Read the vocoder and connector configs before loading any weights (Gemma alone is ~24 GB) and
    refuse a folder of the other LTX version; returns the vocoder class."""
    vocoder_config = root / "vocoder" / "config.json"
    class_name = json.loads(vocoder_config.read_text(encoding="utf-8")).get("_class_name")
    if class_name not in vocoder_classes:
        raise ConfigError(
            f"{vocoder_config}: _class_name {class_name!r}; expected LTX2Vocoder (LTX-2.0) or LTX2VocoderWithBWE (LTX-2.3)"
        )
    connectors_config = json.loads((root / "connectors" / "config.json").read_text(encoding="utf-8"))
    found = "2.3" if connectors_config.get("per_modality_projections") else "2.0"
    if (class_name == "LTX2VocoderWithBWE") != (found == "2.3"):
        raise ConfigError(f"{root}: the vocoder ({class_name}) and the text connectors (LTX-{found}) are from different LTX versions")
    if found != version:
        raise ConfigError(f"model.version is {version!r} but {root} holds LTX-{found} weights; set model.version = \"{found}\"")
    return vocoder_classes[class_name]


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
