"""Slider LoRAs (``trainer/training/slider.py``, ``ltx2-av-trainer slider``): trained from two prompts on the tiny
model, the LoRA moves the prediction toward the positive prompt's at +1 and toward the negative prompt's at -1,
measured on noise and σ the run never drew; the run resumes bit for bit and exports a plain LoRA file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from latent_fixtures import text_widths, tiny_config
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext
from ltx2_av_trainer.trainer.config import ConfigError
from ltx2_av_trainer.trainer.training.slider import SliderTrainer
from safetensors.torch import load_file

SLIDER = {"dataset.frames": 9, "dataset.width": 128, "dataset.height": 128, "slider.positive": "loud",
          "slider.negative": "quiet", "slider.denoise_steps": 1, "logging.log_every": 1000}


def _prompts(cfg, seed=0) -> TextContext:
    """Three random prompt contexts (target, positive, negative), as the text encoder would give them."""
    dv, da = text_widths(cfg)
    g = torch.Generator().manual_seed(seed)
    return TextContext(torch.randn(3, 8, dv, generator=g), torch.randn(3, 8, da, generator=g), torch.ones(3, 8))


def _slider(tmp_path, name, steps, until=None, resume=False, **overrides):
    cfg = tiny_config(tmp_path, **SLIDER, **{"train.steps": steps, "optimizer.lr": 6e-3, "output.save_every": 100,
                                             "output.dir": str(tmp_path / name)}, **overrides)
    trainer = SliderTrainer(cfg, build_denoiser(cfg.model), _prompts(cfg), cfg.output.dir)
    if resume:
        assert trainer.try_resume() is not None
    trainer.run(until_step=until)
    return trainer


def _predictions(trainer, prompts: TextContext, multiplier: float, seed: int = 99, batch: int = 6):
    """Flattened video+audio velocities of the first prompt at LoRA strength ``multiplier`` (and the base model's
    for every prompt at 0), on fresh noise and σ."""
    g = torch.Generator().manual_seed(seed)
    item = trainer.samples[0]
    video = torch.randn(batch, *item.video.shape, generator=g)
    audio = torch.randn(batch, *item.audio.shape, generator=g)
    sigma = 0.05 + 0.9 * torch.rand(batch, generator=g)
    outputs = []
    for index in range(prompts.video.shape[0]):
        one = prompts.select(slice(index, index + 1))
        text = TextContext(one.video.expand(batch, -1, -1), one.audio.expand(batch, -1, -1), one.mask.expand(batch, -1))
        trainer.network.set_multiplier(multiplier)
        try:
            with torch.no_grad():
                v, a = trainer.denoiser(DenoiserInput(video=video, audio=audio, sigma_video=sigma, sigma_audio=sigma,
                                                      text=text, fps=item.fps))
        finally:
            trainer.network.set_multiplier(1.0)
        outputs.append(torch.cat([v.flatten(1), a.flatten(1)], 1))
    return outputs


@pytest.mark.slow
def test_trained_slider_moves_the_prediction_toward_positive_at_plus_one_and_negative_at_minus_one(tmp_path):
    trainer = _slider(tmp_path, "slider", 12)
    target, positive, negative = _predictions(trainer, trainer.prompts, 0.0)
    direction = positive - negative
    measured = {}
    for strength in (1.0, -1.0, 0.5):
        lora = _predictions(trainer, trainer.prompts.select(slice(0, 1)), strength)[0]
        measured[strength] = {
            # the share of the step (positive - negative) the LoRA adds to the target prompt's prediction
            "along": (((lora - target) * direction).sum() / (direction * direction).sum()).item(),
            "to_positive": (lora - positive).norm().item(), "to_negative": (lora - negative).norm().item(),
        }
    plus, minus, half = measured[1.0], measured[-1.0], measured[0.5]
    assert plus["along"] > 0.4 and minus["along"] < -0.4, measured
    assert plus["to_positive"] < plus["to_negative"] and minus["to_negative"] < minus["to_positive"], measured
    assert 0.1 < half["along"] < plus["along"], measured  # any strength in between moves part of the way
    # The base model (strength 0) sits between the two.
    base_to_positive, base_to_negative = (target - positive).norm().item(), (target - negative).norm().item()
    assert plus["to_positive"] - plus["to_negative"] < base_to_positive - base_to_negative < \
        minus["to_positive"] - minus["to_negative"]
    # The exported file is a plain LoRA of the network (no slider-only tensors), at the strength it was trained for.
    tensors, _ = read_adapter_file(trainer.last_lora)
    assert tensors and all(k.startswith("diffusion_model.") for k in tensors)
    assert load_file(str(trainer.last_lora)).keys() == tensors.keys()


def test_slider_resume_is_bit_for_bit(tmp_path):
    straight = _slider(tmp_path, "straight", 4)
    _slider(tmp_path, "split", 4, until=2)
    resumed = _slider(tmp_path, "split", 4, resume=True)
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "split")]
    for key in ("loss", "loss_slider_positive", "loss_slider_negative"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]] and all(r[key] > 0 for r in rows[0]), key


def test_slider_settings_are_checked(tmp_path):
    cases = [({"slider.positive": ""}, "slider.positive and slider.negative: give both"),
             ({"slider.negative": "loud"}, "same prompt"),
             ({"crepa.enabled": True}, "crepa.enabled: a slider run"),
             ({"slider.guidance_strength": 0.0}, "slider.guidance_strength")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            cfg = tiny_config(tmp_path, **{**SLIDER, **overrides})
            SliderTrainer(cfg, build_denoiser(cfg.model), _prompts(cfg), cfg.output.dir)
    # A resume with another positive / negative prompt is refused (their contexts are part of the run's fingerprint;
    # the target prompt's is the training item's).
    _slider(tmp_path, "run", 2, until=1)
    cfg = tiny_config(tmp_path, **SLIDER, **{"train.steps": 2, "optimizer.lr": 6e-3, "output.save_every": 100,
                                             "output.dir": str(tmp_path / "run")})
    same, changed = _prompts(cfg), _prompts(cfg, seed=1)
    prompts = TextContext(*(torch.cat([getattr(same, n)[:1], getattr(changed, n)[1:]]) for n in ("video", "audio", "mask")))
    other = SliderTrainer(cfg, build_denoiser(cfg.model), prompts, cfg.output.dir)
    with pytest.raises(Exception, match="different|differs|match"):
        other.try_resume()


def test_slider_command_trains_from_prompts_alone(tmp_path, capsys):
    config = tmp_path / "slider.toml"
    config.write_text(f"""
[dataset]
frames = 9
width = 64
height = 64

[slider]
target_class = "a person"

[train]
steps = 2
mixed_precision = "fp32"
device = "cpu"

[output]
dir = "{tmp_path / 'run'}"
""", encoding="utf-8")
    assert main(["slider", "--config", str(config), "--positive", "a person shouting", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "slider.positive and slider.negative" in err
    report = tmp_path / "report.json"
    assert main(["slider", "--config", str(config), "--positive", "a person shouting", "--negative", "a person whispering",
                 "--quiet", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["steps"] == 2 and Path(data["files"]["final_lora"]).is_file()
    assert data["config"]["slider"]["positive"] == "a person shouting"
