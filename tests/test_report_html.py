"""Validation sampling during a real (tiny) training run, and the HTML training report built from it.

The run directory is made by the real pipeline: synthesised talking clips → doctor → cache with
decoded previews → train with a ``ValidationSampler`` (voice reference from the cache's sources).
"""

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import av
import numpy as np
import pytest
import torch

from ltx2_av_trainer.trainer.app.demo import demo_config
from ltx2_av_trainer.trainer.io_utils import append_jsonl, atomic_write_json, read_jsonl
from ltx2_av_trainer.trainer.data.media.decode import decode_audio
from ltx2_av_trainer.trainer.app.pipeline import (
    build_headless_denoiser,
    build_headless_encoders,
    cache_dataset,
    run_doctor_command,
    train_from_cache,
)
from ltx2_av_trainer.trainer.evaluation.report_html import ReportError, write_training_report
from ltx2_av_trainer.trainer.data.synth import make_demo_dataset
from ltx2_av_trainer.trainer.evaluation.validation_sampling import ValidationSampler, default_every_n_steps
from ltx2_av_trainer.trainer.evaluation.voice_score import VoiceReference

PROMPTS = ["ohwx, a person speaks to the camera", "ohwx, a person says hello in a quiet room"]
SECTIONS = ["summary", "losses", "audio-weight", "sigma", "validation-losses", "voice", "samples", "round-trip", "doctor"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation_run")
    make_demo_dataset(out / "data", speakers=1, clips_per_speaker=2, seconds=1.2, fps=25, width=128, height=96,
                      trigger="ohwx", seed=0)
    config = demo_config(out, 4, "2.0").replace(**{"logging.log_every": 2, "output.save_every": 4})
    atomic_write_json(out / "doctor.json", run_doctor_command(config, quiet=True).to_dict())
    encoders = build_headless_encoders(config)
    cache_dataset(config, encoders, quiet=True, decode=True)
    reference = VoiceReference.from_cache(out / "cache")
    sampler = ValidationSampler(encoders, PROMPTS, every_n_steps=2, seeds=[5], reference=reference, sample_steps=2)
    result = train_from_cache(config, build_headless_denoiser(config), callbacks=sampler, quiet=True)
    return SimpleNamespace(out=out, config=config, run_dir=result.run_dir, sampler=sampler, reference=reference)


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_voice_reference_is_built_from_the_cached_items_sources(run):
    assert sorted(Path(s).name for s in run.reference.sources) == ["deep_000.mp4", "deep_001.mp4"]
    assert run.reference.typical_similarity > 0.8


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_validation_writes_playable_ab_mp4_files_with_audio(run):
    for step in (2, 4):
        for index in range(len(PROMPTS)):
            for mode in ("lora", "base"):
                path = run.run_dir / "samples" / f"step_{step:06d}" / f"prompt{index}_{mode}.mp4"
                with av.open(str(path)) as container:
                    assert sorted(s.type for s in container.streams) == ["audio", "video"]
                    assert sum(1 for _ in container.decode(video=0)) == run.config.dataset.frames
                track = decode_audio(path)
                assert track.duration_s == pytest.approx(1.0, abs=0.05)
                assert float(np.abs(track.samples).max()) > 1e-3  # real sound, not a silent track


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_validation_log_has_scores_losses_and_files_per_step(run):
    rows = read_jsonl(run.run_dir / "validation.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert 0.0 <= row["voice_score_lora"] <= 1.0 and 0.0 <= row["voice_score_base"] <= 1.0
        assert row["voice_gain"] == pytest.approx(row["voice_score_lora"] - row["voice_score_base"])
        assert row["voice_reference_similarity"] == pytest.approx(run.reference.typical_similarity)
        assert np.isfinite(row["audio_loss_fixed_sigma"]) and np.isfinite(row["video_loss_fixed_sigma"])
        assert row["fixed_sigma"] == 0.5 and row["loss_on"] == "training" and len(row["loss_items"]) == 2
        assert len(row["files"]) == 8 and all((run.run_dir / f).is_file() for f in row["files"])
        assert [s["seed"] for s in row["samples"]] == [5, 5]
    # The base model does not train: its score and loss stay put, while the LoRA's loss moves.
    assert rows[0]["voice_score_base"] == rows[1]["voice_score_base"]
    assert rows[0]["audio_loss_fixed_sigma_base"] == rows[1]["audio_loss_fixed_sigma_base"]
    assert rows[1]["audio_loss_fixed_sigma"] != rows[1]["audio_loss_fixed_sigma_base"]
    fields = run.sampler.results[-1].metrics_fields()
    assert set(fields) == {"val_voice_score_lora", "val_voice_score_base", "val_voice_gain", "val_audio_loss_fixed_sigma",
                           "val_audio_loss_fixed_sigma_base", "val_video_loss_fixed_sigma", "val_video_loss_fixed_sigma_base"}
    assert fields["val_audio_loss_fixed_sigma"] == rows[-1]["audio_loss_fixed_sigma"]


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_validation_leaves_the_training_trajectory_unchanged(run, tmp_path):
    config = run.config.replace(**{"output.dir": str(tmp_path / "plain_run")})
    result = train_from_cache(config, build_headless_denoiser(config), quiet=True)
    plain = read_jsonl(result.run_dir / "metrics.jsonl")
    validated = read_jsonl(run.run_dir / "metrics.jsonl")
    assert [(r["loss_video"], r["loss_audio"]) for r in plain] == [(r["loss_video"], r["loss_audio"]) for r in validated]


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_a_failing_validation_is_a_warning_and_training_goes_on(run, tmp_path):
    config = run.config.replace(**{"output.dir": str(tmp_path / "broken_validation"), "train.steps": 2})
    broken = ValidationSampler(None, PROMPTS, every_n_steps=2, sample_steps=1)  # no encoders: sampling fails
    result = train_from_cache(config, build_headless_denoiser(config), callbacks=broken, quiet=True)
    assert result.completed and result.step == 2
    assert any("validation at step 2 failed" in w for w in result.warnings)
    rows = read_jsonl(result.run_dir / "validation.jsonl")
    assert len(rows) == 1 and rows[0]["step"] == 2 and "AttributeError" in rows[0]["error"]
    section = _section(write_training_report(result.run_dir).read_text(encoding="utf-8"), "validation-losses")
    assert "every validation sampling failed" in section and "validation at step 2 failed" in section


def test_resumed_run_drops_validation_lines_after_its_state(tmp_path):
    for step in (2, 4, 6):
        append_jsonl(tmp_path / "validation.jsonl", {"step": step})
    sampler = ValidationSampler(None, PROMPTS, every_n_steps=2, out_dir=tmp_path)
    sampler.on_start(SimpleNamespace(run_dir=tmp_path, step=4))
    assert [r["step"] for r in read_jsonl(tmp_path / "validation.jsonl")] == [2, 4]
    assert sampler.is_due(6) and not sampler.is_due(5) and not sampler.is_due(0)


def test_validation_settings_are_checked():
    with pytest.raises(ValueError, match="one per prompt"):
        ValidationSampler(None, PROMPTS, every_n_steps=2, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="fixed_sigma"):
        ValidationSampler(None, PROMPTS, every_n_steps=2, fixed_sigma=1.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        ValidationSampler(None, [], every_n_steps=2)
    assert default_every_n_steps("cpu") == 0 and default_every_n_steps("cuda") > 0
    assert default_every_n_steps("auto") == (default_every_n_steps("cuda") if torch.cuda.is_available() else 0)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.urls: list[str] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "img" and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1
        for key in ("src", "href"):
            value = attrs.get(key, "")
            if value and not value.startswith(("data:", "#")):
                self.urls.append(value)


def _section(page: str, name: str) -> str:
    return re.search(rf'<section id="{name}">(.*?)</section>', page, re.S).group(1)


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_report_shows_every_section_with_the_runs_data(run):
    path = write_training_report(run.run_dir, doctor_json=run.out / "doctor.json")
    assert path == run.run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(page)
    assert parsed.sections == SECTIONS
    assert parsed.images == 5  # losses, audio weight, σ histograms, validation losses, voice scores
    for name in SECTIONS:
        assert 'class="missing"' not in _section(page, name), name
    assert "step_000004" in _section(page, "samples") and "<video" in _section(page, "samples")
    assert "deep_000" in _section(page, "round-trip")  # cache found through the run's config.json
    # Every linked file resolves relative to the run directory: the page works offline and moves with the run.
    assert parsed.urls and all((run.run_dir / unquote(url)).resolve().is_file() for url in parsed.urls)


@pytest.mark.slow  # the shared tiny run takes 10-45 s on 2 busy cores
def test_report_embeds_a_sample_commands_ab_pair(run):
    from ltx2_av_trainer.trainer.evaluation.previews import sample_and_write

    samples = run.out / "samples"
    denoiser = build_headless_denoiser(run.config)
    lora = sorted((run.run_dir / "lora").glob("*.safetensors"))[-1]
    sample_and_write(run.config, denoiser, build_headless_encoders(run.config), lora, PROMPTS[0], samples, steps=2)
    page = write_training_report(run.run_dir, samples_dir=samples).read_text(encoding="utf-8")
    section = _section(page, "samples")
    assert 'src="../samples/lora.mp4"' in section and 'src="../samples/base.wav"' in section
    assert "no doctor report given" in _section(page, "doctor")


def test_report_of_an_empty_run_says_why_each_section_is_empty(tmp_path):
    page = write_training_report(tmp_path).read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(page)
    assert parsed.sections == SECTIONS and parsed.images == 0
    reasons = {
        "summary": "no report.json",
        "losses": "has not completed a step",
        "audio-weight": "has not completed a step",
        "sigma": "has not completed a step",
        "validation-losses": "validation sampling was off",
        "voice": "validation sampling was off",
        "samples": "no A/B samples",
        "round-trip": "cache --decode",
        "doctor": "doctor --json",
    }
    for name, reason in reasons.items():
        body = _section(page, name)
        assert 'class="missing"' in body and reason in body, name


def test_report_plots_the_loops_held_out_losses_from_metrics(tmp_path):
    for step in range(1, 21):
        row = {"step": step, "loss": 2.0 - step / 40, "loss_video": 1.5 - step / 50, "loss_audio": None, "audio_weight": None,
               "sigma_video": 0.5, "sigma_audio": None}
        if step % 10 == 0:
            row.update(val_loss_video=1.4 - step / 100, val_loss_audio=None)
        append_jsonl(tmp_path / "metrics.jsonl", row)
    page = write_training_report(tmp_path).read_text(encoding="utf-8")
    section = _section(page, "validation-losses")
    assert section.count("data:image/png;base64,") == 1 and "held-out" in section
    assert "validation sampling" in section  # and why the sampler's fixed-σ A/B losses are absent
    assert "video-only run" in _section(page, "losses") and "no step trained on audio" in _section(page, "audio-weight")


def test_report_needs_a_run_directory_and_names_missing_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(ReportError, match="no such run directory"):
        write_training_report(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ReportError, match="pip install matplotlib"):
        write_training_report(tmp_path)
