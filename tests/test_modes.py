"""The training modes without ComfyUI: options, what the training step feeds the denoiser and which tokens count,
references found and checked, the cache entries, the adapter targets and the LoRA metadata.

The positions and timesteps themselves are compared with ComfyUI's core inference nodes in ``test_mode_parity.py``
(ComfyUI tier); here the same code paths are checked on the diffusers backend and with recording denoisers.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from ltx2_av_trainer.trainer.backends.interface import DenoiserInput
from ltx2_av_trainer.trainer.backends.layouts import guide_positions, reference_audio_positions
from ltx2_av_trainer.trainer.config import Config, ConfigError
from ltx2_av_trainer.trainer.data.audio_only import standin_video_latent
from ltx2_av_trainer.trainer.data.batches import collate
from ltx2_av_trainer.trainer.training.conditioning import check_samples
from ltx2_av_trainer.trainer.training.loop import Trainer, training_step

from latent_fixtures import make_samples, tiny_config


class Recording:
    """A denoiser that records its input and predicts zeros (the loss is then the target's mean square)."""

    version = "2.0"

    def __init__(self):
        self.inputs: list[DenoiserInput] = []

    def __call__(self, inputs: DenoiserInput):
        self.inputs.append(inputs)
        audio = None if inputs.audio is None else torch.zeros_like(inputs.audio)
        return torch.zeros_like(inputs.video), audio


def mode_config(tmp_path, mode: str = "av", **overrides) -> Config:
    return tiny_config(tmp_path, **{"conditioning.mode": mode, **overrides})


def with_references(samples, *, factor: int = 1, guide_frames: int = 1, reference_frames: int = 10):
    g = torch.Generator().manual_seed(9)
    out = []
    for s in samples:
        _, frames, height, width = s.video.shape
        out.append(dataclasses.replace(
            s, reference_video=torch.randn(128, guide_frames, height // factor, width // factor, generator=g),
            reference_audio=torch.randn(8, reference_frames, 16, generator=g)))
    return out


# ---- options -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("section, message", [
    ({"conditioning": {"mode": "video"}}, "conditioning.mode"),
    ({"conditioning": {"first_frame_p": 1.5}}, "conditioning.first_frame_p"),
    ({"conditioning": {"mode": "audio", "first_frame_p": 0.5}}, "conditioning.first_frame_p"),
    ({"conditioning": {"mode": "audio"}, "dataset": {"with_audio": False}}, "dataset.with_audio"),
    ({"dataset": {"reference_frames": 4}}, "dataset.reference_frames"),
    ({"dataset": {"reference_frames": 33, "frames": 25}}, "dataset.reference_frames"),
    ({"dataset": {"reference_downscale": 3, "width": 256}}, "dataset.reference_downscale"),
    ({"dataset": {"reference_audio_seconds": 0}}, "dataset.reference_audio_seconds"),
])
def test_bad_mode_options_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Config.from_dict(section)


# ---- the training step per mode --------------------------------------------------------------------------------


def test_first_frame_is_clean_at_sigma_zero_and_out_of_the_loss(tmp_path):
    config = mode_config(tmp_path, **{"conditioning.first_frame_p": 1.0})
    samples = make_samples(config, 2, latent_frames=3)
    batch = collate(samples)
    denoiser = Recording()
    losses = training_step(batch, denoiser, config, torch.Generator().manual_seed(1), torch.device("cpu"), None)
    seen = denoiser.inputs[0]
    tokens = 4 * 4
    assert torch.equal(seen.video[:, :, 0], batch.video[:, :, 0])  # the clean latent
    assert seen.sigma_video.shape == (2, 3 * tokens)
    assert (seen.sigma_video[:, :tokens] == 0).all() and (seen.sigma_video[:, tokens:] > 0).all()
    # Zero prediction: the loss is the mean square of the target ε - x0 over frames 1.. only.
    replay = torch.Generator().manual_seed(1)  # the step's σ draws, then its video noise
    from ltx2_av_trainer.trainer.training.conditioning import timestep_config
    from ltx2_av_trainer.trainer.training.timesteps import sample_modality_sigmas

    sample_modality_sigmas(timestep_config(config, batch), "2.0", 2, 3 * tokens, batch.audio.shape[2], replay)
    noise = torch.randn(batch.video.shape, generator=replay)
    target = (noise - batch.video)[:, :, 1:]
    assert losses.loss_video.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


def test_first_frame_off_draws_no_random_number(tmp_path):
    """Runs without the option keep their exact σ and noise (resumed runs stay bit for bit)."""
    config = mode_config(tmp_path)
    batch = collate(make_samples(config, 1, latent_frames=3))
    states = []
    for p in (0.0, 0.0):
        g = torch.Generator().manual_seed(5)
        training_step(batch, Recording(), config.replace(**{"conditioning.first_frame_p": p}), g, torch.device("cpu"), None)
        states.append(g.get_state())
    assert torch.equal(states[0], states[1])
    g = torch.Generator().manual_seed(5)
    training_step(batch, Recording(), config.replace(**{"conditioning.first_frame_p": 0.5}), g, torch.device("cpu"), None)
    assert not torch.equal(g.get_state(), states[0])


def test_ic_passes_the_cached_reference_and_trains_only_the_clip(tmp_path):
    config = mode_config(tmp_path, "ic", **{"dataset.reference_downscale": 2, "dataset.width": 128, "dataset.height": 128})
    samples = with_references(make_samples(config, 2, latent_frames=2), factor=2)
    denoiser = Recording()
    training_step(collate(samples), denoiser, config, torch.Generator().manual_seed(1), torch.device("cpu"), None)
    seen = denoiser.inputs[0]
    assert torch.equal(seen.video_guide, torch.stack([s.reference_video for s in samples]))
    assert seen.audio_reference is None and seen.video.shape == (2, 128, 2, 4, 4)


def test_id_passes_the_reference_audio(tmp_path):
    config = mode_config(tmp_path, "id")
    samples = with_references(make_samples(config, 1))
    denoiser = Recording()
    losses = training_step(collate(samples), denoiser, config, torch.Generator().manual_seed(1), torch.device("cpu"), None)
    seen = denoiser.inputs[0]
    assert torch.equal(seen.audio_reference[0], samples[0].reference_audio) and seen.video_guide is None
    assert losses.loss_audio is not None and seen.audio.shape == (1, 8, 13, 16)


def test_audio_only_shares_sigma_and_has_no_video_loss(tmp_path):
    config = mode_config(tmp_path, "audio")
    samples = [dataclasses.replace(s, video=standin_video_latent(25), audio_only=True) for s in make_samples(config, 2)]
    denoiser = Recording()
    losses = training_step(collate(samples), denoiser, config, torch.Generator().manual_seed(1), torch.device("cpu"), None)
    seen = denoiser.inputs[0]
    assert torch.equal(seen.sigma_video, seen.sigma_audio)  # one σ, as ComfyUI samples the stand-in and the audio
    assert seen.video.shape[2:] == (4, 2, 2)
    assert losses.loss_video is None and losses.loss_audio is not None


def test_samples_that_cannot_train_the_mode_are_refused(tmp_path):
    config = mode_config(tmp_path)
    clips = make_samples(config, 2)
    stand_ins = [dataclasses.replace(s, audio_only=True) for s in clips]
    with pytest.raises(ConfigError, match="have no cached reference"):
        check_samples("ic", clips, 1)
    with pytest.raises(ConfigError, match="have no cached reference audio"):
        check_samples("id", clips, 1)
    with pytest.raises(ConfigError, match="are video clips"):
        check_samples("audio", clips, 1)
    with pytest.raises(ConfigError, match="come from audio sources"):
        check_samples("av", stand_ins, 1)
    with pytest.raises(ConfigError, match="cached at downscale 1"):
        check_samples("ic", with_references(clips), 2)
    audio_only_id = [dataclasses.replace(s, audio_only=True, reference_video=None) for s in with_references(clips)]
    assert check_samples("id", audio_only_id, 1) == []  # an audio-only ID-LoRA
    assert "does not use them" in check_samples("av", with_references(clips), 1)[0]


def test_audio_only_run_adapts_only_the_audio_branch_and_ic_writes_the_downscale_factor(tmp_path):
    from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser

    config = mode_config(tmp_path, "audio", **{"network.preset": "full", "train.steps": 1, "output.save_every": 1})
    samples = [dataclasses.replace(s, video=standin_video_latent(9), audio_only=True) for s in make_samples(config, 2)]
    with pytest.warns(UserWarning, match="audio-only run"):
        trainer = Trainer(config, build_denoiser(config.model), samples, tmp_path / "audio")
    assert trainer.network.paths and all(".audio_attn" in p or ".audio_ff." in p for p in trainer.network.paths.values())
    from ltx2_av_trainer.trainer.evaluation.validation_sampling import fixed_sigma_losses
    from ltx2_av_trainer.trainer.training.conditioning import generation_inputs

    with torch.no_grad():
        video_loss, audio_loss = fixed_sigma_losses(trainer, samples, 0.5, 0)
    assert video_loss is None and audio_loss is not None  # the stand-in is never scored
    assert generation_inputs(config, samples[0]) == {"latent_height": 2, "latent_width": 2}  # samples at 64x64
    result = trainer.run()
    with safe_open(str(result.lora_path), framework="pt") as fh:
        assert json.loads(fh.metadata()["ltx2_av_trainer.groups"]) == ["audio_attn", "audio_ff"]
        assert fh.metadata()["ltx2_av_trainer.mode"] == "audio"

    config = mode_config(tmp_path, "ic", **{"network.preset": "v2v", "train.steps": 1, "output.save_every": 1,
                                            "dataset.reference_downscale": 2, "dataset.width": 128, "dataset.height": 128})
    samples = with_references(make_samples(config, 2), factor=2)
    result = Trainer(config, build_denoiser(config.model), samples, tmp_path / "ic").run()
    with safe_open(str(result.lora_path), framework="pt") as fh:
        # The key ComfyUI's GetICLoRAParameters looks for (any key ending in it).
        assert fh.metadata()["reference_downscale_factor"] == "2"


# ---- the diffusers backend with guides and references -------------------------------------------------------------


def test_guide_positions_are_the_kept_cells_of_the_spread_grid():
    kept = guide_positions(2, 2, 3, factor=2, batch=1)
    spread = guide_positions(2, 2, 3, factor=2, batch=1, dilated=True).view(1, 3, 2, 4, 6, 2)
    assert torch.equal(kept, spread[:, :, :, ::2, ::2].reshape(1, 3, -1, 2))
    # Each kept token spans 2 x 2 latent cells (64 px) and the first latent frame is one pixel frame long.
    assert kept[0, 1, 0].tolist() == [0.0, 64.0] and kept[0, 0, 0].tolist() == [0.0, 1.0] and kept[0, 0, -1].tolist() == [1.0, 9.0]
    positions = reference_audio_positions(5, 1)
    assert positions[0, 0, -1, 1].item() == pytest.approx(-0.04) and (positions[..., 1] < 0).all()


def test_diffusers_backend_uses_the_guide_and_the_reference_and_returns_the_clip_only(tmp_path):
    from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser

    config = mode_config(tmp_path, **{"train.steps": 1})
    denoiser = build_denoiser(config.model)
    sample = make_samples(config, 1, latent_frames=2)[0]
    g = torch.Generator().manual_seed(2)
    base = DenoiserInput(sample.video[None], sample.audio[None], torch.tensor([0.5]), torch.tensor([0.5]),
                         collate([sample]).text, 25.0)
    guide = torch.randn(1, 128, 1, 2, 2, generator=g)
    reference = torch.randn(1, 8, 7, 16, generator=g)
    with torch.no_grad():
        plain = denoiser(base)
        guided = denoiser(dataclasses.replace(base, video_guide=guide))
        referenced = denoiser(dataclasses.replace(base, audio_reference=reference))
    assert guided[0].shape == plain[0].shape and referenced[1].shape == plain[1].shape
    assert (guided[0] - plain[0]).abs().max() > 1e-4 and (referenced[1] - plain[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="does not fit the video latent"):
        denoiser(dataclasses.replace(base, video_guide=torch.randn(1, 128, 1, 3, 3)))
