"""Audio truth: one verdict per clip, shared by the doctor and the cache. Silent, near-silent or too little
sound is never cached as voice supervision (the clip trains audio-free) and is a doctor error in an audio
dataset; a caption that is not text fails its item, under its own issue code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.data.audio_verdict import NOT_VOICE, AudioThresholds, judge_clip_audio
from ltx2_av_trainer.trainer.data.cache import manifest_entries
from media_corpus import AudioSpec, moving_picture, stereo, voice_like, write_caption, write_media

SECONDS = 1.2
TOML = """
[[dataset.sources]]
path = "{clips}"

[dataset]
frames = 25
width = 64
height = 64
{extra}

[cache]
dir = "{cache}"

[output]
dir = "{run}"
"""


def _clip(folder, name, audio: np.ndarray | None, caption: str | bytes = "ohwx talks"):
    path = write_media(folder / f"{name}.mov", video=moving_picture(int(SECONDS * 25), 64, 64),
                       audio=None if audio is None else [AudioSpec(stereo(audio), codec="pcm_s16le")])
    write_caption(path, caption)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truth")
    clips = folder / "clips"
    rate = 48000
    voice = voice_like(SECONDS, seed=3)
    _clip(clips, "speech", voice)
    _clip(clips, "silent", np.zeros(int(SECONDS * rate), np.float32))
    _clip(clips, "near_silent", voice_like(SECONDS, seed=4, rms_dbfs=-58.0))
    _clip(clips, "too_short", voice_like(0.1, seed=5))
    _clip(clips, "ends_early", voice_like(0.6, seed=6))
    _clip(clips, "clipped", np.clip(voice_like(SECONDS, seed=7, rms_dbfs=-3.0) * 2.0, -1.0, 1.0))
    _clip(clips, "binary_caption", voice, caption=b"PK\x03\x04\x14\x00\x00\x00\x08\x00")
    _clip(clips, "latin1_caption", voice, caption="ohwx caf\u00e9".encode("latin-1"))
    toml = folder / "run.toml"
    toml.write_text(TOML.format(clips=clips, cache=folder / "cache", run=folder / "run", extra=""), encoding="utf-8")
    return folder, toml


EXPECTED = {  # clip -> (doctor error codes, audio cached as supervision, cached at all)
    "speech": ([], True, True),
    "silent": (["audio_silent"], False, True),
    "near_silent": (["audio_near_silent"], False, True),
    "too_short": (["audio_too_short"], False, True),
    "ends_early": ([], True, True),
    "clipped": ([], True, True),
    "binary_caption": (["caption_binary"], True, False),
    "latin1_caption": (["caption_not_utf8"], True, False),
}


def test_doctor_and_cache_share_one_verdict(dataset, capsys):
    folder, toml = dataset
    assert main(["doctor", "--config", str(toml), "--quiet", "--json", str(folder / "doctor.json")]) == 0
    doctor = {item["path"].rsplit("/", 1)[1][:-4]: item for item in json.loads((folder / "doctor.json").read_text())["items"]}
    assert main(["cache", "--config", str(toml), "--quiet", "--json", str(folder / "cache.json")]) == 0
    cache = json.loads((folder / "cache.json").read_text())
    entries = {e.media.rsplit("/", 1)[1][:-4]: e for e in manifest_entries(folder / "cache")}
    for name, (errors, supervision, cached) in EXPECTED.items():
        item = doctor[name]
        codes = [i["code"] for i in item["issues"] if i["severity"] == "error"]
        assert codes == errors, (name, item["issues"])
        assert item["ok"] is not bool(errors), name
        assert (name in entries) is cached, name
        if cached:
            entry = entries[name]
            assert entry.has_audio is supervision, (name, entry.audio_problem)
            if not supervision:
                # The cache names the same reason the doctor gave.
                message = next(i["message"] for i in item["issues"] if i["code"] in NOT_VOICE)
                assert entry.audio_problem == message
                assert any(f["path"].endswith(f"{name}.mov") and f["kind"] == "audio" for f in cache["failures"])
        else:
            failure = next(f for f in cache["failures"] if f["path"].endswith(f"{name}.mov"))
            assert failure["kind"] == "item" and "caption" in failure["reason"], failure
    warnings = {name: [i["code"] for i in doctor[name]["issues"] if i["severity"] == "warning"] for name in EXPECTED}
    assert "audio_ends_early" in warnings["ends_early"] and "clipped" in warnings["clipped"]
    assert cache["audio_encoded"] == 3 and cache["audio_failed"] == 5  # 3 verdicts + 2 captions (items not cached)


def test_thresholds_come_from_the_config_and_decide_for_both(dataset, tmp_path):
    folder, _ = dataset
    toml = tmp_path / "lenient.toml"
    toml.write_text(TOML.format(clips=folder / "clips", cache=tmp_path / "cache", run=tmp_path / "run",
                                extra="audio_near_silent_lufs = -70.0\naudio_quiet_lufs = -60.0\naudio_min_seconds = 0.05"),
                    encoding="utf-8")
    assert main(["doctor", "--config", str(toml), "--quiet", "--json", str(tmp_path / "doctor.json")]) == 0
    doctor = {i["path"].rsplit("/", 1)[1][:-4]: i for i in json.loads((tmp_path / "doctor.json").read_text())["items"]}
    assert main(["cache", "--config", str(toml), "--quiet"]) == 0
    entries = {e.media.rsplit("/", 1)[1][:-4]: e for e in manifest_entries(tmp_path / "cache")}
    for name in ("near_silent", "too_short"):
        assert doctor[name]["ok"] and entries[name].has_audio, name
    assert not doctor["silent"]["ok"] and not entries["silent"].has_audio


def test_the_verdict_itself():
    rate = 16000
    t = AudioThresholds()
    speech = stereo(voice_like(1.0, rate))
    assert judge_clip_audio(speech, speech.shape[1], rate, t).supervises_voice
    silent = np.zeros((2, rate), np.float32)
    verdict = judge_clip_audio(silent, rate, rate, t)
    assert not verdict.supervises_voice and "silent" in verdict.reason
    padded = np.concatenate([speech[:, : rate // 2], np.zeros((2, rate // 2), np.float32)], axis=1)
    assert [c for _, c, _ in judge_clip_audio(padded, rate // 2, rate, t).issues] == ["audio_ends_early"]
    assert judge_clip_audio(padded, rate // 10, rate, t).reason.startswith("the clip has only 0.10 s of audio")
