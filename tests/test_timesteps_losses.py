import pytest
import torch

from ltx2_av_trainer.trainer.config import LossConfig, TimestepConfig
from ltx2_av_trainer.trainer.training.losses import AudioLossBalancer, audio_padding_mask, elementwise_loss, masked_per_sample_loss
from ltx2_av_trainer.trainer.training.timesteps import add_noise, sample_modality_sigmas, sample_sigmas, token_count_mu


def test_token_count_mu_matches_reference_points():
    assert token_count_mu(1024) == pytest.approx(0.95)
    assert token_count_mu(4096) == pytest.approx(2.05)
    assert token_count_mu(126) < 0.7  # ~5 s of audio: a low-noise distribution


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_audio_sigmas_are_lower_than_video_and_independent(version):
    g = torch.Generator().manual_seed(0)
    sv, sa = sample_modality_sigmas(TimestepConfig(), version, 4000, 9000, 126, g)
    assert sv.min() >= 0 and sv.max() <= 1 and sa.min() >= 0 and sa.max() <= 1
    assert sv.median() > sa.median() + 0.2
    assert abs(torch.corrcoef(torch.stack([sv, sa]))[0, 1]) < 0.05
    assert ((sv - sa).abs() > 0.05).float().mean() > 0.8


def test_shared_sigma_option():
    g = torch.Generator().manual_seed(0)
    sv, sa = sample_modality_sigmas(TimestepConfig(independent_audio=False), "2.0", 16, 9000, 126, g)
    assert torch.equal(sv, sa)


def test_stretched_and_bounds_and_uniform():
    g = torch.Generator().manual_seed(1)
    stretched = sample_sigmas(TimestepConfig(shifted_mode="stretched"), "2.0", 20000, 4992, g)
    legacy = sample_sigmas(TimestepConfig(shifted_mode="legacy"), "2.0", 20000, 4992, g)
    assert stretched.min() >= 1e-3 and stretched.max() <= 1.0
    assert stretched.std() > legacy.std()  # stretching spreads the distribution over [ε, 1]
    bounded = sample_sigmas(TimestepConfig(min_sigma=0.2, max_sigma=0.6), "2.0", 5000, 1024, g)
    assert bounded.min() >= 0.2 and bounded.max() <= 0.6
    uniform = sample_sigmas(TimestepConfig(sampling="uniform"), "2.0", 20000, 1024, g)
    assert uniform.mean() == pytest.approx(0.5, abs=0.02)
    shifted = sample_sigmas(TimestepConfig(shift=2.0), "2.0", 20000, 100, g)
    assert torch.logit(shifted.clamp(1e-6, 1 - 1e-6)).median() == pytest.approx(2.0, abs=0.05)


def test_flow_matching_interpolation():
    x0, eps = torch.ones(2, 3), torch.zeros(2, 3)
    out = add_noise(x0, eps, torch.tensor([0.25, 1.0]))
    assert torch.allclose(out[0], torch.full((3,), 0.75)) and torch.allclose(out[1], torch.zeros(3))


def test_masked_loss_renormalises_per_sample_and_ignores_padding():
    pred = torch.zeros(2, 8, 4, 16)
    target = torch.ones(2, 8, 4, 16)
    target[0, :, 2:] = 100.0  # padding garbage in sample 0
    mask = audio_padding_mask(pred, torch.tensor([2, 4]))
    per_sample = masked_per_sample_loss(elementwise_loss(pred, target, "mse"), mask)
    assert torch.allclose(per_sample, torch.tensor([1.0, 1.0]))
    assert elementwise_loss(pred, target, "l1").mean() > 1
    huber = elementwise_loss(torch.zeros(1), torch.tensor([3.0]), "huber", 1.0)
    assert huber.item() == pytest.approx(2.5)


def test_ema_mag_follows_the_ema_with_its_decay():
    """Changing losses: the weight is the clamped ratio of the two EMAs at loss.ema_decay, step by step."""
    losses = [(0.30, 0.50), (0.25, 0.90), (0.40, 0.20), (0.10, 0.60), (0.35, 0.45), (0.20, 0.05)]
    for decay in (0.5, 0.9):
        cfg = LossConfig(balance="ema_mag", ema_decay=decay)
        balancer = AudioLossBalancer(cfg)
        ema_v = ema_a = None
        for video, audio in losses:
            ema_v = video if ema_v is None else decay * ema_v + (1 - decay) * video
            ema_a = audio if ema_a is None else decay * ema_a + (1 - decay) * audio
            expected = min(max(cfg.audio_weight * cfg.target_ratio * ema_v / ema_a, cfg.balance_min), cfg.balance_max)
            assert balancer.update(video, audio) == pytest.approx(expected, rel=1e-12), (decay, video, audio)
    # Audio-free steps leave the EMAs alone.
    before = balancer.state_dict()
    balancer.update(0.9, None)
    assert (balancer.ema_video, balancer.ema_audio) == (before["ema_video"], before["ema_audio"])


def test_ema_mag_dampens_when_audio_is_large_and_boosts_when_small():
    big = AudioLossBalancer(LossConfig(balance="ema_mag"))
    for _ in range(50):
        w_big = big.update(0.25, 0.45)  # audio > 0.33 · video: the common LTX-2 case
    assert w_big < 1.0 and w_big == pytest.approx(0.33 * 0.25 / 0.45, rel=1e-6)
    small = AudioLossBalancer(LossConfig(balance="ema_mag"))
    for _ in range(50):
        w_small = small.update(0.5, 0.01)
    assert w_small > 1.0 and w_small == pytest.approx(4.0)  # clamped at balance_max
    clamp = AudioLossBalancer(LossConfig(balance="ema_mag", balance_min=0.05))
    assert clamp.update(0.01, 10.0) == pytest.approx(0.05)


def test_inv_freq_and_none_and_state_round_trip():
    inv = AudioLossBalancer(LossConfig(balance="inv_freq", inv_freq_beta=0.5, balance_max=10))
    inv.update(0.3, None)
    inv.update(0.3, None)
    assert inv.update(0.3, 0.4) > 1.0  # rare audio counts more
    fixed = AudioLossBalancer(LossConfig(balance="none", audio_weight=0.7))
    assert fixed.update(1.0, 5.0) == 0.7
    clone = AudioLossBalancer(LossConfig(balance="inv_freq", inv_freq_beta=0.5, balance_max=10))
    clone.load_state_dict(inv.state_dict())
    assert clone.update(0.3, 0.4) == inv.update(0.3, 0.4)


def test_learning_rate_schedules():
    from ltx2_av_trainer.trainer.config import ScheduleConfig
    from ltx2_av_trainer.trainer.training.optim import lr_factor

    warm = ScheduleConfig(name="constant_with_warmup", warmup_steps=4)
    assert [lr_factor(s, 100, warm) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 100, ScheduleConfig(name="constant", warmup_steps=4)) == 1.0
    cosine = ScheduleConfig(name="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cosine) == pytest.approx(1.0) and lr_factor(100, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(50, 100, cosine) == pytest.approx(0.55)
    linear = ScheduleConfig(name="linear")
    assert lr_factor(25, 100, linear) == pytest.approx(0.75)
    restarts = ScheduleConfig(name="cosine_with_restarts", num_cycles=2)
    assert lr_factor(49, 100, restarts) < 0.01 and lr_factor(50, 100, restarts) == pytest.approx(1.0)
