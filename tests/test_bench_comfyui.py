"""``ltx2-av-trainer bench --backend comfyui``: a short run of the tiny preset and the report's structure.

Timings are measured and printed by the bench, never asserted here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from ltx2_av_trainer.trainer.app.bench_cli import add_bench_arguments
from ltx2_av_trainer.trainer.app.cli import cmd_bench
from ltx2_av_trainer.trainer.config import ConfigError


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(["--backend", "comfyui", *argv])


def test_comfyui_backend_refuses_options_it_does_not_use():
    with pytest.raises(ConfigError, match="does not take --precision, --compare-checkpointing"):
        cmd_bench(bench_args("--preset", "tiny", "--precision", "fp32", "--compare-checkpointing"))


def test_comfyui_backend_without_comfyui_says_how_to_get_it():
    code = "from ltx2_av_trainer.trainer.app.bench_comfyui import run_comfyui_bench; run_comfyui_bench('tiny')"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "COMFYUI_PATH" in result.stderr.splitlines()[-1]


@pytest.mark.comfyui
@pytest.mark.slow
def test_tiny_comfyui_bench_reports_every_comparison(comfy, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cmd_bench(bench_args("--preset", "tiny", "--steps", "2", "--warmup", "1", "--json", str(out))) == 0
    printed = capsys.readouterr().out
    for line in ("ours       ComfyUI", "our AV step", "per-block checkpointing", "batch 2", "batch 4", "step_time_vs_comfyui"):
        assert line in printed
    r = json.loads(out.read_text())
    assert r["backend"] == "comfyui" and r["preset"] == "tiny" and r["device"] == "cpu"

    lora = r["model"]["lora"]
    # Same modules at the same rank on both sides: the same number of trainable LoRA weights.
    assert lora["video_parameters"] == lora["comfyui_parameters"] > 0
    assert lora["video_modules"] == 2 * (4 + 4 + 2)  # 2 blocks x (q/k/v/out of attn1 and attn2, the two ff Linears)
    assert lora["av_modules"] > lora["video_modules"]

    v = r["video_only"]
    for side in (v["ours"], v["comfyui"], r["av_step"]["ours"]):
        assert len(side["step_times_s"]) == 2 and side["step_time_s"] > 0 and side["tokens_per_s"] > 0
        assert side["peak_mem_bytes"] == side["persistent_bytes"] + side["step_peak_bytes"]
        assert side["persistent_bytes"] > 0 and side["step_peak_bytes"] > 0 and side["activation_bytes"] > 0
    # ComfyUI's own loop ran every step (warm-up, measured, memory) and trained on finite losses.
    assert len(v["comfyui_losses"]) == 1 + 2 + 1 and all(math.isfinite(x) for x in v["comfyui_losses"])
    for ratio in (v["ratio_step_time"], v["ratio_peak_mem"], r["av_step"]["ratio_step_time_vs_video_only"],
                  r["av_step"]["ratio_peak_mem_vs_video_only"]):
        assert math.isfinite(ratio) and ratio > 0
    for target in v["targets"].values():
        assert target["met"] in (True, False) and target["limit"] == 1.0

    c = r["checkpointing"]
    assert c["block"]["activation_bytes"] < c["none"]["activation_bytes"]
    assert c["time_ratio"] == pytest.approx(c["block"]["step_time_s"] / c["none"]["step_time_s"])
    assert set(r["batched_forward"]) == {"2", "4"}
    for b in r["batched_forward"].values():
        assert len(b["one_forward_times_s"]) == len(b["per_sample_times_s"]) == 2
        assert b["speedup"] == pytest.approx(b["per_sample_s"] / b["one_forward_s"])
