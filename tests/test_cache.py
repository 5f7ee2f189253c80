"""The latent cache over the synthesised test corpus: bad items named, good ones cached, exact invalidation,
validation before training, source-free training, and the CLI path (doctor → cache → train → verify → sample)."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from ltx2_av_trainer.trainer.data.cache import load_training_samples, manifest_entries, validate_entry
from ltx2_av_trainer.trainer.config import Config
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file
from ltx2_av_trainer.trainer.app.pipeline import build_headless_encoders, cache_dataset

from media_corpus import AUDIO_FREE, EXPECTED, build_corpus, corpus_dataset_config

UNUSABLE = {name for name, (severity, _) in EXPECTED.items() if severity == "error"} - AUDIO_FREE


def _config(tmp_path, corpus_dir, **dataset_overrides) -> Config:
    dataset = corpus_dataset_config(corpus_dir, **dataset_overrides)
    return Config.from_dict({
        "dataset": dataclasses.asdict(dataset),
        "cache": {"dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "run")},
        "train": {"steps": 3, "mixed_precision": "fp32", "device": "cpu"},
        "network": {"rank": 4, "alpha": 4.0},
    })


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, build_corpus(folder)


@pytest.fixture(scope="module")
def first_cache(tmp_path_factory, corpus):
    folder, paths = corpus
    tmp = tmp_path_factory.mktemp("cache_run")
    config = _config(tmp, folder)
    encoders = build_headless_encoders(config)
    summary = cache_dataset(config, encoders, quiet=True)
    return config, encoders, summary, paths


def test_every_bad_item_is_named_and_every_good_one_cached(first_cache):
    config, _, summary, paths = first_cache
    failed_paths = {f["path"] for f in summary["failures"] if not f["reason"].startswith("audio:")}
    for name in UNUSABLE:
        assert str(paths[name]) in failed_paths, f"{name} not reported"
        reason = next(f["reason"] for f in summary["failures"] if f["path"] == str(paths[name]))
        assert str(paths[name].name) in reason or str(paths[name].stem) + ".txt" in reason or "truncated" in reason \
            or "empty" in reason or "decode" in reason
    entries = {e.media: e for e in manifest_entries(config.cache.dir)}
    for name, path in paths.items():
        if name in UNUSABLE:
            assert str(path) not in entries, f"{name} is unusable but was cached"
        else:
            assert str(path) in entries, f"{name} was not cached"
    # Audio-less clips are cached video-only and counted as audio failures with the reason.
    no_audio = entries[str(paths["no_audio"])]
    assert not no_audio.has_audio and "no audio" in no_audio.audio_problem
    audio_failures = [f for f in summary["failures"] if f["reason"].startswith("audio:")]
    assert any(str(paths["no_audio"]) in f["path"] for f in audio_failures)
    assert summary["audio_failed"] == len(UNUSABLE) + len(audio_failures)
    # The doctor's verdict: silent audio is cached audio-free, with the reason, never as supervision.
    silent = entries[str(paths["silent_audio"])]
    assert not silent.has_audio and "silent" in silent.audio_problem and "not voice supervision" in silent.audio_problem
    assert any(f["path"] == str(paths["silent_audio"]) and "silent" in f["reason"] for f in audio_failures)
    # The separate wav gives the silent video its audio; images carry none and are not audio failures.
    assert entries[str(paths["silent_video_with_wav"])].has_audio
    assert not entries[str(paths["image"])].has_audio
    assert not any(str(paths["image"]) in f["path"] for f in summary["failures"])


def test_audio_is_fp32_and_entries_validate(first_cache):
    config, _, _, _ = first_cache
    for entry in manifest_entries(config.cache.dir):
        assert validate_entry(config.cache.dir, entry, expect_audio=True) == []
        if entry.has_audio:
            with safe_open(f"{config.cache.dir}/{entry.file}", framework="pt") as fh:
                audio = fh.get_tensor("audio_latent")
                assert audio.dtype == torch.float32 and audio.shape[0] == 8 and audio.shape[2] == 16
                assert 0 < int(fh.get_tensor("audio_valid_frames")) <= audio.shape[1]


def test_second_run_encodes_nothing_and_one_caption_change_reencodes_one(tmp_path, corpus):
    folder, paths = corpus
    work = tmp_path / "corpus"
    shutil.copytree(folder, work)
    config = _config(tmp_path, work)
    encoders = build_headless_encoders(config)
    first = cache_dataset(config, encoders, quiet=True)
    second = cache_dataset(config, encoders, quiet=True)
    assert second["video_encoded"] == 0 and second["audio_encoded"] == 0
    assert second["reused"] == first["entries"]
    caption = work / "clips" / (paths["good"].stem + ".txt")
    caption.write_text(caption.read_text(encoding="utf-8") + " She smiles.", encoding="utf-8")
    third = cache_dataset(config, encoders, quiet=True)
    assert third["video_encoded"] == 1 and third["invalidated"] == 1 and third["reused"] == first["entries"] - 1


def test_invalid_entries_are_reencoded_never_used(tmp_path, corpus):
    folder, _ = corpus
    config = _config(tmp_path, folder)
    encoders = build_headless_encoders(config)
    cache_dataset(config, encoders, quiet=True)
    entries = [e for e in manifest_entries(config.cache.dir) if e.has_audio]
    victim = tmp_path / "cache" / entries[0].file
    victim.write_bytes(victim.read_bytes()[:200])  # truncated by a crash or a full disk
    samples, problems = load_training_samples(config.cache.dir, expect_audio=True)
    assert any(entries[0].file in p for p in problems)
    assert entries[0].id not in {s.id for s in samples}
    again = cache_dataset(config, encoders, quiet=True)
    assert again["invalidated"] == 1 and again["video_encoded"] == 1
    assert load_training_samples(config.cache.dir, expect_audio=True)[1] == []


def test_stale_cache_without_audio_is_invalidated(tmp_path, corpus):
    """A cache built video-only (old runs) must not be used for an audio run: re-encoded, not trusted."""
    folder, _ = corpus
    video_only = _config(tmp_path, folder, with_audio=False)
    encoders = build_headless_encoders(video_only)
    cache_dataset(video_only, encoders, quiet=True)
    with_audio = _config(tmp_path, folder)
    summary = cache_dataset(with_audio, encoders, quiet=True)
    assert summary["audio_encoded"] > 0 and summary["invalidated"] > 0 and summary["reused"] == 0


CLI_TOML = """
[model]
version = "{version}"

[[dataset.sources]]
path = "{clips}"

[dataset]
trigger = "ohwx"
frames = 9
width = 64
height = 64

[cache]
dir = "{cache}"

[network]
rank = 4
alpha = 4.0

[train]
steps = 4
mixed_precision = "fp32"
device = "cpu"

[output]
dir = "{run}"
save_every = 2
"""


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_cli_doctor_cache_train_verify_sample_source_free(tmp_path, version, capsys):
    from ltx2_av_trainer.trainer.app.cli import main
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    clips = tmp_path / "clips"
    make_demo_dataset(clips, clips_per_speaker=3, seconds=0.6, width=64, height=64)
    toml = tmp_path / "run.toml"
    toml.write_text(CLI_TOML.format(version=version, clips=clips, cache=tmp_path / "cache", run=tmp_path / "run"), encoding="utf-8")
    assert main(["doctor", "--config", str(toml), "--strict", "--json", str(tmp_path / "doctor.json")]) == 0
    assert main(["cache", "--config", str(toml), "--json", str(tmp_path / "cache.json")]) == 0
    out = capsys.readouterr().out
    assert "Audio latent caching: 3 encoded, 0 failed" in out
    assert json.loads(out.strip().splitlines()[-1]) == {"video_encoded": 3, "audio_encoded": 3, "audio_failed": 0, "reused": 0, "invalidated": 0}
    shutil.rmtree(clips)  # source-free: training needs only the cache
    assert main(["train", "--config", str(toml), "--quiet", "--json", str(tmp_path / "train.json")]) == 0
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["steps"] == 4 and report["with_audio"] and "a2v" in report["adapted_groups"]
    lora = report["files"]["lora"][-1]
    assert main(["verify", lora, "--config", str(toml), "--json", str(tmp_path / "verify.json")]) == 0
    assert json.loads((tmp_path / "verify.json").read_text())["ok"] is True
    assert main(["sample", "--config", str(toml), "--lora", lora, "--prompt", "ohwx speaks", "--out", str(tmp_path / "s"),
                 "--sample-steps", "2"]) == 0
    assert (tmp_path / "s" / "lora.mp4").is_file() and (tmp_path / "s" / "base.wav").is_file()


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    from ltx2_av_trainer.trainer.app.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.stepz" in err[0]
    empty = tmp_path / "empty.toml"
    empty.write_text("[output]\ndir = 'x'\n", encoding="utf-8")
    assert main(["cache", "--config", str(empty)]) == 2
    assert "dataset.sources is empty" in capsys.readouterr().err
    nocache = tmp_path / "nocache.toml"
    nocache.write_text(f"[cache]\ndir = '{tmp_path / 'none'}'\n", encoding="utf-8")
    assert main(["train", "--config", str(nocache)]) == 2
    assert "run `ltx2-av-trainer cache" in capsys.readouterr().err


OPTIONS_TOML = CLI_TOML + """
[audio]
missing_audio = "audio_dop"

[preservation]
dop = true
dop_class_prompt = "a person speaking"
blank = true

[validation]
every_steps = 2
sample_every_steps = 2
sample_steps = 2
"""


def test_pipeline_wires_encoder_backed_options(tmp_path):
    """Options that need the encoders (encoded silence, preservation prompts, connector inputs, validation
    samples with voice scores) work through `cache` + `train` on the headless backend, ending with report.html."""
    from ltx2_av_trainer.trainer.app.cli import main
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    clips = tmp_path / "clips"
    make_demo_dataset(clips, clips_per_speaker=4, seconds=0.6, width=64, height=64)
    toml = tmp_path / "run.toml"
    text = OPTIONS_TOML.format(version="2.0", clips=clips, cache=tmp_path / "cache", run=tmp_path / "run")
    text = text.replace('[network]\nrank = 4', '[network]\nconnectors = "audio"\nrank = 4')
    text = text.replace('height = 64\n', 'height = 64\nvalidation_split = 0.5\n', 1)
    toml.write_text(text, encoding="utf-8")
    assert main(["cache", "--config", str(toml), "--quiet"]) == 0
    entries = manifest_entries(tmp_path / "cache")
    assert any(e.is_validation for e in entries) and any(not e.is_validation for e in entries)
    with safe_open(str(tmp_path / "cache" / entries[0].file), framework="pt") as fh:
        assert {"features_video", "features_audio", "features_mask"} <= set(fh.keys())
    assert main(["train", "--config", str(toml), "--quiet"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("val_loss_video") is not None for r in rows)
    assert all(r.get("loss_dop") is not None and r.get("loss_blank") is not None for r in rows)
    validation = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [2, 4]
    assert (run / "report.html").is_file()
    tensors, _ = read_adapter_file(sorted((run / "lora").glob("*.safetensors"))[-1])
    assert any(k.startswith("diffusion_model.audio_embeddings_connector.") for k in tensors)
