"""``make gpu-check``: without CUDA it prints what it would run and exits 0; ``--smoke`` runs a check end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ltx2_av_trainer.trainer.app.gpu_check import CHECKS, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on machines without CUDA")
def test_without_cuda_it_prints_the_plan_and_exits_0(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert main(["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device here, nothing is run" in printed
    for check in CHECKS:
        assert f"  {check.name}: {check.runs}" in printed
    assert not out.exists()


def test_the_makefile_target_runs_the_script():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^gpu-check:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None, "no gpu-check target in the Makefile"
    assert "-m ltx2_av_trainer.trainer.app.gpu_check" in recipe.group(1)
    assert re.search(r"^\.PHONY:.*\bgpu-check\b", makefile, re.MULTILINE)


def test_the_checks_cover_what_the_cpu_suite_cannot():
    names = [check.name for check in CHECKS]
    assert names == ["bench_real", "lora_19b_float8", "lora_19b_int8", "precision_bf16", "precision_fp16",
                     "attention_kernels", "compile_blocks", "comfyui_partial_loading", "block_swap_test"]


def test_smoke_runs_a_check_and_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert main(["--smoke", "--only", "lora_19b_int8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^lora_19b_int8\s+ok\s+\d+s\s+.*losses finite", printed, re.MULTILINE), printed
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["environment"]["torch"] == torch.__version__
    (result,) = report["results"]
    assert result["check"] == "lora_19b_int8" and result["status"] == "ok"
    assert len(result["figures"]["losses"]) == 2 and result["figures"]["parameters"] > 0
