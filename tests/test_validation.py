"""Validation loss per modality at a fixed, seeded σ set: deterministic, side-effect free, logged and passed
to callbacks."""

import dataclasses

import pytest
import torch

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import ConfigError
from ltx2_av_trainer.trainer.training.loop import TrainCallbacks, Trainer

from latent_fixtures import make_samples, make_structured_sample, tiny_config
from voice_fixtures import metric_rows


def _validation_items(cfg, with_audio=True):
    items = make_samples(cfg, 2, seed=7, with_audio=with_audio)
    return [dataclasses.replace(s, id=f"val{i}", is_validation=True) for i, s in enumerate(items)]


def test_validation_losses_are_deterministic_and_leave_training_alone(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 3, "network.dropout": 0.2, "network.rank_dropout": 0.3})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir,
                      validation_samples=_validation_items(cfg))
    trainer.run()
    generator, global_rng = trainer.generator.get_state(), torch.get_rng_state()
    first, second = trainer.validate(), trainer.validate()
    assert first == second and first["val_loss_video"] > 0 and first["val_loss_audio"] > 0
    assert torch.equal(trainer.generator.get_state(), generator) and torch.equal(torch.get_rng_state(), global_rng)
    assert trainer.network.training  # back in training mode afterwards
    # A different σ set scores differently (the σ really are the configured ones).
    other = dataclasses.replace(cfg, validation=dataclasses.replace(cfg.validation, sigmas=[0.95]))
    trainer.config = other
    assert trainer.validate()["val_loss_video"] != first["val_loss_video"]


def test_validation_is_logged_every_n_steps_and_reaches_callbacks(tmp_path):
    seen = []

    class Chart(TrainCallbacks):
        def on_step(self, trainer, metrics):
            seen.append((metrics["step"], metrics["val_loss_video"], metrics["val_loss_audio"]))

    cfg = tiny_config(tmp_path, **{"train.steps": 7, "validation.every_steps": 3, "logging.log_every": 3})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir, Chart(),
                      validation_samples=_validation_items(cfg, with_audio=False))
    trainer.run()
    rows = metric_rows(cfg.output.dir)
    validated = [r["step"] for r in rows if r["val_loss_video"] is not None]
    assert validated == [3, 6, 7]  # every 3 steps and at the end
    assert all(r["val_loss_audio"] is None for r in rows)  # no validation item has audio
    assert [s for s, v, _ in seen if v is not None] == validated


def test_validation_does_not_change_the_training_run(tmp_path):
    rows = {}
    for every in (0, 2):
        cfg = tiny_config(tmp_path, **{"train.steps": 5, "validation.every_steps": every, "network.dropout": 0.1,
                                       "output.dir": str(tmp_path / f"every{every}")})
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir,
                validation_samples=_validation_items(cfg)).run()
        rows[every] = metric_rows(cfg.output.dir)
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[2]]
    assert any(r["val_loss_audio"] is not None for r in rows[2])


def test_validation_loss_follows_learning(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 20, "optimizer.lr": 3e-3, "network.preset": "full", "loss.balance": "none",
                                   "validation.every_steps": 5, "output.save_every": 1000})
    sample = make_structured_sample(cfg)
    held_out = dataclasses.replace(sample, id="val", is_validation=True)
    Trainer(cfg, build_denoiser(cfg.model), [sample], cfg.output.dir, validation_samples=[held_out]).run()
    scores = [(r["val_loss_video"], r["val_loss_audio"]) for r in metric_rows(cfg.output.dir) if r["val_loss_video"] is not None]
    assert len(scores) == 4
    assert scores[-1][0] < scores[0][0] and scores[-1][1] < scores[0][1], scores


def test_validation_sigmas_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="validation.sigmas"):
        tiny_config(tmp_path, **{"validation.sigmas": [0.0, 0.5]})
