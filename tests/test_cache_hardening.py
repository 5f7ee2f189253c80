"""The cache never loses finished work (kill -9 and Ctrl-C mid-run), never reads or deletes outside its folder,
fails only the bad item, and its counts and exit codes agree with each other and with the doctor."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.data.cache import JOURNAL, MANIFEST, manifest_entries
from media_corpus import moving_picture, write_media

TOML = """
[[dataset.sources]]
path = "{clips}"
kind = "{kind}"

[dataset]
frames = 9
width = 64
height = 64

[cache]
dir = "{cache}"

[output]
dir = "{run}"
"""


def _toml(folder: Path, clips: Path, cache: Path, kind: str = "video") -> Path:
    path = folder / f"{cache.name}.toml"
    path.write_text(TOML.format(clips=clips, cache=cache, run=folder / "run", kind=kind), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three talking clips, one clip without sound and one empty file."""
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    folder = tmp_path_factory.mktemp("clips")
    make_demo_dataset(folder, clips_per_speaker=3, seconds=0.6, width=64, height=64)
    write_media(folder / "mute.mp4", video=moving_picture(15, 64, 64))
    (folder / "mute.txt").write_text("ohwx, a silent clip", encoding="utf-8")
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "empty.txt").write_text("ohwx, nothing", encoding="utf-8")
    return folder


def _errors(capsys) -> list[str]:
    # Library notices some dependencies print once at import (torchao's) are not ours.
    return [line for line in capsys.readouterr().err.strip().splitlines() if "torchao" not in line]


def _journal_lines(cache: Path) -> int:
    path = cache / JOURNAL
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_or_killed_cache_keeps_every_finished_entry(tmp_path, clips, signum, capsys):
    cache = tmp_path / "cache"
    toml = _toml(tmp_path, clips, cache)
    proc = subprocess.Popen([sys.executable, "-m", "ltx2_av_trainer.trainer.app.cli", "cache", "--config", str(toml),
                             "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _journal_lines(cache) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the cache finished before it could be stopped"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    finished = {e.id for e in manifest_entries(cache)}
    assert len(finished) >= 2
    if signum == signal.SIGINT:
        assert proc.returncode == 130 and "stopped by SIGINT" in err and "are kept" in err, err[-2000:]
        assert not (cache / JOURNAL).exists() and (cache / MANIFEST).is_file()  # folded into the manifest
        assert "resumable state was saved" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert main(["cache", "--config", str(toml), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["reused"] >= len(finished), (again, finished)
    assert again["reused"] + again["video_encoded"] + again["failed"] == again["items"] == 5


def test_a_manifest_never_leads_outside_the_cache_folder(tmp_path, clips, capsys):
    cache = tmp_path / "cache"
    toml = _toml(tmp_path, clips, cache)
    assert main(["cache", "--config", str(toml), "--quiet"]) == 0
    manifest = json.loads((cache / MANIFEST).read_text())
    victim = tmp_path / "precious.txt"
    for name in ("../precious.txt", str(victim)):
        victim.write_text("keep me", encoding="utf-8")
        crafted = dict(manifest, entries=manifest["entries"] + [dict(manifest["entries"][0], id="gone", file=name)])
        (cache / MANIFEST).write_text(json.dumps(crafted), encoding="utf-8")
        assert main(["cache", "--config", str(toml), "--quiet"]) == 1
        err = _errors(capsys)
        assert len(err) == 1 and "not a file inside the cache folder" in err[0] and name in err[0], err
        assert victim.read_text(encoding="utf-8") == "keep me"
        assert main(["train", "--config", str(toml), "--quiet"]) == 1  # training refuses it too
        assert "not a file inside the cache folder" in capsys.readouterr().err
    crafted = dict(manifest, entries=[dict(manifest["entries"][0], colour="blue")])
    (cache / MANIFEST).write_text(json.dumps(crafted), encoding="utf-8")
    assert main(["cache", "--config", str(toml), "--quiet"]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and "unknown field 'colour'" in err[0], err


def test_a_folder_in_a_jsonl_source_fails_only_that_item(tmp_path, clips, capsys):
    listing = tmp_path / "list.jsonl"
    (tmp_path / "a_folder.mp4").mkdir()
    rows = [{"media": str(clips / "deep_000.mp4"), "caption": "ohwx talks"},
            {"media": "a_folder.mp4", "caption": "ohwx is a folder"},
            {"media": str(clips / "deep_001.mp4"), "caption": "ohwx talks again"}]
    listing.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    toml = _toml(tmp_path, listing, tmp_path / "cache", kind="jsonl")
    assert main(["cache", "--config", str(toml), "--json", str(tmp_path / "cache.json")]) == 0
    summary = json.loads((tmp_path / "cache.json").read_text())
    assert summary["video_encoded"] == 2 and summary["failed"] == 1
    failure = next(f for f in summary["failures"] if f["kind"] == "item")
    assert failure["path"].endswith("a_folder.mp4") and "is not a file" in failure["reason"]


def test_counts_agree_between_runs_and_lines_and_exit_codes_follow_the_policy(tmp_path, clips, capsys):
    cache = tmp_path / "cache"
    toml = _toml(tmp_path, clips, cache)
    runs = []
    for attempt in range(2):
        assert main(["cache", "--config", str(toml), "--json", str(tmp_path / f"{attempt}.json")]) == 0
        out = capsys.readouterr().out.splitlines()
        summary = json.loads((tmp_path / f"{attempt}.json").read_text())
        console = next(line for line in out if line.startswith("Audio latent caching:"))
        items = next(line for line in out if line.startswith("Cache: "))
        assert console == f"Audio latent caching: {summary['audio_encoded']} encoded, {summary['audio_failed']} failed"
        assert json.loads(out[-1])["audio_failed"] == summary["audio_failed"]
        assert summary["audio_failed"] == len([f for f in summary["failures"] if f["audio_expected"]]) == 2
        assert summary["video_encoded"] + summary["reused"] + summary["failed"] == summary["items"] == 5
        assert f"{summary['failed']} not cached" in items
        runs.append(summary)
    first, second = runs
    assert second["reused"] == first["video_encoded"] == 4 and second["video_encoded"] == 0
    # The same failures, the reused audio-free clip included: nothing vanishes on the second run.
    assert sorted((f["path"], f["kind"]) for f in first["failures"]) == sorted((f["path"], f["kind"]) for f in second["failures"])
    assert [f["reused"] for f in second["failures"] if f["kind"] == "audio"] == [True]
    # Exit codes: failures alone do not fail `cache` (as they do not fail `doctor`); --strict makes both strict.
    assert main(["cache", "--config", str(toml), "--quiet", "--strict"]) == 1
    assert main(["doctor", "--config", str(toml), "--quiet"]) == 0
    assert main(["doctor", "--config", str(toml), "--quiet", "--strict"]) == 1
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "empty.mp4").write_bytes(b"")
    assert main(["cache", "--config", str(_toml(tmp_path, nothing, tmp_path / "cache_nothing")), "--quiet"]) == 1
    assert "nothing usable was cached" in capsys.readouterr().err
