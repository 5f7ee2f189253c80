"""The steps users run — doctor, cache, train, verify, sample — as functions shared by the CLI, the
demo and the ComfyUI nodes. The backend objects (denoiser, encoders) are passed in, so the nodes run
the very same steps on ComfyUI's MODEL/VAE/CLIP and the CLI on the diffusers backend."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..adapters.files import module_group
from ..adapters.verify import model_modules, verify_lora_keys
from ..config import Config, ConfigError
from ..data.cache import build_cache, load_training_samples, prepare_for_cache
from ..data.dataset import enumerate_dataset
from ..data.doctor import run_doctor
from ..data.media.probe import MediaError
from ..io_utils import atomic_write_json
from ..training.distributed import World, join_from_environment
from ..training.loop import CallbackList, TrainCallbacks, Trainer, TrainResult
from ..training.stopping import StopRequest, stop_on_signals
from .console import ConsoleTraining, Progress


def cache_dir_of(config: Config) -> Path:
    return Path(config.cache.dir) if config.cache.dir else Path(config.output.dir) / "cache"


def _echo(message: str, quiet: bool, stream=None) -> None:
    if not quiet:
        print(message, file=stream or sys.stdout, flush=True)


# ---- backends (headless) --------------------------------------------------------------------------


def build_headless_encoders(config: Config):
    from ..backends.diffusers_encoders import build_tiny_encoders, load_encoders

    if config.model.source == "tiny":
        return build_tiny_encoders(config.model.version, config.model.tiny, seed=config.model.tiny.seed)
    return load_encoders(config.model.source, config.model.version, precision=_encoder_precision(config))


def build_headless_denoiser(config: Config):
    from ..backends.diffusers_backend import build_denoiser

    return build_denoiser(config.model, config.memory)


def _encoder_precision(config: Config) -> str:
    return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[config.train.mixed_precision]


# ---- doctor ---------------------------------------------------------------------------------------


def run_doctor_command(config: Config, *, strict: bool = False, quiet: bool = False):
    _require_sources(config)
    progress = Progress(1, "doctor", quiet=quiet)
    report = run_doctor(config.dataset, strict=strict, progress=lambda done, total, path: _tick(progress, done, total))
    _echo(report.to_text(), quiet)
    return report


def _tick(progress: Progress, done: int, total: int) -> None:
    progress.total = max(1, total)
    progress.update(done)


def _require_sources(config: Config) -> None:
    if not config.dataset.sources:
        raise ConfigError("dataset.sources is empty: add a [[dataset.sources]] table with path = \"<folder of clips>\"")


# ---- cache ----------------------------------------------------------------------------------------


def cache_dataset(config: Config, encoders, *, quiet: bool = False, decode: bool = False, warn=None,
                  on_item: Callable[[int, int], None] | None = None, stop: StopRequest | None = None) -> dict:
    """Encode the dataset into the cache; prints ``Audio latent caching: N encoded, M failed`` and the item
    counts, and returns the cache summary (the contract's totals plus failures). ``decode`` also writes
    previews. ``on_item(done, total)`` reports progress (ComfyUI's progress bar); ``stop`` ends the run between
    two items, keeping what was finished."""
    _require_sources(config)
    items = enumerate_dataset(config.dataset)
    cache_dir = cache_dir_of(config)
    progress = Progress(len(items), "cache", quiet=quiet)
    warnings: list[str] = []

    def on_warn(message: str) -> None:
        warnings.append(message)
        (warn or progress.line)("warning: " + message)

    def item_done(index: int, note: str) -> None:
        progress.update(index + 1)
        if on_item is not None:
            on_item(index + 1, len(items))

    summary = build_cache(config, items, encoders, lambda item: prepare_for_cache(item, config), cache_dir,
                          on_item=item_done, warn=on_warn, stop=stop)
    result = {**summary.totals(), "failed": summary.failed, "entries": summary.entries, "items": summary.items,
              "failures": summary.failures, "stopped_by": summary.stopped_by, "cache_dir": str(cache_dir),
              "warnings": warnings}
    if decode and summary.stopped_by is None:
        from ..evaluation.previews import write_cache_previews

        result["previews"] = write_cache_previews(config, encoders, cache_dir, progress=progress)
    atomic_write_json(cache_dir / "cache_report.json", result)
    _echo(summary.console_line(), quiet)
    _echo(summary.items_line(), quiet)
    _echo(json.dumps(summary.totals()), quiet)
    return result


def run_cache_command(config: Config, *, decode: bool = False, quiet: bool = False) -> dict:
    encoders = build_headless_encoders(config)
    # Ctrl-C / SIGTERM stop between two items; every finished entry is already in the cache's journal.
    with torch.no_grad(), stop_on_signals(StopRequest(), announce=_announce) as stop:
        return cache_dataset(config, encoders, quiet=quiet, decode=decode, stop=stop)


# ---- train ----------------------------------------------------------------------------------------


def load_samples_for_training(config: Config, *, quiet: bool = False):
    cache_dir = cache_dir_of(config)
    if not (cache_dir / "manifest.json").is_file():
        raise ConfigError(f"no cache at {cache_dir}: run `ltx2-av-trainer cache --config ...` first (or set cache.dir)")
    samples, problems = load_training_samples(cache_dir, expect_audio=config.dataset.with_audio)
    for problem in problems:
        _echo(f"warning: not trained on (re-run `cache` to re-encode): {problem}", quiet, sys.stderr)
    if not samples:
        raise ConfigError(f"{cache_dir}: no valid cache entry to train on; run `ltx2-av-trainer cache` again")
    return samples


def train_from_cache(config: Config, denoiser, *, encoders=None, callbacks: TrainCallbacks | None = None,
                     resume: str | None = None, no_resume: bool = False, until_step: int | None = None,
                     quiet: bool = False, stop: StopRequest | None = None, world: World | None = None) -> TrainResult:
    """Train from the cache folder alone. ``encoders`` (the ones that built the cache) provide what some
    options need: the encoded silence (audio.missing_audio), the preservation prompts' contexts, the text
    connectors (network.connectors) and validation samples with voice scores. ``stop``: requesting it stops the
    run at the next step boundary with a resumable state (``result.stopped_by`` says why). ``world``: this
    process' rank when torchrun started several (only rank 0 writes the reports)."""
    world = world or World()
    if resume and no_resume:
        raise ConfigError("--resume and --no-resume contradict each other: give one of them")
    samples = load_samples_for_training(config, quiet=quiet)
    extras = trainer_inputs(config, encoders, quiet=quiet)
    sampler = validation_sampler(config, encoders, quiet=quiet) if world.is_main else None
    trainer = Trainer(config, denoiser, samples, config.output.dir, CallbackList(callbacks, sampler), stop=stop,
                      world=world, **extras)
    return run_and_report(config, trainer, resume=resume, no_resume=no_resume, until_step=until_step, quiet=quiet)


def run_and_report(config: Config, trainer: Trainer, *, resume: str | None, no_resume: bool, until_step: int | None,
                   quiet: bool) -> TrainResult:
    """Resume (as asked), train, detach the adapter, write report.json and the report page (rank 0 only)."""
    try:
        if resume or (not no_resume and config.output.resume == "auto"):
            trainer.try_resume(resume)
        result = trainer.run(until_step=until_step)
    finally:
        # The adapter lives on in the exported file and the resumable state; the base model is left
        # exactly as it was (ComfyUI samples with it next).
        trainer.network.detach()
    if trainer.world.is_main:
        write_run_report(config, result, trainer)
        if config.validation.report and result.completed:
            write_report_page(config, result, quiet=quiet)
    return result


def trainer_inputs(config: Config, encoders, *, quiet: bool = False) -> dict:
    """Keyword arguments of ``Trainer`` beyond the samples: validation items from the cache and what the
    encoders provide for the options that are on."""
    cache_dir = cache_dir_of(config)
    validation, problems = load_training_samples(cache_dir, expect_audio=config.dataset.with_audio, validation=True)
    for problem in problems:
        _echo(f"warning: validation item not used (re-run `cache`): {problem}", quiet, sys.stderr)
    inputs: dict = {"validation_samples": validation or None}
    needs_silence = config.dataset.with_audio and config.audio.missing_audio != "skip"
    needs_contexts = config.preservation.dop or config.preservation.blank
    needs_connectors = config.network.connectors != "off"
    if encoders is None:
        if needs_silence or needs_contexts or needs_connectors:
            raise ConfigError("audio.missing_audio, preservation.dop/blank and network.connectors need the encoders "
                              "that built the cache (pass encoders= to train_from_cache)")
        return inputs
    with torch.no_grad():
        if needs_silence:
            inputs["silence_audio_latent"] = encode_silence(config, encoders)
        contexts = {}
        if config.preservation.dop:
            contexts["class"] = encoders.encode_text([config.preservation.dop_class_prompt]).select(0)
        if config.preservation.blank:
            contexts["blank"] = encoders.encode_text([""]).select(0)
        inputs["preservation_contexts"] = contexts or None
    if needs_connectors:
        text = getattr(encoders, "text", None)
        if not hasattr(text, "connectors"):
            raise ConfigError("network.connectors needs the headless text encoder with the model's connectors")
        inputs["text_connectors"] = text.connectors
    return inputs


def encode_silence(config: Config, encoders) -> torch.Tensor:
    """The audio VAE's encoding of a zero waveform as long as the longest training clip (plus a second)."""
    longest = max([config.dataset.frames, *config.dataset.frame_buckets]) / config.dataset.target_fps + 1.0
    zeros = torch.zeros(1, 2, int(round(longest * 16000)))
    return encoders.encode_audio(zeros)[0].float().cpu()


def validation_sampler(config: Config, encoders, *, quiet: bool = False):
    """The A/B validation sampler (samples + voice scores every N steps), or None when off."""
    from ..evaluation.validation_sampling import ValidationSampler, default_every_n_steps

    v = config.validation
    every = v.sample_every_steps if v.sample_every_steps >= 0 else default_every_n_steps(config.train.device)
    if every and encoders is None and v.sample_every_steps > 0:
        raise ConfigError("validation.sample_every_steps needs the encoders that built the cache "
                          "(pass encoders= to train_from_cache)")
    if not every or encoders is None:
        return None
    reference = note = None
    if v.voice_score and config.dataset.with_audio:
        from ..evaluation.voice_score import VoiceReference, VoiceScoreError

        try:
            reference = VoiceReference.from_cache(cache_dir_of(config))
        except (ImportError, VoiceScoreError, MediaError) as exc:
            note = f"no voice score: {exc}"
            _echo(f"warning: {note}", quiet, sys.stderr)
    prompts = v.prompts or [f"{config.dataset.trigger}, a person speaks to the camera"]
    return ValidationSampler(encoders, prompts, every_n_steps=every, seeds=v.sample_seeds, reference=reference,
                             sample_steps=v.sample_steps, seconds=v.sample_seconds or None, fixed_sigma=v.fixed_sigma,
                             reference_note=note)


def write_report_page(config: Config, result: TrainResult, *, quiet: bool = False) -> Path | None:
    from ..evaluation.report_html import ReportError, write_training_report

    try:
        page = write_training_report(result.run_dir, cache_dir=cache_dir_of(config))
    except ReportError as exc:
        _echo(f"warning: no report page: {exc}", quiet, sys.stderr)
        return None
    _echo(f"training report: {page}", quiet)
    return page


def write_run_report(config: Config, result: TrainResult, trainer: Trainer) -> dict:
    lora_files = sorted(str(p) for p in (result.run_dir / "lora").glob("*.safetensors"))
    report = {
        "config": config.to_dict(),
        "steps": result.step,
        "completed": result.completed,
        "stopped_by": result.stopped_by,
        "resumed_from": result.resumed_from,
        "final_loss_video": result.final_loss_video,
        "final_loss_audio": result.final_loss_audio,
        "audio_weight": trainer.balancer.weight,
        "trainable_parameters": trainer.network.parameter_count(),
        "adapted_modules": len(trainer.network.paths),
        "adapted_groups": sorted({module_group(p) for p in trainer.network.paths.values()}),
        "with_audio": trainer.with_audio,
        # "final_lora" is the LoRA of "steps" (also when a resume found nothing left to train).
        "files": {"lora": lora_files, "final_lora": str(result.lora_path) if result.lora_path else None,
                  "state": str(result.state_path) if result.state_path else None,
                  "metrics": str(result.run_dir / "metrics.jsonl")},
        "warnings": result.warnings,
    }
    atomic_write_json(result.run_dir / "report.json", report)
    return report


def run_train_command(config: Config, *, resume: str | None = None, no_resume: bool = False, quiet: bool = False) -> dict:
    """``train``: one process, or one rank of several when started by torchrun (README: Several GPUs); every rank
    returns the report rank 0 wrote."""
    world = join_from_environment(config.train.device)
    try:
        quiet = quiet or not world.is_main  # rank 0 speaks for the run; the others print only their errors
        denoiser = build_headless_denoiser(config)
        encoders = build_headless_encoders(config)
        tensorboard = Path(config.output.dir) / "tensorboard" if config.logging.tensorboard else None
        callbacks = ConsoleTraining(quiet=quiet or config.logging.quiet, tensorboard_dir=tensorboard) if world.is_main else None
        # Ctrl-C and SIGTERM stop at the next step boundary (a second one at once, keeping the last completed step).
        with stop_on_signals(StopRequest(), announce=_announce if world.is_main else None) as stop:
            result = train_from_cache(config, denoiser, encoders=encoders, callbacks=callbacks, resume=resume,
                                      no_resume=no_resume, quiet=quiet, stop=stop, world=world)
        # No rank leaves before rank 0 has written everything: torchrun stops the others once one has exited.
        world.barrier()
    finally:
        world.close()
    return json.loads((result.run_dir / "report.json").read_text(encoding="utf-8"))


def _announce(message: str) -> None:
    # Called from a signal handler: one unbuffered write, no print() (its buffer may be in use).
    os.write(2, (message + "\n").encode())


# ---- verify ---------------------------------------------------------------------------------------


def model_module_paths(config: Config) -> dict[str, tuple[int, int] | None]:
    """The reference module paths of the run's model (what a LoRA's keys are checked against), with the Linear
    layers' ``(out, in)`` (the shape check)."""
    from ..backends.diffusers_backend import diffusers_to_reference_path

    denoiser = build_headless_denoiser(config)
    return model_modules(denoiser.module, diffusers_to_reference_path)


def run_verify_command(config: Config, lora: Path):
    return verify_lora_keys(lora, model_module_paths(config))


# ---- sample ---------------------------------------------------------------------------------------


def run_sample_command(config: Config, lora: Path | None, prompt: str, out: Path, *, seed: int = 0, steps: int = 20,
                       seconds: float | None = None) -> dict:
    from ..evaluation.previews import sample_and_write

    denoiser = build_headless_denoiser(config)
    encoders = build_headless_encoders(config)
    return sample_and_write(config, denoiser, encoders, lora, prompt, out, seed=seed, steps=steps, seconds=seconds)
