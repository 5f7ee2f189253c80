"""``ltx2-av-trainer bench --ranks N``: how our training step scales over N ranks (torch.distributed, gloo on the
CPU, NCCL on CUDA) against one process, on a bench preset's model and data.

Weak scaling, as torchrun runs it: every rank trains the preset's per-rank batch (so N ranks train a global batch
N times larger), one process per device. On the CPU each rank gets ``cpu_count // N`` threads and the single
process the same, so the figure is "one more device", not "the same cores split". Reported per side: the median
step time and tokens/s per rank; for N ranks also the scaling efficiency (tokens/s per rank of N ranks over that
of one) and the share of the step spent in collectives (``World.comm_seconds``: the adapter-gradient all-reduce,
the summed loss scalars, and the wait for the slowest rank, which a collective includes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import ConfigError
from ..training.distributed import World, join_from_environment
from ..training.loop import Trainer
from .bench import BenchConfig, build_bench_denoiser, make_bench_samples


def run_scaling_bench(preset: str = "small", ranks: int = 2, steps: int | None = None, warmup: int | None = None,
                      device: str | None = None) -> dict:
    """One process, then ``ranks`` processes, each timing ``steps`` training steps after ``warmup``."""
    if ranks < 2:
        raise ConfigError(f"bench --ranks must be >= 2 (it compares them with one process), got {ranks}")
    bench = BenchConfig.from_preset(preset, steps=steps, warmup=warmup, device=device)
    if bench.device == "cuda" and torch.cuda.device_count() < ranks:
        raise ConfigError(f"bench --ranks {ranks} on cuda needs {ranks} GPUs, {torch.cuda.device_count()} visible: "
                          "lower --ranks or use --device cpu")
    threads = max(1, (os.cpu_count() or 1) // ranks)
    with tempfile.TemporaryDirectory(prefix="ltx2-av-bench-ranks-") as folder:
        single = _run_group(bench, 1, threads, Path(folder) / "single.json")
        several = _run_group(bench, ranks, threads, Path(folder) / "ranks.json")
    s = bench.shapes
    tokens_per_rank_step = (s.video_tokens + s.audio_frames) * s.batch_size
    one = _side(single, tokens_per_rank_step)
    many = _side(several, tokens_per_rank_step)
    return {
        "preset": preset, "device": bench.device, "ranks": ranks, "threads_per_rank": threads,
        "backend": "nccl" if bench.device == "cuda" else "gloo", "batch_per_rank": s.batch_size,
        "tokens_per_rank_step": tokens_per_rank_step, "steps": bench.steps, "warmup": bench.warmup,
        "single": one, "distributed": many,
        "scaling_efficiency": many["tokens_per_s_per_rank"] / one["tokens_per_s_per_rank"],
        "comm_share": many["comm_share"],
    }


def cmd_scaling_bench(args: argparse.Namespace) -> int:
    """``bench --ranks N``: print the report (and write it as JSON with ``--json``)."""
    from ..io_utils import atomic_write_json

    report = run_scaling_bench(args.preset, args.ranks, steps=args.steps, warmup=args.warmup, device=args.device)
    if not args.quiet:
        print(format_scaling_report(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def _side(timings: dict, tokens_per_rank_step: int) -> dict:
    step = statistics.median(timings["step_times_s"])
    return {
        "step_time_s": step,
        "step_times_s": timings["step_times_s"],
        "tokens_per_s_per_rank": tokens_per_rank_step / step,
        "comm_share": sum(timings["comm_times_s"]) / sum(timings["step_times_s"]),
    }


def _run_group(bench: BenchConfig, ranks: int, threads: int, out: Path) -> dict:
    if ranks == 1:
        _rank(0, 1, 0, bench, threads, str(out))
    else:
        import torch.multiprocessing as mp

        # fork is quick (nothing to import again) and safe before CUDA is touched; CUDA ranks are spawned.
        method = "spawn" if bench.device == "cuda" else "fork"
        mp.start_processes(_rank, args=(ranks, _free_port(), bench, threads, str(out)), nprocs=ranks, start_method=method)
    return json.loads(out.read_text(encoding="utf-8"))


def _rank(rank: int, ranks: int, port: int, bench: BenchConfig, threads: int, out: str) -> None:
    """One rank: the preset's trainer, timed one ``train_step`` at a time (rank 0 writes the timings)."""
    world = World()
    if ranks > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        world = join_from_environment(bench.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = bench.trainer_config()
        trainer = Trainer(config, build_bench_denoiser(bench, config), make_bench_samples(bench),
                          Path(tempfile.gettempdir()) / "ltx2-av-trainer-bench-unused", world=world)
        step_times, comm_times = [], []
        for i in range(bench.warmup + bench.steps):
            world.barrier()  # every rank starts the step together: the wait for a late one is not counted
            comm_before = world.comm_seconds
            _synchronize(trainer.device)
            started = time.perf_counter()
            if trainer.train_step() is None:
                raise RuntimeError("a bench training step was skipped (non-finite loss) on random bench data")
            _synchronize(trainer.device)
            if i >= bench.warmup:
                step_times.append(time.perf_counter() - started)
                comm_times.append(world.comm_seconds - comm_before)
        if world.is_main:
            Path(out).write_text(json.dumps({"step_times_s": step_times, "comm_times_s": comm_times}), encoding="utf-8")
    finally:
        torch.set_num_threads(threads_before)
        world.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_scaling_report(report: dict) -> str:
    one, many = report["single"], report["distributed"]
    return "\n".join([
        f"bench {report['preset']} on {report['device']} ({report['backend']}): {report['ranks']} ranks vs 1 process, "
        f"batch {report['batch_per_rank']} per rank, {report['threads_per_rank']} thread(s) per rank, "
        f"{report['steps']} steps after {report['warmup']} warm-up",
        f"  1 process : {one['step_time_s'] * 1000:9.1f} ms/step  {one['tokens_per_s_per_rank']:10.0f} tokens/s per rank",
        f"  {report['ranks']} ranks   : {many['step_time_s'] * 1000:9.1f} ms/step  {many['tokens_per_s_per_rank']:10.0f} tokens/s per rank"
        f"  ({many['comm_share']:.1%} of the step in collectives)",
        f"  scaling efficiency (tokens/s per rank, {report['ranks']} ranks / 1): {report['scaling_efficiency']:.2f}",
    ])
