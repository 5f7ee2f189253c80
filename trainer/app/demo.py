"""``ltx2-av-trainer demo``: the whole pipeline with no weights and no network.

Synthesises a small dataset of talking clips (voice-like audio with one speaker's pitch and
formants, a face whose mouth follows the audio envelope, captions with a trigger), builds the
embedded tiny LTX-2 model and its encoders, and runs doctor → cache (with previews) → train →
export → verify → A/B sample, writing ``DIR/report.json`` and the run directory contract under
``DIR/run/``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..config import Config
from ..data.synth import make_demo_dataset
from ..io_utils import atomic_write_json, read_jsonl
from .console import ConsoleTraining
from .pipeline import (
    build_headless_denoiser,
    build_headless_encoders,
    cache_dataset,
    run_doctor_command,
    run_verify_command,
    train_from_cache,
)

DEMO_STEPS = 400
DEMO_TRIGGER = "ohwx"


def demo_config(out: Path, steps: int, version: str) -> Config:
    return Config.from_dict(
        {
            "dataset": {
                "sources": [{"path": str(out / "data")}],
                "trigger": DEMO_TRIGGER,
                "frames": 25,
                "width": 128,
                "height": 96,
            },
            "cache": {"dir": str(out / "cache")},
            # The tiny model's activations are small: no checkpointing (the recommendation for real models).
            "model": {"version": version, "source": "tiny", "gradient_checkpointing": False},
            "network": {"rank": 16, "alpha": 16.0, "preset": "av"},
            "optimizer": {"lr": 1e-3},
            "train": {"steps": steps, "batch_size": 1, "mixed_precision": "fp32", "device": "cpu", "seed": 7},
            "logging": {"log_every": 50},
            # The demo writes the report page itself, with the doctor, previews and A/B samples.
            "validation": {"report": False},
            "output": {"dir": str(out / "run"), "name": "demo_av_lora", "save_every": 100, "save_dtype": "float32"},
        }
    )


class StageClock:
    """The demos' stage timings: ``with clock("cache"): ...`` records the stage's seconds and prints one line."""

    def __init__(self, label: str, quiet: bool):
        self.label, self.quiet = label, quiet
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - t0, 2)
        if not self.quiet:
            print(f"[{self.label}] {name} done in {self.timings[name]:.1f} s", flush=True)

    def total_s(self) -> float:
        return round(time.monotonic() - self.started, 1)


@dataclass
class PipelineRun:
    """What doctor → cache → train → verify gave (both demos run these stages alike)."""

    doctor: Any
    encoders: Any
    cache: dict
    denoiser: Any
    result: Any
    verify: Any


def doctor_cache_train_verify(config: Config, out: Path, stage: StageClock, *, quiet: bool,
                              decode: bool = False) -> PipelineRun:
    """The CLI's doctor, cache, train and verify steps on the synthesised data, writing ``doctor.json`` and
    ``verify.json`` into ``out``; ``decode``: the cache also writes its decoded previews."""
    with stage("doctor"):
        doctor = run_doctor_command(config, quiet=quiet)
        atomic_write_json(out / "doctor.json", doctor.to_dict())
    with stage("cache"):
        encoders = build_headless_encoders(config)
        cache = cache_dataset(config, encoders, quiet=quiet, decode=decode)
    with stage("train"):
        denoiser = build_headless_denoiser(config)
        result = train_from_cache(config, denoiser, encoders=encoders, callbacks=ConsoleTraining(quiet=quiet), quiet=quiet)
    with stage("verify"):
        verify = run_verify_command(config, result.lora_path)
        atomic_write_json(out / "verify.json", verify.to_dict())
        if not quiet:
            print(verify.summary())
    return PipelineRun(doctor, encoders, cache, denoiser, result, verify)


def run_demo(out: Path, *, steps: int | None = None, version: str = "2.0", quiet: bool = False) -> dict:
    from ..adapters.network import load_lora_file
    from ..evaluation.previews import sample_and_write

    out = Path(out)
    stage = StageClock("demo", quiet)
    config = demo_config(out, steps or DEMO_STEPS, version)
    with stage("synthesise"):
        clips = make_demo_dataset(out / "data", speakers=1, clips_per_speaker=8, seconds=1.2, fps=25, width=128,
                                  height=96, trigger=DEMO_TRIGGER, seed=0)
    run = doctor_cache_train_verify(config, out, stage, quiet=quiet, decode=True)
    doctor, cache, result, verify = run.doctor, run.cache, run.result, run.verify
    with stage("sample"):
        network = load_lora_file(run.denoiser, result.lora_path)
        samples = sample_and_write(config, run.denoiser, run.encoders, None,
                                   f"{DEMO_TRIGGER}, a person speaks to the camera in a quiet room", out / "samples",
                                   seed=1, steps=12, network=network)
    with stage("voice score"):
        voice = score_demo_samples(out, samples, quiet=quiet)

    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    report = {
        "ok": bool(verify.ok and cache["audio_failed"] == 0 and result.completed),
        "version": version,
        "clips": [str(c) for c in clips],
        "doctor": {"items": doctor.summary.items, "ok": doctor.summary.ok, "speech_seconds": doctor.summary.speech_seconds},
        "cache": {k: cache[k] for k in ("video_encoded", "audio_encoded", "audio_failed", "reused", "invalidated")},
        "previews": cache.get("previews", []),
        "train": json.loads((result.run_dir / "report.json").read_text(encoding="utf-8")),
        "trends": loss_trends(metrics),
        "verify": verify.to_dict(),
        "samples": samples,
        "voice": voice,
        "timings_s": stage.timings,
        "total_s": stage.total_s(),
    }
    with stage("report page"):
        report["report_html"] = write_report_page(out, result.run_dir, quiet=quiet)
    report["total_s"] = stage.total_s()
    atomic_write_json(out / "report.json", report)
    if not quiet:
        t = report["trends"]
        print(f"[demo] video loss {t['video_first']:.3f} → {t['video_last']:.3f}, audio loss {t['audio_first']:.3f} → "
              f"{t['audio_last']:.3f}; σ_a differs from σ_v by > 0.05 in {100 * t['sigma_differs_fraction']:.0f} % of steps")
        print(f"[demo] report: {out / 'report.json'} ({report['total_s']} s)")
    return report


def score_demo_samples(out: Path, samples: dict, *, quiet: bool) -> dict:
    """Voice identity score of the A/B samples against the dataset's voice (mean embedding of its speech)."""
    from ..evaluation.voice_score import VoiceReference, VoiceScoreError, score_ab_files

    try:
        reference = VoiceReference.from_cache(out / "cache")
        gain = score_ab_files(out / "samples" / "lora.wav", out / "samples" / "base.wav", reference)
    except (ImportError, VoiceScoreError) as exc:
        if not quiet:
            print(f"[demo] no voice score: {exc}")
        return {"error": str(exc)}
    voice = {**gain.to_dict(), "reference_typical": reference.typical_similarity}
    samples["voice"] = gain.to_dict()
    atomic_write_json(out / "samples" / "samples.json", samples)
    if not quiet:
        print(f"[demo] voice score vs the dataset voice: LoRA {gain.lora:.3f}, base {gain.base:.3f} (gain {gain.gain:+.3f}; "
              f"the dataset's own clips score {reference.typical_similarity:.3f}). The tiny random model makes noise, "
              "so these scores say little here; on a real model they show whether the voice was learned.")
    return voice


def write_report_page(out: Path, run_dir: Path, *, quiet: bool) -> str | None:
    from ..evaluation.report_html import ReportError, write_training_report

    try:
        page = write_training_report(run_dir, doctor_json=out / "doctor.json", cache_dir=out / "cache", samples_dir=out / "samples")
    except ReportError as exc:
        if not quiet:
            print(f"[demo] no report page: {exc}")
        return None
    if not quiet:
        print(f"[demo] training report: {page}")
    return str(page)


def loss_trends(metrics: list[dict], window: int = 50) -> dict:
    """First/last window means of both losses and how often σ_a and σ_v differed by more than 0.05."""
    window = max(1, min(window, len(metrics) // 4 or 1))
    audio = [m for m in metrics if m.get("loss_audio") is not None]

    def mean(rows, key):
        return sum(r[key] for r in rows) / max(1, len(rows))

    differs = [abs(m["sigma_audio"] - m["sigma_video"]) > 0.05 for m in audio]
    return {
        "video_first": mean(metrics[:window], "loss_video"),
        "video_last": mean(metrics[-window:], "loss_video"),
        "audio_first": mean(audio[:window], "loss_audio"),
        "audio_last": mean(audio[-window:], "loss_audio"),
        "sigma_differs_fraction": sum(differs) / max(1, len(differs)),
        "steps": len(metrics),
    }
