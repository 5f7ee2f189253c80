"""The no-weights demo end to end: synthesised clips → doctor → cache → train → export → verify → A/B sample."""

import json
from pathlib import Path

import av
import pytest
from safetensors import safe_open

from ltx2_av_trainer.trainer.app.cli import main

METRIC_FIELDS = {"step", "loss", "loss_video", "loss_audio", "audio_weight", "sigma_video", "sigma_audio", "lr",
                 "audio_supervised", "regularizer", "step_time_s", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet", "--json", str(out / "demo.json")]) == 0
    return out


def test_demo_writes_the_run_directory_contract(demo_dir):
    run = demo_dir / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 400 and all(METRIC_FIELDS <= set(r) for r in rows)
    assert all(r["audio_supervised"] is True and r["regularizer"] is None for r in rows)
    loras = sorted((run / "lora").glob("demo_av_lora_*.safetensors"))
    assert [p.name for p in loras][-1] == "demo_av_lora_000400.safetensors"
    with safe_open(str(loras[-1]), framework="pt") as fh:
        meta = fh.metadata()
        assert json.loads(meta["ltx2_av_trainer.config"])["network"]["preset"] == "av"
        assert meta["ltx2_av_trainer.base_fingerprint"] and meta["ltx2_av_trainer.step"] == "400"
        assert all(k.startswith("diffusion_model.transformer_blocks.") for k in fh.keys())
    assert (run / "state" / "latest.json").is_file()
    state = json.loads((run / "state" / "latest.json").read_text())
    assert set(p.name for p in (run / "state" / state["folder"]).iterdir()) == {"adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 400 and report["final_loss_audio"] is not None and report["files"]["lora"]


def test_demo_meets_the_done_criteria(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["ok"] is True
    trends = report["trends"]
    assert trends["sigma_differs_fraction"] >= 0.8
    assert trends["video_last"] < trends["video_first"] and trends["audio_last"] < trends["audio_first"]
    assert report["cache"]["audio_encoded"] == report["cache"]["video_encoded"] == 8 and report["cache"]["audio_failed"] == 0
    assert report["verify"]["ok"] and report["verify"]["by_group"]["a2v"] > 0 and report["verify"]["by_group"]["audio_attn"] > 0
    assert json.loads((demo_dir / "demo.json").read_text())["ok"] is True
    assert (demo_dir / "doctor.json").is_file() and json.loads((demo_dir / "doctor.json").read_text())["summary"]["ok"] == 8


def test_demo_samples_and_previews_are_playable_with_audio(demo_dir):
    for name in ("lora.mp4", "base.mp4"):
        with av.open(str(demo_dir / "samples" / name)) as container:
            kinds = sorted(s.type for s in container.streams)
            assert kinds == ["audio", "video"]
            frames = sum(1 for _ in container.decode(video=0))
            assert frames == 25
    previews = json.loads((demo_dir / "report.json").read_text())["previews"]
    assert len(previews) == 8
    for row in previews:
        assert Path(row["wav"]).is_file() and Path(row["video"]).is_file()
        assert set(row["round_trip"]) >= {"log_mel_distance", "snr_db"}


def test_demo_ends_with_report_page_and_voice_scores(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    page = Path(report["report_html"])
    assert page.is_file()
    html = page.read_text(encoding="utf-8")
    for section in ("Loss per modality", "Audio loss weight", "σ per modality", "Validation losses", "Voice identity score",
                    "A/B samples", "Cache round trip", "Dataset doctor"):
        assert section.lower() in html.lower(), section
    voice = report["voice"]
    assert set(voice) >= {"lora", "base", "gain", "reference_typical"}
    assert 0 <= voice["lora"] <= 1 and 0 <= voice["base"] <= 1
    # The report's scores are those of the files it names, against the dataset's voice (scored again here).
    from ltx2_av_trainer.trainer.evaluation.voice_score import VoiceReference, score_file

    reference = VoiceReference.from_cache(demo_dir / "cache")
    lora = score_file(demo_dir / "samples" / "lora.wav", reference).similarity
    base = score_file(demo_dir / "samples" / "base.wav", reference).similarity
    assert (voice["lora"], voice["base"]) == (pytest.approx(lora, abs=1e-6), pytest.approx(base, abs=1e-6))
    assert voice["gain"] == pytest.approx(lora - base, abs=1e-6) and lora != base
    assert voice["reference_typical"] == pytest.approx(reference.typical_similarity, abs=1e-6)
    samples = json.loads((demo_dir / "samples" / "samples.json").read_text())
    assert samples["voice"]["gain"] == pytest.approx(voice["gain"])


def test_score_and_report_commands(demo_dir, capsys):
    out = demo_dir / "score.json"
    assert main(["score", str(demo_dir / "samples" / "lora.wav"), str(demo_dir / "data" / "deep_000.mp4"),
                 "--cache", str(demo_dir / "cache"), "--json", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert scores[1]["similarity"] > scores[0]["similarity"]  # a dataset clip is closer to the dataset voice than noise
    assert main(["report", str(demo_dir / "run")]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert main(["score", "x.wav"]) == 2  # no reference given: one clear line


def test_second_cache_run_reuses_everything(demo_dir):
    from ltx2_av_trainer.trainer.app.demo import demo_config
    from ltx2_av_trainer.trainer.app.pipeline import build_headless_encoders, cache_dataset

    config = demo_config(demo_dir, 400, "2.0")
    summary = cache_dataset(config, build_headless_encoders(config), quiet=True)
    assert summary["reused"] == 8 and summary["video_encoded"] == 0 and summary["audio_encoded"] == 0
