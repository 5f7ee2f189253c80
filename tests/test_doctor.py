"""Dataset listing and the dataset doctor, on the synthesised corpus of good and broken media."""

from __future__ import annotations

import json
import os
from pathlib import Path

import media_corpus as corpus
import numpy as np
import pytest
from ltx2_av_trainer.trainer.config import DatasetConfig, DatasetSource
from ltx2_av_trainer.trainer.data.dataset import (
    DatasetError,
    apply_trigger,
    enumerate_dataset,
    read_caption,
    scan_dataset,
    training_items,
)
from ltx2_av_trainer.trainer.config import Config
from ltx2_av_trainer.trainer.data.audio_verdict import NOT_VOICE
from ltx2_av_trainer.trainer.data.cache import prepare_for_cache
from ltx2_av_trainer.trainer.data.doctor import diagnose, run_doctor
from ltx2_av_trainer.trainer.io_utils import TMP_PREFIX
from ltx2_av_trainer.trainer.data.media.timing import prepare_item

CONTRACT_FIELDS = ["path", "ok", "has_audio", "audio_seconds", "video_seconds", "fps", "frames", "sample_rate",
                   "channels", "loudness_lufs", "peak_dbfs", "clipped_fraction", "silence_fraction", "caption",
                   "caption_has_trigger", "problems"]


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    corpus.build_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def files(corpus_folder) -> dict[str, Path]:
    names = {path.stem: path for path in (corpus_folder / "clips").iterdir() if path.suffix != ".txt"}
    return {**{n: names[n] for n in corpus.EXPECTED if n in names},
            "duplicate": names["good_copy"], "image": corpus_folder / "images" / "portrait.png"}


@pytest.fixture(scope="module")
def report(corpus_folder):
    return diagnose(corpus.corpus_dataset_config(corpus_folder))


def entry_for(report, path: Path):
    matches = [e for e in report.entries if e.path == str(path)]
    assert len(matches) == 1, f"{path} must have exactly one doctor entry"
    return matches[0]


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def test_captions_and_trigger(tmp_path):
    assert apply_trigger("a man talks", "ohwx", "{trigger}, {caption}") == "ohwx, a man talks"
    assert apply_trigger("ohwx, a man talks", "ohwx", "{trigger}, {caption}") == "ohwx, a man talks"
    assert apply_trigger("Ohwx talks", "ohwx", "{trigger}, {caption}") == "Ohwx talks"  # no double prefix
    assert apply_trigger("a photo of ohwx", "ohwx", "{trigger}, {caption}") == "a photo of ohwx"
    assert apply_trigger("ohwxyz talks", "ohwx", "{trigger}, {caption}") == "ohwx, ohwxyz talks"  # whole word
    assert apply_trigger("uses {caption} and {trigger}", "ohwx", "[{trigger}] {caption}") == \
        "[ohwx] uses {caption} and {trigger}"  # braces in captions are never substituted
    assert apply_trigger("", "ohwx", "{trigger}, {caption}") == "ohwx"
    assert apply_trigger("a man talks", "", "{trigger}, {caption}") == "a man talks"

    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffohwx,\n  two   lines\n".encode("utf-8"))
    assert read_caption(path) == ("ohwx, two lines", [])
    path.write_bytes("caf\u00e9".encode("latin-1"))
    text, problems = read_caption(path)
    (severity, code, message), = problems
    assert text == "" and (severity, code) == ("error", "caption_not_utf8")
    assert "not valid UTF-8" in message and str(path) in message
    path.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00")  # a zip saved as the caption: valid UTF-8, not text
    assert read_caption(path)[1][0][:2] == ("error", "caption_binary")
    path.write_bytes(b"  \n")
    assert read_caption(path)[1][0][:2] == ("warning", "caption_empty")
    assert read_caption(tmp_path / "none.txt")[1][0][:2] == ("warning", "caption_missing")


def test_folder_listing_with_audio_dir_images_weights_and_validation(corpus_folder):
    config = corpus.corpus_dataset_config(corpus_folder)
    config.sources[0].repeats, config.sources[0].audio_loss_weight = 3, 0.5
    config.sources[1].is_validation = True
    items = enumerate_dataset(config)
    by_name = {item.media_path.name: item for item in items}
    assert len(items) == len(corpus.EXPECTED)  # every media file once, captions and wav not listed
    good = by_name["good.mp4"]
    assert good.caption == corpus.GOOD_CAPTION and good.caption_has_trigger and good.problems == []
    assert good.caption_path == good.media_path.with_suffix(".txt") and good.audio_path is None
    assert (good.repeats, good.video_loss_weight, good.audio_loss_weight) == (3, 1.0, 0.5)
    assert by_name["silent_video_with_wav.mp4"].audio_path == corpus_folder / "audio" / "silent_video_with_wav.wav"
    image = by_name["portrait.png"]
    assert image.is_image and image.is_validation and image.audio_path is None and image.audio_loss_weight == 0.0
    assert by_name["no_trigger.mp4"].caption == "ohwx, a person speaks to the camera"
    assert not by_name["no_trigger.mp4"].caption_has_trigger
    assert "not valid UTF-8" in by_name["latin1_caption.mp4"].caption_error
    assert by_name["latin1_caption.mp4"].caption == "ohwx"  # never the garbage text
    assert "does not exist" in by_name["missing_caption.mp4"].caption_problems[0][2]
    assert by_name["missing_caption.mp4"].caption_error is None
    assert by_name["missing_caption.mp4"].caption == "ohwx"
    assert len(training_items(items)) == 3 * (len(items) - 1)  # repeats applied, validation left out


def test_validation_split_is_deterministic_by_path(corpus_folder):
    config = corpus.corpus_dataset_config(corpus_folder, validation_split=0.5)
    first = {i.key: i.is_validation for i in enumerate_dataset(config)}
    again = {i.key: i.is_validation for i in enumerate_dataset(config)}
    assert first == again and 0 < sum(first.values()) < len(first)
    config.sources = config.sources[:1]  # removing a source does not move the others' items
    assert {i.key: i.is_validation for i in enumerate_dataset(config)} == {k: v for k, v in first.items()
                                                                          if k.startswith("0:")}


def test_jsonl_source(tmp_path, corpus_folder):
    clips = corpus_folder / "clips"
    listing = tmp_path / "list" / "data.jsonl"
    listing.parent.mkdir()
    rows = [
        json.dumps({"media": os.path.relpath(clips / "good.mp4", listing.parent), "caption": "a woman laughs"}),
        json.dumps({"media": str(clips / "no_audio.mp4"), "caption": "ohwx waves",
                    "audio": str(corpus_folder / "audio" / "silent_video_with_wav.wav")}),
        json.dumps({"media": str(clips / "pcm_mov.mov")}),  # no caption key: the sidecar is read
        "{not json",
        json.dumps({"caption": "no media"}),
        json.dumps({"media": "missing.mp4", "caption": "x", "audio": "nope.wav"}),
    ]
    listing.write_text("\n".join(rows) + "\n", encoding="utf-8")
    scan = scan_dataset(DatasetConfig(sources=[DatasetSource(path=str(listing), kind="jsonl")]))
    assert [i.media_path.name for i in scan.items] == ["good.mp4", "no_audio.mp4", "pcm_mov.mov", "missing.mp4"]
    assert scan.items[0].media_path.resolve() == (clips / "good.mp4").resolve()  # relative to the JSONL
    assert scan.items[0].caption == "ohwx, a woman laughs" and scan.items[0].caption_path is None
    assert scan.items[1].audio_path.name == "silent_video_with_wav.wav"
    assert scan.items[2].caption == corpus.GOOD_CAPTION
    assert scan.items[3].media_path == listing.parent / "missing.mp4"
    assert "nope.wav" in scan.items[3].problems[0] and scan.items[3].audio_path is None
    assert [p.severity for p in scan.problems] == ["error", "error"]
    assert "line 4" in scan.problems[0].message and "line 5" in scan.problems[1].message
    with pytest.raises(DatasetError, match="line 4"):
        enumerate_dataset(DatasetConfig(sources=[DatasetSource(path=str(listing), kind="jsonl")]))


def test_source_problems_are_specific(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        enumerate_dataset(DatasetConfig(sources=[DatasetSource(path=str(tmp_path / "nowhere"))]))
    with pytest.raises(DatasetError, match="sources is empty"):
        enumerate_dataset(DatasetConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no video files found"):
        enumerate_dataset(DatasetConfig(sources=[DatasetSource(path=str(tmp_path / "empty"))]))
    with pytest.raises(DatasetError, match="audio_dir 'sounds' is not a folder"):
        enumerate_dataset(DatasetConfig(sources=[DatasetSource(path=str(tmp_path / "empty"), audio_dir="sounds")]))

    folder = tmp_path / "mixed"
    corpus.talking_clip(folder / "a.mp4", seconds=0.4)
    corpus.write_png(folder / "still.png", corpus.moving_picture(1)[0])
    audio = tmp_path / "audio"
    for name in ("a.wav", "a.flac", "orphan.wav"):
        codec = "pcm_s16le" if name.endswith("wav") else "flac"
        corpus.write_media(audio / name, audio=[corpus.AudioSpec(corpus.stereo(corpus.tone(0.3, 200.0)), codec=codec)])
    scan = scan_dataset(DatasetConfig(sources=[DatasetSource(path=str(folder), audio_dir=str(audio))]))
    assert [i.media_path.name for i in scan.items] == ["a.mp4"]
    assert "several audio files match a.mp4" in scan.items[0].problems[-1]
    messages = " | ".join(p.message for p in scan.problems)
    assert "1 image file(s) are ignored" in messages and "still.png" in messages
    assert "match no media file" in messages and "orphan.wav" in messages
    assert all(p.severity == "warning" for p in scan.problems)

    corpus.write_media(folder / "a.wav", audio=[corpus.AudioSpec(corpus.stereo(corpus.tone(0.3, 200.0)),
                                                                  codec="pcm_s16le")])
    loose = scan_dataset(DatasetConfig(sources=[DatasetSource(path=str(folder))]))
    assert loose.items[0].audio_path is None
    assert any("lie among the media but are not used" in p.message and "a.wav" in p.message for p in loose.problems)
    paired = scan_dataset(DatasetConfig(sources=[DatasetSource(path=str(folder), audio_dir=str(folder))]))
    assert paired.items[0].audio_path == folder / "a.wav"
    assert not any("not used" in p.message for p in paired.problems)


# --------------------------------------------------------------------------------------------
# Doctor
# --------------------------------------------------------------------------------------------


def test_every_corpus_item_is_reported_with_its_problem(report, files):
    assert len(report.entries) == len(corpus.EXPECTED)
    for name, (severity, words) in corpus.EXPECTED.items():
        entry = entry_for(report, files[name])
        if severity is None:
            assert entry.ok and entry.problems == [], f"{name} should be clean: {entry.problems}"
            continue
        text = " ".join(entry.problems).lower()
        for word in words:
            assert word.lower() in text, f"{name}: expected {word!r} in {entry.problems}"
        assert entry.ok == (severity == "warning"), f"{name}: {entry.problems}"
        if severity == "error":
            assert entry.errors and all(issue.message in entry.problems for issue in entry.errors)
        else:
            assert entry.warnings and not entry.errors


def test_entries_carry_measurements(report, files):
    good = entry_for(report, files["good"])
    assert good.has_audio and good.fps == 25 and good.frames == 40 and good.video_seconds == pytest.approx(1.6)
    assert (good.sample_rate, good.channels) == (48000, 2) and good.audio_seconds == pytest.approx(1.6, abs=0.01)
    assert -24 < good.loudness_lufs < -14 and -20 < good.peak_dbfs < 0
    assert good.clipped_fraction == 0.0 and good.silence_fraction < 0.4 and good.speech_seconds > 0.8
    assert good.caption == corpus.GOOD_CAPTION and good.caption_has_trigger
    assert good.frame_bucket == 25 and good.resolution_bucket == [96, 64]
    mono = entry_for(report, files["mono_44k"])
    assert (mono.sample_rate, mono.channels) == (44100, 1)
    separate = entry_for(report, files["silent_video_with_wav"])
    assert separate.has_audio and separate.audio_path.endswith("silent_video_with_wav.wav")
    assert separate.sample_rate == 24000
    assert entry_for(report, files["fps60"]).fps == 60
    assert entry_for(report, files["odd_resolution"]).width == 333
    no_audio = entry_for(report, files["no_audio"])
    assert not no_audio.has_audio and no_audio.loudness_lufs is None
    silent = entry_for(report, files["silent_audio"])
    assert silent.loudness_lufs is None and silent.silence_fraction == 1.0 and silent.peak_dbfs is None
    assert entry_for(report, files["clipped"]).clipped_fraction > 0.01
    assert entry_for(report, files["too_quiet"]).loudness_lufs < -35
    early = entry_for(report, files["audio_ends_early"])
    assert early.audio_seconds == pytest.approx(0.8, abs=0.01) and early.video_seconds == pytest.approx(1.6)
    assert str(files["good"]) in entry_for(report, files["duplicate"]).problems[0]
    image = entry_for(report, files["image"])
    assert image.ok and image.is_image and image.frames == 1 and not image.has_audio


def test_summary_counts(report):
    s = report.summary
    assert s.items == len(corpus.EXPECTED)
    errors = sum(1 for sev, _ in corpus.EXPECTED.values() if sev == "error")
    assert (s.ok, s.with_errors) == (s.items - errors, errors)
    assert s.with_warnings == sum(1 for sev, _ in corpus.EXPECTED.values() if sev == "warning")
    assert s.images == 1 and s.with_audio == sum(e.has_audio for e in report.entries)
    assert 0 < s.usable_speech_seconds <= s.speech_seconds
    usable = sum(e.speech_seconds or 0 for e in report.entries if e.ok)
    assert s.usable_speech_seconds == pytest.approx(usable, abs=1e-3)
    assert s.issues_by_code["truncated"] == 1 and s.issues_by_code["duplicate"] == 1


def test_json_and_text_rendering(report, files, tmp_path):
    data = json.loads(report.to_json())
    assert len(data["items"]) == len(corpus.EXPECTED)
    for item in data["items"]:
        assert list(item)[: len(CONTRACT_FIELDS)] == CONTRACT_FIELDS
        assert all(isinstance(p, str) for p in item["problems"])
    silent = next(i for i in data["items"] if i["path"] == str(files["silent_audio"]))
    assert silent["peak_dbfs"] is None and silent["loudness_lufs"] is None  # never -inf/NaN in JSON
    text = report.to_text()
    for name, (severity, _) in corpus.EXPECTED.items():
        if severity is not None:
            assert str(files[name]) in text
    assert "ERROR" in text and "the file is truncated" in text.lower()


def test_strict_mode_and_run_doctor_writes_json_atomically(corpus_folder, tmp_path):
    config = corpus.corpus_dataset_config(corpus_folder)
    out = tmp_path / "reports" / "doctor.json"
    calls = []
    strict = run_doctor(config, json_path=out, strict=True, progress=lambda *a: calls.append(a))
    assert calls[0][:2] == (0, len(corpus.EXPECTED)) and calls[-1][:2] == (len(corpus.EXPECTED),) * 2
    assert strict.exit_code == 1 and strict.has_errors
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(strict.to_json())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert run_doctor(config).exit_code == 0  # not strict: errors are reported, usable items remain

    clean = DatasetConfig(sources=[DatasetSource(path=str(tmp_path / "clean"))], trigger="ohwx", frames=25,
                          frame_buckets=[], width=64, height=64)
    corpus.talking_clip(tmp_path / "clean" / "one.mp4", seconds=1.2)
    corpus.write_caption(tmp_path / "clean" / "one.mp4", "ohwx talks")
    assert diagnose(clean, strict=True).exit_code == 0

    broken = DatasetConfig(sources=[DatasetSource(path=str(tmp_path / "missing"))])
    nothing = diagnose(broken)
    assert nothing.exit_code == 1 and "does not exist" in nothing.dataset_problems[0].message
    assert "does not exist" in nothing.to_text()


def test_thresholds_are_configurable(corpus_folder, files):
    strict_quiet = diagnose(corpus.corpus_dataset_config(corpus_folder, audio_quiet_lufs=-10.0))
    assert any("too quiet" in p for p in entry_for(strict_quiet, files["good"]).problems)
    short = diagnose(corpus.corpus_dataset_config(corpus_folder, audio_min_seconds=5.0))
    assert [i.code for i in entry_for(short, files["good"]).errors] == ["audio_too_short"]


def test_doctor_ok_items_prepare_and_error_items_do_not(report, corpus_folder):
    """The doctor's verdict matches what the cache will meet: every ok item turns into a clip."""
    config = corpus.corpus_dataset_config(corpus_folder)
    items = {str(i.media_path): i for i in enumerate_dataset(config)}
    for entry in report.entries:
        item = items[entry.path]
        if not entry.ok and all(i.code in NOT_VOICE for i in entry.errors):
            # Only the audio verdict failed: the clip is cached audio-free, with the doctor's reason.
            prepared = prepare_for_cache(item, Config(dataset=config))
            assert prepared.audio is None and "not voice supervision" in prepared.audio_problem
        elif entry.ok:
            clip = prepare_item(item, config, seed=0)
            assert clip.num_frames == entry.frame_bucket
            assert list(clip.resolution_bucket) == entry.resolution_bucket
            assert (clip.audio is not None) == entry.has_audio
            if clip.audio is not None:
                assert np.isfinite(clip.audio).all()
        elif any(i.code.startswith("caption_") for i in entry.errors):
            assert item.caption_error and item.caption == "ohwx"  # the cache fails it; never encodes garbage
        else:
            with pytest.raises(Exception) as caught:
                prepare_item(item, config, seed=0)
            assert entry.path in str(caught.value)


def test_doctor_reports_unused_audio_settings(corpus_folder, files):
    config = corpus.corpus_dataset_config(corpus_folder)
    config.sources[0].audio_stream = 1
    report = diagnose(config)
    two = entry_for(report, files["two_audio_streams"])
    assert two.ok and two.audio_stream == 1 and "stream 1" in two.problems[0]
    good = entry_for(report, files["good"])
    assert not good.ok and "audio_stream=1 does not exist" in " ".join(good.problems)
    config.with_audio = False
    silent = entry_for(diagnose(config), files["silent_audio"])
    assert silent.ok and silent.problems == [] and silent.loudness_lufs is None


def test_doctor_flags_what_stretch_retiming_cannot_do(corpus_folder, files):
    config = corpus.corpus_dataset_config(corpus_folder, target_fps=12.0)
    config.retime = "stretch"  # not a DatasetConfig field yet: read with getattr, see ClipSpec.from_config
    report = diagnose(config)
    fps60 = entry_for(report, files["fps60"])
    assert not fps60.ok and "x5.00" in fps60.problems[0]
    fps30 = entry_for(report, files["fps30"])
    assert fps30.ok and fps30.frame_bucket == 25  # stretch keeps all 48 source frames


def test_broken_separate_audio_file_is_an_error_naming_that_file(tmp_path):
    corpus.talking_clip(tmp_path / "clips" / "a.mp4", seconds=1.2)
    corpus.write_caption(tmp_path / "clips" / "a.mp4", "ohwx talks")
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(b"")
    report = diagnose(DatasetConfig(sources=[DatasetSource(path=str(tmp_path / "clips"), audio_dir="../audio")],
                                    frames=9))
    (entry,) = report.entries
    assert not entry.ok and entry.audio_path == str(tmp_path / "clips" / "../audio" / "a.wav")
    assert "a.wav" in entry.problems[0] and "empty (0 bytes)" in entry.problems[0]
