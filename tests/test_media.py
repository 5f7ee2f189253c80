"""Media ingest on real files written with PyAV: probe, decode, audio processing, retiming, buckets.

The alignment test plants a flash on one video frame and a click in the audio at the same moment,
writes the clip at 30, 50 and 60 fps, prepares it at 25 fps and checks that both land where LTX-2's
latents expect them: the flash on the target frame, the click on the audio latent of that frame
(log-mel hop 160 at 16 kHz → 100 frames/s, audio VAE time ÷4 → 40 ms per latent).
"""

from __future__ import annotations

import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av
import media_corpus as corpus
import numpy as np
import pytest
import torch
from ltx2_av_trainer.trainer.backends.audio_frontend import log_mel_spectrogram
from ltx2_av_trainer.trainer.data.media import audio as A
from ltx2_av_trainer.trainer.data.media import decode as D
from ltx2_av_trainer.trainer.data.media.probe import MediaError, probe_media
from ltx2_av_trainer.trainer.data.media.timing import (
    ClipSpec,
    audio_latent_index,
    choose_frame_bucket,
    choose_resolution_bucket,
    cover_size,
    crop_offsets,
    detect_fps,
    mel_frame_to_audio_latent,
    nearest_frame_indices,
    pixel_frames_of_video_latent,
    prepare_clip,
    video_latent_index,
)

SPEC = ClipSpec(frame_buckets=(9, 25), resolution_buckets=((64, 64), (96, 64), (64, 96)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return corpus.build_corpus(tmp_path_factory.mktemp("corpus"))


def dominant_frequency(x: np.ndarray, sample_rate: int) -> float:
    """Peak of a zero-padded, Hann-windowed spectrum with parabolic interpolation (Hz)."""
    x = np.asarray(x, dtype=np.float64)
    size = 1 << 20
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size), size))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-30)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sample_rate / size


# --------------------------------------------------------------------------------------------
# Probe and decode
# --------------------------------------------------------------------------------------------


def test_probe_reads_streams_and_real_timing(files):
    good = probe_media(files["good"])
    assert good.video is not None and good.video.codec in ("h264", "mpeg4")
    assert (good.video.width, good.video.height) == (corpus.WIDTH, corpus.HEIGHT)
    assert good.video.frame_count == 40 and good.video.duration_s == pytest.approx(1.6, abs=1e-6)
    assert good.video.average_fps == pytest.approx(25) and good.video.real_fps == pytest.approx(25)
    assert not good.video.variable_frame_rate and good.truncated is None
    assert [(a.codec, a.sample_rate, a.channels) for a in good.audio] == [("aac", 48000, 2)]
    assert good.audio[0].duration_s == pytest.approx(1.6, abs=0.03)

    assert detect_fps(probe_media(files["fps60"])) == pytest.approx(60)
    assert probe_media(files["fps30"]).video.frame_count == 48
    mono = probe_media(files["mono_44k"]).audio[0]
    assert (mono.sample_rate, mono.channels) == (44100, 1)
    surround = probe_media(files["surround_51"]).audio[0]
    assert surround.channels == 6 and surround.channel_names == ["FL", "FR", "FC", "LFE", "BL", "BR"]
    assert probe_media(files["opus_mkv"]).audio[0].codec == "opus"
    assert probe_media(files["pcm_mov"]).audio[0].codec == "pcm_s16le"
    assert [a.audio_index for a in probe_media(files["two_audio_streams"]).audio] == [0, 1]
    assert probe_media(files["no_audio"]).audio == []

    vfr = probe_media(files["vfr"]).video
    assert vfr.variable_frame_rate
    assert vfr.min_interval_s == pytest.approx(0.033) and vfr.max_interval_s == pytest.approx(0.060)
    image = probe_media(files["image"])
    assert image.is_image and (image.video.width, image.video.height) == (120, 90)


@pytest.mark.parametrize(
    "name, kind, words",
    [
        ("truncated", "truncated", "truncated"),
        ("zero_byte", "empty", "empty (0 bytes)"),
        ("unsupported_codec", "unsupported_codec", "video stream #0 uses a codec this FFmpeg build cannot decode"),
    ],
)
def test_broken_corpus_files_raise_errors_naming_file_reason_and_fix(files, name, kind, words):
    with pytest.raises(MediaError) as caught:
        probe_media(files[name])
    error = caught.value
    assert error.kind == kind and words in str(error)
    assert str(files[name]) in str(error) and error.fix  # the file, what is wrong, what to do


def test_unreadable_inputs_raise_media_errors(tmp_path):
    with pytest.raises(MediaError, match="file not found") as missing:
        probe_media(tmp_path / "nope.mp4")
    assert missing.value.kind == "missing"
    with pytest.raises(MediaError, match="is a folder"):
        probe_media(tmp_path)
    not_media = tmp_path / "notes.mp4"
    not_media.write_text("this is not a video\n" * 20)
    with pytest.raises(MediaError, match="FFmpeg cannot read it") as unreadable:
        probe_media(not_media)
    assert unreadable.value.kind == "unreadable" and "notes.mp4" in str(unreadable.value)


def test_truncated_matroska_is_detected_from_packets(files, tmp_path):
    data = files["opus_mkv"].read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    info = probe_media(cut)  # Matroska opens without its tail, so truncation shows in the packets
    assert info.truncated and "data ends" in info.truncated


def test_audio_only_file_has_no_video_for_a_clip(files, tmp_path):
    wav = tmp_path / "voice.wav"
    corpus.write_media(wav, audio=[corpus.AudioSpec(corpus.stereo(corpus.voice_like(0.5)), codec="pcm_s16le")])
    with pytest.raises(MediaError, match="no video stream") as caught:
        prepare_clip(wav, SPEC)
    assert caught.value.kind == "no_video"


def test_decoded_audio_matches_what_was_written(files, tmp_path):
    samples = corpus.stereo(corpus.tone(1.0, 440.0, amplitude=0.5))
    samples[1] *= 0.5
    path = corpus.write_media(tmp_path / "pcm.mov", video=corpus.moving_picture(25),
                              audio=[corpus.AudioSpec(samples, codec="pcm_s16le")])
    track = D.decode_audio(path)
    assert track.samples.dtype == np.float32 and track.samples.shape == samples.shape
    np.testing.assert_allclose(track.samples, samples, atol=2.0 / 32768)  # 16-bit quantisation
    assert track.start_s == 0.0 and track.channel_names == ("FL", "FR")
    # AAC encoder padding is trimmed to the stream duration the mp4 declares.
    assert D.decode_audio(files["good"]).samples.shape[1] == int(1.6 * 48000)
    assert D.decode_audio(files["two_audio_streams"], audio_index=1).duration_s == pytest.approx(1.6, abs=0.03)
    assert dominant_frequency(D.decode_audio(files["two_audio_streams"], audio_index=1).samples[0], 48000) == \
        pytest.approx(440.0, rel=1e-3)
    with pytest.raises(MediaError, match="audio_stream=2 does not exist"):
        D.decode_audio(files["two_audio_streams"], audio_index=2)
    with pytest.raises(MediaError, match="has no audio stream") as caught:
        D.decode_audio(files["no_audio"])
    assert caught.value.kind == "no_audio"


def test_decode_video_frames_and_timestamps(files):
    video = D.decode_video(files["fps30"])
    assert video.frames.shape == (48, corpus.HEIGHT, corpus.WIDTH, 3) and video.frames.dtype == np.uint8
    np.testing.assert_allclose(video.times_s, np.arange(48) / 30.0, atol=1e-6)
    expected = corpus.moving_picture(48, seed=3)
    assert np.abs(video.frames.astype(int) - expected).mean() < 6  # lossy codec, same picture
    part = D.decode_video(files["fps30"], start_s=0.5, end_s=1.0, size=(48, 32))
    assert part.frames.shape == (15, 32, 48, 3) and part.times_s[0] == pytest.approx(0.5)


def test_shared_time_origin_with_nonzero_start_and_late_audio(tmp_path):
    """A container starting at 2 s whose audio begins 0.5 s after its first frame: the decoded times
    share one origin, and the prepared clip has 0.5 s of leading silence."""
    path = tmp_path / "offset.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream(corpus.video_codec(), rate=25)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        video.codec_context.time_base = Fraction(1, 25)
        audio = out.add_stream("pcm_s16le", rate=16000, layout="stereo")
        audio.codec_context.time_base = Fraction(1, 16000)
        for i, picture in enumerate(corpus.moving_picture(40)):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = 50 + i, Fraction(1, 25)  # starts at 2.0 s
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        sound = corpus.stereo(corpus.tone(1.1, 300.0, 16000, amplitude=0.5))
        for start in range(0, sound.shape[1], 1600):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound[:, start : start + 1600]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 16000, 40000 + start, Fraction(1, 16000)  # 2.5 s
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))

    info = probe_media(path)
    assert info.origin_s == pytest.approx(2.0)
    assert D.decode_video(path, info=info).times_s[0] == pytest.approx(0.0)
    assert D.decode_audio(path, info=info).start_s == pytest.approx(0.5)
    clip = prepare_clip(path, ClipSpec(frame_buckets=(25,), resolution_buckets=((96, 64),)))
    assert clip.audio.shape == (2, 16000)
    assert np.abs(clip.audio[:, :7900]).max() < 1e-3  # silence before the audio starts
    assert np.abs(clip.audio[:, 8200:]).max() > 0.4  # the tone from 0.5 s on
    assert clip.audio_valid_samples == 16000


def test_display_rotation_is_applied(tmp_path):
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(corpus.video_codec(), rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(90)  # display = turn the coded picture 90° counter-clockwise
        for i in range(3):
            picture = np.zeros((64, 96, 3), np.uint8)
            picture[:16, -16:] = 255  # top-right corner of the coded picture
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    info = probe_media(path)
    assert (info.video.rotation, info.video.width, info.video.height) == (90, 64, 96)
    frames = D.decode_video(path, info=info).frames
    assert frames.shape[1:3] == (96, 64)
    assert frames[0, :16, :16].mean() > 200 and frames[0, -16:, -16:].mean() < 50  # now top-left


def test_separate_audio_file_overrides_container_audio(files, tmp_path):
    wav = corpus.write_media(tmp_path / "tone.wav",
                             audio=[corpus.AudioSpec(corpus.stereo(corpus.tone(1.6, 1000.0)), codec="pcm_s16le")])
    clip = prepare_clip(files["good"], SPEC, audio_path=wav)
    assert clip.audio_path == str(wav)
    assert dominant_frequency(clip.audio[0], 16000) == pytest.approx(1000.0, rel=1e-3)
    media = D.decode_media(files["good"], audio_path=wav)
    assert media.audio.path == str(wav) and media.audio.start_s == 0.0


def test_ffmpeg_cli_fallback_decodes_when_pyav_fails(files, monkeypatch, tmp_path):
    def pyav_fails(path, audio_index, info):
        raise MediaError(path, "PyAV decoding failed (simulated)", "re-encode the audio", kind="decode_failed")

    monkeypatch.setattr(D, "_decode_audio_pyav", pyav_fails)
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    with pytest.raises(MediaError, match="simulated") as caught:
        D.decode_audio(files["surround_51"])
    assert str(files["surround_51"]) in str(caught.value)
    monkeypatch.undo()

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="no ffmpeg executable to test the fallback with")
        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    link = tmp_path / "bin" / "ffmpeg"
    link.parent.mkdir()
    link.symlink_to(ffmpeg)
    reference = D.decode_audio(files["surround_51"])
    monkeypatch.setenv("PATH", f"{link.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(D, "_decode_audio_pyav", pyav_fails)
    fallback = D.decode_audio(files["surround_51"])
    assert fallback.decoder == "ffmpeg-cli" and fallback.channel_names == reference.channel_names
    length = min(fallback.samples.shape[1], reference.samples.shape[1])
    assert abs(fallback.samples.shape[1] - reference.samples.shape[1]) <= 1024
    np.testing.assert_allclose(fallback.samples[:, :length], reference.samples[:, :length], atol=1e-4)


# --------------------------------------------------------------------------------------------
# Audio processing
# --------------------------------------------------------------------------------------------


def test_to_stereo_downmix():
    rng = np.random.default_rng(0)
    mono = rng.normal(size=(1, 100)).astype(np.float32)
    np.testing.assert_array_equal(A.to_stereo(mono), np.repeat(mono, 2, axis=0))
    stereo = rng.normal(size=(2, 100)).astype(np.float32)
    assert A.to_stereo(stereo) is stereo or np.array_equal(A.to_stereo(stereo), stereo)

    fl, fr, fc, lfe, bl, br = rng.normal(size=(6, 100)).astype(np.float32)
    surround = np.stack([fl, fr, fc, lfe, bl, br])
    g = 1 / math.sqrt(2)  # ITU-R BS.775: Lo = L + 0.707 C + 0.707 Ls, LFE dropped
    for names in (("FL", "FR", "FC", "LFE", "BL", "BR"), None):  # named, or FFmpeg's default 5.1 order
        out = A.to_stereo(surround, names)
        np.testing.assert_allclose(out[0], fl + g * fc + g * bl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[1], fr + g * fc + g * br, rtol=1e-5, atol=1e-6)
    side = A.to_stereo(surround, ("FL", "FR", "FC", "LFE", "SL", "SR"))
    np.testing.assert_allclose(side[0], fl + g * fc + g * bl, rtol=1e-5, atol=1e-6)

    unknown = rng.normal(size=(3, 100)).astype(np.float32)  # three channels, no names: plain average
    np.testing.assert_allclose(A.to_stereo(unknown), np.repeat(unknown.mean(0, keepdims=True), 2, 0), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        A.to_stereo(np.zeros((0, 10), np.float32))


def test_surround_file_downmix_keeps_the_centre_dialogue(files):
    track = D.decode_audio(files["surround_51"])
    stereo = A.to_stereo(track.samples, track.channel_names)
    centre = track.samples[2]
    for side in stereo:
        weight = float(side @ centre / (centre @ centre))
        assert weight == pytest.approx(1 / math.sqrt(2), abs=0.02)


def test_resample_is_band_limited_and_keeps_frequency_and_level():
    sine = corpus.tone(1.0, 1000.0, 44100, amplitude=0.5)[None]
    out = A.resample(sine, 44100, 16000)
    assert out.dtype == np.float32 and abs(out.shape[1] - 16000) <= 1
    assert dominant_frequency(out[0], 16000) == pytest.approx(1000.0, rel=1e-4)
    assert np.sqrt(np.mean(out[0, 800:-800] ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)
    above_nyquist = A.resample(corpus.tone(1.0, 10000.0, 44100, amplitude=0.5)[None], 44100, 16000)
    assert np.sqrt(np.mean(above_nyquist[0, 800:-800] ** 2)) < 0.5 * 1e-3  # > 60 dB rejection, no aliasing
    assert A.resample(sine, 44100, 44100) is not None and A.resample(sine, 44100, 44100).shape == sine.shape


@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_time_stretch_keeps_pitch_and_sets_length(factor):
    sample_rate = 16000
    tone = corpus.stereo(corpus.tone(2.0, 220.0, sample_rate, amplitude=0.5))
    out = A.time_stretch(tone, factor, sample_rate)
    assert out.shape == (2, round(tone.shape[1] * factor))
    assert dominant_frequency(out[0], sample_rate) == pytest.approx(220.0, rel=0.02)
    np.testing.assert_array_equal(out[0], out[1])  # one alignment for all channels
    body = out[0, 800:-800]
    assert np.sqrt(np.mean(body**2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.05)  # no phasing dips
    with pytest.raises(ValueError, match="outside"):
        A.time_stretch(tone, 5.0, sample_rate)


def test_k_weighting_matches_the_bs1770_coefficients_at_48k():
    (shelf_b, shelf_a), (hp_b, hp_a) = A.k_weighting_filters(48000)
    # ITU-R BS.1770-4, Tables 1 and 2.
    np.testing.assert_allclose(shelf_b, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-9)
    np.testing.assert_allclose(shelf_a, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-9)
    np.testing.assert_allclose(hp_b, [1.0, -2.0, 1.0])
    np.testing.assert_allclose(hp_a, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-9)


def test_integrated_loudness_follows_bs1770():
    rate = 48000
    full_scale = corpus.tone(5.0, 997.0, rate, amplitude=1.0)[None]
    assert A.integrated_loudness(full_scale, rate) == pytest.approx(-3.01, abs=0.02)
    # A -20 dBFS sine (peak 0.1 of full scale) in one channel: -23 LUFS.
    assert A.integrated_loudness(0.1 * full_scale, rate) == pytest.approx(-23.01, abs=0.02)
    # EBU Tech 3341 case 1: 1 kHz, -23 dBFS in both stereo channels reads -23.0 LUFS.
    both = corpus.stereo(corpus.tone(20.0, 1000.0, rate, amplitude=10 ** (-23 / 20)))
    assert A.integrated_loudness(both, rate) == pytest.approx(-23.0, abs=0.1)
    # The same at the audio VAE's 16 kHz (bilinear-transformed K-weighting).
    assert A.integrated_loudness(corpus.tone(5.0, 997.0, 16000)[None], 16000) == \
        pytest.approx(-3.01 + 20 * math.log10(0.3), abs=0.1)
    # Gating: silence (absolute gate) and a much quieter passage (relative gate) do not pull it down.
    # 47 blocks inside the tone, 3 straddling its end with 3/4, 1/2 and 1/4 of its power; the passage
    # 40 dB down is above the absolute gate (-63 LUFS) but below the relative one.
    gated = np.concatenate([0.1 * full_scale, np.zeros((1, 5 * rate)), 0.01 * full_scale], axis=1)
    assert A.integrated_loudness(gated, rate) == pytest.approx(-23.01 + 10 * math.log10(48.5 / 50), abs=0.01)
    # LFE is excluded and surrounds weigh +1.5 dB.
    six = np.zeros((6, full_scale.shape[1]))
    six[3] = full_scale[0]
    assert A.integrated_loudness(six, rate, ("FL", "FR", "FC", "LFE", "BL", "BR")) is None
    six[3], six[4] = 0, 0.1 * full_scale[0]
    assert A.integrated_loudness(six, rate, ("FL", "FR", "FC", "LFE", "BL", "BR")) == \
        pytest.approx(-23.01 + 10 * math.log10(1.41), abs=0.02)
    assert A.integrated_loudness(np.zeros((2, rate)), rate) is None
    assert A.integrated_loudness(full_scale[:, : rate // 4], rate) is None  # shorter than one block


def test_peak_clipping_silence_and_speech_measures():
    rate = 16000
    sine = corpus.tone(2.0, 220.0, rate, amplitude=0.5)[None]
    assert A.peak_dbfs(sine) == pytest.approx(-6.02, abs=0.01)
    assert A.peak_dbfs(np.zeros((1, 10))) == float("-inf")
    hard = np.clip(4 * sine, -1.0, 1.0)
    assert 0.5 < A.clipped_fraction(hard) < 0.9 and A.clipped_fraction(sine) == 0.0
    half_silent = np.concatenate([sine, np.zeros_like(sine)], axis=1)
    assert A.silence_fraction(half_silent, rate) == pytest.approx(0.5, abs=0.02)

    voice = corpus.voice_like(4.0, rate, seed=3)[None]
    with_pause = np.concatenate([voice, 1e-4 * np.random.default_rng(0).normal(size=(1, 2 * rate))], axis=1)
    speech = A.speech_seconds(with_pause, rate)
    assert 1.5 < speech < 4.0  # syllables minus the gaps, and not the 2 s pause
    noise = np.random.default_rng(1).normal(0, 0.1, (1, 4 * rate)).astype(np.float32)
    assert A.speech_seconds(noise, rate) < 0.2  # loud but not voiced
    assert A.speech_seconds(np.zeros((1, rate)), rate) == 0.0

    stats = A.measure(np.concatenate([voice, voice]), rate)
    assert stats.loudness_lufs == pytest.approx(-20 + 3.0, abs=3.0) and stats.peak_dbfs < 0
    assert stats.clipped_fraction == 0.0 and stats.speech_seconds > 1.5


# --------------------------------------------------------------------------------------------
# Timing, buckets and alignment
# --------------------------------------------------------------------------------------------


def test_latent_time_maps():
    assert [video_latent_index(f) for f in (0, 1, 8, 9, 16, 17, 24)] == [0, 1, 1, 2, 2, 3, 3]
    assert list(pixel_frames_of_video_latent(0)) == [0]
    assert list(pixel_frames_of_video_latent(2)) == list(range(9, 17))
    for frame in range(0, 97):
        assert frame in pixel_frames_of_video_latent(video_latent_index(frame))
    assert [mel_frame_to_audio_latent(m) for m in (0, 3, 4, 61, 63, 64)] == [0, 0, 1, 15, 15, 16]
    assert audio_latent_index(0.6) == 15 and audio_latent_index(0.639) == 15 and audio_latent_index(0.64) == 16


def test_bucket_choice_and_cropping():
    assert choose_frame_bucket(40, (9, 25, 49)) == 25
    assert choose_frame_bucket(9, (9, 25)) == 9 and choose_frame_bucket(8, (9, 25)) is None
    buckets = ((64, 64), (96, 64), (64, 96))
    assert choose_resolution_bucket(333, 250, buckets) == (96, 64)
    assert choose_resolution_bucket(90, 160, buckets) == (64, 96)
    assert choose_resolution_bucket(50, 50, buckets) == (64, 64)
    assert choose_resolution_bucket(50, 50, buckets, allow_upscale=False) is None
    assert choose_resolution_bucket(100, 70, ((128, 128), (96, 64)), allow_upscale=False) == (96, 64)
    assert cover_size(333, 250, (96, 64)) == (96, 73)
    assert cover_size(96, 64, (96, 64)) == (96, 64)
    assert crop_offsets((96, 73), (96, 64), "center") == (0, 4)
    first = crop_offsets((200, 100), (64, 64), "random", np.random.default_rng(5))
    assert first == crop_offsets((200, 100), (64, 64), "random", np.random.default_rng(5))
    assert 0 <= first[0] <= 136 and 0 <= first[1] <= 36
    with pytest.raises(ValueError, match="8n\\+1"):
        ClipSpec(frame_buckets=(24,))
    with pytest.raises(ValueError, match="multiple of 32"):
        ClipSpec(resolution_buckets=((100, 64),))


def test_nearest_frame_selection():
    source = np.arange(60) / 60.0
    np.testing.assert_array_equal(nearest_frame_indices(source, np.arange(25) / 25.0),
                                  np.round(np.arange(25) * 2.4).astype(int))
    np.testing.assert_array_equal(nearest_frame_indices(np.array([0.0, 0.1]), np.array([0.05, 0.2])), [0, 1])


@pytest.mark.parametrize("name", ["good", "fps60", "fps30", "mono_44k", "surround_51", "opus_mkv", "pcm_mov",
                                  "silent_video_with_wav", "odd_resolution", "two_audio_streams", "vfr",
                                  "audio_ends_early", "no_audio", "clipped", "too_quiet", "silent_audio"])
def test_every_decodable_corpus_clip_prepares(files, name):
    audio_path = files["good"].parent.parent / "audio" / f"{name}.wav"
    clip = prepare_clip(files[name], SPEC, audio_path=audio_path if audio_path.exists() else None, seed=1)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape[0] == 25 and clip.fps == 25.0
    assert clip.frames.shape[1:3] == (64, 96)  # every corpus clip is landscape → the 96x64 bucket
    if name == "no_audio":
        assert clip.audio is None and clip.audio_valid_samples == 0
        return
    assert clip.audio.dtype == np.float32 and clip.audio.shape == (2, 16000)
    assert np.isfinite(clip.audio).all()
    if name == "audio_ends_early":
        assert clip.audio_valid_samples == pytest.approx(0.8 * 16000, abs=16)
        assert not clip.audio[:, clip.audio_valid_samples :].any() and clip.notes
    else:
        assert clip.audio_valid_samples == 16000
    loudest = np.abs(clip.audio).max()
    assert loudest == 0.0 if name == "silent_audio" else loudest > (0.005 if name == "too_quiet" else 0.05)


def test_too_short_and_no_upscale_raise_clear_errors(files):
    with pytest.raises(MediaError, match="smallest frame bucket needs 9 frames") as caught:
        prepare_clip(files["too_short"], SPEC)
    assert caught.value.kind == "too_short" and "too_short.mp4" in str(caught.value)
    big = ClipSpec(frame_buckets=(9,), resolution_buckets=((128, 128),), allow_upscale=False)
    with pytest.raises(MediaError, match="smaller than every resolution bucket") as small:
        prepare_clip(files["good"], big)
    assert small.value.kind == "too_small"
    image = prepare_clip(files["image"], SPEC)
    assert image.frames.shape == (1, 64, 96, 3) and image.audio is None


def test_resample_picks_nearest_frames_by_timestamp(files):
    clip = prepare_clip(files["fps60"], SPEC)
    np.testing.assert_allclose(clip.source_times_s, np.round(np.arange(25) * 2.4) / 60.0, atol=1e-6)
    vfr = prepare_clip(files["vfr"], SPEC)  # source frames at irregular times: chosen by timestamp
    times = D.decode_video(files["vfr"]).times_s
    np.testing.assert_allclose(vfr.source_times_s, times[nearest_frame_indices(times, np.arange(25) / 25.0)])
    later = prepare_clip(files["fps60"], SPEC, start_s=0.5)  # clip start inside the file
    np.testing.assert_allclose(later.source_times_s, 0.5 + np.round(np.arange(25) * 2.4) / 60.0, atol=1e-6)

    # fps_override: timestamps ignored, frame i is at i / 25 s, so frames 0..24 are taken in order.
    override = prepare_clip(files["fps30"], SPEC, fps_override=25.0)
    np.testing.assert_allclose(override.source_times_s, np.arange(25) / 25.0)
    decoded = D.decode_video(files["fps30"]).frames
    np.testing.assert_array_equal(override.frames, decoded[:25])  # 96x64 source = the bucket, no crop
    assert override.source_fps == 25.0

    stretched = prepare_clip(files["fps30"], ClipSpec(frame_buckets=(25, 41), resolution_buckets=((96, 64),),
                                                      retime="stretch"))
    assert stretched.frame_bucket == 41 and stretched.audio.shape == (2, 41 * 640)
    np.testing.assert_allclose(stretched.source_times_s, np.arange(41) / 30.0, atol=1e-6)
    np.testing.assert_array_equal(stretched.frames, decoded[:41])


def write_flash_and_click(path: Path, fps: int, flash_frame: int, seconds: float = 1.6, codec: str = "aac") -> float:
    """A dark clip whose frame ``flash_frame`` is white, with a 3 ms noise click while that frame is
    shown (at the middle of its display interval). Returns the click time in seconds."""
    frames = int(round(seconds * fps))
    video = np.full((frames, 64, 96, 3), 16, dtype=np.uint8)
    video[flash_frame] = 235
    sound = np.zeros((2, int(seconds * corpus.SAMPLE_RATE)), dtype=np.float32)
    click_time = (flash_frame + 0.5) / fps
    start = int(round(click_time * corpus.SAMPLE_RATE))
    burst = np.random.default_rng(fps).uniform(-0.8, 0.8, int(0.003 * corpus.SAMPLE_RATE)).astype(np.float32)
    sound[:, start : start + burst.size] = burst
    corpus.write_media(path, video=video, fps=fps, audio=[corpus.AudioSpec(sound, codec=codec)])
    return click_time


def flash_and_click_positions(clip) -> tuple[int, int]:
    """(video frame with the flash, audio latent with the click from the LTX-2 log-mel front-end)."""
    brightness = clip.frames.reshape(clip.num_frames, -1).mean(axis=1)
    assert (brightness > 128).sum() == 1, "exactly one frame must carry the flash"
    mel = log_mel_spectrogram(torch.from_numpy(clip.audio)[None], clip.sample_rate)[0]  # [2, T_mel, 64]
    click_mel_frame = int(torch.argmax(mel.mean(dim=(0, 2))))
    return int(np.argmax(brightness)), mel_frame_to_audio_latent(click_mel_frame)


@pytest.mark.parametrize("fps", [30, 50, 60])
@pytest.mark.parametrize("codec", ["aac", "pcm_s16le"])
def test_flash_and_click_stay_aligned_after_resampling_to_25fps(tmp_path, fps, codec):
    # 0.6 s is a frame time at every rate: source frame 0.6·fps is shown at target frame 15.
    flash = int(0.6 * fps)
    path = tmp_path / f"click_{fps}.{'mp4' if codec == 'aac' else 'mov'}"
    click_time = write_flash_and_click(path, fps, flash, codec=codec)
    clip = prepare_clip(path, ClipSpec(frame_buckets=(25,), resolution_buckets=((96, 64),)))
    frame, latent = flash_and_click_positions(clip)
    assert frame == 15
    assert latent == audio_latent_index(click_time) == frame  # latent 15 covers 600-640 ms, like frame 15
    assert video_latent_index(frame) == 2 and frame in pixel_frames_of_video_latent(2)


@pytest.mark.parametrize("fps, flash", [(24, 12), (30, 18), (50, 30), (60, 36)])
def test_flash_and_click_stay_aligned_after_stretching_to_25fps(tmp_path, fps, flash):
    # Stretch keeps every source frame: the flash stays on its frame number, now shown at flash/25 s,
    # and the click, time-stretched by fps/25 with its pitch kept, moves with it.
    path = tmp_path / f"click_{fps}.mp4"
    write_flash_and_click(path, fps, flash)
    clip = prepare_clip(path, ClipSpec(frame_buckets=(25, 41), resolution_buckets=((96, 64),), retime="stretch"))
    assert clip.num_frames == (25 if fps == 24 else 41) and clip.audio.shape == (2, clip.num_frames * 640)
    frame, latent = flash_and_click_positions(clip)
    assert frame == flash
    if fps <= 30:
        assert latent == frame
    else:
        # WSOLA copies 40 ms segments at their own speed, so a transient lands up to ~20 ms early
        # when the clip is slowed down more than 2x: within one latent of its frame.
        assert abs(latent - frame) <= 1
