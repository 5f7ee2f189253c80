"""The training modes' data: audio sources, references found by stem or by speaker, the doctor's checks of them, and
the cache entries (stand-in, reference latents, fingerprints). Media are synthesised here (PyAV), encoders are the
tiny random ones."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ltx2_av_trainer.trainer.config import Config
from ltx2_av_trainer.trainer.data.dataset import scan_dataset
from ltx2_av_trainer.trainer.data.doctor import diagnose
from ltx2_av_trainer.trainer.data.media.encode import write_av_file, write_wav
from ltx2_av_trainer.trainer.data.synth import make_demo_dataset
from ltx2_av_trainer.trainer.data.synth_modes import make_audio_dataset, make_reference_folder

SIZE = 64


def config_for(source: dict, **dataset) -> Config:
    return Config.from_dict({"dataset": {"sources": [source], "frames": 9, "width": SIZE, "height": SIZE, **dataset},
                             "model": {"source": "tiny"}})


def codes(entry) -> set[str]:
    return {issue.code for issue in entry.issues}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("mode_data")
    clips = make_demo_dataset(root / "clips", clips_per_speaker=3, seconds=0.8, width=SIZE, height=SIZE)
    make_reference_folder(clips, root / "references")
    return root, clips


def test_ic_references_are_matched_by_stem_and_checked(clips, tmp_path):
    root, media = clips
    references = tmp_path / "references"
    shutil.copytree(root / "references", references)
    (references / f"{media[2].stem}.mp4").unlink()  # one clip without a reference
    write_av_file(references / "stray.mp4", np.zeros((9, SIZE, SIZE, 3), np.uint8), 25, None, 48000)
    grey = np.zeros((5, SIZE, SIZE, 3), np.uint8)  # 0.2 s: shorter than reference_frames
    write_av_file(references / f"{media[1].stem}.mp4", grey, 25, None, 48000)
    config = config_for({"path": str(root / "clips"), "reference_dir": str(references)}, reference_frames=9)

    scan = scan_dataset(config.dataset)
    by_stem = {item.media_path.stem: item for item in scan.items}
    assert by_stem[media[0].stem].reference_path.name == f"{media[0].stem}.png"  # an image reference
    assert by_stem[media[2].stem].reference_path is None
    assert any("stray.mp4" in p.message for p in scan.problems)  # a reference that matches no clip

    entries = {entry.path: entry for entry in diagnose(config.dataset).entries}
    assert entries[str(media[0])].ok and entries[str(media[0])].reference.endswith(".png")
    assert "reference_too_short" in codes(entries[str(media[1])]) and not entries[str(media[1])].ok
    assert "no_reference" in codes(entries[str(media[2])]) and not entries[str(media[2])].ok


def test_reference_audio_by_stem_or_another_clip_of_the_speaker(clips, tmp_path):
    root, media = clips
    voices = tmp_path / "voices"
    voices.mkdir()
    rng = np.random.default_rng(0)
    write_wav(voices / f"{media[0].stem}.wav", 0.3 * rng.standard_normal((2, 48000 * 6)).astype(np.float32), 48000)
    write_wav(voices / f"{media[1].stem}.wav", 0.3 * rng.standard_normal((2, 24000)).astype(np.float32), 48000)  # 0.5 s
    write_wav(voices / f"{media[2].stem}.wav", np.zeros((2, 48000 * 6), np.float32), 48000)  # silent
    config = config_for({"path": str(root / "clips"), "reference_audio_dir": str(voices)})
    entries = {entry.path: entry for entry in diagnose(config.dataset).entries}
    assert entries[str(media[0])].ok and entries[str(media[0])].reference_audio_seconds == pytest.approx(6.0, abs=0.01)
    assert "reference_audio_short" in codes(entries[str(media[1])]) and entries[str(media[1])].ok  # used whole
    assert "reference_audio_silent" in codes(entries[str(media[2])])

    same = config_for({"path": str(root / "clips")}, reference_audio_same_speaker=True)
    items = sorted(scan_dataset(same.dataset).items, key=lambda i: str(i.media_path))
    assert [i.reference_audio_path for i in items] == [items[1].media_path, items[2].media_path, items[0].media_path]

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(media[0], alone / media[0].name)
    single = config_for({"path": str(alone)}, reference_audio_same_speaker=True)
    (entry,) = diagnose(single.dataset).entries
    assert "no_reference_audio" in codes(entry) and "no other clip of the speaker" in entry.problems[-1]


def test_audio_sources_list_their_sound_and_the_doctor_checks_its_length(tmp_path):
    files = make_audio_dataset(tmp_path / "voice", clips=3, seconds=0.8)
    write_wav(tmp_path / "voice" / "blip.wav", np.zeros((2, 4800), np.float32) + 0.1, 48000)  # 0.1 s
    config = config_for({"path": str(tmp_path / "voice"), "kind": "audio"})
    items = scan_dataset(config.dataset).items
    assert {i.media_path.name for i in items} == {f.name for f in files} | {"blip.wav"}
    assert all(i.is_audio_only and i.audio_path is None for i in items)
    entries = {entry.path: entry for entry in diagnose(config.dataset).entries}
    for file in files:  # wav files and a video's sound
        assert entries[str(file)].ok and entries[str(file)].has_audio and entries[str(file)].frame_bucket == 9
    assert "too_short" in codes(entries[str(tmp_path / "voice" / "blip.wav")])


def test_cache_stores_stand_ins_and_reference_latents_with_fingerprints(clips, tmp_path):
    from ltx2_av_trainer.trainer.app.pipeline import build_headless_encoders, cache_dataset
    from ltx2_av_trainer.trainer.data.cache import load_training_samples, manifest_entries

    root, media = clips
    references = tmp_path / "references"
    shutil.copytree(root / "references", references)
    config = Config.from_dict({
        "dataset": {"sources": [{"path": str(root / "clips"), "reference_dir": str(references)},
                                {"path": str(make_audio_dataset(tmp_path / "voice", clips=2, seconds=0.8)[0].parent),
                                 "kind": "audio"}],
                    "frames": 9, "width": SIZE, "height": SIZE, "reference_frames": 9, "reference_downscale": 2,
                    "reference_audio_same_speaker": True, "reference_audio_seconds": 0.6},
        "cache": {"dir": str(tmp_path / "cache")}, "model": {"source": "tiny"},
    })
    encoders = build_headless_encoders(config)
    first = cache_dataset(config, encoders, quiet=True)
    assert first["failed"] == 0 and first["video_encoded"] == 5
    samples, problems = load_training_samples(tmp_path / "cache", expect_audio=True)
    assert not problems
    clip_samples = [s for s in samples if not s.audio_only]
    stand_ins = [s for s in samples if s.audio_only]
    assert len(clip_samples) == 3 and len(stand_ins) == 2
    for sample in clip_samples:
        assert tuple(sample.reference_video.shape) == (128, 2, 1, 1)  # 9 frames at half of 64 px
        assert tuple(sample.reference_audio.shape) == (8, 16, 16)  # 0.6 s of the next clip: 1 + 9600 // 160 mel → 16
    for sample in stand_ins:
        assert sample.video.abs().sum() == 0 and tuple(sample.video.shape) == (128, 2, 2, 2)
        assert sample.reference_video is None and sample.audio is not None

    # A changed reference re-encodes exactly its clip; the entry records its reference's shape.
    write_av_file(references / f"{media[1].stem}.mp4", np.full((12, SIZE, SIZE, 3), 200, np.uint8), 25, None, 48000)
    second = cache_dataset(config, encoders, quiet=True)
    assert second["video_encoded"] == 1 and second["reused"] == 4
    assert all(e.reference_shape == [128, 2, 1, 1] for e in manifest_entries(tmp_path / "cache") if not e.audio_only)
