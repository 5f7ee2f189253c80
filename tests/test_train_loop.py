import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.training.loop import TrainCallbacks, Trainer, TrainingError
from ltx2_av_trainer.trainer.training.state import find_latest_state, load_state

from latent_fixtures import make_samples, make_structured_sample, tiny_config

METRIC_FIELDS = {"step", "loss", "loss_video", "loss_audio", "audio_weight", "sigma_video", "sigma_audio", "lr",
                 "audio_supervised", "regularizer", "step_time_s", "peak_mem_bytes"}


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class _FixedBatchNoise(TrainCallbacks):
    """Same σ and noise every step: a truly fixed batch."""

    def on_step(self, trainer, metrics):
        trainer.generator.manual_seed(123)


def test_overfit_fixed_batch_halves_both_losses(tmp_path):
    tiny = {"num_attention_heads": 4, "attention_head_dim": 32, "audio_num_attention_heads": 4, "audio_attention_head_dim": 32, "caption_channels": 32}
    cfg = tiny_config(tmp_path, **{"model.tiny": tiny, "train.steps": 200, "optimizer.lr": 3e-3, "network.preset": "full",
                                   "network.rank": 32, "network.alpha": 32.0, "loss.balance": "none", "output.save_every": 1000})
    trainer = Trainer(cfg, build_denoiser(cfg.model), [make_structured_sample(cfg)], cfg.output.dir, _FixedBatchNoise())
    trainer.generator.manual_seed(123)
    trainer.run()
    rows = _rows(cfg.output.dir)
    first, last = rows[0], rows[-1]
    assert last["loss_video"] < 0.5 * first["loss_video"], (first, last)
    assert last["loss_audio"] < 0.5 * first["loss_audio"], (first, last)


def test_metrics_contract_and_console_line(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 10, "logging.log_every": 5})
    lines = []

    class Log(TrainCallbacks):
        def on_log(self, trainer, line):
            lines.append(line)

    result = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir, Log()).run()
    rows = _rows(cfg.output.dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for row in rows:
        assert METRIC_FIELDS <= set(row)
        assert row["audio_supervised"] is True and row["regularizer"] is None and row["loss_audio"] > 0
        assert row["audio_weight"] > 0 and row["peak_mem_bytes"] > 0
    assert len(lines) == 2 and "[audio] raw=" in lines[0] and "weighted=" in lines[0] and "video=" in lines[0] and "weight=" in lines[0]
    assert result.lora_path.is_file() and (Path(cfg.output.dir) / "state" / "latest.json").is_file()


def _train(tmp_path, name, steps, until=None, resume=False):
    cfg = tiny_config(tmp_path, **{"train.steps": steps, "output.dir": str(tmp_path / name), "output.save_every": 3,
                                   "network.dropout": 0.1, "train.batch_size": 2})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 5), cfg.output.dir)
    if resume:
        assert trainer.try_resume() is not None
    trainer.run(until_step=until)
    return trainer


def test_resume_is_bit_for_bit(tmp_path):
    straight = _train(tmp_path, "straight", 10)
    _train(tmp_path, "split", 10, until=5)
    resumed = _train(tmp_path, "split", 10, resume=True)
    assert resumed.resumed_from == 5
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in rows_b] == list(range(1, 11))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["sigma_audio"] for r in rows_a] == [r["sigma_audio"] for r in rows_b]
    la = load_file(str(tmp_path / "straight" / "lora" / "ltx2_av_lora_000010.safetensors"))
    lb = load_file(str(tmp_path / "split" / "lora" / "ltx2_av_lora_000010.safetensors"))
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_resume_refuses_a_different_run(tmp_path):
    _train(tmp_path, "run", 4)
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "output.dir": str(tmp_path / "run"), "network.rank": 8})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 5), cfg.output.dir)
    with pytest.raises(TrainingError, match="different model, network or dataset"):
        trainer.try_resume()


def test_nonfinite_steps_are_skipped_then_training_stops(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 30, "train.max_consecutive_nonfinite": 3, "output.save_every": 2})
    samples = make_samples(cfg, 2)
    trainer = Trainer(cfg, build_denoiser(cfg.model), samples, cfg.output.dir)
    trainer.run(until_step=4)
    good_state = trainer.last_state
    good = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    for s in samples:
        s.audio[0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps") as exc:
        trainer.run()
    assert str(good_state) in str(exc.value)
    assert any("non-finite loss" in w and "clip" in w for w in trainer.warnings)
    after = trainer.network.state_dict()
    assert all(torch.equal(good[k], after[k]) for k in good)  # nothing was updated from NaN batches
    assert find_latest_state(cfg.output.dir) == good_state


KILL_SCRIPT = r"""
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.training.loop import Trainer, TrainCallbacks
class Ready(TrainCallbacks):
    def on_step(self, trainer, metrics):
        if metrics["step"] >= (trainer.resumed_from or 0) + 2:
            Path({ready!r}).write_text("go")
cfg = tiny_config(Path({tmp!r}), **{{"train.steps": 100000, "output.save_every": 1, "output.dir": {run!r}}})
trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir, Ready())
trainer.try_resume()
trainer.run()
"""


@pytest.mark.slow
def test_sigkill_leaves_no_partial_file_taken_as_valid(tmp_path):
    run = tmp_path / "run"
    tests_dir = str(Path(__file__).parent)
    for attempt, delay in enumerate((0.05, 0.13, 0.31)):
        ready = tmp_path / f"ready{attempt}"
        script = KILL_SCRIPT.format(tests=tests_dir, ready=str(ready), tmp=str(tmp_path), run=str(run))
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "training subprocess ended early"
        time.sleep(delay)  # somewhere in the middle of a step or a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Every file a later run would read is complete: the newest state loads, every LoRA parses.
        latest = find_latest_state(run)
        assert latest is not None
        saved = load_state(latest)
        assert saved.step >= 1
        for lora in (run / "lora").glob("*.safetensors"):
            load_file(str(lora))
        for row in (run / "metrics.jsonl").read_text().splitlines()[:-1]:
            json.loads(row)
    # And a new run resumes from it without complaint.
    cfg = tiny_config(tmp_path, **{"train.steps": 100000, "output.dir": str(run)})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir)
    assert trainer.try_resume() == load_state(find_latest_state(run)).step
