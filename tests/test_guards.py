"""Guards that were missing: the balancer's weight really scales the audio gradient in the loop, the cache
re-encodes exactly when the encoder, the geometry or a separate audio file changes, a random crop differs per
clip, and the README's quantisation figures are the bounds the tests assert."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from latent_fixtures import make_samples, tiny_config
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser
from ltx2_av_trainer.trainer.config import DatasetConfig, DatasetSource
from ltx2_av_trainer.trainer.data.dataset import enumerate_dataset
from ltx2_av_trainer.trainer.data.media.timing import prepare_item
from ltx2_av_trainer.trainer.training.loop import Trainer
from media_corpus import AudioSpec, stereo, talking_clip, voice_like, write_caption, write_media

README = Path(__file__).resolve().parent.parent / "README.md"


def _first_step_gradients(tmp_path, name: str, **loss) -> tuple[dict[str, torch.Tensor], dict]:
    overrides = {f"loss.{k}": v for k, v in loss.items()}
    cfg = tiny_config(tmp_path, **{"train.steps": 1, "train.max_grad_norm": 0.0, "output.dir": str(tmp_path / name),
                                   **overrides})
    trainer = Trainer(cfg, build_denoiser(cfg.model), make_samples(cfg, 2), cfg.output.dir)
    metrics = trainer.train_step()  # the gradients stay on the parameters until the next step
    return {n: p.grad.detach().clone() for n, p in trainer.network.named_parameters() if p.grad is not None}, metrics


def test_the_audio_weight_scales_the_audio_gradient_in_the_loop(tmp_path):
    """Total = video + w·audio, so the gradient is g_video + w·g_audio: linear in w, with the balancer's w."""
    grads = {w: _first_step_gradients(tmp_path, f"w{w}", balance="none", audio_weight=float(w))[0] for w in (1, 2, 3)}
    audio_part = {k: grads[2][k] - grads[1][k] for k in grads[1]}
    assert sum(v.abs().sum() for v in audio_part.values()) > 0
    audio_modules = [k for k in audio_part if "audio_attn1" in k and audio_part[k].abs().sum() > 0]
    assert audio_modules, "the audio loss reaches no audio module"
    for k in grads[1]:
        torch.testing.assert_close(grads[3][k] - grads[2][k], audio_part[k], rtol=1e-3, atol=1e-7)
    # ema_mag: the weight the step reports is the one its gradient carries.
    balanced, metrics = _first_step_gradients(tmp_path, "ema", balance="ema_mag")
    weight = metrics["audio_weight"]
    assert weight != pytest.approx(1.0)
    for k in balanced:
        torch.testing.assert_close(balanced[k], grads[1][k] + (weight - 1.0) * audio_part[k], rtol=1e-3, atol=1e-7)


TOML = """
[model.tiny]
seed = {model_seed}

[[dataset.sources]]
path = "{clips}"
audio_dir = "{audio}"

[dataset]
frames = 9
width = {width}
height = 64
target_fps = {fps}

[cache]
dir = "{cache}"

[output]
dir = "{run}"
"""


def test_cache_reencodes_exactly_what_a_change_touches(tmp_path):
    clips, audio = tmp_path / "clips", tmp_path / "audio"
    for i in range(2):
        write_caption(talking_clip(clips / f"c{i}.mp4", seconds=0.6, seed=i), "ohwx talks")
    wav = audio / "c0.wav"
    write_media(wav, audio=[AudioSpec(stereo(voice_like(0.6, seed=10)), codec="pcm_s16le")])

    def cache(**settings) -> dict:
        values = {"model_seed": 0, "width": 64, "fps": 25.0, **settings}
        toml = tmp_path / "run.toml"
        toml.write_text(TOML.format(clips=clips, audio=audio, cache=tmp_path / "cache", run=tmp_path / "run", **values),
                        encoding="utf-8")
        assert main(["cache", "--config", str(toml), "--quiet", "--json", str(tmp_path / "c.json")]) == 0
        summary = json.loads((tmp_path / "c.json").read_text())
        return {k: summary[k] for k in ("video_encoded", "reused", "invalidated")}

    assert cache() == {"video_encoded": 2, "reused": 0, "invalidated": 0}
    assert cache() == {"video_encoded": 0, "reused": 2, "invalidated": 0}
    write_media(wav, audio=[AudioSpec(stereo(voice_like(0.6, seed=11)), codec="pcm_s16le")])  # the separate audio file
    assert cache() == {"video_encoded": 1, "reused": 1, "invalidated": 1}
    assert cache(width=96) == {"video_encoded": 2, "reused": 0, "invalidated": 2}  # geometry: size
    assert cache(width=96, fps=20.0) == {"video_encoded": 2, "reused": 0, "invalidated": 2}  # geometry: frame rate
    assert cache(width=96, fps=20.0, model_seed=1) == {"video_encoded": 2, "reused": 0, "invalidated": 2}  # encoder


def test_random_crop_differs_per_clip_and_repeats_per_run(tmp_path):
    clips = tmp_path / "clips"
    for i in range(6):
        write_caption(talking_clip(clips / f"c{i}.mp4", seconds=0.5, seed=i, width=160, height=64), "ohwx")
    dataset = DatasetConfig(sources=[DatasetSource(path=str(clips))], frames=9, width=64, height=64, crop="random",
                            with_audio=False)
    items = enumerate_dataset(dataset)
    boxes = [prepare_item(item, dataset, seed=3).crop_box for item in items]
    assert len(set(boxes)) > 1, boxes  # not the same offset for every clip
    assert boxes == [prepare_item(item, dataset, seed=3).crop_box for item in items]  # the same on every run
    assert boxes != [prepare_item(item, dataset, seed=4).crop_box for item in items]  # the seed decides


def test_readme_quantisation_figures_are_the_asserted_bounds():
    from test_memory import LOSS_TOLERANCE

    text = " ".join(README.read_text(encoding="utf-8").split())
    found = re.search(r"within ([0-9.e-]+) \(int8\), ([0-9.e-]+) \(float8\) and ([0-9.e-]+) \(nf4\)", text)
    assert found, "the README's quantisation sentence moved"
    assert [float(v) for v in found.groups()] == [LOSS_TOLERANCE[m] for m in ("int8", "float8", "nf4")]
