"""``ltx2-av-trainer bench --backend comfyui``: our training step on a ComfyUI-loaded LTXAV model, against ComfyUI's own.

The model is a random-weight LTX-2 checkpoint of the preset's dimensions, written to a temporary folder and
loaded by ComfyUI's diffusion-model loader (``COMFYUI_PATH`` names the ComfyUI checkout when this does not run
inside ComfyUI). Each side gets its own loaded copy (ComfyUI's trainer deep-copies the MODEL, as its node does;
our adapters wrap module forwards, so two of our networks cannot share one module). Four measurements:

1. **Video-only, ours vs ComfyUI's trainer** (the work both can do): our ``Trainer.train_step`` with
   ``ComfyDenoiser`` on video-only items, LoRA on the ``video`` preset's modules, against the step of ComfyUI's
   Train LoRA node (``trainer.backends.comfyui.builtin_trainer``) with LoRA on exactly those modules at the same
   rank, both with per-block checkpointing (ComfyUI's trainer cannot run LTX-2 without checkpointing). The steps
   alternate inside ComfyUI's own training loop; medians after warm-up; memory as in the diffusers bench (bytes
   kept between steps + the step's allocation peak). Targets: ours ≤ 1.0x its time and memory.
2. **Our AV step's extra cost**: our audio+video step (``av`` preset, independent σ per modality) alternated
   with the video-only step of 1.
3. **Per-block checkpointing** (with the norm-input snapshots) against none, on the AV step: time and memory.
4. **One forward per batch**: the AV step at batch 2 and 4 with independent σ, with the batch in one forward
   against one forward per sample (what the ComfyUI backend did before it computed the cross-modal gates per
   sample), alternating.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..backends.interface import DenoiserInput
from ..config import Config, ConfigError
from ..data.batches import LatentSample
from ..training.loop import Trainer
from .bench import (
    MODEL_VERSION,
    PEAK_MEMORY_RATIO_LIMIT,
    BenchConfig,
    MemoryMeasure,
    StepMemoryProbe,
    _bytes,
    _cut,
    _row,
    _seconds,
    _synchronize,
    _target,
    _timed,
    make_bench_samples,
    measure_step_memory,
    optimizer_state_tensors,
    unique_storage_bytes,
)

STEP_TIME_RATIO_LIMIT = 1.0  # the target against ComfyUI's own trainer (time and memory)
BATCH_SIZES = (2, 4)
# ComfyUI's nodes_train checkpoint depth: 2 = each child of the diffusion model (every transformer block and the
# top-level layers); 1 = the whole model as one checkpoint, the node's default.
COMFY_CHECKPOINT_DEPTH = 2


@dataclass
class Side:
    step_times_s: list[float] = field(default_factory=list)
    memory: MemoryMeasure | None = None

    def report(self, tokens_per_step: int) -> dict:
        step = statistics.median(self.step_times_s)
        m = self.memory
        return {
            "step_time_s": step, "step_times_s": self.step_times_s, "tokens_per_s": tokens_per_step / step,
            "peak_mem_bytes": m.peak_mem_bytes, "persistent_bytes": m.persistent_bytes,
            "step_peak_bytes": m.step_peak_bytes, "activation_bytes": m.activation_bytes,
        }


class _OneForwardPerSample:
    """A denoiser that runs each sample of a batch alone and concatenates the outputs: the ComfyUI backend's
    behaviour for a batch whose samples all have different σ before the per-sample cross-modal gates."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.enabled = False

    def __getattr__(self, name):
        return getattr(self.denoiser, name)

    def __call__(self, inputs: DenoiserInput):
        if not self.enabled or inputs.video.shape[0] == 1:
            return self.denoiser(inputs)
        outputs = []
        for i in range(inputs.video.shape[0]):
            part = slice(i, i + 1)
            outputs.append(self.denoiser(DenoiserInput(
                inputs.video[part], None if inputs.audio is None else inputs.audio[part], inputs.sigma_video[part],
                None if inputs.sigma_audio is None else inputs.sigma_audio[part], inputs.text.select(part), inputs.fps)))
        video = torch.cat([o[0] for o in outputs])
        return video, None if inputs.audio is None else torch.cat([o[1] for o in outputs])


class ComfyBenchRun:
    def __init__(self, bench: BenchConfig, folder: Path):
        from ..backends.comfyui.denoiser import ComfyDenoiser
        from ..backends.comfyui.env import import_model_management
        from ..backends.comfyui.random_model import load_ltxav_checkpoint, write_tiny_ltxav_checkpoint

        mm = import_model_management()  # a clear error without ComfyUI
        self.bench = bench
        self.comfy_device = mm.get_torch_device()  # where ComfyUI puts the model (our steps run there too)
        base = bench.trainer_config()
        self.tiny = base.model.tiny
        checkpoint = write_tiny_ltxav_checkpoint(folder, MODEL_VERSION, self.tiny, seed=bench.seed)
        self.load = lambda: load_ltxav_checkpoint(checkpoint)
        self.denoiser_class = ComfyDenoiser
        self.folder = folder
        self.av_samples = make_bench_samples(bench)
        self.video_samples = [LatentSample(s.id, s.video, None, 0, s.text, s.fps) for s in self.av_samples]

        self.video = self._trainer(self._config(base, "video", with_audio=False), self.video_samples)
        self.av = self._trainer(self._config(base, "av", with_audio=True), self.av_samples)
        self.device = self.video.device

    # ---- construction ---------------------------------------------------------------------------

    def _config(self, base: Config, preset: str, with_audio: bool, batch_size: int | None = None) -> Config:
        data = base.to_dict()
        data["network"]["preset"] = preset
        data["dataset"]["with_audio"] = with_audio
        data["timesteps"]["independent_audio"] = True
        data["model"]["gradient_checkpointing"] = True
        data["train"]["device"] = str(self.comfy_device)
        if batch_size is not None:
            data["train"]["batch_size"] = batch_size
        return Config.from_dict(data)

    def _trainer(self, config: Config, samples: list[LatentSample], wrap: Callable | None = None) -> Trainer:
        denoiser = self.denoiser_class(self.load(), MODEL_VERSION, checkpointing="block")
        with torch.inference_mode(False):
            denoiser.load()
        if wrap is not None:
            denoiser = wrap(denoiser)
        return Trainer(config, denoiser, samples, self.folder / "unused-run-dir")

    def builtin(self, module_paths: list[str]):
        from ..backends.comfyui.builtin_trainer import ComfyBuiltinTrainer

        latents = torch.stack([s.video for s in self.video_samples])
        contexts = [torch.cat([s.text.video, s.text.audio], dim=-1)[None] for s in self.video_samples]
        return ComfyBuiltinTrainer(self.load(), latents, contexts, module_paths, rank=self.bench.rank,
                                   learning_rate=self.video.config.optimizer.lr, seed=self.bench.seed,
                                   batch_size=self.bench.shapes.batch_size, checkpoint_depth=COMFY_CHECKPOINT_DEPTH)

    # ---- steps and memory -----------------------------------------------------------------------

    @staticmethod
    def step(trainer: Trainer) -> Callable[[], dict]:
        def run() -> dict:
            with torch.inference_mode(False), torch.enable_grad():
                metrics = trainer.train_step()
            if metrics is None:
                raise RuntimeError("our training step was skipped (non-finite loss) on random bench data")
            return metrics

        return run

    def memory(self, trainer: Trainer) -> MemoryMeasure:
        trainer.optimizer.zero_grad(set_to_none=True)
        module, network, optimizer = trainer.denoiser.module, trainer.network, trainer.optimizer
        tensors = lambda: [*module.parameters(), *module.buffers(), *network.parameters(), *optimizer_state_tensors(optimizer)]  # noqa: E731
        return measure_step_memory(self.step(trainer), self.device, lambda: unique_storage_bytes(tensors()), tensors())

    def alternate(self, sides: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, list[float]]:
        """Each side once per round, the order rotating every round; times after ``warmup`` rounds."""
        times: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for i in range(warmup + steps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                elapsed, _ = _timed(sides[name], self.device)
                if i >= warmup:
                    times[name].append(elapsed)
        return times

    # ---- the four measurements ------------------------------------------------------------------

    def video_only_against_comfyui(self) -> tuple[Side, Side, Side, list[float]]:
        """Ours (video-only and AV) between the steps of ComfyUI's own training loop; the last round measures memory."""
        bench = self.bench
        builtin = self.builtin(list(self.video.network.paths.values()))
        ours_video, ours_av, comfy = Side(), Side(), Side()
        rounds = bench.warmup + bench.steps
        device = self.device
        video_step, av_step = self.step(self.video), self.step(self.av)
        comfy_weights = [*builtin.module.parameters(), *builtin.module.buffers()]

        class Hooks:
            started_at = 0.0
            probe: StepMemoryProbe | None = None

            def before(self, i: int) -> None:
                if i == rounds:  # the memory round
                    ours_video.memory = run.memory(run.video)
                    ours_av.memory = run.memory(run.av)
                    return
                for side, step in ((ours_video, video_step), (ours_av, av_step))[:: 1 if i % 2 == 0 else -1]:
                    elapsed, _ = _timed(step, device)
                    if i >= bench.warmup:
                        side.step_times_s.append(elapsed)

            def started(self, i: int) -> None:
                if i == rounds:
                    builtin.optimizer.zero_grad(set_to_none=True)
                    self.probe = StepMemoryProbe(device, comfy_weights)
                    self.probe.start()
                _synchronize(device)
                self.started_at = time.perf_counter()

            def finished(self, i: int) -> None:
                _synchronize(device)
                elapsed = time.perf_counter() - self.started_at
                if self.probe is not None:
                    step_peak, activations = self.probe.stop()
                    persistent = unique_storage_bytes([*comfy_weights, *builtin.parameters,
                                                       *optimizer_state_tensors(builtin.optimizer)])
                    comfy.memory = MemoryMeasure(persistent, step_peak, activations)
                    self.probe = None
                elif i >= bench.warmup:
                    comfy.step_times_s.append(elapsed)

        run = self
        try:
            builtin.run(rounds + 1, Hooks())
        finally:
            builtin.close()
        # Its LoRA matrices (the node also trains each adapter's alpha, one number per module).
        self.builtin_parameters = sum(p.numel() for a in builtin.adapters for n, p in a.named_parameters() if n != "alpha")
        return ours_video, ours_av, comfy, builtin.losses

    def checkpointing(self) -> dict:
        """The AV step with per-block checkpointing against none: memory of one step each, then timed rounds."""
        denoiser = self.av.denoiser
        step = self.step(self.av)

        def with_mode(mode: str) -> Callable[[], dict]:
            def run() -> dict:
                denoiser.checkpointing = mode
                return step()

            return run

        memory = {}
        for mode in ("none", "block"):
            denoiser.checkpointing = mode
            memory[mode] = self.memory(self.av)
        times = self.alternate({"none": with_mode("none"), "block": with_mode("block")}, self.bench.steps, 1)
        denoiser.checkpointing = "block"
        out = {mode: {"step_time_s": statistics.median(times[mode]), "step_times_s": times[mode],
                      "step_peak_bytes": memory[mode].step_peak_bytes, "activation_bytes": memory[mode].activation_bytes}
               for mode in ("none", "block")}
        out["time_ratio"] = out["block"]["step_time_s"] / out["none"]["step_time_s"]
        out["step_peak_cut"] = _cut(out["none"]["step_peak_bytes"], out["block"]["step_peak_bytes"])
        out["activation_cut"] = _cut(out["none"]["activation_bytes"], out["block"]["activation_bytes"])
        return out

    def batched_forwards(self, batch_sizes: tuple[int, ...]) -> dict:
        """The AV step at each batch size: the batch in one forward against one forward per sample."""
        base = self.av.config
        out = {}
        for batch in batch_sizes:
            samples = self.av_samples * -(-batch // len(self.av_samples))  # at least one full batch
            trainer = self._trainer(self._config(base, "av", with_audio=True, batch_size=batch), samples, _OneForwardPerSample)
            step = self.step(trainer)

            def mode(serial: bool, trainer=trainer, step=step) -> Callable[[], dict]:
                def run() -> dict:
                    trainer.denoiser.enabled = serial
                    return step()

                return run

            times = self.alternate({"one_forward": mode(False), "per_sample": mode(True)}, self.bench.steps, 1)
            one, per_sample = statistics.median(times["one_forward"]), statistics.median(times["per_sample"])
            out[str(batch)] = {"one_forward_s": one, "per_sample_s": per_sample, "speedup": per_sample / one,
                               "one_forward_times_s": times["one_forward"], "per_sample_times_s": times["per_sample"]}
        return out


def run_comfyui_bench(preset: str = "small", layers: int | None = None, steps: int | None = None, warmup: int | None = None,
                      batch_sizes: tuple[int, ...] = BATCH_SIZES, progress: Callable[[str], None] | None = None) -> dict:
    """The ComfyUI bench's report (see the module docstring)."""
    bench = BenchConfig.from_preset(preset, layers=layers, steps=steps, warmup=warmup)
    if bench.precision != "fp32" or preset == "real":
        raise ConfigError("bench --backend comfyui runs the tiny and small presets (fp32, on the device ComfyUI picks); "
                          "the real preset is for the diffusers backend")
    say = progress or (lambda _message: None)
    with tempfile.TemporaryDirectory(prefix="ltx2av-bench-comfyui-") as folder:
        say("loading the model through ComfyUI's loader")
        run = ComfyBenchRun(bench, Path(folder))
        say("video-only: ours vs ComfyUI's Train LoRA step (alternating), and our AV step")
        ours_video, ours_av, comfy, comfy_losses = run.video_only_against_comfyui()
        say("per-block checkpointing vs none")
        checkpointing = run.checkpointing()
        say(f"one forward per batch vs one per sample (batch {', '.join(map(str, batch_sizes))})")
        batched = run.batched_forwards(batch_sizes)

    s = bench.shapes
    video_tokens = s.video_tokens * s.batch_size
    av_tokens = (s.video_tokens + s.audio_frames) * s.batch_size
    video, builtin, av = ours_video.report(video_tokens), comfy.report(video_tokens), ours_av.report(av_tokens)
    ratio_step = statistics.median(o / c for o, c in zip(ours_video.step_times_s, comfy.step_times_s))
    ratio_mem = video["peak_mem_bytes"] / builtin["peak_mem_bytes"]
    return {
        "backend": "comfyui",
        "preset": bench.preset,
        "device": run.device.type,
        "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": bench.precision,
        "steps": bench.steps,
        "warmup": bench.warmup,
        "model": {
            "version": MODEL_VERSION, "layers": bench.dims.layers, "dims": bench.dims.to_dict(),
            "tokens": {"video": s.video_tokens, "audio": s.audio_frames, "text": s.text_tokens},
            "clip": s.pixels, "batch_size": s.batch_size,
            "lora": {"rank": bench.rank, "video_modules": len(run.video.network.paths), "av_modules": len(run.av.network.paths),
                     "video_parameters": run.video.network.parameter_count(), "comfyui_parameters": run.builtin_parameters},
        },
        "video_only": {
            "ours": video, "comfyui": builtin, "ratio_step_time": ratio_step, "ratio_peak_mem": ratio_mem,
            "comfyui_losses": comfy_losses,
            "targets": {
                "step_time_vs_comfyui": _target(ratio_step, STEP_TIME_RATIO_LIMIT, True, "ours / ComfyUI step time"),
                "peak_mem_vs_comfyui": _target(ratio_mem, PEAK_MEMORY_RATIO_LIMIT, True, "ours / ComfyUI peak memory"),
            },
        },
        "av_step": {
            "ours": av,
            "ratio_step_time_vs_video_only": statistics.median(a / v for a, v in zip(ours_av.step_times_s, ours_video.step_times_s)),
            "ratio_peak_mem_vs_video_only": av["peak_mem_bytes"] / video["peak_mem_bytes"],
        },
        "checkpointing": checkpointing,
        "batched_forward": batched,
        "notes": [
            "ComfyUI side: the step of comfy_extras.nodes_train (TrainSampler in a TrainGuider), set up as TrainLoraNode "
            "does, with LoRA only on our video preset's modules at our rank and per-block checkpointing "
            f"(checkpoint_depth {COMFY_CHECKPOINT_DEPTH}); fp32, AdamW, MSE on its own x0 target and σ draws",
            "ComfyUI's trainer cannot train LTX-2 without checkpointing: autograd stops at the blocks' in-place updates",
            "ours: Trainer.train_step with ComfyDenoiser (checkpointing block, norm-input snapshots), video preset on "
            "video-only items; AV: av preset, audio + video with independent σ",
            "ratio_step_time is the median of per-round ratios (each round ran back to back); each side has its own copy "
            "of the base weights and counts it once",
        ],
    }


def format_comfyui_report(report: dict) -> str:
    m, v, av = report["model"], report["video_only"], report["av_step"]
    ours, comfy = v["ours"], v["comfyui"]
    dims, tokens = m["dims"], m["tokens"]
    lines = [
        f"bench {report['preset']} --backend comfyui on {report['device_name']} ({report['threads']} threads), {report['precision']}",
        f"model (ComfyUI-loaded): {m['layers']} blocks, video {dims['video']['heads']}x{dims['video']['head_dim']}, audio "
        f"{dims['audio']['heads']}x{dims['audio']['head_dim']}; LoRA rank {m['lora']['rank']}",
        f"tokens: {tokens['video']} video ({m['clip']}) + {tokens['audio']} audio, {tokens['text']} text; "
        f"{report['steps']} measured steps after {report['warmup']} warm-up, medians",
        "",
        f"video-only, per-block checkpointing, LoRA on {m['lora']['video_modules']} modules:",
        f"{'':22}{'ours':>14}{'ComfyUI':>14}{'ratio':>10}",
        _row("step time", _seconds(ours["step_time_s"]), _seconds(comfy["step_time_s"]), v["ratio_step_time"]),
        _row("peak memory", _bytes(ours["peak_mem_bytes"]), _bytes(comfy["peak_mem_bytes"]), v["ratio_peak_mem"]),
        _row("  step peak", _bytes(ours["step_peak_bytes"]), _bytes(comfy["step_peak_bytes"]), None),
        _row("  saved activations", _bytes(ours["activation_bytes"]), _bytes(comfy["activation_bytes"]), None),
        "",
        f"our AV step (audio + video, LoRA on {m['lora']['av_modules']} modules): {_seconds(av['ours']['step_time_s'])}, "
        f"{av['ratio_step_time_vs_video_only']:.2f}x the video-only step's time, {av['ratio_peak_mem_vs_video_only']:.2f}x its memory",
    ]
    c = report["checkpointing"]
    lines.append(f"per-block checkpointing (AV step): step time {_seconds(c['none']['step_time_s'])} -> "
                 f"{_seconds(c['block']['step_time_s'])} ({c['time_ratio']:.2f}x), step peak {_bytes(c['none']['step_peak_bytes'])} -> "
                 f"{_bytes(c['block']['step_peak_bytes'])} ({100 * (c['step_peak_cut'] or 0):.0f} % less)")
    for batch, b in report["batched_forward"].items():
        lines.append(f"batch {batch} (independent σ): one forward {_seconds(b['one_forward_s'])}, one per sample "
                     f"{_seconds(b['per_sample_s'])}: {b['speedup']:.2f}x faster")
    lines.append("targets:")
    for name, t in v["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  {name}: {value} ({t['rule']}) {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def cmd_bench_comfyui(args: argparse.Namespace) -> int:
    """``ltx2-av-trainer bench --backend comfyui`` (the CLI dispatches here on ``--backend``)."""
    from ..io_utils import atomic_write_json

    unused = [flag for flag, value in (("--checkpointing", args.checkpointing != "off"), ("--precision", args.precision),
                                       ("--device", args.device), ("--compare-checkpointing", args.compare_checkpointing),
                                       ("--unfused", args.unfused))
              if value]
    if unused:
        raise ConfigError(f"bench --backend comfyui does not take {', '.join(unused)}: it runs fp32 on the device ComfyUI "
                          "picks and always compares per-block checkpointing with none")
    say = (lambda _message: None) if args.quiet else (lambda message: print(f"bench comfyui: {message}", flush=True))
    report = run_comfyui_bench(args.preset, layers=args.layers, steps=args.steps, warmup=args.warmup, progress=say)
    if not args.quiet:
        print(format_comfyui_report(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0
