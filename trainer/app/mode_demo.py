"""``ltx2-av-trainer demo --mode audio|i2v|ic|id``: each training mode end to end, with no weights and no network.

Synthesises the mode's data (voice recordings, talking clips with grey reference videos, talking clips of one
speaker), then doctor → cache → train → verify → a sample with the mode's conditioning (the stand-in video for
audio-only, a clip's first latent frame, its reference, a reference recording), writing ``DIR/report.json``.
``--mode av`` (the default) is the main demo (``demo.py``).

| mode | data | training |
|---|---|---|
| audio | wav files + one talking clip's sound (``kind = "audio"``) | audio branch only, 64x64 stand-in video |
| i2v | talking clips | first-frame conditioning with p = 0.5 |
| ic | talking clips + a grey reference per clip (one PNG, the rest mp4), 9 frames at half size | IC-LoRA guide |
| id | talking clips of one speaker | another clip of the speaker as reference audio |
"""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters.files import METADATA_PREFIX, read_adapter_file
from ..config import Config
from ..data.cache import load_training_samples
from ..data.synth import make_demo_dataset
from ..data.synth_modes import make_audio_dataset, make_reference_folder
from ..io_utils import atomic_write_json, read_jsonl
from ..training.conditioning import generation_inputs
from .demo import StageClock, doctor_cache_train_verify

MODE_DEMOS = ("audio", "i2v", "ic", "id")
MODE_DEMO_STEPS = 100
TRIGGER = "ohwx"
CLIPS = 4


def mode_demo_config(out: Path, mode: str, steps: int, version: str) -> Config:
    source: dict = {"path": str(out / "data")}
    dataset: dict = {"trigger": TRIGGER, "frames": 25, "width": 128, "height": 96}
    conditioning: dict = {"mode": "av" if mode == "i2v" else mode}
    preset = {"audio": "audio", "i2v": "av", "ic": "v2v", "id": "voice"}[mode]
    if mode == "audio":
        source["kind"] = "audio"
    elif mode == "i2v":
        conditioning["first_frame_p"] = 0.5
    elif mode == "ic":
        source["reference_dir"] = "../references"
        dataset.update(width=128, height=128, reference_frames=9, reference_downscale=2)
    elif mode == "id":
        dataset.update(reference_audio_same_speaker=True, reference_audio_seconds=1.0)  # the demo clips last 1.2 s
    return Config.from_dict({
        "dataset": {"sources": [source], **dataset},
        "cache": {"dir": str(out / "cache")},
        "model": {"version": version, "source": "tiny"},
        "network": {"rank": 8, "alpha": 8.0, "preset": preset},
        "optimizer": {"lr": 1e-3},
        "train": {"steps": steps, "batch_size": 1, "mixed_precision": "fp32", "device": "cpu", "seed": 7},
        "logging": {"log_every": 25},
        "validation": {"report": False},
        "output": {"dir": str(out / "run"), "name": f"demo_{mode}_lora", "save_every": max(1, steps),
                   "save_dtype": "float32"},
        "conditioning": conditioning,
    })


def synthesise(out: Path, mode: str) -> list[str]:
    if mode == "audio":
        return [str(p) for p in make_audio_dataset(out / "data", clips=CLIPS, seconds=1.2, trigger=TRIGGER)]
    clips = make_demo_dataset(out / "data", speakers=1, clips_per_speaker=CLIPS, seconds=1.2, trigger=TRIGGER)
    if mode == "ic":
        make_reference_folder(clips, out / "references")
    return [str(c) for c in clips]


def mode_checks(mode: str, config: Config, lora_path: Path, metrics: list[dict], verify) -> dict[str, bool]:
    """What must hold for the mode's LoRA to be right."""
    _, metadata = read_adapter_file(lora_path)
    groups = set(json.loads(metadata.get(METADATA_PREFIX + "groups", "[]")))
    checks = {"mode in the LoRA metadata": metadata.get(METADATA_PREFIX + "mode") == config.conditioning.mode,
              "audio trained every step": all(m["loss_audio"] is not None for m in metrics)}
    if mode == "audio":
        checks["only audio modules adapted"] = bool(groups) and groups <= {"audio_attn", "audio_ff"}
        checks["no video loss"] = all(m["loss_video"] is None for m in metrics)
    if mode == "ic":
        checks["reference_downscale_factor in the LoRA"] = metadata.get("reference_downscale_factor") == str(
            config.dataset.reference_downscale)
    checks["every adapted group loads in ComfyUI's key map"] = bool(verify.ok)
    return checks


def run_mode_demo(out: Path, mode: str, *, steps: int | None = None, version: str = "2.0", quiet: bool = False) -> dict:
    from ..adapters.network import load_lora_file
    from ..evaluation.previews import sample_and_write
    from .pipeline import cache_dir_of

    if mode not in MODE_DEMOS:
        raise ValueError(f"--mode {mode!r}: choose av or one of {', '.join(MODE_DEMOS)}")
    out = Path(out)
    stage = StageClock(f"demo {mode}", quiet)
    config = mode_demo_config(out, mode, steps or MODE_DEMO_STEPS, version)
    with stage("synthesise"):
        media = synthesise(out, mode)
    run = doctor_cache_train_verify(config, out, stage, quiet=quiet)
    doctor, cache, result, verify = run.doctor, run.cache, run.result, run.verify
    with stage("sample"):
        samples_cached, _ = load_training_samples(cache_dir_of(config), expect_audio=True)
        network = load_lora_file(run.denoiser, result.lora_path)
        samples = sample_and_write(config, run.denoiser, run.encoders, None, f"{TRIGGER}, a person speaks in a quiet room",
                                   out / "samples", seed=1, steps=8, network=network,
                                   conditioning=generation_inputs(config, samples_cached[0]))

    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    checks = mode_checks(mode, config, result.lora_path, metrics, verify)
    report = {
        "ok": bool(cache["failed"] == 0 and result.completed and all(checks.values())),
        "mode": mode,
        "version": version,
        "media": media,
        "doctor": {"items": doctor.summary.items, "ok": doctor.summary.ok},
        "cache": {k: cache[k] for k in ("video_encoded", "audio_encoded", "audio_failed", "reused", "invalidated", "failed")},
        "train": json.loads((result.run_dir / "report.json").read_text(encoding="utf-8")),
        "checks": checks,
        "verify": verify.to_dict(),
        "samples": samples,
        "timings_s": stage.timings,
        "total_s": stage.total_s(),
    }
    atomic_write_json(out / "report.json", report)
    if not quiet:
        failed = [name for name, ok in checks.items() if not ok]
        print(f"[demo {mode}] {'ok' if report['ok'] else 'FAILED: ' + ', '.join(failed) or 'see report'}; "
              f"report: {out / 'report.json'} ({report['total_s']} s)")
    return report
