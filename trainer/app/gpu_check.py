"""``make gpu-check``: what the CPU test suite cannot check, run once on a CUDA machine; one table and a JSON file.

Run it from a git clone with the development install (``make gpu-check``, or ``python -m
ltx2_av_trainer.trainer.app.gpu_check --json gpu_check.json``). ``COMFYUI_PATH`` (a ComfyUI checkout whose
requirements are installed) adds the ComfyUI check. On a machine without CUDA it prints what it would run and
exits 0; ``--smoke`` runs every check that can run here at tiny sizes instead (it checks the script, its
figures mean nothing). The exit status is 1 when a check fails.

The checks (``CHECKS``), each independent, in this order:

- ``bench_real``: ``bench --preset real --compare-checkpointing`` (real LTX-2 dims at 768x512x97 + audio,
  bf16, 8 blocks): ours against diffusers + peft, MFU, fraction of the measured GEMM peak, checkpointing cost.
- ``lora_19b_float8`` / ``lora_19b_int8``: the 48-block, 19B-parameter dims with a float8 / int8 base,
  ``blocks_to_swap`` blocks in pinned CPU memory and per-block checkpointing: LoRA training steps at
  768x512x97 + audio, whose peak GPU allocation must stay under 24 GiB. The model is built on the GPU in bf16
  (random weights) before it is quantised and swapped, so building it needs more memory than training it.
- ``precision_bf16`` / ``precision_fp16``: the small bench on the GPU in each mixed precision (fp16 with the
  gradient scaler): finite losses and the step against the reference.
- ``attention_kernels``: ``memory.attention`` = sdpa, sdpa_flash, flash (flash-attn when installed) on the
  same inputs: outputs against sdpa, and the forward+backward time of each.
- ``compile_blocks``: ``memory.compile`` (inductor, per block) against eager: the first step (compilation),
  the steady step time, and the first loss against eager.
- ``comfyui_partial_loading``: a ComfyUI-loaded LTXAV model (real dims, 8 blocks) loaded with less memory
  than it needs (ComfyUI's partial loading, weights streamed per layer) against the fully loaded one, with
  per-block checkpointing: one training step each from the same state, LoRA gradients compared.
- ``block_swap_test``: ``tests/test_memory.py::test_block_swap_on_cuda_matches_the_unswapped_model``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


@dataclass(frozen=True)
class Options:
    device: str = "cuda"
    smoke: bool = False  # tiny sizes on whatever device there is
    swap: int = 24  # blocks_to_swap of the 19B steps
    budget_gib: float = 24.0
    steps: int = 2  # training steps of the 19B and partial-loading checks


@dataclass(frozen=True)
class Check:
    name: str
    runs: str  # what it runs
    records: str  # what it records
    run: Callable[[Options], dict]  # → {"status": "ok" | "failed" | "skipped", "summary": str, "figures": {...}}
    needs_cuda: bool = False  # cannot run at all without CUDA (skipped by --smoke on a CPU)


def _result(status: str, summary: str, **figures) -> dict:
    return {"status": status, "summary": summary, "figures": figures}


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the checks ---------------------------------------------------------------------------------------------


def check_bench_real(options: Options) -> dict:
    from .bench import run_bench

    if options.smoke:
        report = run_bench("tiny", steps=2, warmup=1, device=options.device, compare_checkpointing=True)
    else:
        report = run_bench("real", compare_checkpointing=True)
    ours, saving = report["ours"], report["checkpointing_saving"]
    figures = {
        "ratio_step_time": report["ratio_step_time"], "ratio_peak_mem": report["ratio_peak_mem"],
        "step_time_s": ours["step_time_s"], "peak_mem_bytes": ours["peak_mem_bytes"], "tokens_per_s": ours["tokens_per_s"],
        "mfu": ours["mfu"], "fraction_of_gemm_peak": ours["fraction_of_gemm_peak"],
        "gemm_peak_flops_per_s": report["gemm_peak"]["flops_per_s"],
        "checkpointing_step_peak_cut": saving["step_peak_cut"], "checkpointing_time_ratio": saving["time_ratio"],
        "targets_met": {name: t["met"] for name, t in report["targets"].items()},
    }
    mfu = "n/a" if ours["mfu"] is None else f"{100 * ours['mfu']:.1f} %"
    summary = (f"{ours['step_time_s']:.3f} s/step, x{report['ratio_step_time']:.3f} time / x{report['ratio_peak_mem']:.3f} "
               f"memory vs reference, MFU {mfu}, {100 * ours['fraction_of_gemm_peak']:.1f} % of GEMM peak")
    return _result("ok", summary, **figures)


def _lora_19b(quantization: str) -> Callable[[Options], dict]:
    def run(options: Options) -> dict:
        import torch

        from ..config import MemoryConfig
        from ..memory.setup import apply_memory_options
        from ..training.loop import Trainer
        from .bench import BenchConfig, build_bench_denoiser, make_bench_samples

        if options.smoke:
            bench = BenchConfig.from_preset("tiny", layers=3, device=options.device)
            swap = 1
        else:
            bench = BenchConfig.from_preset("real", layers=48)  # LTX-2's 48 blocks: 19B parameters
            swap = options.swap
        config = bench.trainer_config()  # gradient_checkpointing off: the memory options switch it on below
        denoiser = build_bench_denoiser(bench, config)
        parameters = sum(p.numel() for p in denoiser.module.parameters())
        memory = MemoryConfig(quantization=quantization, blocks_to_swap=swap, pin_memory=True)
        denoiser.memory_plan = apply_memory_options(denoiser.transformer, memory, gradient_checkpointing=True)
        data = config.to_dict()
        data["model"]["gradient_checkpointing"] = True
        config = type(config).from_dict(data)
        device = torch.device(bench.device)
        trainer = Trainer(config, denoiser, make_bench_samples(bench), Path(tempfile.gettempdir()) / "ltx2-av-gpu-check-unused")
        _free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for _ in range(options.steps):
            started = time.perf_counter()
            metrics = trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
            losses.append(None if metrics is None else metrics["loss"])
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        swapped = len(denoiser.memory_plan.report.swapped_blocks)
        del trainer, denoiser
        _free_memory()
        finite = all(loss is not None and loss == loss for loss in losses)
        under = peak is None or peak < options.budget_gib * GIB
        status = "ok" if finite and under else "failed"
        peak_text = "n/a (CPU)" if peak is None else f"{peak / GIB:.1f} GiB"
        summary = (f"{parameters / 1e9:.1f}B params, {swapped} blocks swapped, peak {peak_text} "
                   f"(budget {options.budget_gib:g} GiB), {times[-1]:.1f} s/step, losses {'finite' if finite else 'NOT finite'}")
        return _result(status, summary, parameters=parameters, swapped_blocks=swapped, peak_allocated_bytes=peak,
                       peak_reserved_bytes=reserved, step_times_s=times, losses=losses)

    return run


def _precision(precision: str) -> Callable[[Options], dict]:
    def run(options: Options) -> dict:
        from .bench import run_bench

        preset = "tiny" if options.smoke else "small"
        report = run_bench(preset, precision=precision, device=options.device, steps=3 if options.smoke else 10,
                           warmup=1 if options.smoke else 3)
        ours, initial = report["ours"], report["ours"]["initial_loss"]
        finite = all(value == value and abs(value) != float("inf") for value in initial.values())
        summary = (f"{ours['step_time_s']:.4f} s/step, x{report['ratio_step_time']:.3f} vs reference, "
                   f"initial loss v/a {initial['video']:.4f}/{initial['audio']:.4f}")
        return _result("ok" if finite else "failed", summary, ratio_step_time=report["ratio_step_time"],
                       step_time_s=ours["step_time_s"], initial_loss=initial,
                       fraction_of_gemm_peak=ours["fraction_of_gemm_peak"])

    return run


def _small_model(options: Options, memory):
    """The small bench model (or tiny with --smoke) with ``memory``, on the check's device, and one batch."""
    import torch

    from ..backends.diffusers_backend import build_denoiser
    from ..backends.interface import DenoiserInput
    from ..data.batches import collate
    from .bench import BenchConfig, make_bench_samples

    bench = BenchConfig.from_preset("tiny" if options.smoke else "small", device=options.device)
    config = bench.trainer_config()
    denoiser = build_denoiser(config.model, memory)
    denoiser.place_on(options.device)
    batch = collate(make_bench_samples(bench)[:1])
    g = torch.Generator().manual_seed(0)
    device = torch.device(options.device)
    inputs = DenoiserInput(
        video=batch.video.to(device), audio=batch.audio.to(device),
        sigma_video=torch.rand(1, generator=g).to(device), sigma_audio=torch.rand(1, generator=g).to(device),
        text=batch.text.to(device, torch.float32), fps=batch.fps,
    )
    return denoiser, inputs, config


def check_attention_kernels(options: Options) -> dict:
    import torch

    from ..config import ConfigError, MemoryConfig
    from ..memory.attention import check_attention

    device = torch.device(options.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    outputs, times, skipped = {}, {}, {}
    for kind in ("sdpa", "sdpa_flash", "flash"):
        try:
            check_attention(kind, device)
        except ConfigError as exc:
            skipped[kind] = str(exc)
            continue
        denoiser, inputs, _ = _small_model(options, MemoryConfig(attention=kind))
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            with torch.no_grad():
                outputs[kind] = [t.float() for t in denoiser(inputs)]
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                video, audio = denoiser(replace(inputs, video=inputs.video.clone().requires_grad_(True)))
                (video.float().square().mean() + audio.float().square().mean()).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                runs.append(time.perf_counter() - started)
        times[kind] = statistics.median(runs[1:])
        del denoiser
        _free_memory()
    errors = {}
    for kind, (video, audio) in outputs.items():
        ref_video, ref_audio = outputs["sdpa"]
        errors[kind] = max(float((video - ref_video).norm() / ref_video.norm()), float((audio - ref_audio).norm() / ref_audio.norm()))
    # bf16 kernels differ in their rounding; a wrong kernel (mask, layout, scale) is off by far more.
    agree = all(error < 2e-2 for error in errors.values())
    summary = ", ".join(f"{k} {1e3 * times[k]:.1f} ms (err {errors[k]:.1e})" for k in times)
    if skipped:
        summary += "; skipped: " + ", ".join(skipped)
    return _result("ok" if agree else "failed", summary, relative_error_vs_sdpa=errors, fwd_bwd_s=times, skipped=skipped)


def check_compile(options: Options) -> dict:
    import torch

    from ..backends.diffusers_backend import build_denoiser
    from ..config import Config, MemoryConfig
    from ..training.loop import Trainer
    from .bench import BenchConfig, make_bench_samples

    bench = BenchConfig.from_preset("tiny" if options.smoke else "small", device=options.device,
                                    precision="bf16" if options.device == "cuda" else "fp32")
    runs = {}
    for compiled in (False, True):
        data = bench.trainer_config().to_dict()
        data["model"]["gradient_checkpointing"] = True
        config = Config.from_dict(data)
        denoiser = build_denoiser(config.model, MemoryConfig(compile=compiled))
        trainer = Trainer(config, denoiser, make_bench_samples(bench), Path(tempfile.gettempdir()) / "ltx2-av-gpu-check-unused")
        times, losses = [], []
        for _ in range(2 if options.smoke else 6):
            started = time.perf_counter()
            metrics = trainer.train_step()
            if options.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            losses.append(metrics["loss"] if metrics else float("nan"))
        runs["compiled" if compiled else "eager"] = {"first_step_s": times[0], "step_s": statistics.median(times[1:]),
                                                     "losses": losses}
        del trainer, denoiser
        _free_memory()
    eager, compiled = runs["eager"], runs["compiled"]
    difference = abs(compiled["losses"][0] - eager["losses"][0]) / max(abs(eager["losses"][0]), 1e-12)
    speedup = eager["step_s"] / compiled["step_s"]
    summary = (f"first step {compiled['first_step_s']:.1f} s (compiling), then {compiled['step_s']:.4f} s vs eager "
               f"{eager['step_s']:.4f} s (x{speedup:.2f}); first loss rel. diff {difference:.1e}")
    return _result("ok" if difference < 2e-2 else "failed", summary, **runs, speedup=speedup, first_loss_rel_diff=difference)


def check_comfyui_partial_loading(options: Options) -> dict:
    if not os.environ.get("COMFYUI_PATH"):
        return _result("skipped", "COMFYUI_PATH is not set (a ComfyUI checkout with its requirements installed)")
    import torch

    from ..backends.comfyui.denoiser import ComfyDenoiser
    from ..backends.comfyui.env import comfy_training_mode, import_model_management
    from ..backends.comfyui.random_model import load_ltxav_checkpoint, write_tiny_ltxav_checkpoint
    from ..training.loop import Trainer
    from .bench import MODEL_VERSION, BenchConfig, make_bench_samples

    mm = import_model_management()
    bench = BenchConfig.from_preset("tiny", device=options.device) if options.smoke else BenchConfig.from_preset("real", layers=8)
    config = bench.trainer_config()
    data = config.to_dict()
    data["model"]["gradient_checkpointing"] = True
    data["train"]["mixed_precision"] = "bf16"
    config = type(config).from_dict(data)
    samples = make_bench_samples(bench)
    gradients, loaded = {}, {}
    with tempfile.TemporaryDirectory(prefix="ltx2av-gpu-check-") as folder:
        checkpoint = write_tiny_ltxav_checkpoint(Path(folder), MODEL_VERSION, config.model.tiny, seed=bench.seed)
        for mode in ("full", "partial"):
            patcher = load_ltxav_checkpoint(checkpoint)
            denoiser = ComfyDenoiser(patcher, MODEL_VERSION, checkpointing="block")
            size = patcher.model_size()
            with torch.inference_mode(False):
                if mode == "full":
                    denoiser.load(force_full_load=True)
                else:
                    # ComfyUI loads what fits next to `memory_required`: leave it room for about half the model.
                    free = mm.get_free_memory(patcher.load_device)
                    denoiser.load(memory_required=max(free - size / 2, 0))
            loaded[mode] = {"model_bytes": size, "loaded_bytes": patcher.loaded_size()}
            trainer = Trainer(config, denoiser, samples, Path(folder) / "unused")
            with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
                trainer.train_step()
            gradients[mode] = [p.grad.detach().float().cpu().clone() for p in trainer.network.parameters() if p.grad is not None]
            del trainer, denoiser
            mm.unload_all_models()
            del patcher
            _free_memory()
    full, partial = gradients["full"], gradients["partial"]
    error = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(partial, full))
    was_partial = loaded["partial"]["loaded_bytes"] < loaded["partial"]["model_bytes"]
    status = "ok" if (was_partial or options.smoke) and error < 1e-2 and len(full) == len(partial) > 0 else "failed"
    summary = (f"partial load {loaded['partial']['loaded_bytes'] / GIB:.2f} of {loaded['partial']['model_bytes'] / GIB:.2f} GiB "
               f"on the GPU; LoRA gradients vs full load: max rel. error {error:.1e}")
    return _result(status, summary, loaded=loaded, max_relative_gradient_error=error, gradients_compared=len(full))


def check_block_swap_test(options: Options) -> dict:
    test = REPO_ROOT / "tests" / "test_memory.py"
    if not test.is_file():
        return _result("skipped", f"{test} is missing: run gpu-check from a git clone")
    node = f"{test}::test_block_swap_on_cuda_matches_the_unswapped_model"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", node], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1800)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode == 0 and "skipped" in last:
        return _result("skipped", f"pytest: {last}")
    return _result("ok" if result.returncode == 0 else "failed", f"pytest: {last}", returncode=result.returncode,
                   output_tail=(result.stdout + result.stderr)[-2000:])


CHECKS = [
    Check("bench_real", "bench --preset real --compare-checkpointing (real dims, bf16, 8 blocks, 768x512x97 + audio)",
          "step time and memory vs diffusers + peft, MFU, fraction of the measured GEMM peak, checkpointing cost",
          check_bench_real, needs_cuda=True),
    Check("lora_19b_float8", "LoRA steps on the 48-block 19B dims, float8 base, blocks_to_swap, per-block checkpointing",
          "peak GPU allocation (must stay under the budget, 24 GiB), step time, finite losses", _lora_19b("float8")),
    Check("lora_19b_int8", "the same with an int8 base",
          "peak GPU allocation (must stay under the budget, 24 GiB), step time, finite losses", _lora_19b("int8")),
    Check("precision_bf16", "bench --preset small --precision bf16 on the GPU", "finite losses, step time vs reference",
          _precision("bf16")),
    Check("precision_fp16", "bench --preset small --precision fp16 on the GPU (gradient scaler)",
          "finite losses, step time vs reference", _precision("fp16"), needs_cuda=True),
    Check("attention_kernels", "memory.attention = sdpa, sdpa_flash, flash on the small model, same inputs",
          "outputs vs sdpa, forward+backward time per kernel", check_attention_kernels),
    Check("compile_blocks", "memory.compile (inductor, per block) vs eager on the small model, bf16",
          "compilation step, steady step time, first loss vs eager", check_compile, needs_cuda=True),
    Check("comfyui_partial_loading", "ComfyUI-loaded LTXAV (real dims, 8 blocks) partially loaded vs fully loaded, "
          "per-block checkpointing, one training step each (needs COMFYUI_PATH)",
          "bytes on the GPU, LoRA gradients partial vs full", check_comfyui_partial_loading),
    Check("block_swap_test", "pytest tests/test_memory.py::test_block_swap_on_cuda_matches_the_unswapped_model",
          "pass/fail", check_block_swap_test, needs_cuda=True),
]


# ---- running and reporting ------------------------------------------------------------------------------------


def plan_text(checks: list[Check], reason: str) -> str:
    lines = [f"gpu-check: {reason}; on a CUDA machine it runs these checks and writes one table and a JSON file:"]
    for check in checks:
        lines.append(f"  {check.name}: {check.runs}")
        lines.append(f"      records: {check.records}")
    return "\n".join(lines)


def run_checks(checks: list[Check], options: Options, say: Callable[[str], None] = print) -> list[dict]:
    import torch

    results = []
    for check in checks:
        if options.smoke and check.needs_cuda and not torch.cuda.is_available():
            result = _result("skipped", "needs CUDA")
            seconds = 0.0
        else:
            say(f"gpu-check: {check.name} ...")
            started = time.perf_counter()
            try:
                result = check.run(options)
            except Exception as exc:  # one failing check must not hide the others
                result = _result("failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                                 traceback=traceback.format_exc()[-3000:])
            seconds = time.perf_counter() - started
            _free_memory()
        results.append({"check": check.name, "runs": check.runs, "seconds": seconds, **result})
    return results


def table(results: list[dict]) -> str:
    width = max(len(r["check"]) for r in results)
    lines = [f"{'check':{width}}  {'status':8}{'time':>8}  result", "-" * (width + 70)]
    for r in results:
        lines.append(f"{r['check']:{width}}  {r['status']:8}{r['seconds']:7.0f}s  {r['summary']}")
    return "\n".join(lines)


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(device=properties.name, memory_bytes=properties.total_memory, device_count=torch.cuda.device_count())
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", default="gpu_check.json", help="where to write the results (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], help="run only these checks")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="run every check this machine can run at tiny sizes (tests the script; the figures mean nothing)")
    parser.add_argument("--swap", type=int, default=Options.swap, help="blocks_to_swap of the 19B steps (default: %(default)s)")
    parser.add_argument("--budget-gib", type=float, default=Options.budget_gib, help="GPU memory budget of the 19B steps")
    args = parser.parse_args(argv)
    checks = [c for c in CHECKS if not args.only or c.name in args.only]
    import torch

    if args.dry_run or (not torch.cuda.is_available() and not args.smoke):
        reason = "dry run" if args.dry_run else "no CUDA device here, nothing is run"
        print(plan_text(checks, reason))
        return 0
    options = Options(device="cuda" if torch.cuda.is_available() else "cpu", smoke=args.smoke, swap=args.swap,
                      budget_gib=args.budget_gib)
    results = run_checks(checks, options)
    print(table(results))
    report = {"environment": environment(), "smoke": args.smoke, "results": results}
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"gpu-check: results written to {args.json}")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
