"""Merging LoRAs (``ltx2-av-trainer merge``, ``adapters/merge.py``): the concatenated merge applied equals applying
the sources together (in our loader, in diffusers with two adapters, in ltx-core with two LoRAs), per-group weights
take each group from the chosen source, and the SVD merge's reported error is the measured one, within its bound."""

from __future__ import annotations

import json
import math

import ltx_core_oracle as oracle_lib
import pytest
import test_lora_runtimes as runtimes
import torch
from ltx2_av_trainer.trainer.adapters.files import GROUPS, module_group, read_adapter_file, save_network
from ltx2_av_trainer.trainer.adapters.formats import convert_lora, parse_lora
from ltx2_av_trainer.trainer.adapters.merge import (
    FAMILIES,
    MergeSource,
    dense_update,
    merge_files,
    merge_loras,
    parse_weights,
    read_source,
)
from ltx2_av_trainer.trainer.adapters.network import load_lora_file
from ltx2_av_trainer.trainer.app.cli import main
from ltx2_av_trainer.trainer.backends.diffusers_backend import diffusers_to_reference_path
from ltx2_av_trainer.trainer.config import ConfigError, NetworkConfig, TinyModelConfig
from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

TINY = TinyModelConfig()


@pytest.fixture(scope="module")
def base():
    return runtimes.bf16_base()


@pytest.fixture(scope="module")
def sources(base, tmp_path_factory):
    """Two trained-looking LoRAs with different targets, ranks and alphas (A: av rank 4 alpha 2, in the down_up
    layout; B: v2v rank 2 alpha 8, lora_ab) and their per-module updates."""
    folder = tmp_path_factory.mktemp("merge_sources")
    out = {}
    for name, net, fmt, seed in (("a", NetworkConfig(rank=4, alpha=2.0, preset="av"), "down_up", 1),
                                 ("b", NetworkConfig(rank=2, alpha=8.0, preset="v2v"), "lora_ab", 2)):
        network = runtimes.perturbed_network(base, net, seed=seed)
        try:
            modules = {diffusers_to_reference_path(n): m for n, m in base.transformer.named_modules()}
            with torch.no_grad():
                deltas = {p: layer.weight_delta(modules[p].weight).double() for p, layer in network.named_layers()}
            path = save_network(network, folder / f"{name}.safetensors", config_json="{}", base_fingerprint=base.fingerprint(),
                                step=10, version="2.0", dtype="float32", lora_format=fmt)
        finally:
            network.detach()
        out[name] = (path, deltas)
    return out


def merged_deltas(base, path) -> dict[str, torch.Tensor]:
    network = load_lora_file(base, path)
    try:
        modules = {diffusers_to_reference_path(n): m for n, m in base.transformer.named_modules()}
        with torch.no_grad():
            return {p: layer.weight_delta(modules[p].weight).double() for p, layer in network.named_layers()}
    finally:
        network.detach()


def expected_sum(sources, weights) -> dict[str, torch.Tensor]:
    total = {}
    for name, spec in weights.items():
        group_weights = parse_weights(spec)
        for path, delta in sources[name][1].items():
            w = group_weights[module_group(path)]
            if w:
                total[path] = total.get(path, 0) + w * delta
    return total


def test_weight_specs():
    assert parse_weights(0.5) == {g: 0.5 for g in GROUPS}
    voice = parse_weights("audio=1,video=0")
    assert all(voice[g] == 1 for g in FAMILIES["audio"]) and all(voice[g] == 0 for g in FAMILIES["video"])
    assert voice["connector"] == voice["other"] == 1.0
    assert parse_weights("audio_attn=2,default=0") == {g: (2.0 if g == "audio_attn" else 0.0) for g in GROUPS}
    with pytest.raises(ConfigError, match="unknown group 'voice'"):
        parse_weights("voice=1")
    with pytest.raises(ConfigError, match="not a number"):
        parse_weights("audio=loud")


def test_concat_merge_is_exact_module_by_module(base, sources, tmp_path):
    out = tmp_path / "merged.safetensors"
    report = merge_files([sources["a"][0], sources["b"][0]], out, weights=["1", "0.7"], dtype="float32")
    assert report["written"] and report["max_relative_error"] == 0.0
    deltas = merged_deltas(base, out)
    expected = expected_sum(sources, {"a": "1", "b": "0.7"})
    assert deltas.keys() == expected.keys()
    for path, delta in expected.items():
        assert torch.allclose(deltas[path], delta, rtol=1e-5, atol=1e-7), path
    tensors, metadata = read_adapter_file(out)
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    assert ranks["diffusion_model.transformer_blocks.0.attn1.to_q"] == 4 + 2  # both sources adapt it
    assert ranks["diffusion_model.transformer_blocks.0.ff.net.2"] == 2  # only B does
    merge = json.loads(metadata["ltx2_av_trainer.merge"])
    assert [s["file"] for s in merge["sources"]] == ["a.safetensors", "b.safetensors"] and len(merge["sources"][0]["sha256"]) == 64
    assert merge["sources"][1]["weights"]["video_attn"] == 0.7 and metadata["ltx2_av_trainer.model_version"] == "2.0"
    assert metadata["ltx2_av_trainer.base_fingerprint"] == base.fingerprint()


def test_concat_merge_applied_equals_both_loras_in_diffusers_and_ltx_core(base, sources, tmp_path):
    """diffusers with two adapters (``set_adapters`` weights) and ltx-core with two LoRAs (strengths) are the
    oracles of "applying both"; the merged file in each must give the same prediction."""
    pair = []
    for name in ("a", "b"):  # diffusers reads lora_A/lora_B only: the sources in our default layout
        tensors, metadata = read_adapter_file(sources[name][0])
        path = tmp_path / f"{name}_ab.safetensors"
        save_safetensors_atomic(convert_lora(tensors, metadata).tensors, path)
        pair.append(path)
    merged = tmp_path / "merged.safetensors"
    merge_files(pair, merged, weights=["1", "0.7"], dtype="float32")

    from diffusers import LTX2Pipeline

    with torch.no_grad():
        model, _ = runtimes.diffusers_load(base, merged)
        from_merged = model(runtimes.inputs())
        fresh, _ = runtimes.diffusers_load(base, pair[0])
        pipe = LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, text_encoder=None, tokenizer=None, connectors=None,
                            transformer=fresh.transformer, vocoder=None)
        pipe.load_lora_weights(str(pair[1]), adapter_name="b")
        pipe.set_adapters([a for a in fresh.transformer.peft_config], [1.0, 0.7])
        from_both = fresh(runtimes.inputs())
        ours_network = load_lora_file(base, merged)
        try:
            ours = base(runtimes.inputs())
        finally:
            ours_network.detach()
    for m, b, o in zip(from_merged, from_both, ours):
        assert oracle_lib.relative_error(m, b) < runtimes.TOLERANCE
        assert oracle_lib.relative_error(o, b) < runtimes.TOLERANCE

    checkpoint = oracle_lib.write_checkpoint(base, tmp_path, TINY, dtype=torch.bfloat16)
    both = oracle_lib.build_model(checkpoint, loras=((str(pair[0]), 1.0), (str(pair[1]), 0.7)), dtype=torch.float32)
    one, _, tolerance = runtimes.ltx_core_load(checkpoint, merged)
    with torch.no_grad():
        for m, b in zip(oracle_lib.ltx_core_forward(one, runtimes.inputs()), oracle_lib.ltx_core_forward(both, runtimes.inputs())):
            assert oracle_lib.relative_error(m, b) < tolerance


def test_per_group_weights_take_the_voice_from_one_and_the_look_from_the_other(base, sources, tmp_path):
    out = tmp_path / "voice_and_look.safetensors"
    merge_files([sources["a"][0], sources["b"][0]], out, weights=["audio=1,video=0", "audio=0,video=1"], dtype="float32")
    deltas = merged_deltas(base, out)
    writes_audio = {"audio_attn", "audio_ff", "v2a"}  # the modules that write into the audio stream
    for path, delta in deltas.items():
        source = sources["a" if module_group(path) in writes_audio else "b"][1]
        assert torch.allclose(delta, source[path], rtol=1e-5, atol=1e-7), path
    groups = {module_group(p) for p in deltas}
    assert groups == {"audio_attn", "v2a", "video_attn", "video_ff", "a2v"}  # A has no audio_ff; B's is weighted out


def test_svd_merge_error_is_reported_measured_and_bounded(base, sources, tmp_path):
    merged = merge_loras([read_source(sources["a"][0], 1.0), read_source(sources["b"][0], 0.7)], method="svd", rank=3)
    expected = expected_sum(sources, {"a": 1.0, "b": 0.7})
    assert merged.errors.keys() == expected.keys()
    for path, delta in expected.items():
        module = merged.modules[path]
        approx = module[".lora_up.weight"].double() @ module[".lora_down.weight"].double()
        measured = float((delta - approx).norm() / delta.norm())
        assert measured == pytest.approx(merged.errors[path], abs=1e-6), path
        # Eckart–Young: the error is the energy of the discarded singular values of the true ΔW.
        sv = torch.linalg.svdvals(delta)
        R = int((sv > sv[0] * 1e-6).sum())  # ΔW comes from float32 factors: its rank up to float32 rounding
        optimal = math.sqrt(float(sv[3:].square().sum() / sv.square().sum()))
        assert merged.errors[path] == pytest.approx(optimal, abs=1e-6)
        assert merged.errors[path] <= merged.bounds[path] + 1e-9
        assert merged.bounds[path] == pytest.approx(math.sqrt(max(0.0, 1 - min(3, R) / R)))
        assert module[".lora_down.weight"].shape[0] == min(3, R)
    assert merged.max_error > 0.05  # rank 3 < 6 on the doubly adapted modules: the test can see an error
    exact = merge_loras([read_source(sources["a"][0], 1.0), read_source(sources["b"][0], 0.7)], method="svd", rank=6)
    assert exact.max_error < 1e-6
    for path, delta in expected.items():
        m = exact.modules[path]
        assert torch.allclose(m[".lora_up.weight"].double() @ m[".lora_down.weight"].double(), delta, rtol=1e-5, atol=1e-7)


def test_svd_merge_reprojects_lokr_and_loha_to_a_lora(base, tmp_path):
    files = []
    for kind, net in (("lokr", NetworkConfig(type="lokr", rank=2, alpha=3.0, preset="audio", lokr_factor=2)),
                      ("loha", NetworkConfig(type="loha", rank=2, alpha=2.0, preset="audio"))):
        network = runtimes.perturbed_network(base, net)
        try:
            files.append(save_network(network, tmp_path / f"{kind}.safetensors", config_json="{}", base_fingerprint="fp",
                                      step=1, version="2.0", dtype="float32"))
        finally:
            network.detach()
    with pytest.raises(ConfigError, match="use method svd"):
        merge_loras([read_source(files[0])], method="concat")
    merged = merge_loras([read_source(f) for f in files], method="svd", rank=64)
    assert merged.max_error < 1e-6  # full rank of the tiny audio layers: exact
    parsed = [parse_lora(*read_adapter_file(f)).modules for f in files]
    for path, module in merged.modules.items():
        expected = sum(dense_update(p[path]) for p in parsed)
        assert torch.allclose(module[".lora_up.weight"].double() @ module[".lora_down.weight"].double(), expected, atol=1e-6)


def test_merge_refuses_dora_mixed_versions_and_all_zero_weights(base, sources, tmp_path):
    network = runtimes.perturbed_network(base, NetworkConfig(type="dora", rank=2, preset="audio"))
    try:
        dora = save_network(network, tmp_path / "dora.safetensors", config_json="{}", base_fingerprint="fp", step=1,
                            version="2.0", dtype="float32")
    finally:
        network.detach()
    with pytest.raises(ConfigError, match="DoRA.*depend on the base weights"):
        merge_loras([read_source(dora)], method="svd", rank=4)
    a = read_source(sources["a"][0])
    other = MergeSource("other.safetensors", a.modules, metadata={"ltx2_av_trainer.model_version": "2.3"})
    with pytest.raises(ConfigError, match="different model versions"):
        merge_loras([a, other])
    with pytest.raises(ConfigError, match="every module has weight 0"):
        merge_loras([read_source(sources["a"][0], 0.0)])


# ---- the command line ----------------------------------------------------------------------------------------------


def test_merge_convert_and_verify_commands(base, sources, tmp_path, capsys):
    out, report = tmp_path / "m.safetensors", tmp_path / "m.json"
    assert main(["merge", str(sources["a"][0]), str(sources["b"][0]), "--out", str(out), "--weights", "audio=1,video=0",
                 "--weights", "audio=0,video=1", "--method", "svd", "--rank", "2", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert "relative error per module" in printed and data["written"] and 0 < data["max_relative_error"] <= data["max_error_bound"]
    strict = tmp_path / "strict.safetensors"
    assert main(["merge", str(sources["a"][0]), str(sources["b"][0]), "--out", str(strict), "--method", "svd", "--rank", "1",
                 "--max-error", "1e-3"]) == 2
    assert "relative error" in capsys.readouterr().err and not strict.exists()

    converted = tmp_path / "a_ab.safetensors"
    assert main(["convert", str(sources["a"][0]), "--out", str(converted)]) == 0
    assert "from the down_up layout" in capsys.readouterr().out
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in read_adapter_file(converted)[0])
    assert main(["convert", str(converted), "--out", str(converted)]) == 2  # never over its own source
    assert main(["verify", str(converted), "--json", str(tmp_path / "v.json")]) == 0
    text = capsys.readouterr().out
    assert "key layout: lora_ab" in text and "comfyui loads" in text and "ltx_core loads" in text
