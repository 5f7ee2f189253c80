"""Voice identity score: Resemblyzer's real speaker encoder on audio decoded with PyAV.

Voices come from our source-filter synthesiser (trainer/data/synth: different pitch and formants) and,
when the Debian package is installed, from espeak-ng (real text-to-speech with different voices).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltx2_av_trainer.trainer.data.media.encode import write_av_file, write_wav
from ltx2_av_trainer.trainer.data.media.probe import MediaError
from ltx2_av_trainer.trainer.data.synth import speaker, synthesize_voice
from ltx2_av_trainer.trainer.evaluation.voice_score import (
    VoiceReference,
    VoiceScoreError,
    embed_audio,
    score_ab_files,
    score_file,
    score_waveform,
)

RATE = 48000
ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(
    ESPEAK is None, reason="espeak-ng is not installed (Debian: apt-get install -y espeak-ng); real-speech tests skipped"
)


def _voice(name: str, seed: int, seconds: float = 2.5) -> np.ndarray:
    return synthesize_voice(speaker(name), seconds, RATE, seed=seed).audio


def _frames(count: int) -> np.ndarray:
    frames = np.zeros((count, 64, 64, 3), dtype=np.uint8)
    frames[:, 16:48, 16:48] = 180
    return frames


@pytest.fixture(scope="module")
def deep_reference(tmp_path_factory):
    """Reference from three 'deep' clips: two wav files and one mp4 with the voice muxed in."""
    folder = tmp_path_factory.mktemp("voices")
    paths = [write_wav(folder / f"deep_{seed}.wav", _voice("deep", seed), RATE) for seed in (0, 1)]
    paths.append(write_av_file(folder / "deep_2.mp4", _frames(50), 25, _voice("deep", 2, seconds=2.0), RATE))
    return VoiceReference.from_files(paths)


def test_same_synthetic_speaker_scores_higher_than_another_speaker(deep_reference):
    assert len(deep_reference.sources) == 3 and deep_reference.skipped == []
    assert min(deep_reference.clip_similarities) > 0.85
    same = deep_reference.score_detail(_voice("deep", 10), RATE)
    other = deep_reference.score_detail(_voice("bright", 10), RATE)
    assert same.speech_detected and other.speech_detected
    assert 0.0 <= other.similarity < same.similarity <= 1.0
    assert same.similarity - other.similarity > 0.1
    assert deep_reference.typical_similarity > other.similarity


def test_score_ab_reports_the_gain_of_the_lora_sample(deep_reference):
    result = deep_reference.score_ab(_voice("deep", 11), _voice("bright", 11), RATE)
    assert result.gain == pytest.approx(result.lora - result.base)
    assert result.gain > 0.1
    as_dict = result.to_dict()
    assert {"lora", "base", "gain"} <= set(as_dict) and as_dict["lora_detail"]["speech_detected"] is True


def test_ab_files_and_a_dataset_reference(deep_reference, tmp_path):
    lora = write_wav(tmp_path / "lora.wav", _voice("deep", 14), RATE)
    base = write_wav(tmp_path / "base.wav", _voice("bright", 14), RATE)
    assert score_ab_files(lora, base, deep_reference).gain > 0.1

    from ltx2_av_trainer.trainer.config import Config

    data = tmp_path / "data"
    for seed in (0, 1):
        write_av_file(data / f"talk_{seed}.mp4", _frames(50), 25, _voice("deep", seed, seconds=2.0), RATE)
    write_av_file(data / "mute.mp4", _frames(25), 25, None, RATE)
    for clip in data.glob("*.mp4"):
        clip.with_suffix(".txt").write_text("a person speaks")
    reference = VoiceReference.from_dataset(Config.from_dict({"dataset": {"sources": [{"path": str(data)}]}}).dataset)
    assert sorted(Path(s).name for s in reference.sources) == ["talk_0.mp4", "talk_1.mp4"]
    assert len(reference.skipped) == 1 and "mute.mp4" in reference.skipped[0] and "no audio" in reference.skipped[0]
    assert reference.score(_voice("deep", 15), RATE) > reference.score(_voice("bright", 15), RATE)


def test_waveform_shapes_torch_and_numpy_score_alike(deep_reference):
    stereo = _voice("deep", 12)
    from_torch = score_waveform(torch.from_numpy(stereo), RATE, deep_reference).similarity
    from_mono = score_waveform(stereo.mean(axis=0), RATE, deep_reference).similarity
    assert from_torch == pytest.approx(from_mono, abs=1e-4)
    with pytest.raises(VoiceScoreError, match=r"waveform\[0\]"):
        score_waveform(torch.from_numpy(stereo)[None], RATE, deep_reference)
    with pytest.raises(VoiceScoreError, match="transpose"):
        score_waveform(stereo.T, RATE, deep_reference)


def test_unscorable_audio_gets_a_clear_error(deep_reference, tmp_path):
    with pytest.raises(VoiceScoreError, match="silent"):
        deep_reference.score(np.zeros((2, RATE), dtype=np.float32), RATE)
    with pytest.raises(VoiceScoreError, match="too short"):
        deep_reference.score(_voice("deep", 0)[:, : RATE // 10], RATE)
    broken = _voice("deep", 0)
    broken[0, 100] = np.nan
    with pytest.raises(VoiceScoreError, match="NaN"):
        deep_reference.score(broken, RATE)
    silent_video = write_av_file(tmp_path / "no_sound.mp4", _frames(25), 25, None, RATE)
    with pytest.raises(MediaError, match="no_sound.mp4"):
        score_file(silent_video, deep_reference)


def test_noise_is_scored_but_flagged_as_no_speech(deep_reference):
    noise = np.random.default_rng(0).normal(0.0, 0.2, (2, 2 * RATE)).astype(np.float32)
    detail = deep_reference.score_detail(noise, RATE)
    assert detail.speech_detected is False and 0.0 <= detail.similarity <= 1.0
    with pytest.warns(UserWarning, match="no speech detected"):
        deep_reference.score(noise, RATE)


def test_reference_leaves_out_clips_without_speech_and_needs_one_with_speech():
    noise = np.random.default_rng(1).normal(0.0, 0.2, (2, 2 * RATE)).astype(np.float32)
    silence = np.zeros((2, RATE), dtype=np.float32)
    reference = VoiceReference.from_waveforms([("talk.wav", _voice("deep", 3), RATE), ("hiss.wav", noise, RATE),
                                               ("quiet.wav", silence, RATE)])
    assert reference.sources == ["talk.wav"]
    assert [s.split(":")[0] for s in reference.skipped] == ["hiss.wav", "quiet.wav"]
    with pytest.raises(VoiceScoreError, match="no clip with speech"):
        VoiceReference.from_waveforms([("hiss.wav", noise, RATE)])


def test_reference_survives_a_json_round_trip(deep_reference, tmp_path):
    path = deep_reference.save(tmp_path / "voice_reference.json")
    loaded = VoiceReference.load(path)
    clip = _voice("deep", 13)
    assert loaded.score(clip, RATE) == pytest.approx(deep_reference.score(clip, RATE), abs=1e-9)
    assert loaded.sources == deep_reference.sources
    (tmp_path / "bad.json").write_text('{"format": 1, "embedding": [0.1]}')
    with pytest.raises(VoiceScoreError, match="bad.json"):
        VoiceReference.load(tmp_path / "bad.json")


def test_missing_resemblyzer_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "resemblyzer", None)  # makes `import resemblyzer` fail
    with pytest.raises(ImportError, match="pip install resemblyzer"):
        embed_audio(_voice("deep", 0), RATE)


def _espeak(path, voice: str, text: str):
    subprocess.run([ESPEAK, "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


@needs_espeak
def test_real_speech_two_voices_score_lower_than_one_voice_with_itself(tmp_path):
    sentences = [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Every voice has its own colour and its own rhythm when it speaks.",
        "Good morning, it is nice to see you. The weather here is calm and bright today.",
    ]
    male = [_espeak(tmp_path / f"m3_{i}.wav", "en+m3", text) for i, text in enumerate(sentences)]
    female = _espeak(tmp_path / "f4_2.wav", "en+f4", sentences[2])
    reference = VoiceReference.from_files(male[:2])
    # The held-out sentence of the same voice, muxed into an mp4 to go through the container path.
    from ltx2_av_trainer.trainer.data.media.decode import decode_audio

    track = decode_audio(male[2])
    seconds = track.samples.shape[1] / track.sample_rate
    same_mp4 = write_av_file(tmp_path / "m3_2.mp4", _frames(int(seconds * 25)), 25,
                             _resample_to_48k(track.samples, track.sample_rate), RATE)
    same = score_file(same_mp4, reference)
    other = score_file(female, reference)
    assert same.speech_detected and other.speech_detected
    assert same.similarity > other.similarity + 0.1
    assert score_file(male[2], reference).similarity == pytest.approx(same.similarity, abs=0.03)


def _resample_to_48k(samples, rate):
    from ltx2_av_trainer.trainer.data.media.audio import resample

    return resample(samples, rate, RATE)
