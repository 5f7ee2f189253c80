"""Listen before you train, and hear what you trained.

- ``write_cache_previews``: for every cache entry, the decoded audio (wav) and a short video preview
  (decoded frames with the decoded audio muxed in), plus a round-trip score per item: log-mel distance
  and SNR between the source audio and the decoded audio, so broken audio is caught before a long run.
- ``sample_and_write``: A/B samples (same seed and prompt, with and without the LoRA) as mp4 + wav.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backends.audio_frontend import log_mel_spectrogram
from ..data.cache import load_entry, manifest_entries, prepare_for_cache
from ..data.media.audio import resample
from ..data.media.encode import write_av_file, write_wav
from ..io_utils import atomic_write_json

ROUND_TRIP_RATE = 16000


def round_trip_scores(source: np.ndarray, decoded: np.ndarray, rate: int = ROUND_TRIP_RATE) -> dict:
    """Log-mel distance (mean |Δ| of natural-log mel magnitudes, lower is better) and SNR in dB
    (higher is better) between two stereo signals at ``rate``, over their common length."""
    length = min(source.shape[1], decoded.shape[1])
    src, dec = source[:, :length].astype(np.float32), decoded[:, :length].astype(np.float32)
    noise = float(np.sum((src - dec) ** 2))
    signal = float(np.sum(src**2))
    snr = 10 * np.log10(max(signal, 1e-12) / max(noise, 1e-12))
    mel_src = log_mel_spectrogram(torch.from_numpy(src)[None], rate)
    mel_dec = log_mel_spectrogram(torch.from_numpy(dec)[None], rate)
    return {"log_mel_distance": float((mel_src - mel_dec).abs().mean()), "snr_db": float(snr), "seconds": length / rate}


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] → uint8 [F, H, W, 3] with even H and W."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    h, w = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
    return np.ascontiguousarray(frames[:, :h, :w])


@torch.no_grad()
def write_cache_previews(config, encoders, cache_dir: Path, *, progress=None) -> list[dict]:
    from ..data.dataset import enumerate_dataset

    out_dir = Path(cache_dir) / "previews"
    items = {str(i.media_path): i for i in enumerate_dataset(config.dataset)}
    results = []
    for entry in manifest_entries(cache_dir):
        sample = load_entry(cache_dir, entry)
        row = {"id": entry.id, "media": entry.media, "has_audio": entry.has_audio}
        frames = frames_uint8(encoders.decode_video(sample.video[None].float())[0])
        audio = None
        if sample.audio is not None:
            waveform, rate = encoders.decode_audio(sample.audio[None])
            audio = waveform[0].float().cpu().numpy()
            valid_seconds = sample.audio_valid_frames / 25.0
            audio = audio[:, : int(round(valid_seconds * rate))]
            row["wav"] = str(write_wav(out_dir / f"{entry.id}.wav", audio, rate))
            item = items.get(entry.media)
            if item is not None:
                try:
                    source = prepare_for_cache(item, config)
                    if source.audio is not None:
                        src = source.audio[:, : source.audio_valid_samples].numpy()
                        row["round_trip"] = round_trip_scores(src, resample(audio, rate, ROUND_TRIP_RATE))
                except Exception as exc:  # the source went away (source-free cache): no score, say why
                    row["round_trip_error"] = f"source not readable for scoring: {exc}"
            else:
                row["round_trip_error"] = "source media not in the dataset any more (source-free cache): no score"
            preview_audio = resample(audio, rate, 48000)
            row["video"] = str(write_av_file(out_dir / f"{entry.id}.mp4", frames, int(round(sample.fps)), preview_audio, 48000))
        else:
            row["video"] = str(write_av_file(out_dir / f"{entry.id}.mp4", frames, int(round(sample.fps)), None, 48000))
        results.append(row)
        if progress is not None:
            progress.line(_preview_line(row))
    atomic_write_json(out_dir / "round_trip.json", results)
    return results


def _preview_line(row: dict) -> str:
    rt = row.get("round_trip")
    score = f"log-mel distance {rt['log_mel_distance']:.3f}, SNR {rt['snr_db']:.1f} dB" if rt else row.get("round_trip_error", "no audio")
    return f"preview {row['id']}: {score}"


@torch.no_grad()
def sample_and_write(config, denoiser, encoders, lora: Path | None, prompt: str, out: Path, *, seed: int = 0, steps: int = 20,
                     seconds: float | None = None, network=None, conditioning: dict | None = None) -> dict:
    """Generate with and without the LoRA (same seed, same prompt) and write mp4 (audio muxed) + wav.
    ``conditioning``: ``SampleRequest`` fields of the training mode (``training.conditioning.generation_inputs``:
    first frame, reference, reference audio, or the audio-only stand-in's size)."""
    from ..adapters.network import load_lora_file
    from .generation import SampleRequest, sample_ab, sample_av

    d = config.dataset
    frames = d.frames if seconds is None else max(1, int(round(seconds * d.target_fps)) // 8 * 8 + 1)
    fields = dict(
        text=encoders.encode_text([prompt]),
        latent_frames=(frames - 1) // 8 + 1,
        latent_height=d.height // 32,
        latent_width=d.width // 32,
        audio_frames=encoders.audio_latent_frames(int(round(frames / d.target_fps * 16000))),
        fps=d.target_fps,
        steps=steps,
        seed=seed,
    )
    request = SampleRequest(**{**fields, **(conditioning or {})})
    out = Path(out)
    if network is None and lora is not None:
        network = load_lora_file(denoiser, lora)
    results = sample_ab(denoiser, network, request) if network is not None else {"base": sample_av(denoiser, request)}
    files = {}
    for name, (video_latent, audio_latent) in results.items():
        video = frames_uint8(encoders.decode_video(video_latent)[0])
        waveform, rate = encoders.decode_audio(audio_latent)
        audio = waveform[0].float().cpu().numpy()
        wav = write_wav(out / f"{name}.wav", audio, rate)
        mp4 = write_av_file(out / f"{name}.mp4", video, int(round(d.target_fps)), resample(audio, rate, 48000), 48000)
        files[name] = {"mp4": str(mp4), "wav": str(wav), "audio_rms": float(np.sqrt(np.mean(audio**2)))}
    if "lora" in results:
        files["difference"] = {
            "video_latent_rms": float((results["lora"][0] - results["base"][0]).pow(2).mean().sqrt()),
            "audio_latent_rms": float((results["lora"][1] - results["base"][1]).pow(2).mean().sqrt()),
        }
    report = {"prompt": prompt, "seed": seed, "steps": steps, "frames": frames, "files": files}
    atomic_write_json(out / "samples.json", report)
    return report
