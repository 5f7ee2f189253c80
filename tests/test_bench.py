"""``ltx2-av-trainer bench``: contract fields, same model on both sides, memory and FLOP accounting.

Timings are measured by the bench, never asserted here.
"""

import argparse
import json
import math
import statistics

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ltx2_av_trainer.trainer.app.bench import (
    BenchConfig,
    BenchRun,
    _cpu_step_peak_bytes,
    cmd_bench,
    measure_gemm_peak,
    reference_lora_targets,
    run_bench,
)
from ltx2_av_trainer.trainer.app.bench_cli import add_bench_arguments
from ltx2_av_trainer.trainer.config import ConfigError


@pytest.fixture(scope="module")
def tiny_report():
    return run_bench("tiny", compare_checkpointing=True)


@pytest.fixture(scope="module")
def tiny_run():
    return BenchRun(BenchConfig.from_preset("tiny"))


def test_tiny_bench_returns_the_contract_with_sane_values(tiny_report):
    r = tiny_report
    assert r["device"] == "cpu" and r["preset"] == "tiny"
    model = r["model"]
    assert model["layers"] == 2
    assert model["dims"]["video"] == {"heads": 2, "head_dim": 16, "inner": 32, "ff": 128}
    assert model["dims"]["audio"] == {"heads": 2, "head_dim": 8, "inner": 16, "ff": 64}
    assert model["tokens"] == {"video": 2 * 4 * 4, "audio": 13, "text": 8, "per_step": 45}
    assert model["lora"]["parameters"] == model["lora"]["reference_parameters"] > 0
    for side in ("ours", "reference"):
        s = r[side]
        assert s["step_time_s"] > 0 and len(s["step_times_s"]) == r["steps"]
        assert s["peak_mem_bytes"] == s["persistent_bytes"] + s["step_peak_bytes"]
        assert s["persistent_bytes"] > 0 and s["step_peak_bytes"] > 0 and s["activation_bytes"] > 0
        assert s["tokens_per_s"] > 0
        assert 0 <= s["data_share"] < 1 and s["data_time_s"] >= 0
        assert s["mfu"] is None  # no peak-FLOPs figure on CPU
    for ratio in ("ratio_step_time", "ratio_peak_mem"):
        assert math.isfinite(r[ratio]) and r[ratio] > 0
    assert r["tokens_per_s"] == r["ours"]["tokens_per_s"] and r["data_share"] == r["ours"]["data_share"]
    assert "mfu" in r and r["mfu"] is None and "CPU" in r["mfu_note"]
    assert 0 < r["flops"]["forward"] < r["flops"]["train_step"]
    gemm = r["gemm_peak"]
    assert gemm["size"] == 2048 and gemm["dtype"] == "float32" and gemm["repeats"] >= 3
    assert gemm["flops_per_s"] == max(gemm["at_start_flops_per_s"], gemm["at_end_flops_per_s"]) > 0
    for side in ("ours", "reference"):
        s = r[side]
        assert s["achieved_flops_per_s"] == pytest.approx(r["flops"]["train_step"] / s["step_time_s"])
        assert s["fraction_of_gemm_peak"] == pytest.approx(s["achieved_flops_per_s"] / gemm["flops_per_s"])
        assert r["fraction_of_gemm_peak"][side] == s["fraction_of_gemm_peak"]
    # Each target holds the measured value it is named after, and "met" is its rule applied to it.
    pairs = [o / f for o, f in zip(r["ours"]["step_times_s"], r["reference"]["step_times_s"])]
    measured = {"step_time_vs_reference": statistics.median(pairs),
                "peak_mem_vs_reference": r["ours"]["peak_mem_bytes"] / r["reference"]["peak_mem_bytes"],
                "data_share": r["ours"]["data_share"],
                "checkpointing_cut": r["checkpointing_saving"]["step_peak_cut"]}
    for name, value in measured.items():
        target = r["targets"][name]
        assert target["value"] == pytest.approx(value, rel=1e-12), name
        at_most = name != "checkpointing_cut"
        assert target["rule"].endswith(f"{'<=' if at_most else '>='} {target['limit']}"), target
        assert target["met"] is (value <= target["limit"] if at_most else value >= target["limit"]), (name, target)
    json.dumps(r)  # the report is plain JSON


def test_both_sides_start_from_the_same_model_batch_and_noise(tiny_report):
    ours, reference = tiny_report["ours"]["initial_loss"], tiny_report["reference"]["initial_loss"]
    for modality in ("video", "audio"):
        assert math.isfinite(ours[modality]) and ours[modality] > 0
        assert ours[modality] == pytest.approx(reference[modality], rel=1e-6)
    assert tiny_report["initial_loss_rel_diff"] <= 1e-6


def test_checkpointing_cuts_measured_activation_memory(tiny_report):
    saving = tiny_report["checkpointing_saving"]
    assert saving["on"]["step_peak_bytes"] < saving["off"]["step_peak_bytes"]
    assert saving["on"]["activation_bytes"] < saving["off"]["activation_bytes"]
    assert saving["step_peak_cut"] > 0 and saving["activation_cut"] > 0
    assert saving["off"]["step_time_s"] > 0 and saving["on"]["step_time_s"] > 0
    assert saving["time_ratio"] == pytest.approx(saving["on"]["step_time_s"] / saving["off"]["step_time_s"])


def test_gemm_peak_times_the_matmul_it_names():
    calls = []
    original = torch.mm

    def counting_mm(a, b):
        calls.append((tuple(a.shape), tuple(b.shape), a.dtype))
        return original(a, b)

    import ltx2_av_trainer.trainer.app.bench as bench_module

    durations = iter([0.5, 0.25, 0.4])  # the best of the timed runs counts

    def timed(step, device):
        return next(durations), step()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "mm", counting_mm)
        patch.setattr(bench_module, "_timed", timed)
        peak = measure_gemm_peak(torch.device("cpu"), torch.float32, budget_s=0.0, size=64)
    assert peak.size == 64 and peak.dtype == "float32" and peak.repeats == 3
    assert calls == [((64, 64), (64, 64), torch.float32)] * 5  # two warm-ups, three timed
    assert peak.flops_per_s == 2 * 64**3 / 0.25


def test_reference_adapts_exactly_our_modules_on_shared_frozen_weights(tiny_run):
    ours = list(tiny_run.trainer.network.paths.values())
    reference = reference_lora_targets(tiny_run.reference.model)
    assert reference == ours
    assert any(".audio_to_video_attn.to_q" in p for p in ours) and any(".audio_attn2.to_v" in p for p in ours)
    # Two trainable matrices per adapted module, nothing else trainable.
    assert len(tiny_run.reference.params) == 2 * len(ours)
    ours_base = dict(tiny_run.trainer.denoiser.module.named_parameters())
    for name, param in tiny_run.reference.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32
            continue
        assert not param.requires_grad
        assert param.data_ptr() == ours_base[name.replace(".base_layer", "")].data_ptr()


def test_analytic_flops_match_torch_flop_counter(tiny_run):
    # The math SDPA backend runs attention as matmuls, so the counter sees every matmul of the step.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tiny_run.ours_step()
    assert tiny_run.flops().train_step == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_cpu_step_peak_follows_allocations_and_frees():
    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)
        del a, b
        c = torch.ones(1 << 19)  # 2 MiB, after the peak
        return c.sum()

    peak = _cpu_step_peak_bytes(step)
    assert 8 << 20 <= peak < 9 << 20


def test_bad_bench_requests_are_refused():
    with pytest.raises(ConfigError, match="preset 'huge'"):
        BenchConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="--layers"):
        BenchConfig.from_preset("small", layers=0)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        BenchRun(BenchConfig.from_preset("tiny", precision="fp16", device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_real_preset_needs_a_gpu():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        run_bench("real", layers=1)


def test_cli_prints_a_table_and_writes_the_json_report(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--json", str(out)])
    assert cmd_bench(args) == 0
    printed = capsys.readouterr().out
    assert "step time" in printed and "peak memory" in printed and "targets" in printed and "of GEMM peak" in printed
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["steps"] == 1 and len(report["ours"]["step_times_s"]) == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_bench_precisions_match_the_loop():
    from ltx2_av_trainer.trainer.app.bench_cli import PRECISIONS
    from ltx2_av_trainer.trainer.training.loop import PRECISION_DTYPES

    assert set(PRECISIONS) == set(PRECISION_DTYPES)
