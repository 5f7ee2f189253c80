"""Audio-free batches never train the audio branch towards zero latents; audio DOP and the silence target;
preservation (dop / blank / prior divergence) and their clear errors."""

import dataclasses

import pytest
import torch

from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import ConfigError
from ltx2_av_trainer.trainer.data.batches import collate
from ltx2_av_trainer.trainer.training.loop import Trainer
from ltx2_av_trainer.trainer.training.preservation import SilenceLatents
from ltx2_av_trainer.trainer.training.timesteps import velocity_target

from latent_fixtures import make_samples, tiny_config
from voice_fixtures import metric_rows, mixed_samples, probe_input, relative_drift


@pytest.fixture(scope="module")
def encoded_silence():
    """The tiny audio VAE's encoding of 2 s of digital silence (what the pipeline passes the trainer)."""
    from ltx2_av_trainer.trainer.backends.diffusers_encoders import build_tiny_encoders
    from ltx2_av_trainer.trainer.config import TinyModelConfig

    encoders = build_tiny_encoders("2.0", TinyModelConfig())
    with torch.no_grad():
        return encoders.encode_audio(torch.zeros(1, 2, 32000))[0]


def _audio_free_run(tmp_path, mode, silence, steps=20, **extra):
    # One audio clip (so audio modules are adapted) but batch_probability 0: every step is audio-free.
    cfg = tiny_config(tmp_path, **{"train.steps": steps, "optimizer.lr": 5e-3, "audio.missing_audio": mode,
                                   "audio.batch_probability": 0.0, "audio.supervision_mode": "off", "loss.balance": "none",
                                   "output.save_every": 1000, "output.dir": str(tmp_path / mode), **extra})
    trainer = Trainer(cfg, build_denoiser(cfg.model), mixed_samples(cfg, 1, 4), cfg.output.dir, silence_audio_latent=silence)
    return cfg, trainer


def test_audio_dop_holds_the_audio_branch_at_the_base_model(tmp_path, encoded_silence):
    probe = probe_input(tiny_config(tmp_path))
    drift = {}
    for mode in ("skip", "audio_dop"):
        cfg, trainer = _audio_free_run(tmp_path, mode, encoded_silence)
        drift[mode] = []
        for quarter in range(1, 5):
            trainer.run(until_step=quarter * cfg.train.steps // 4)
            drift[mode].append(relative_drift(trainer, probe, modality=1))
        rows = metric_rows(cfg.output.dir)
        assert all(r["audio_supervised"] is False and r["loss_audio"] is None for r in rows)
        assert all(r["regularizer"] == ("audio_dop" if mode == "audio_dop" else None) for r in rows)
        if mode == "audio_dop":
            assert all(r["loss_regularizer"] >= 0 for r in rows)
    # Without audio DOP the video LoRA drags the audio output along (through v2a); with it the audio
    # output on a probe it never trained on stays close to the base model's.
    assert drift["skip"][-1] > 2 * drift["skip"][0] and drift["skip"][-1] > 0.3, drift
    assert drift["audio_dop"][-1] < 0.25 * drift["skip"][-1], drift


def test_silence_target_is_the_encoded_silence_never_zeros(tmp_path, encoded_silence):
    cfg, trainer = _audio_free_run(tmp_path, "silence", encoded_silence, steps=3)
    seen = []
    original = trainer.denoiser.__class__.__call__

    def spy(self, inputs):
        seen.append(inputs)
        return original(self, inputs)

    trainer.denoiser.__class__.__call__ = spy
    try:
        trainer.run()
    finally:
        trainer.denoiser.__class__.__call__ = original
    rows = metric_rows(cfg.output.dir)
    assert [r["regularizer"] for r in rows] == ["silence"] * 3
    assert all(r["audio_supervised"] is False and r["loss_audio"] is None and r["loss_regularizer"] > 0 for r in rows)
    # Audio-free batches reach the denoiser as audio batches spanning the clip: 9 pixel frames at 25 fps → 9
    # audio latents of the encoded silence (which is far from zero latents).
    assert all(inputs.audio is not None and inputs.audio.shape[2] == 9 for inputs in seen)
    silence = SilenceLatents(encoded_silence)
    assert silence.get(9).abs().mean() > 0.1
    assert torch.equal(silence.for_batch(collate([trainer.samples[1]]))[0], encoded_silence[:, :9])


def test_silence_loss_uses_the_silence_velocity(tmp_path, encoded_silence):
    """training_step on an audio-free batch: loss_silence is the MSE against ε − silence, not against ε."""
    from ltx2_av_trainer.trainer.training.loop import training_step

    cfg, trainer = _audio_free_run(tmp_path, "silence", encoded_silence, steps=1)
    batch = collate([trainer.samples[1]])
    silence = SilenceLatents(encoded_silence)
    g = torch.Generator().manual_seed(7)
    losses = training_step(batch, trainer.denoiser, cfg, g, trainer.device, None, silence=silence)
    # Redo the draws: σ_v, σ_a, video noise, audio noise — in training_step's order.
    g = torch.Generator().manual_seed(7)
    from ltx2_av_trainer.trainer.training.timesteps import sample_modality_sigmas

    target_audio = silence.for_batch(batch)
    sample_modality_sigmas(cfg.timesteps, "2.0", 1, 32, target_audio.shape[2], g)
    torch.randn(batch.video.shape, generator=g)
    noise_audio = torch.randn(target_audio.shape, generator=g)
    expected = torch.mean((losses.pred_audio.float() - velocity_target(target_audio, noise_audio)) ** 2)
    assert torch.allclose(losses.loss_silence, expected, rtol=1e-5)
    wrong = torch.mean((losses.pred_audio.float() - noise_audio) ** 2)  # what a zero-latent target would give
    assert not torch.allclose(losses.loss_silence, wrong, rtol=1e-3)


@pytest.mark.parametrize("mode", ["silence", "audio_dop"])
def test_missing_audio_modes_need_the_silence_latent(tmp_path, mode):
    cfg = tiny_config(tmp_path, **{"audio.missing_audio": mode})
    with pytest.raises(ConfigError, match="encoded silence.*silence_audio_latent"):
        Trainer(cfg, build_denoiser(cfg.model), mixed_samples(cfg, 1, 1), cfg.output.dir)
    with pytest.raises(ConfigError, match="needs an audio run"):
        tiny_config(tmp_path, **{"audio.missing_audio": mode, "dataset.with_audio": False})
    with pytest.raises(ValueError, match=r"expected \[8, T, 16\]"):
        SilenceLatents(torch.zeros(8, 10, 15))


def test_audio_and_audio_free_items_never_share_a_batch(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.batch_size": 3})
    samples = mixed_samples(cfg, 4, 4, images=3)
    trainer = Trainer(cfg, build_denoiser(cfg.model), samples, cfg.output.dir)
    for _ in range(30):
        batch = [samples[i] for i in trainer.sampler.next_batch()]
        assert len({s.audio is None for s in batch}) == 1 and len({s.bucket_key() for s in batch}) == 1
    with pytest.raises(ValueError, match="different shapes"):
        collate([samples[0], samples[4]])


# ---- preservation -------------------------------------------------------------------------------


def _contexts(cfg, seed):
    from latent_fixtures import text_widths
    from ltx2_av_trainer.trainer.backends.interface import TextContext

    g = torch.Generator().manual_seed(seed)
    dv, da = text_widths(cfg)
    return TextContext(torch.randn(6, dv, generator=g), torch.randn(6, da, generator=g), torch.ones(6))


def test_preservation_needs_its_prompt_contexts(tmp_path):
    cfg = tiny_config(tmp_path, **{"preservation.dop": True, "preservation.dop_class_prompt": "a woman speaking",
                                   "preservation.blank": True})
    with pytest.raises(ConfigError, match=r"'a woman speaking'.*empty prompt.*preservation_contexts=\{'class': ctx, 'blank': ctx\}"):
        Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    with pytest.raises(ConfigError, match="dop_class_prompt: is empty"):
        tiny_config(tmp_path, **{"preservation.dop": True})
    with pytest.raises(ConfigError, match="contains the trigger word"):
        tiny_config(tmp_path, **{"preservation.dop": True, "preservation.dop_class_prompt": "ohwx woman"})


def test_prompt_preservation_keeps_those_prompts_at_the_base_model(tmp_path):
    """dop (class prompt) and blank-prompt preservation together vs neither: both prompts' outputs stay closer
    to the base model's."""
    drift = {}
    for on in (False, True):
        cfg = tiny_config(tmp_path, **{"train.steps": 10, "optimizer.lr": 5e-3, "output.save_every": 1000,
                                       "preservation.dop": on, "preservation.dop_class_prompt": "a person speaking",
                                       "preservation.blank": on, "output.dir": str(tmp_path / f"preserve{on}")})
        contexts = {"class": _contexts(cfg, seed=11), "blank": _contexts(cfg, seed=12)}
        trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 3), cfg.output.dir, preservation_contexts=contexts)
        trainer.run()
        drift[on] = {}
        for name, ctx in contexts.items():
            probe = probe_input(cfg, text=dataclasses.replace(ctx, video=ctx.video[None], audio=ctx.audio[None], mask=ctx.mask[None]))
            drift[on][name] = relative_drift(trainer, probe, modality=0) + relative_drift(trainer, probe, modality=1)
        rows = metric_rows(cfg.output.dir)
        assert all((r["loss_dop"] is not None) == on and (r["loss_blank"] is not None) == on for r in rows)
    for name in ("class", "blank"):
        assert drift[True][name] < 0.5 * drift[False][name], drift


def test_prior_divergence_pushes_the_training_prompt_away_from_the_base(tmp_path):
    # The term's gradient vanishes where the LoRA equals the base, so start from a perturbed LoRA.
    drift = {}
    for on in (False, True):
        cfg = tiny_config(tmp_path, **{"train.steps": 10, "optimizer.lr": 1e-3, "output.save_every": 1000,
                                       "preservation.prior_divergence": on, "preservation.prior_divergence_multiplier": 2.0,
                                       "output.dir": str(tmp_path / f"pd{on}")})
        samples = make_samples(cfg, 3)
        trainer = Trainer(cfg, build_denoiser(cfg.model), samples, cfg.output.dir)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, layer in trainer.network.named_layers():
                layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.05)
        text = samples[0].text
        probe = probe_input(cfg, text=dataclasses.replace(text, video=text.video[None], audio=text.audio[None], mask=text.mask[None]))
        start = relative_drift(trainer, probe, modality=0)
        trainer.run()
        drift[on] = (start, relative_drift(trainer, probe, modality=0))
        rows = metric_rows(cfg.output.dir)
        assert all((r["loss_prior_divergence"] is not None) == on for r in rows)
    assert drift[True][1] > drift[True][0] and drift[True][1] > 1.15 * drift[False][1], drift
