"""Loss options: caption dropout (joint / per modality), noise offset on 5-D video and on audio, per-dataset
loss weights, audio bucket strategy pad vs truncate, and the Min-SNR refusal."""

import dataclasses

import pytest
import torch

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.backends.interface import TextContext
from ltx2_av_trainer.trainer.config import ConfigError
from ltx2_av_trainer.trainer.data.batches import collate, drop_captions, truncate_audio
from ltx2_av_trainer.trainer.training.loop import Trainer, training_step
from ltx2_av_trainer.trainer.training.losses import audio_padding_mask
from ltx2_av_trainer.trainer.training.timesteps import AUDIO_OFFSET_DIMS, VIDEO_OFFSET_DIMS, offset_noise

from latent_fixtures import make_samples, tiny_config


def _text(batch=4000, length=6):
    return TextContext(torch.ones(batch, length, 8), torch.ones(batch, length, 4), torch.ones(batch, length))


def _dropped(tensor):
    return (tensor.flatten(1).abs().sum(1) == 0).float()


def test_caption_dropout_zeroes_contexts_at_the_right_rate():
    g = torch.Generator().manual_seed(0)
    joint = drop_captions(_text(), 0.3, 0.0, 0.0, g)
    rate = _dropped(joint.video).mean().item()
    assert abs(rate - 0.3) < 0.03
    # Joint dropout clears both contexts and the mask of the same samples.
    assert torch.equal(_dropped(joint.video), _dropped(joint.audio)) and torch.equal(_dropped(joint.video), _dropped(joint.mask))
    video_only = drop_captions(_text(), 0.0, 0.2, 0.0, g)
    assert abs(_dropped(video_only.video).mean().item() - 0.2) < 0.03
    assert _dropped(video_only.audio).sum() == 0 and _dropped(video_only.mask).sum() == 0  # the shared mask stays
    audio_only = drop_captions(_text(), 0.0, 0.0, 0.25, g)
    assert abs(_dropped(audio_only.audio).mean().item() - 0.25) < 0.03 and _dropped(audio_only.video).sum() == 0
    # Independent draws combine: P(video dropped) = 1 - (1 - 0.1)(1 - 0.2).
    both = drop_captions(_text(), 0.1, 0.2, 0.0, g)
    assert abs(_dropped(both.video).mean().item() - 0.28) < 0.03
    # Nothing drawn, nothing changed when off.
    state = g.get_state()
    text = _text(8)
    assert drop_captions(text, 0.0, 0.0, 0.0, g) is text and torch.equal(g.get_state(), state)


def test_caption_dropout_reaches_the_denoiser(tmp_path):
    cfg = tiny_config(tmp_path, **{"loss.caption_dropout": 0.5, "train.batch_size": 4})
    denoiser = build_denoiser(cfg.model)
    seen = []

    class Spy:
        def __call__(self, inputs):
            seen.append(inputs.text)
            return denoiser(inputs)

    batch = collate(make_samples(cfg, 4))
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        training_step(batch, Spy(), cfg, g, torch.device("cpu"), None)
    dropped = torch.cat([_dropped(t.video) for t in seen])
    assert 0.25 < dropped.mean().item() < 0.75
    assert all(torch.equal(_dropped(t.video), _dropped(t.mask)) for t in seen)


def test_noise_offset_shifts_5d_video_noise_per_sample_and_channel():
    shape = (3, 128, 3, 4, 4)
    plain = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(offset_noise(shape, 0.0, VIDEO_OFFSET_DIMS, torch.Generator().manual_seed(0)), plain)
    shifted = offset_noise(shape, 0.5, VIDEO_OFFSET_DIMS, torch.Generator().manual_seed(0))
    shift = shifted - plain  # same base draw, then the offset draw
    per_channel = shift[:, :, :1, :1, :1]
    assert torch.allclose(shift, per_channel.expand(shape), atol=1e-6)  # constant over frames and pixels
    assert per_channel.flatten().std() > 0.3  # differs between samples and channels (0.5 · N(0, 1))
    assert not torch.allclose(per_channel[0], per_channel[1])


def test_audio_noise_offset_is_constant_over_time_only():
    shape = (2, 8, 13, 16)
    plain = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    shift = offset_noise(shape, 0.2, AUDIO_OFFSET_DIMS, torch.Generator().manual_seed(3)) - plain
    assert torch.allclose(shift, shift[:, :, :1].expand(shape), atol=1e-6)
    assert shift[:, :, 0].std() > 0.1  # varies over channels and mel bins


def test_per_dataset_loss_weights_scale_each_modality(tmp_path):
    cfg = tiny_config(tmp_path)
    denoiser = build_denoiser(cfg.model)
    samples = make_samples(cfg, 2)
    plain = training_step(collate(samples), denoiser, cfg, torch.Generator().manual_seed(5), torch.device("cpu"), None)
    weighted = [dataclasses.replace(s, video_loss_weight=2.0, audio_loss_weight=0.25) for s in samples]
    scaled = training_step(collate(weighted), denoiser, cfg, torch.Generator().manual_seed(5), torch.device("cpu"), None)
    assert torch.allclose(scaled.loss_video, 2.0 * plain.loss_video)
    assert torch.allclose(scaled.loss_audio, 0.25 * plain.loss_audio)


def test_audio_bucket_strategy_truncate_vs_pad(tmp_path):
    cfg = tiny_config(tmp_path)
    sample = make_samples(cfg, 2, audio_frames=13)[1]  # 12 valid frames of 13
    assert sample.audio_valid_frames == 12
    cut = truncate_audio(sample, interval_seconds=0.2)  # 5 latents per interval: floor(12 / 5) · 5 = 10
    assert cut.audio.shape == (8, 10, 16) and cut.audio_valid_frames == 10
    assert torch.equal(cut.audio, sample.audio[:, :10])
    short = truncate_audio(sample, interval_seconds=1.0)  # shorter than one interval: all valid frames kept
    assert short.audio.shape[1] == 12 and short.audio_valid_frames == 12
    # pad keeps the full length and masks the tail; truncate leaves nothing to mask.
    pad_mask = audio_padding_mask(sample.audio[None], torch.tensor([sample.audio_valid_frames]))
    assert pad_mask.shape[2] == 13 and pad_mask.sum() == 12
    cut_mask = audio_padding_mask(cut.audio[None], torch.tensor([cut.audio_valid_frames]))
    assert bool(cut_mask.all())

    trainers = {}
    for strategy in ("pad", "truncate"):
        run = tiny_config(tmp_path, **{"audio.bucket_strategy": strategy, "audio.bucket_interval_seconds": 0.2,
                                       "train.batch_size": 3, "output.dir": str(tmp_path / strategy)})
        trainers[strategy] = Trainer(run, build_denoiser(run.model), make_samples(run, 3, audio_frames=13), run.output.dir)
    assert {s.audio.shape[1] for s in trainers["pad"].samples} == {13}
    # valid 13, 12, 11 → 10, 10, 10: one bucket, no padding.
    assert [(s.audio.shape[1], s.audio_valid_frames) for s in trainers["truncate"].samples] == [(10, 10)] * 3
    assert len(trainers["truncate"].sampler.plain.buckets) == 1


def test_min_snr_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="Min-SNR weighting does not exist for flow matching"):
        tiny_config(tmp_path, **{"loss.min_snr_gamma": 5.0})
