"""Every stop resumes bit for bit: Ctrl-C and SIGTERM sent to the real CLI, ComfyUI's Cancel (a stop request
between steps, or its exception inside an op in the middle of a step), a kill while the LoRA is exported; and
the run's identity is what it trains on, not file names."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.training.loop import TrainCallbacks, Trainer, TrainingError
from ltx2_av_trainer.trainer.training.state import find_latest_state, load_state
from ltx2_av_trainer.trainer.training.stopping import StopRequest, stop_on_signals
from safetensors.torch import load_file

STEPS = 12
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
dropout = 0.1

[train]
steps = {steps}
mixed_precision = "fp32"
device = "cpu"
seed = 5

[output]
dir = "{run}"
save_every = 100
"""


def _toml(folder: Path, clips: Path, cache: Path, name: str, steps: int = STEPS) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(TOML.format(clips=clips, cache=cache, run=folder / name, steps=steps), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A cache of three synthesised talking clips and the straight run of STEPS steps on it."""
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    folder = tmp_path_factory.mktemp("stops")
    clips = folder / "clips"
    make_demo_dataset(clips, clips_per_speaker=2, seconds=0.6, width=64, height=64)
    straight = _toml(folder, clips, folder / "cache", "straight")
    assert main(["cache", "--config", str(straight), "--quiet"]) == 0
    assert main(["train", "--config", str(straight), "--quiet"]) == 0
    return folder, clips


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = find_latest_state(run)
    return {
        "lora": load_file(str(run / "lora" / f"ltx2_av_lora_{STEPS:06d}.safetensors")),
        "adapter": load_file(str(state / "adapter.safetensors")),
        "optimizer": load_file(str(state / "optimizer.safetensors")),
    }


def assert_bit_for_bit(run: Path, straight: Path, note: str = "") -> None:
    got, want = _tensors(run), _tensors(straight)
    for kind in want:
        assert set(got[kind]) == set(want[kind]), (kind, note)
        different = [k for k in want[kind] if not torch.equal(got[kind][k], want[kind][k])]
        assert not different, f"{note}: {len(different)}/{len(want[kind])} {kind} tensors differ, e.g. {different[:3]}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), note
    # Items by clip name: a cache built from another folder gives them other ids (the path is part of an id).
    assert [(r["loss"], r["sigma_video"], [i.rsplit("-", 1)[0] for i in r["items"]]) for r in rows] == \
        [(r["loss"], r["sigma_video"], [i.rsplit("-", 1)[0] for i in r["items"]]) for r in straight_rows], note


def _rows_written(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_cli_stops_on_a_step_boundary_and_resumes_bit_for_bit(cached, signum, code):
    folder, clips = cached
    name = signal.Signals(signum).name
    toml = _toml(folder, clips, folder / "cache", f"run_{name}")
    run = folder / f"run_{name}"
    at = random.randrange(1, STEPS - 5)  # the step whose row triggers the signal; it lands somewhere after it
    proc = subprocess.Popen([sys.executable, "-m", "ltx2_av_trainer.trainer.app.cli", "train", "--config", str(toml),
                             "--quiet"], stderr=subprocess.PIPE, text=True)  # same thread count as this process: same float sums
    deadline = time.time() + 300
    while _rows_written(run) < at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the training process ended before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    saved = load_state(find_latest_state(run)).step
    assert at <= saved < STEPS, (at, saved)
    assert f"stopped by {name} after step {saved}: resumable state saved" in err, err[-2000:]
    assert json.loads((run / "report.json").read_text())["stopped_by"] == name
    assert sorted(p.name for p in (run / "lora").iterdir()) == [f"ltx2_av_lora_{saved:06d}.safetensors"]
    # Resumed by the same command (here in this process: the signal handlers come and go with the run).
    assert main(["train", "--config", str(toml), "--quiet"]) == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_bit_for_bit(run, folder / "straight", f"{name} after step {at}, saved {saved}")


class _Cancel(TrainCallbacks):
    """ComfyUI's Cancel as the node sees it between steps: a stop request from the step callback."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, trainer, metrics):
        if metrics["step"] == self.at:
            trainer.stop.request("ComfyUI Cancel")


class _Interrupted(Exception):
    """Stands for ComfyUI's InterruptProcessingException, which its ops raise in the middle of a forward."""


def _train_latents(tmp_path, name, callbacks=None, *, until=None, resume=False, stop=None):
    cfg = tiny_config(tmp_path, **{"train.steps": STEPS, "output.dir": str(tmp_path / name), "output.save_every": 100,
                                   "network.dropout": 0.1, "train.batch_size": 2})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 5), cfg.output.dir, callbacks, stop=stop)
    if resume:
        trainer.try_resume()
    return trainer, trainer.run(until_step=until)


def test_cancel_between_steps_and_inside_a_step_resume_bit_for_bit(tmp_path):
    _train_latents(tmp_path, "straight")
    at = random.randrange(2, STEPS - 2)
    # Cancel between steps: the run returns, stopped at that step, with its state and LoRA.
    trainer, result = _train_latents(tmp_path, "cancel", _Cancel(at))
    assert (result.stopped_by, result.step, result.completed) == ("ComfyUI Cancel", at, False)
    assert load_state(find_latest_state(tmp_path / "cancel")).step == at and result.lora_path.is_file()
    _train_latents(tmp_path, "cancel", resume=True)
    assert_bit_for_bit(tmp_path / "cancel", tmp_path / "straight", f"cancel at {at}")

    # Cancel raised inside an op of the forward of step at+1: the state of step `at` is kept, not a half step.
    cfg = tiny_config(tmp_path, **{"train.steps": STEPS, "output.dir": str(tmp_path / "op"), "output.save_every": 100,
                                   "network.dropout": 0.1, "train.batch_size": 2})
    denoiser = build_denoiser(cfg.model)
    trainer = Trainer(cfg, denoiser, make_samples(cfg, 5), cfg.output.dir)
    block = denoiser.transformer.transformer_blocks[1]

    def interrupt(module, args):
        if trainer.step == at:
            raise _Interrupted()

    handle = block.register_forward_pre_hook(interrupt)
    with pytest.raises(_Interrupted):
        trainer.run()
    handle.remove()
    assert load_state(find_latest_state(tmp_path / "op")).step == at
    _train_latents(tmp_path, "op", resume=True)
    assert_bit_for_bit(tmp_path / "op", tmp_path / "straight", f"interrupt inside step {at + 1}")


def test_second_signal_inside_a_step_stops_at_once_keeping_the_last_completed_step(tmp_path):
    _train_latents(tmp_path, "straight")
    at = random.randrange(2, STEPS - 2)
    stop = StopRequest()
    cfg = tiny_config(tmp_path, **{"train.steps": STEPS, "output.dir": str(tmp_path / "twice"), "output.save_every": 100,
                                   "network.dropout": 0.1, "train.batch_size": 2})
    denoiser = build_denoiser(cfg.model)
    trainer = Trainer(cfg, denoiser, make_samples(cfg, 5), cfg.output.dir, stop=stop)

    def second_ctrl_c(module, args):
        if trainer.step == at:
            stop.request("SIGINT")  # the first Ctrl-C, then the second one in the middle of the next forward
            raise KeyboardInterrupt

    denoiser.transformer.transformer_blocks[0].register_forward_pre_hook(second_ctrl_c)
    result = trainer.run()
    assert (result.stopped_by, result.step) == ("SIGINT", at)
    assert load_state(find_latest_state(tmp_path / "twice")).step == at
    _train_latents(tmp_path, "twice", resume=True)
    assert_bit_for_bit(tmp_path / "twice", tmp_path / "straight", f"second signal in step {at + 1}")


def test_signal_handlers_only_in_the_main_thread_and_restored():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker():
        with stop_on_signals(StopRequest()):
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=worker)  # as ComfyUI runs nodes: its own handlers must stay
    thread.start()
    thread.join()
    assert seen["handler"] is before
    stop = StopRequest()
    with stop_on_signals(stop):
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


KILL_DURING_EXPORT = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
import ltx2_av_trainer.trainer.training.loop as loop
export = loop.save_network
def killed_while_exporting(network, path, **kwargs):
    if kwargs["step"] == {at}:  # the state of this step is on disk; the LoRA is half written
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (Path(path).parent / (".tmp-" + Path(path).name)).write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return export(network, path, **kwargs)
loop.save_network = killed_while_exporting
cfg = tiny_config(Path({tmp!r}), **{{"train.steps": {steps}, "output.dir": {run!r}, "output.save_every": 2,
                                    "network.dropout": 0.1, "train.batch_size": 2}})
loop.Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 5), cfg.output.dir).run()
"""


def test_kill_while_exporting_the_lora_loses_no_lora(tmp_path):
    straight = tmp_path / "straight"
    cfg = tiny_config(tmp_path, **{"train.steps": 6, "output.dir": str(straight), "output.save_every": 2,
                                   "network.dropout": 0.1, "train.batch_size": 2})
    Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 5), cfg.output.dir).run()
    run = tmp_path / "killed"
    script = KILL_DURING_EXPORT.format(tests=str(Path(__file__).parent), at=4, tmp=str(tmp_path), run=str(run), steps=6)
    proc = subprocess.run([sys.executable, "-c", script], timeout=300)  # same thread count: same float sums
    assert proc.returncode == -signal.SIGKILL
    assert load_state(find_latest_state(run)).step == 4 and not (run / "lora" / "ltx2_av_lora_000004.safetensors").exists()
    trainer = Trainer(cfg.replace(**{"output.dir": str(run)}), build_denoiser(cfg.model), make_samples(cfg, 5), run)
    assert trainer.try_resume() == 4
    assert any("ltx2_av_lora_000004.safetensors was missing" in w for w in trainer.warnings)
    for step in (2, 4):
        name = f"ltx2_av_lora_{step:06d}.safetensors"
        got, want = load_file(str(run / "lora" / name)), load_file(str(straight / "lora" / name))
        assert all(torch.equal(got[k], want[k]) for k in want), name
    trainer.run()
    got, want = load_file(str(run / "lora" / "ltx2_av_lora_000006.safetensors")), \
        load_file(str(straight / "lora" / "ltx2_av_lora_000006.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_flags_that_contradict_are_refused(cached, capsys):
    folder, clips = cached
    toml = _toml(folder, clips, folder / "cache", "flags")
    assert main(["train", "--config", str(toml), "--resume", str(folder / "straight" / "state"), "--no-resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume and --no-resume" in err[0]


def test_resuming_past_train_steps_reports_the_truth(cached, tmp_path):
    folder, clips = cached
    run = tmp_path / "past"
    shutil.copytree(folder / "straight", run)
    toml = _toml(tmp_path, clips, folder / "cache", "past", steps=4)
    assert main(["train", "--config", str(toml), "--quiet", "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == STEPS and report["completed"] and report["resumed_from"] == STEPS
    assert report["files"]["final_lora"].endswith(f"ltx2_av_lora_{STEPS:06d}.safetensors")
    assert any(f"already at step {STEPS} (train.steps = 4): nothing to train" in w for w in report["warnings"])


def test_resume_identity_is_the_content_not_the_file_names(cached, tmp_path):
    """The same clips cached again from another folder (other ids, other cache) resume; other content does not."""
    folder, clips = cached
    moved = tmp_path / "moved_clips"
    shutil.copytree(clips, moved)
    run = tmp_path / "run"
    first = _toml(tmp_path, clips, folder / "cache", "run")
    assert main(["train", "--config", str(first), "--quiet", "--steps", "5"]) == 0
    second = _toml(tmp_path, moved, tmp_path / "cache2", "run")
    assert main(["cache", "--config", str(second), "--quiet"]) == 0
    assert main(["train", "--config", str(second), "--quiet"]) == 0
    assert json.loads((run / "report.json").read_text())["resumed_from"] == 5
    assert_bit_for_bit(run, folder / "straight", "re-cached from another folder")
    # Other content (one caption changed, so one text context differs) is another run.
    caption = sorted(moved.glob("*.txt"))[0]
    caption.write_text(caption.read_text(encoding="utf-8") + " Loudly.", encoding="utf-8")
    assert main(["cache", "--config", str(second), "--quiet"]) == 0
    from ltx2_av_trainer.trainer.app.pipeline import load_samples_for_training
    from ltx2_av_trainer.trainer.config import Config

    config = Config.from_toml(second)
    trainer = Trainer(config, build_denoiser(config.model), load_samples_for_training(config, quiet=True), run)
    with pytest.raises(TrainingError, match="different model, network or dataset .*samples"):
        trainer.try_resume()
