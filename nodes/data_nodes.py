"""Data nodes: load a dataset, check it, listen to it, cache its latents, listen to the cache.

Each node builds the trainer's ``Config`` and calls ``trainer/`` (the same functions as the CLI):
``scan_dataset``, ``run_doctor``, ``prepare_for_cache``, ``cache_dataset``; ComfyUI's VAE / audio VAE /
CLIP reach the cache through ``ComfyEncoders``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from comfy_api.latest import io

from ..trainer.app.pipeline import cache_dataset
from ..trainer.backends.comfyui.denoiser import detect_comfy_version, ltxav_diffusion_model
from ..trainer.backends.comfyui.encoders import ComfyEncoders, decode_audio
from ..trainer.backends.comfyui.env import import_model_management
from ..trainer.backends.interface import AUDIO_LATENTS_PER_SECOND, AUDIO_SAMPLE_RATE
from ..trainer.config import Config, DatasetConfig, DatasetSource
from ..trainer.data.cache import load_entry, manifest_entries, prepare_for_cache
from ..trainer.data.dataset import enumerate_dataset, scan_dataset
from ..trainer.data.doctor import run_doctor
from ..trainer.data.media.decode import decode_audio as decode_media_audio
from ..trainer.data.media.probe import MediaError
from ..trainer.data.signature import dataset_signature
from .types import (
    CACHE_ROOT,
    CATEGORY_DATA,
    CacheType,
    DatasetType,
    audio_value,
    cache_payload,
    file_state,
    is_readable,
    output_subfolder,
    outside_roots_message,
    readable_roots,
    resolve_input_path,
)


def field_help(cls: type, name: str) -> str:
    """The help text config.py gives a field (the node tooltip)."""
    for field in dataclasses.fields(cls):
        if field.name == name:
            return field.metadata["help"]
    raise KeyError(f"{cls.__name__} has no field {name}")


def dataset_config(value, **sections: dict) -> Config:
    """An LTX2AV_DATASET value (plus other config sections) → a validated ``Config``."""
    if not isinstance(value, dict) or "sources" not in value:
        raise ValueError("expected an LTX2AV_DATASET value from the LTX2AV Load Dataset node")
    return Config.from_dict({"dataset": value, **sections})


def _progress(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(max(1, total))


def parse_frame_counts(text: str) -> list[int]:
    """'49, 73' → [49, 73] (commas or spaces); errors name the widget."""
    counts = []
    for item in text.replace(",", " ").split():
        try:
            counts.append(int(item))
        except ValueError:
            raise ValueError(f"frame_buckets: {item!r} is not a whole number; give frame counts (8n+1) separated by "
                             "commas, e.g. 49, 73, or leave it empty") from None
    return counts


def dataset_from_widgets(folder: str, trigger: str, caption_extension: str, audio_dir: str, target_fps: float,
                         frames: int, width: int, height: int, with_audio: bool, validation_split: float, kind: str,
                         repeats: int, frame_buckets: str = "", reference_dir: str = "", reference_frames: int = 1,
                         reference_downscale: int = 1, reference_audio_dir: str = "",
                         reference_audio_same_speaker: bool = False, reference_audio_seconds: float = 5.0) -> Config:
    """The Load Dataset widgets → a validated ``Config`` whose folders lie where nodes may read (``nodes/types``)."""
    root = resolve_input_path(folder, "folder")
    source = {"path": str(root), "kind": kind, "caption_extension": caption_extension.strip(), "repeats": repeats}
    # Like the CLI: a relative audio or reference folder is looked up next to the clips first.
    near = root if root.is_dir() else root.parent
    for name, value in (("audio_dir", audio_dir), ("reference_dir", reference_dir),
                        ("reference_audio_dir", reference_audio_dir)):
        if value.strip():
            source[name] = str(resolve_input_path(value, name, relative_to=[near, readable_roots()[0]]))
    return Config.from_dict({"dataset": {
        "sources": [source], "trigger": trigger.strip(), "target_fps": target_fps, "frames": frames, "width": width,
        "height": height, "with_audio": with_audio, "validation_split": validation_split,
        "frame_buckets": parse_frame_counts(frame_buckets), "reference_frames": reference_frames,
        "reference_downscale": reference_downscale, "reference_audio_seconds": reference_audio_seconds,
        "reference_audio_same_speaker": reference_audio_same_speaker,
    }})


def check_items_readable(dataset: DatasetConfig) -> None:
    """Every media and audio file of the dataset lies where nodes may read (a JSONL may name any path)."""
    for item in scan_dataset(dataset).items:
        for what, path in (("media", item.media_path), ("audio", item.audio_path), ("reference", item.reference_path),
                           ("reference audio", item.reference_audio_path)):
            if path is not None and not is_readable(path):
                raise ValueError("LTX2AV Load Dataset: " + outside_roots_message(f"the {what} of item {item.key}",
                                                                                  str(path), path))


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        src, ds = DatasetSource, DatasetConfig
        source_defaults, defaults = DatasetSource(), DatasetConfig()
        return io.Schema(
            node_id="LTX2AV_LoadDataset",
            display_name="LTX2AV Load Dataset",
            category=CATEGORY_DATA,
            description="A folder of clips (or images, audio files, or a JSONL list) with captions: the dataset to "
                        "check, cache and train on, with the references of the IC-LoRA / ID-LoRA modes. Relative paths "
                        "are read from ComfyUI's input folder. Adding, replacing or editing a clip, a reference or a "
                        "caption re-runs it (and the nodes after it) on the next queue.",
            inputs=[
                io.String.Input("folder", default="", tooltip=field_help(src, "path") + " Relative paths start in ComfyUI's input folder; other folders only when the server allows them (LTX2AV_DATASET_ROOTS)."),
                io.String.Input("trigger", default=defaults.trigger, tooltip=field_help(ds, "trigger")),
                io.String.Input("caption_extension", default=source_defaults.caption_extension, tooltip=field_help(src, "caption_extension")),
                io.String.Input("audio_dir", default="", tooltip=field_help(src, "audio_dir") + " A relative path is looked up next to the clips first, then in ComfyUI's input folder."),
                io.Float.Input("target_fps", default=defaults.target_fps, min=1.0, max=240.0, step=0.01, tooltip=field_help(ds, "target_fps")),
                io.Int.Input("frames", default=defaults.frames, min=1, max=1025, step=8, tooltip=field_help(ds, "frames")),
                io.Int.Input("width", default=defaults.width, min=32, max=4096, step=32, tooltip=field_help(ds, "width")),
                io.Int.Input("height", default=defaults.height, min=32, max=4096, step=32, tooltip=field_help(ds, "height")),
                io.Boolean.Input("with_audio", default=defaults.with_audio, tooltip=field_help(ds, "with_audio")),
                io.Float.Input("validation_split", default=0.0, min=0.0, max=0.99, step=0.01, tooltip=field_help(ds, "validation_split")),
                io.Combo.Input("kind", options=["video", "image", "jsonl", "audio"], default="video", tooltip=field_help(src, "kind")),
                io.Int.Input("repeats", default=1, min=1, max=10000, tooltip=field_help(src, "repeats")),
                io.String.Input("frame_buckets", default=", ".join(str(f) for f in defaults.frame_buckets),
                                tooltip=field_help(ds, "frame_buckets") + " Frame counts separated by commas.", advanced=True),
                io.String.Input("reference_dir", default="", optional=True, advanced=True,
                                tooltip=field_help(src, "reference_dir") + " Relative paths start next to the folder."),
                io.Int.Input("reference_frames", default=defaults.reference_frames, min=1, max=1025, step=8, optional=True,
                             advanced=True, tooltip=field_help(ds, "reference_frames")),
                io.Int.Input("reference_downscale", default=defaults.reference_downscale, min=1, max=8, optional=True,
                             advanced=True, tooltip=field_help(ds, "reference_downscale")),
                io.String.Input("reference_audio_dir", default="", optional=True, advanced=True,
                                tooltip=field_help(src, "reference_audio_dir") + " Relative paths start next to the folder."),
                io.Boolean.Input("reference_audio_same_speaker", default=defaults.reference_audio_same_speaker,
                                 optional=True, advanced=True, tooltip=field_help(ds, "reference_audio_same_speaker")),
                io.Float.Input("reference_audio_seconds", default=defaults.reference_audio_seconds, min=0.5, max=60.0,
                               step=0.1, optional=True, advanced=True, tooltip=field_help(ds, "reference_audio_seconds")),
            ],
            outputs=[DatasetType.Output("dataset", tooltip="The dataset settings (LTX2AV_DATASET).")],
        )

    @classmethod
    def fingerprint_inputs(cls, **widgets):
        # ComfyUI re-executes a node (and every node after it) when this changes: the folder's content signature,
        # not just its name. A dataset that cannot be read is reported by execute.
        try:
            return dataset_signature(dataset_from_widgets(**widgets).dataset)
        except (ValueError, TypeError, OSError) as exc:
            return f"unreadable: {exc}"

    @classmethod
    def execute(cls, folder: str, trigger: str, caption_extension: str, audio_dir: str, target_fps: float, frames: int,
                width: int, height: int, with_audio: bool, validation_split: float, kind: str, repeats: int,
                frame_buckets: str = "", reference_dir: str = "", reference_frames: int = 1, reference_downscale: int = 1,
                reference_audio_dir: str = "", reference_audio_same_speaker: bool = False,
                reference_audio_seconds: float = 5.0) -> io.NodeOutput:
        config = dataset_from_widgets(folder, trigger, caption_extension, audio_dir, target_fps, frames, width, height,
                                      with_audio, validation_split, kind, repeats, frame_buckets, reference_dir,
                                      reference_frames, reference_downscale, reference_audio_dir,
                                      reference_audio_same_speaker, reference_audio_seconds)
        scan = scan_dataset(config.dataset)
        if scan.errors:
            raise ValueError("LTX2AV Load Dataset: " + "; ".join(scan.errors))
        check_items_readable(config.dataset)
        return io.NodeOutput(dataclasses.asdict(config.dataset))


class DatasetDoctor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_DatasetDoctor",
            display_name="LTX2AV Dataset Doctor",
            category=CATEGORY_DATA,
            description="Checks every clip before caching (audio present and aligned, loudness, clipping, silence, "
                        "frame rate, captions with the trigger) and lets you listen to one clip as the trainer hears it.",
            inputs=[
                DatasetType.Input("dataset", tooltip="From LTX2AV Load Dataset."),
                io.Boolean.Input("strict", default=False, tooltip="Stop the workflow with an error when any item has an error (otherwise items with errors are only reported)."),
                io.Int.Input("listen_index", default=0, min=0, max=100000, tooltip="Which item (0 = the first, in report order) to output as audio: 16 kHz stereo, decoded, resampled and cut exactly as the cache will encode it."),
            ],
            outputs=[
                io.String.Output("report", tooltip="The readable report."),
                io.String.Output("report_json", tooltip="The same report as JSON (one entry per item)."),
                io.Audio.Output("audio", tooltip="The chosen item's audio as the cache will encode it."),
            ],
        )

    @classmethod
    def execute(cls, dataset, strict: bool, listen_index: int) -> io.NodeOutput:
        config = dataset_config(dataset)
        progress = _progress(1)
        mm = import_model_management()

        def tick(done: int, total: int, _path: str) -> None:
            progress.update_absolute(done, max(1, total))
            mm.throw_exception_if_processing_interrupted()

        report = run_doctor(config.dataset, strict=strict, progress=tick)
        text = report.to_text()
        if strict and report.has_errors:
            raise ValueError("LTX2AV Dataset Doctor (strict): the dataset has errors; fix them or turn strict off.\n" + text)
        audio, note = listen_to_item(config, listen_index)
        return io.NodeOutput(text + "\n" + note, report.to_json(), audio)


def listen_to_item(config: Config, index: int) -> tuple[dict, str]:
    """(AUDIO of item ``index`` as the cache sees it, one report line). An item without usable audio gives
    a 0.1 s silent clip and a line saying why, so the report is still shown."""
    items = enumerate_dataset(config.dataset)
    if not 0 <= index < len(items):
        raise ValueError(f"listen_index {index} is out of range: the dataset has {len(items)} items (0..{len(items) - 1})")
    item = items[index]
    try:
        prepared = prepare_for_cache(item, config)
    except MediaError as exc:
        problem = str(exc)
    else:
        if prepared.audio is not None:
            waveform = prepared.audio[:, : prepared.audio_valid_samples]
            line = f"listen_index {index}: {item.media_path} ({waveform.shape[1] / AUDIO_SAMPLE_RATE:.2f} s at {AUDIO_SAMPLE_RATE} Hz, as cached)"
            return audio_value(waveform, AUDIO_SAMPLE_RATE), line
        problem = prepared.audio_problem or "no audio (image item or with_audio is off)"
    silence = torch.zeros(2, AUDIO_SAMPLE_RATE // 10)
    return audio_value(silence, AUDIO_SAMPLE_RATE), f"listen_index {index}: {item.media_path} has no audio to listen to ({problem}); the audio output is 0.1 s of silence"


class ExtractAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_ExtractAudio",
            display_name="LTX2AV Extract Audio",
            category=CATEGORY_DATA,
            description="The sound of a video or audio file (PyAV decoder, no FFmpeg install needed), at its own rate and channels.",
            inputs=[
                io.String.Input("file", default="", tooltip="Path of a video or audio file; relative paths start in ComfyUI's input folder."),
                io.Int.Input("audio_stream", default=0, min=0, max=64, tooltip=field_help(DatasetSource, "audio_stream")),
            ],
            outputs=[io.Audio.Output("audio", tooltip="The decoded audio stream.")],
        )

    @classmethod
    def fingerprint_inputs(cls, file: str = "", audio_stream: int = 0, **_):
        # Re-read when the file is replaced or edited (its name alone stays the same).
        try:
            path = resolve_input_path(file, "file")
        except ValueError as exc:
            return f"unreadable: {exc}"
        return (str(path), audio_stream, file_state(path))

    @classmethod
    def execute(cls, file: str, audio_stream: int) -> io.NodeOutput:
        path = resolve_input_path(file, "file")
        try:
            track = decode_media_audio(path, audio_index=audio_stream)
        except MediaError as exc:
            raise ValueError(f"LTX2AV Extract Audio: {exc}") from None
        return io.NodeOutput(audio_value(track.samples, track.sample_rate))


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_CacheLatents",
            display_name="LTX2AV Cache Latents",
            category=CATEGORY_DATA,
            description="Encodes every clip once (video VAE, audio VAE posterior mean in fp32, Gemma + the model's "
                        "text connectors) into output/ltx2av_cache/<cache_name>. Unchanged items are reused; changed "
                        "ones are re-encoded.",
            inputs=[
                DatasetType.Input("dataset", tooltip="From LTX2AV Load Dataset."),
                io.Model.Input("model", tooltip="The LTX-2 / LTX-2.3 audio-video MODEL (its text connectors prepare the captions)."),
                io.Vae.Input("vae", tooltip="The LTX-2 video VAE (from the checkpoint loader)."),
                io.Vae.Input("audio_vae", tooltip="The LTX-2 audio VAE (from Load LTXV Audio VAE)."),
                io.Clip.Input("clip", tooltip="The Gemma text encoder (from Load LTXV Audio Text Encoder)."),
                io.String.Input("cache_name", default="my_character", tooltip="Cache folder name under ComfyUI's output/ltx2av_cache (a plain name, no path)."),
                io.Boolean.Input("decode_previews", default=True, tooltip="Also decode every cached item back to wav + mp4 and score the audio round trip (log-mel distance, SNR): catches broken audio before training."),
            ],
            outputs=[
                CacheType.Output("cache", tooltip="The cache (LTX2AV_CACHE): folder, settings and report."),
                io.String.Output("summary", tooltip="What was encoded, reused and failed, with reasons."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, cache_name: str = "", decode_previews: bool = True, **_):
        # The dataset's content reaches this node through Load Dataset's signature (ComfyUI's cache key holds every
        # upstream node's). This adds the cache folder itself: deleted, it is rebuilt on the next queue.
        try:
            manifest = output_subfolder(CACHE_ROOT, cache_name, "cache_name") / "manifest.json"
        except ValueError as exc:
            return f"unusable: {exc}"
        return (cache_name, decode_previews, manifest.is_file())

    @classmethod
    def execute(cls, dataset, model, vae, audio_vae, clip, cache_name: str, decode_previews: bool) -> io.NodeOutput:
        version = detect_comfy_version(ltxav_diffusion_model(model))
        cache_dir = output_subfolder(CACHE_ROOT, cache_name, "cache_name")
        config = dataset_config(dataset, cache={"dir": str(cache_dir)}, model={"version": version})
        encoders = ComfyEncoders(model, vae, audio_vae, clip)
        warnings: list[str] = []
        import comfy.utils

        bar: list = []

        def on_item(done: int, total: int) -> None:
            if not bar:
                bar.append(comfy.utils.ProgressBar(total))
            bar[0].update_absolute(done, total)

        report = cache_dataset(config, encoders, decode=decode_previews, warn=warnings.append, on_item=on_item)
        summary = {k: v for k, v in report.items() if k != "warnings"} | {"warnings": warnings}
        return io.NodeOutput({"cache_dir": str(cache_dir), "config": config.to_dict(), "summary": summary},
                             cache_summary_text(summary))


def cache_summary_text(summary: dict) -> str:
    lines = [
        f"Audio latent caching: {summary['audio_encoded']} encoded, {summary['audio_failed']} failed",
        f"video encoded {summary['video_encoded']}, reused {summary['reused']}, invalidated {summary['invalidated']}, "
        f"items not cached {summary['failed']}, entries {summary['entries']}",
        f"cache folder: {summary['cache_dir']}",
    ]
    lines += [f"failed: {f['path']}: {f['reason']}" for f in summary.get("failures", [])]
    lines += [f"warning: {w}" for w in summary.get("warnings", [])]
    for row in summary.get("previews", []):
        rt = row.get("round_trip")
        score = (f"log-mel distance {rt['log_mel_distance']:.3f}, SNR {rt['snr_db']:.1f} dB" if rt
                 else row.get("round_trip_error", "no audio"))
        lines.append(f"preview {row['id']}: {score} ({row.get('video', '')})")
    return "\n".join(lines)


class PreviewCachedAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_PreviewCachedAudio",
            display_name="LTX2AV Preview Cached Audio",
            category=CATEGORY_DATA,
            description="Decodes one cached audio latent with the audio VAE: what the trainer will learn the voice from.",
            inputs=[
                CacheType.Input("cache", tooltip="From LTX2AV Cache Latents."),
                io.Int.Input("index", default=0, min=0, max=100000, tooltip="Which cache entry (0 = the first, in cache manifest order)."),
                io.Vae.Input("audio_vae", tooltip="The LTX-2 audio VAE the cache was made with (from Load LTXV Audio VAE)."),
            ],
            outputs=[io.Audio.Output("audio", tooltip="The cached audio, decoded (vocoder rate), cut to its valid length.")],
        )

    @classmethod
    def execute(cls, cache, index: int, audio_vae) -> io.NodeOutput:
        cache_dir = Path(cache_payload(cache)["cache_dir"])
        entries = manifest_entries(cache_dir)
        if not entries:
            raise ValueError(f"{cache_dir}: the cache has no entries; run LTX2AV Cache Latents first")
        if not 0 <= index < len(entries):
            raise ValueError(f"index {index} is out of range: the cache has {len(entries)} entries (0..{len(entries) - 1})")
        entry = entries[index]
        if not entry.has_audio:
            raise ValueError(f"cache entry {index} ({entry.media}) has no audio latent: {entry.audio_problem or 'no audio'}")
        sample = load_entry(cache_dir, entry)
        waveform, rate = decode_audio(audio_vae, sample.audio[None])
        valid = int(round(sample.audio_valid_frames / AUDIO_LATENTS_PER_SECOND * rate))
        return io.NodeOutput(audio_value(waveform[:, :, :valid], rate))
