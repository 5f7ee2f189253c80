"""``demo --mode``: every training mode end to end on synthesised data (doctor → cache → train → verify → a sample
with the mode's conditioning), as a user runs it. Two training steps each, to keep CI short."""

import json

import av
import pytest

from ltx2_av_trainer.trainer.app.cli import main


@pytest.mark.parametrize("mode", ["audio", "i2v", "ic", "id"])
def test_demo_mode_runs_end_to_end(tmp_path, mode):
    out = tmp_path / mode
    assert main(["demo", "--mode", mode, "--out", str(out), "--steps", "2", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["mode"] == mode and all(report["checks"].values()), report["checks"]
    assert report["cache"]["failed"] == 0 and report["doctor"]["ok"] == report["doctor"]["items"] == 4
    assert report["train"]["steps"] == 2 and report["verify"]["ok"]
    groups = set(report["train"]["adapted_groups"])
    if mode == "audio":
        assert groups == {"audio_attn", "audio_ff"}
    else:
        assert {"a2v", "v2a", "audio_attn"} <= groups
    for name in ("lora", "base"):  # the sample with and without the LoRA, same seed and conditioning
        with av.open(report["samples"]["files"][name]["mp4"]) as container:
            assert container.streams.audio and container.streams.video
    assert report["samples"]["files"]["difference"]["audio_latent_rms"] >= 0
