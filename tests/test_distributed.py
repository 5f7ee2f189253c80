"""Several ranks (torch.distributed, gloo on the CPU) train what one process trains: N ranks x batch b equal one
process x batch N·b (and a single-process state goes on with 2 ranks); a stop asked of one rank stops every rank after
the same step; a rank killed under torchrun ends the run with a resumable state; those states resume in one process
to the straight run's result. Ranks are forked (nothing to import again) except under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.training.distributed import World, join_from_environment
from ltx2_av_trainer.trainer.training.loop import Trainer
from ltx2_av_trainer.trainer.training.state import find_latest_state, load_state
from safetensors.torch import load_file

STEPS = 20
# LoRA tensors of 2 ranks vs 1 process after STEPS steps: the gradients are summed in another order (each rank's
# half, then the all-reduce), so they differ by float32 rounding, which Adam's normalisation carries into the
# weights. Measured here: max |difference| 1.1e-6 on weights up to 0.26; the broken runs below differ by 0.01-0.03.
TOLERANCE = 2e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(run_dir: Path, batch_size: int):
    # The audio balancer on (its weight follows the losses), a mixed dataset (audio and audio-free buckets, one with
    # an odd tail, so a global batch of 1 leaves rank 1 without rows) and per-sample σ / noise / caption dropout draws.
    return tiny_config(run_dir.parent, **{"train.steps": STEPS, "train.batch_size": batch_size,
                                          "output.dir": str(run_dir), "output.save_every": 100,
                                          "loss.balance": "ema_mag", "loss.caption_dropout": 0.3,
                                          "audio.missing_audio": "skip"})


def _samples(cfg):
    speaking = make_samples(cfg, 5)
    silent = [dataclasses.replace(s, id=f"silent{i}") for i, s in enumerate(make_samples(cfg, 2, with_audio=False, seed=1))]
    return speaking + silent


def _train(cfg, world: World | None = None, until: int | None = None, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, build_denoiser(cfg.model), _samples(cfg), cfg.output.dir, world=world)
    if resume:
        trainer.try_resume()
    trainer.run(until_step=until)
    return trainer


def _rank(rank: int, size: int, port: int, run_dir: str, batch_size: int, broken: str | None, resume: bool,
          stop_at: int | None) -> None:
    """One rank, as torchrun starts it (the environment names the group)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = join_from_environment("cpu")
    if broken == "unsharded":  # every rank samples its own batches of b (the global order is lost)
        Trainer.global_batch_size = property(lambda self: self.config.train.batch_size)
    if broken == "per-rank balancing":  # the balancer and the tallies see this rank's losses only
        World.sum_values = lambda self, values: dict(values)
    if stop_at is not None and rank == 1:  # this rank alone is asked to stop (its SIGTERM) after step stop_at
        step = Trainer.train_step

        def train_step(self):
            metrics = step(self)
            if self.step == stop_at:
                self.stop.request("SIGTERM")
            return metrics

        Trainer.train_step = train_step
    try:
        _train(_config(Path(run_dir), batch_size), world, resume=resume)
    finally:
        world.close()


def _run_ranks(run_dir: Path, size: int, batch_size: int, broken: str | None = None, resume: bool = False,
               stop_at: int | None = None) -> None:
    mp.start_processes(_rank, args=(size, _free_port(), str(run_dir), batch_size, broken, resume, stop_at), nprocs=size,
                       start_method="fork")


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_latest_state(run_dir) / "adapter.safetensors"))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_ranks_of_batch_1_train_what_one_process_of_batch_2_trains(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(_config(tmp_path / "single", 2))
        _train(_config(tmp_path / "handover", 2), until=STEPS // 2)  # its state goes on under torchrun below
    finally:
        torch.set_num_threads(threads)
    _run_ranks(tmp_path / "ranks", 2, 1)

    want, got = _rows(tmp_path / "single"), _rows(tmp_path / "ranks")
    assert [r["items"] for r in got] == [r["items"] for r in want]  # the same global batches, in the same order
    assert any(len(r["items"]) == 1 for r in want), "no bucket tail: rank 1's empty share is not exercised"
    assert any(r.get("loss_audio") is None for r in want) and any(r.get("loss_audio") is not None for r in want)
    for key in ("sigma_video", "sigma_audio", "loss", "loss_video", "loss_audio", "audio_weight"):
        for w, g in zip(want, got):
            assert (w.get(key) is None) == (g.get(key) is None), (key, w, g)
            if w.get(key) is not None:
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (key, w["step"])
    difference = _max_difference(_adapter(tmp_path / "ranks"), _adapter(tmp_path / "single"))
    assert difference < TOLERANCE, difference
    assert single.step == STEPS

    # A single-process state resumes with 2 ranks (same global batch) and continues to the same result.
    _run_ranks(tmp_path / "handover", 2, 1, resume=True)
    assert [r["items"] for r in _rows(tmp_path / "handover")] == [r["items"] for r in want]
    assert _max_difference(_adapter(tmp_path / "handover"), _adapter(tmp_path / "single")) < TOLERANCE

    # Negative controls: each of the two mistakes the design avoids is caught by the comparison above.
    for broken in ("unsharded", "per-rank balancing"):
        run = tmp_path / broken.replace(" ", "_")
        _run_ranks(run, 2, 1, broken)
        assert _max_difference(_adapter(run), _adapter(tmp_path / "single")) > 100 * TOLERANCE, broken


def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step_and_resumes_in_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(_config(tmp_path / "single", 2))
        stop_at = 7
        _run_ranks(tmp_path / "ranks", 2, 1, stop_at=stop_at)  # returns only when both ranks ended without error
        assert [r["step"] for r in _rows(tmp_path / "ranks")] == list(range(1, stop_at + 1))
        state = find_latest_state(tmp_path / "ranks")
        assert load_state(state).step == stop_at
        _train(_config(tmp_path / "ranks", 2), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert [r["items"] for r in _rows(tmp_path / "ranks")] == [r["items"] for r in _rows(tmp_path / "single")]
    assert _max_difference(_adapter(tmp_path / "ranks"), _adapter(tmp_path / "single")) < TOLERANCE


def test_a_state_resumes_only_with_the_same_global_batch(tmp_path):
    from ltx2_av_trainer.trainer.training.loop import TrainingError

    _train(_config(tmp_path / "run", 2), until=2)
    cfg = _config(tmp_path / "run", 2)  # 2 ranks x batch 2: a global batch of 4 (no collective runs before run())
    trainer = Trainer(cfg, build_denoiser(cfg.model), _samples(cfg), cfg.output.dir, world=World(rank=0, size=2))
    with pytest.raises(TrainingError, match=r"global batch of 2 samples and this run has 4 \(2 rank\(s\) x train.batch_size 2\)"):
        trainer.try_resume()
    cfg = _config(tmp_path / "run", 1)
    trainer = Trainer(cfg, build_denoiser(cfg.model), _samples(cfg), cfg.output.dir, world=World(rank=1, size=2))
    assert trainer.try_resume() == 2  # 2 ranks x batch 1 continue it


TOML = """
[[dataset.sources]]
path = "{clips}"

[dataset]
frames = 9
width = 64
height = 64

[cache]
dir = "{cache}"

[network]
rank = 4
alpha = 4.0

[train]
steps = {steps}
batch_size = {batch_size}
mixed_precision = "fp32"
device = "cpu"
seed = 5
num_threads = 1

[output]
dir = "{run}"
save_every = 100
"""
KILL_STEPS = 10


def _toml(folder: Path, name: str, run: str, batch_size: int) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(TOML.format(clips=folder / "clips", cache=folder / "cache", run=folder / run, steps=KILL_STEPS,
                                batch_size=batch_size), encoding="utf-8")
    return path


def _workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun's agent ``agent`` started."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in v)
        except (OSError, ValueError):
            continue  # ended meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_a_killed_rank_ends_every_rank_and_the_state_resumes_in_one_process(tmp_path):
    from ltx2_av_trainer.trainer.app.cli import main
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    make_demo_dataset(tmp_path / "clips", clips_per_speaker=2, seconds=0.6, width=64, height=64)
    straight = _toml(tmp_path, "straight", "straight", 2)
    assert main(["cache", "--config", str(straight), "--quiet"]) == 0
    assert main(["train", "--config", str(straight), "--quiet"]) == 0

    ranks = _toml(tmp_path, "ranks", "ranks", 1)
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "ltx2_av_trainer.trainer.app.cli", "train", "--config", str(ranks), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "ranks" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and agent.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _workers(agent.pid)
    assert agent.poll() is None and sorted(workers) == [0, 1], agent.poll()
    os.kill(workers[1], signal.SIGKILL)
    output, _ = agent.communicate(timeout=300)
    assert agent.returncode != 0
    assert not any(_alive(pid) for pid in workers.values()), output[-3000:]
    # Rank 0's "another rank stopped answering" line is not asserted: torchrun, having seen rank 1 die, may SIGTERM
    # rank 0 after it saved the state and before it printed.
    state = find_latest_state(tmp_path / "ranks")
    # Rank 0 saved the last step both ranks completed (3 rows were written before the kill).
    assert state is not None and 3 <= load_state(state).step < KILL_STEPS, (state, output[-3000:])

    # The same run directory, continued by one process with the same global batch (1 process x batch 2).
    resume = _toml(tmp_path, "resume", "ranks", 2)
    assert main(["train", "--config", str(resume), "--quiet"]) == 0
    want, got = _rows(tmp_path / "straight"), _rows(tmp_path / "ranks")
    assert [r["step"] for r in got] == list(range(1, KILL_STEPS + 1))
    assert [r["items"] for r in got] == [r["items"] for r in want]
    difference = _max_difference(_adapter(tmp_path / "ranks"), _adapter(tmp_path / "straight"))
    assert difference < TOLERANCE, difference


def test_bench_reports_the_scaling_of_two_cpu_ranks(tmp_path):
    from ltx2_av_trainer.trainer.app.cli import main

    out = tmp_path / "scaling.json"
    assert main(["bench", "--preset", "tiny", "--ranks", "2", "--steps", "2", "--warmup", "1", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert (report["ranks"], report["backend"], report["batch_per_rank"]) == (2, "gloo", 1)
    for side in ("single", "distributed"):
        assert len(report[side]["step_times_s"]) == 2 and report[side]["tokens_per_s_per_rank"] > 0
    assert report["single"]["comm_share"] == 0  # one process runs no collective
    assert 0 < report["distributed"]["comm_share"] < 1  # the ranks' gradients were all-reduced
    assert report["scaling_efficiency"] == pytest.approx(
        report["distributed"]["tokens_per_s_per_rank"] / report["single"]["tokens_per_s_per_rank"])


def test_only_train_runs_under_torchrun(tmp_path, monkeypatch, capsys):
    from ltx2_av_trainer.trainer.app.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["verify", str(tmp_path / "some.safetensors")]) == 2
    assert "`verify` runs in one process, but torchrun started 2" in capsys.readouterr().err


def test_representation_regularisers_are_refused_under_torchrun(tmp_path):
    """CREPA / Self-Flow draw and average per process: with several ranks they would train something else than one
    process, so the Trainer refuses them before any collective runs."""
    from ltx2_av_trainer.trainer.config import ConfigError

    for section in ("crepa", "self_flow"):
        cfg = tiny_config(tmp_path, **{"output.dir": str(tmp_path / section), f"{section}.enabled": True})
        with pytest.raises(ConfigError, match="not available under torchrun"):
            Trainer(cfg, build_denoiser(cfg.model), _samples(cfg), cfg.output.dir, world=World(rank=0, size=2))
        Trainer(cfg, build_denoiser(cfg.model), _samples(cfg), cfg.output.dir)  # one process: fine
