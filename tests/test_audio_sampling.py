"""Audio-aware sampling (batch probability, minimum audio batches per accumulation window) and the audio
supervision monitor, including resume."""

import pytest
import torch

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import ConfigError
from ltx2_av_trainer.trainer.training.loop import Trainer, TrainingError
from ltx2_av_trainer.trainer.data.batch_sampler import AudioAwareBatchSampler

from latent_fixtures import tiny_config
from voice_fixtures import metric_rows, mixed_samples


def _windows(sampler, samples, accumulation, count):
    return [sum(samples[sampler.next_batch()[0]].audio is not None for _ in range(accumulation)) for _ in range(count)]


def test_sampler_meets_its_minimum_audio_batches_per_window(tmp_path):
    cfg = tiny_config(tmp_path)
    samples = mixed_samples(cfg, 1, 10)
    plain = AudioAwareBatchSampler(samples, 1, seed=0, accumulation=4)
    natural = _windows(plain, samples, 4, 200)
    assert sum(w < 2 for w in natural) > 150  # audio is 1 item in 11: most windows have at most one
    tilted = AudioAwareBatchSampler(samples, 1, seed=0, accumulation=4, min_audio_per_accum=2)
    windows = _windows(tilted, samples, 4, 200)
    assert min(windows) >= 2
    assert max(windows) > 2  # free slots still follow the natural share, they are not all forced
    # Every audio-free item keeps being drawn (the other stream cycles through its epochs).
    seen = {i for _ in range(200) for i in tilted.next_batch()}
    assert seen == set(range(len(samples)))


@pytest.mark.parametrize("probability", [0.0, 0.3, 0.7, 1.0])
def test_batch_probability_sets_the_audio_share(tmp_path, probability):
    cfg = tiny_config(tmp_path)
    samples = mixed_samples(cfg, 2, 6)
    sampler = AudioAwareBatchSampler(samples, 1, seed=4, batch_probability=probability)
    share = sum(samples[sampler.next_batch()[0]].audio is not None for _ in range(2000)) / 2000
    assert abs(share - probability) < 0.04, share


def test_sampler_state_resumes_the_same_batches(tmp_path):
    cfg = tiny_config(tmp_path)
    samples = mixed_samples(cfg, 3, 5, images=2)
    first = AudioAwareBatchSampler(samples, 2, seed=9, accumulation=3, min_audio_per_accum=1)
    for _ in range(17):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(40)]
    second = AudioAwareBatchSampler(samples, 2, seed=9, accumulation=3, min_audio_per_accum=1)
    second.load_state_dict(state)
    assert [second.next_batch() for _ in range(40)] == expected


def test_sampling_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="mutually exclusive"):
        tiny_config(tmp_path, **{"audio.batch_probability": 0.5, "audio.min_batches_per_accum": 1, "train.gradient_accumulation": 2})
    with pytest.raises(ConfigError, match="more than the 2 micro-batches"):
        tiny_config(tmp_path, **{"audio.min_batches_per_accum": 3, "train.gradient_accumulation": 2})


def test_trainer_steps_carry_the_minimum_audio_batches(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 6, "train.gradient_accumulation": 3, "audio.min_batches_per_accum": 2,
                                   "audio.supervision_mode": "off"})
    Trainer(cfg, build_denoiser(cfg.model), mixed_samples(cfg, 1, 8), cfg.output.dir).run()
    rows = metric_rows(cfg.output.dir)
    assert len(rows) == 6 and all(r["audio_batches"] >= 2 and r["audio_supervised"] for r in rows)


# ---- monitor ------------------------------------------------------------------------------------


def test_monitor_stops_a_run_whose_cache_has_no_audio(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 20, "audio.supervision_mode": "error", "audio.supervision_warmup": 4,
                                   "audio.supervision_interval": 2, "output.save_every": 2})
    samples = mixed_samples(cfg, 0, 3, audio_problem="no audio stream")
    with pytest.warns(UserWarning, match="video-only run"):
        trainer = Trainer(cfg, build_denoiser(cfg.model), samples, cfg.output.dir)
    with pytest.raises(TrainingError, match=r"step 4: audio supervision too low: 0 of 4 .*No audio in the cache.*3 item\(s\): no audio stream"):
        trainer.run()
    assert trainer.step == 3 and [r["step"] for r in metric_rows(cfg.output.dir)] == [1, 2, 3]
    assert any("video-only run" in w for w in trainer.warnings)


def test_monitor_names_decode_failures_and_a_starving_sampler(tmp_path):
    base = {"train.steps": 12, "audio.supervision_mode": "warn", "audio.supervision_warmup": 6,
            "audio.supervision_interval": 6, "audio.supervision_min_ratio": 0.5, "output.save_every": 100}
    cfg = tiny_config(tmp_path, **base)
    samples = mixed_samples(cfg, 1, 2, images=6, audio_problem="the audio could not be decoded")
    trainer = Trainer(cfg, build_denoiser(cfg.model), samples, cfg.output.dir)
    trainer.run()
    assert trainer.step == 12  # warn mode keeps training
    checks = [w for w in trainer.warnings if "audio supervision too low" in w]
    assert len(checks) == 2
    assert "Audio decode/encode failures" in checks[0] and "the audio could not be decoded" in checks[0] and "silent" in checks[0]
    assert "The sampler starves audio" in checks[0] and "audio.min_batches_per_accum" in checks[0]
    # Giving audio its share fixes it: no warning.
    fixed = tiny_config(tmp_path, **{**base, "audio.batch_probability": 0.8, "output.dir": str(tmp_path / "fixed")})
    trainer = Trainer(fixed, build_denoiser(fixed.model), samples, fixed.output.dir)
    trainer.run()
    assert not [w for w in trainer.warnings if "audio supervision" in w]


def test_resume_is_bit_for_bit_with_tilted_sampler_and_monitor(tmp_path):
    def train(name, until=None, resume=False):
        cfg = tiny_config(tmp_path, **{"train.steps": 8, "output.dir": str(tmp_path / name), "output.save_every": 2,
                                       "train.gradient_accumulation": 2, "audio.min_batches_per_accum": 1,
                                       "audio.supervision_warmup": 3, "audio.supervision_interval": 3,
                                       "audio.supervision_min_ratio": 0.9, "network.rank_dropout": 0.2,
                                       "network.module_dropout": 0.2, "loss.caption_dropout": 0.3, "loss.noise_offset": 0.1})
        trainer = Trainer(cfg, build_denoiser(cfg.model), mixed_samples(cfg, 2, 3, images=1), cfg.output.dir)
        if resume:
            assert trainer.try_resume() is not None
        trainer.run(until_step=until)
        return trainer

    straight = train("straight")
    train("split", until=5)
    resumed = train("split", resume=True)
    assert resumed.resumed_from == 5
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "split")
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["items"] for r in rows_a] == [r["items"] for r in rows_b]
    assert straight.monitor.state_dict() == resumed.monitor.state_dict()
