"""The synthetic talking-clip generator: real files decoded back with PyAV, measured, not just run."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from scipy import linalg, ndimage, signal

from ltx2_av_trainer.trainer.data import synth
from ltx2_av_trainer.trainer.io_utils import TMP_PREFIX

FPS = 25
WIDTH, HEIGHT = 128, 96
SECONDS = 1.6
SAMPLE_RATE = 48000


@dataclass
class DecodedClip:
    path: Path
    speaker: synth.Speaker
    video_streams: int
    audio_streams: int
    video_codec: str
    audio_codec: str
    pix_fmt: str
    frames: np.ndarray  # uint8 [F, H, W, 3]
    frame_times: np.ndarray  # seconds, from the decoded pts
    audio: np.ndarray  # float32 [channels, samples]
    audio_start: float  # seconds, pts of the first decoded audio frame
    sample_rate: int


def decode(path: Path, speaker: synth.Speaker) -> DecodedClip:
    with av.open(str(path)) as container:
        video_stream = container.streams.video[0]
        audio_stream = container.streams.audio[0]
        counts = (len(container.streams.video), len(container.streams.audio))
        video_codec, audio_codec = video_stream.codec_context.name, audio_stream.codec_context.name
        pix_fmt = video_stream.codec_context.pix_fmt
        frames, times, chunks, audio_start = [], [], [], None
        for frame in container.decode(video_stream, audio_stream):
            if isinstance(frame, av.VideoFrame):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.pts * frame.time_base))
            else:
                if audio_start is None:
                    audio_start = float(frame.pts * frame.time_base)
                chunks.append(frame.to_ndarray())
                sample_rate = frame.sample_rate
    order = np.argsort(times)
    return DecodedClip(
        path, speaker, counts[0], counts[1], video_codec, audio_codec, pix_fmt,
        np.stack(frames)[order], np.asarray(times)[order], np.concatenate(chunks, axis=1), audio_start, sample_rate,
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, DecodedClip]:
    """Two speakers saying "the same thing" (one seed: same syllables and vowels), written to real
    mp4 files and decoded back."""
    folder = tmp_path_factory.mktemp("synth_clips")
    decoded = {}
    for name, seed in (("deep", 3), ("bright", 3)):
        who = synth.speaker(name, seed=0)
        path = synth.write_talking_clip(folder / f"{name}.mp4", who, SECONDS, fps=FPS, width=WIDTH, height=HEIGHT,
                                        sample_rate=SAMPLE_RATE, seed=seed)
        decoded[name] = decode(path, who)
    return decoded


# ---- measurements -------------------------------------------------------------------------------


def frame_rms(audio: np.ndarray, sample_rate: int, frames: int, fps: float, start: float = 0.0) -> np.ndarray:
    """RMS of the (mono-mixed) audio over each video frame's interval."""
    mono = audio.mean(axis=0).astype(np.float64)
    first = int(round(start * sample_rate))
    if first > 0:
        mono = np.concatenate([np.zeros(first), mono])
    bounds = np.round(np.arange(frames + 1) * sample_rate / fps).astype(int)
    return np.array([np.sqrt(np.mean(mono[a:b] ** 2)) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])])


def estimate_f0(audio: np.ndarray, sample_rate: int) -> float:
    """Median autocorrelation pitch over the loud (voiced) 40 ms frames."""
    mono = audio.mean(axis=0).astype(np.float64)
    size, hop = 2048, 1024
    starts = range(0, len(mono) - size, hop)
    loudness = np.array([np.sqrt(np.mean(mono[s : s + size] ** 2)) for s in starts])
    shortest, longest = int(sample_rate / 450), int(sample_rate / 60)
    estimates = []
    for s, rms in zip(starts, loudness):
        if rms < 0.5 * loudness.max():
            continue
        x = mono[s : s + size] * np.hanning(size)
        spectrum = np.fft.rfft(x, 2 * size)
        autocorrelation = np.fft.irfft(np.abs(spectrum) ** 2)[:size]
        lag = shortest + int(np.argmax(autocorrelation[shortest:longest]))
        estimates.append(sample_rate / lag)
    assert len(estimates) >= 5, "too few voiced frames to estimate pitch"
    return float(np.median(estimates))


def spectral_centroid(audio: np.ndarray, sample_rate: int, max_hz: float = 8000.0) -> float:
    mono = audio.mean(axis=0).astype(np.float64)
    power = np.abs(np.fft.rfft(mono)) ** 2
    freqs = np.fft.rfftfreq(len(mono), 1.0 / sample_rate)
    keep = freqs <= max_hz
    return float(np.sum(freqs[keep] * power[keep]) / np.sum(power[keep]))


def lpc_formants(audio: np.ndarray, sample_rate: int, order: int = 12) -> np.ndarray:
    """Median F1, F2, F3 over loud frames: roots of a 12th-order LPC fit at 12 kHz (classic formant tracking)."""
    rate = 12000
    x = signal.resample_poly(audio.mean(axis=0).astype(np.float64), rate, sample_rate)
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])  # pre-emphasis flattens the glottal tilt
    size, hop = 360, 180  # 30 ms frames
    starts = range(0, len(x) - size, hop)
    loudness = np.array([np.sqrt(np.mean(x[s : s + size] ** 2)) for s in starts])
    tracks = []
    for s, rms in zip(starts, loudness):
        if rms < 0.3 * loudness.max():
            continue
        frame = x[s : s + size] * np.hamming(size)
        autocorrelation = np.correlate(frame, frame, "full")[size - 1 : size + order]
        coefficients = linalg.solve_toeplitz(autocorrelation[:order], -autocorrelation[1 : order + 1])
        roots = np.roots(np.concatenate([[1.0], coefficients]))
        roots = roots[roots.imag > 0]
        frequencies = np.angle(roots) * rate / (2 * np.pi)
        bandwidths = -np.log(np.abs(roots)) * rate / np.pi
        formants = np.sort(frequencies[(frequencies > 150) & (bandwidths < 500)])
        if len(formants) >= 3:
            tracks.append(formants[:3])
    assert len(tracks) >= 10, "too few frames with three formants"
    return np.median(np.array(tracks), axis=0)


def mouth_motion(clip: DecodedClip, loudness: np.ndarray) -> np.ndarray:
    """Per frame: mean absolute pixel difference in the mouth region from the quietest frame."""
    rows, cols = synth.mouth_box(clip.speaker.look, WIDTH, HEIGHT)
    mouth = clip.frames[:, rows, cols].astype(np.float64)
    closed = mouth[int(np.argmin(loudness))]
    return np.abs(mouth - closed).mean(axis=(1, 2, 3))


# ---- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deep", "bright"])
def test_clip_has_one_video_and_one_audio_stream_in_sync(clips, name):
    clip = clips[name]
    expected_frames = round(SECONDS * FPS)
    assert (clip.video_streams, clip.audio_streams) == (1, 1)
    assert clip.video_codec in ("h264", "mpeg4") and clip.audio_codec == "aac"
    assert clip.pix_fmt == "yuv420p"
    assert clip.frames.shape == (expected_frames, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(clip.frame_times, np.arange(expected_frames) / FPS, atol=1e-6)
    assert clip.sample_rate == SAMPLE_RATE and clip.audio.shape[0] == 2
    video_seconds = expected_frames / FPS
    audio_seconds = clip.audio_start + clip.audio.shape[1] / clip.sample_rate
    assert abs(clip.audio_start) < 1.0 / FPS
    assert abs(audio_seconds - video_seconds) < 1.0 / FPS


def test_decoded_pitch_is_the_speakers_and_differs_between_speakers(clips):
    pitches = {name: estimate_f0(clip.audio, clip.sample_rate) for name, clip in clips.items()}
    for name, clip in clips.items():
        assert pitches[name] == pytest.approx(clip.speaker.voice.f0_hz, rel=0.08), (name, pitches)
    assert pitches["bright"] > 1.5 * pitches["deep"]


def test_spectral_centroid_differs_between_speakers(clips):
    deep = spectral_centroid(clips["deep"].audio, SAMPLE_RATE)
    bright = spectral_centroid(clips["bright"].audio, SAMPLE_RATE)
    assert bright > 1.3 * deep, (deep, bright)


def test_measured_formants_differ_between_speakers_like_their_vocal_tracts(clips):
    deep, bright = (clips[name] for name in ("deep", "bright"))
    measured = lpc_formants(bright.audio, SAMPLE_RATE) / lpc_formants(deep.audio, SAMPLE_RATE)
    expected = np.array(bright.speaker.voice.formants_hz[:3]) / np.array(deep.speaker.voice.formants_hz[:3])
    # F1 is the least reliable LPC estimate (close to the harmonics); F2 and F3 must track the tract.
    np.testing.assert_allclose(measured[1:], expected[1:], atol=0.08)
    assert measured[0] > 1.1


@pytest.mark.parametrize("seed", [7, 8])
def test_a_shorter_vocal_tract_alone_moves_the_formants_not_the_pitch(seed):
    """Same pitch, same seed (so same syllables and vowels): only the formants are 25 % higher."""
    voice = synth.speaker("deep").voice
    shorter_tract = dataclasses.replace(voice, formants_hz=tuple(f * 1.25 for f in voice.formants_hz))
    low = synth.synthesize_voice(voice, SECONDS, seed=seed).audio
    high = synth.synthesize_voice(shorter_tract, SECONDS, seed=seed).audio
    ratio = lpc_formants(high, SAMPLE_RATE) / lpc_formants(low, SAMPLE_RATE)
    np.testing.assert_allclose(ratio[1:], 1.25, atol=0.06)
    assert spectral_centroid(high, SAMPLE_RATE) > spectral_centroid(low, SAMPLE_RATE)
    assert estimate_f0(high, SAMPLE_RATE) == pytest.approx(estimate_f0(low, SAMPLE_RATE), rel=0.03)


@pytest.mark.parametrize("name", ["deep", "bright"])
def test_mouth_opening_follows_the_decoded_audio_in_sync(clips, name):
    clip = clips[name]
    loudness = frame_rms(clip.audio, clip.sample_rate, len(clip.frames), FPS, start=clip.audio_start)
    motion = mouth_motion(clip, loudness)
    assert np.corrcoef(motion, loudness)[0, 1] > 0.5

    # Sync: shifting audio against video by a few frames only makes the match worse.
    def shifted_r(lag: int) -> float:
        if lag >= 0:
            return float(np.corrcoef(motion[lag:], loudness[: len(loudness) - lag])[0, 1])
        return float(np.corrcoef(motion[:lag], loudness[-lag:])[0, 1])

    correlations = {lag: shifted_r(lag) for lag in range(-4, 5)}
    assert max(correlations, key=correlations.get) == 0, correlations


def test_other_container_and_no_libx264_fallback(tmp_path, monkeypatch):
    who = synth.speaker("light")
    mkv = decode(synth.write_talking_clip(tmp_path / "c.mkv", who, 0.8, container="mkv", seed=1), who)
    assert (mkv.video_streams, mkv.audio_streams, len(mkv.frames)) == (1, 1, 20)

    monkeypatch.setattr(synth.av, "codecs_available", set(av.codecs_available) - {"libx264"})
    assert synth.video_codec_name() == "mpeg4"
    fallback = decode(synth.write_talking_clip(tmp_path / "m.mp4", who, 0.8, seed=1), who)
    assert fallback.video_codec == "mpeg4" and fallback.pix_fmt == "yuv420p" and len(fallback.frames) == 20


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(synth.av.VideoFrame, "from_ndarray", broken)
    with pytest.raises(RuntimeError, match="encoder exploded"):
        synth.write_talking_clip(tmp_path / "x.mp4", synth.speaker(0), 0.8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=127), "must be even"),
        (dict(container="avi"), "not supported"),
        (dict(container="mkv"), r"should end in \.mkv"),
        (dict(seconds=0.01), "no video frame"),
        (dict(fps=23.976), "whole number"),
        (dict(seconds=0.2), r"bad\.mp4: seconds=0\.200 is too short"),
    ],
)
def test_write_talking_clip_rejects_bad_arguments(tmp_path, kwargs, message):
    arguments = dict(path=tmp_path / "bad.mp4", speaker=synth.speaker(0), seconds=0.8) | kwargs
    with pytest.raises(ValueError, match=message):
        synth.write_talking_clip(**arguments)
    assert not any(tmp_path.iterdir())


# ---- voice ----------------------------------------------------------------------------------------


def test_same_seed_gives_identical_audio_and_another_seed_differs():
    who = synth.speaker("raspy")
    first = synth.synthesize_voice(who, SECONDS, seed=11)
    again = synth.synthesize_voice(who, SECONDS, seed=11)
    other = synth.synthesize_voice(who, SECONDS, seed=12)
    assert first.audio.dtype == np.float32 and first.audio.shape == (2, round(SECONDS * SAMPLE_RATE))
    assert np.array_equal(first.audio, again.audio) and np.array_equal(first.envelope, again.envelope)
    assert not np.array_equal(first.audio, other.audio)


@pytest.mark.parametrize("index", range(5))
def test_level_pauses_and_no_clipping(index):
    voice = synth.synthesize_voice(synth.speaker(index, seed=2), 2.0, seed=index)
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(voice.audio.astype(np.float64) ** 2)))
    assert rms_dbfs == pytest.approx(synth.TARGET_RMS_DBFS, abs=1.0)
    assert np.max(np.abs(voice.audio)) < 10 ** (synth.PEAK_CEILING_DBFS / 20) + 1e-6
    assert 0.0 <= voice.envelope.min() and voice.envelope.max() <= 1.0
    silent = voice.envelope == 0
    assert 0.1 < silent.mean() < 0.6  # pauses between words, but mostly speech
    # The envelope really gates the sound: pauses (away from the formants' ringing) are > 30 dB quieter.
    loud = voice.envelope > 0.5
    pauses = ndimage.binary_erosion(silent, iterations=960)  # 20 ms in from each edge
    quiet_rms = np.sqrt(np.mean(voice.audio[0, pauses] ** 2))
    loud_rms = np.sqrt(np.mean(voice.audio[0, loud] ** 2))
    assert loud_rms > 30 * quiet_rms


def test_envelope_at_frames_averages_each_frame_interval():
    envelope = np.repeat(np.array([0.0, 1.0, 0.5], dtype=np.float32), 1920)
    np.testing.assert_allclose(synth.envelope_at_frames(envelope, 48000, 25, 3), [0.0, 1.0, 0.5])


def test_voice_rejects_bad_settings():
    with pytest.raises(ValueError, match="f0_hz"):
        dataclasses.replace(synth.speaker(0).voice, f0_hz=20.0)
    with pytest.raises(ValueError, match="3 or 4 formants"):
        dataclasses.replace(synth.speaker(0).voice, formants_hz=(500.0, 1500.0))
    with pytest.raises(ValueError, match="too short"):
        synth.synthesize_voice(synth.speaker(0), 0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        synth.synthesize_voice(synth.speaker(0), 1.0, sample_rate=8000)


# ---- speakers and faces ----------------------------------------------------------------------------


def test_speakers_are_distinct_and_deterministic():
    speakers = [synth.speaker(i, seed=5) for i in range(6)]
    assert speakers == [synth.speaker(i, seed=5) for i in range(6)]
    assert len({s.name for s in speakers}) == len({s.voice.f0_hz for s in speakers}) == 6
    assert synth.speaker("bright", seed=5) == speakers[1]
    deep, bright = speakers[0], speakers[1]
    assert deep.voice.f0_hz == pytest.approx(110, rel=0.05) and bright.voice.f0_hz == pytest.approx(210, rel=0.05)
    assert all(b > d for d, b in zip(deep.voice.formants_hz, bright.voice.formants_hz))
    assert synth.speaker(0, seed=6) != deep  # the seed nudges a preset
    with pytest.raises(ValueError, match="Unknown speaker name 'nobody'"):
        synth.speaker("nobody")


def test_face_mouth_opens_with_envelope_and_nothing_else_follows_it():
    look = synth.speaker(0).look
    envelope = np.array([0.0, 1.0] * 10)
    frames = synth.render_face_frames(look, envelope, WIDTH, HEIGHT, FPS, seed=0)
    assert frames.dtype == np.uint8 and frames.shape == (20, HEIGHT, WIDTH, 3)
    assert np.array_equal(frames, synth.render_face_frames(look, envelope, WIDTH, HEIGHT, FPS, seed=0))
    rows, cols = synth.mouth_box(look, WIDTH, HEIGHT)
    dark = (frames[:, rows, cols].astype(int).sum(axis=-1) < 150).sum(axis=(1, 2))
    assert (dark[1::2] > dark[0::2] + 20).all()  # open mouths show far more dark interior
    # Outside the mouth region the picture does not flicker with the envelope.
    outside = frames.astype(float).copy()
    outside[:, rows, cols] = 0
    assert np.abs(outside[1::2].mean(axis=0) - outside[0::2].mean(axis=0)).mean() < 1.0


# ---- demo dataset -----------------------------------------------------------------------------------


def test_demo_dataset_captions_determinism_and_idempotence(tmp_path):
    first = synth.make_demo_dataset(tmp_path / "a", speakers=2, clips_per_speaker=3, seconds=1.0, trigger="zkw")
    assert [p.name for p in first] == [f"{n}_{k:03d}.mp4" for n in ("deep", "bright") for k in range(3)]
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in first]
    assert all(c.startswith("zkw, a person with ") and 'Speech: "' in c for c in captions)
    assert "deep warm voice" in captions[0] and "bright clear voice" in captions[3]
    assert len({c.split('Speech: "')[1] for c in captions[:3]}) == 3  # transcripts vary per clip

    # Same arguments elsewhere: byte-identical files.
    second = synth.make_demo_dataset(tmp_path / "b", speakers=2, clips_per_speaker=3, seconds=1.0, trigger="zkw")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()

    # Again in place: nothing is rewritten.
    stamps = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert synth.make_demo_dataset(tmp_path / "a", speakers=2, clips_per_speaker=3, seconds=1.0, trigger="zkw") == first
    assert stamps == {p: os.stat(p).st_mtime_ns for p in (tmp_path / "a").iterdir()}

    # A damaged clip is noticed and rebuilt; a smaller set removes the clips it no longer has.
    first[0].write_bytes(b"broken")
    fewer = synth.make_demo_dataset(tmp_path / "a", speakers=2, clips_per_speaker=2, seconds=1.0, trigger="zkw")
    assert first[0].read_bytes() == second[0].read_bytes()
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([p.name for p in fewer] + [p.with_suffix(".txt").name for p in fewer]
                           + [synth.DEMO_MANIFEST])
    assert not any(n.startswith(TMP_PREFIX) for n in names)


def test_demo_dataset_default_size_is_quick(tmp_path):
    import time

    start = time.perf_counter()
    clips = synth.make_demo_dataset(tmp_path, clips_per_speaker=6)
    elapsed = time.perf_counter() - start
    assert len(clips) == 6 and all(c.stat().st_size > 1000 for c in clips)
    assert elapsed < 10.0, f"6 demo clips took {elapsed:.1f} s"


def test_demo_dataset_finishes_an_interrupted_build_and_removes_its_leftovers(tmp_path, monkeypatch):
    real_write = synth.write_talking_clip
    written = []

    def interrupted_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(synth, "write_talking_clip", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        synth.make_demo_dataset(tmp_path, clips_per_speaker=4, seconds=0.8)
    monkeypatch.undo()
    assert (tmp_path / "deep_001.mp4").exists()

    clips = synth.make_demo_dataset(tmp_path, clips_per_speaker=1, seconds=0.8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep_000.mp4", "deep_000.txt", synth.DEMO_MANIFEST]
    assert clips == [tmp_path / "deep_000.mp4"]
