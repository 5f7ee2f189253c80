import pytest
import torch

from ltx2_av_trainer.trainer.adapters.network import build_lora, select_targets
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser, diffusers_to_reference_path
from ltx2_av_trainer.trainer.config import ConfigError, ModelConfig, NetworkConfig
from ltx2_av_trainer.trainer.adapters.files import GROUPS, module_group
from ltx2_av_trainer.trainer.adapters.verify import verify_lora_keys
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file
from ltx2_av_trainer.trainer.adapters.files import save_network


@pytest.fixture(scope="module")
def denoiser23():
    return build_denoiser(ModelConfig(version="2.3"))


def _groups(paths):
    return {module_group(p) for p in paths}


def test_presets_select_the_documented_modules(denoiser23):
    paths = [p for p, _ in denoiser23.adaptable_modules()]
    av = select_targets(paths, NetworkConfig(preset="av"), with_audio=True)
    assert _groups(av) == {"video_attn", "audio_attn", "a2v", "v2a"}
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for p in av)
    assert len(av) == 2 * 6 * 4  # layers x attentions x q/k/v/out
    assert _groups(select_targets(paths, NetworkConfig(preset="audio"), with_audio=True)) == {"audio_attn", "audio_ff"}
    assert _groups(select_targets(paths, NetworkConfig(preset="voice"), with_audio=True)) == {"audio_attn", "audio_ff", "a2v", "v2a"}
    assert _groups(select_targets(paths, NetworkConfig(preset="video"), with_audio=True)) == {"video_attn", "video_ff"}
    full = select_targets(paths, NetworkConfig(preset="full"), with_audio=True)
    assert not any(p.endswith("to_gate_logits") for p in full), "to_gate_logits must never be adapted"
    assert any("to_gate_logits" in p for p in paths)  # the 2.3 model has them
    custom = select_targets(paths, NetworkConfig(preset="video", include=[r"audio_ff\.net\.2$"], exclude=[r"attn2"]), with_audio=True)
    assert any(p.endswith("audio_ff.net.2") for p in custom) and not any(".attn2." in p for p in custom)
    never = select_targets(paths, NetworkConfig(preset="video", include=[r"to_gate_logits$"]), with_audio=True)
    assert not any("gate" in p for p in never)


def test_video_only_run_never_adapts_audio_or_cross_modal(denoiser23):
    paths = [p for p, _ in denoiser23.adaptable_modules()]
    with pytest.warns(UserWarning, match="video-only run"):
        chosen = select_targets(paths, NetworkConfig(preset="av"), with_audio=False)
    assert _groups(chosen) == {"video_attn"}
    with pytest.raises(ConfigError, match="selects no module"):
        with pytest.warns(UserWarning):
            select_targets(paths, NetworkConfig(preset="audio"), with_audio=False)


def test_lora_starts_at_base_and_detaches_cleanly():
    denoiser = build_denoiser(ModelConfig(version="2.0"))
    module = denoiser.transformer.transformer_blocks[0].audio_attn1.to_q
    x = torch.randn(3, module.in_features)
    base = module(x)
    net = build_lora(denoiser, NetworkConfig(rank=4, alpha=8), with_audio=True)
    assert torch.equal(module(x), base)  # up starts at zero
    with torch.no_grad():
        for _, layer in net.named_layers():
            layer.up.normal_()
    assert not torch.allclose(module(x), base)
    net.set_multiplier(0.0)
    assert torch.equal(module(x), base)
    net.set_multiplier(1.0)
    net.detach()
    assert torch.equal(module(x), base)
    assert "transformer_blocks.0.audio_attn1.to_q.weight" in dict(denoiser.transformer.named_parameters())


@pytest.mark.parametrize("lora_format", ["lora_ab", "down_up"])
@pytest.mark.parametrize("preset,expect_audio", [("av", True), ("voice", True), ("video", False)])
def test_exported_keys_use_reference_names_and_honour_alpha(tmp_path, preset, expect_audio, lora_format):
    denoiser = build_denoiser(ModelConfig(version="2.0"))
    net = build_lora(denoiser, NetworkConfig(rank=4, alpha=2.0, preset=preset), with_audio=True)
    with torch.no_grad():
        for _, layer in net.named_layers():
            layer.up.normal_()
    path = save_network(net, tmp_path / "l.safetensors", config_json="{}", base_fingerprint=denoiser.fingerprint(), step=3,
                        version="2.0", dtype="float32", lora_format=lora_format)
    tensors, metadata = read_adapter_file(path)
    assert metadata["ltx2_av_trainer.step"] == "3" and metadata["ltx2_av_trainer.base_fingerprint"] == denoiser.fingerprint()
    assert metadata["ltx2_av_trainer.lora_format"] == lora_format
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    suffixes = {"lora_ab": (".lora_A.weight", ".lora_B.weight"), "down_up": (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert all(k.endswith(suffixes[lora_format]) for k in tensors)
    modules = {k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in tensors}
    assert len(tensors) == len(modules) * len(suffixes[lora_format])
    groups = _groups(m[len("diffusion_model."):] for m in modules)
    has_audio = bool(groups & {"audio_attn", "audio_ff", "a2v", "v2a"})
    assert has_audio == expect_audio
    if preset in ("av", "voice"):
        assert {"a2v", "v2a"} <= groups
        assert "diffusion_model.transformer_blocks.1.audio_attn1.to_q" in modules or preset == "voice"
    # alpha honoured: the file's update is the delta the network applied (lora_ab: alpha/rank is folded into
    # lora_B, which every runtime applies as lora_B·lora_A; down_up: the runtime scales by .alpha / rank).
    key = sorted(modules)[0]
    layer = dict(net.named_layers())[key[len("diffusion_model."):]]
    if lora_format == "lora_ab":
        assert torch.allclose(tensors[key + ".lora_B.weight"], layer.up * 0.5)
        delta_file = tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"]
    else:
        assert tensors[key + ".alpha"].item() == 2.0
        delta_file = tensors[key + ".lora_up.weight"] @ tensors[key + ".lora_down.weight"] * (tensors[key + ".alpha"] / 4)
    x = torch.eye(layer.down.shape[1])
    assert torch.allclose(layer.delta(x).T, delta_file, atol=1e-6)


def test_verify_counts_groups_and_flags_unloaded_keys(tmp_path):
    from safetensors.torch import save_file

    denoiser = build_denoiser(ModelConfig(version="2.0"))
    net = build_lora(denoiser, NetworkConfig(rank=2, alpha=2, preset="av"), with_audio=True)
    path = save_network(net, tmp_path / "l.safetensors", config_json="{}", base_fingerprint="x", step=1, version="2.0")
    model_paths = {diffusers_to_reference_path(n) for n, _ in denoiser.transformer.named_modules()}
    report = verify_lora_keys(path, model_paths)
    assert report.ok and report.unloaded_keys == [] and report.applied_modules == 48
    assert set(report.by_group) == set(GROUPS) and report.by_group["a2v"] == 8 and report.by_group["audio_attn"] == 16
    # diffusers-prefixed keys are exactly what ComfyUI does not load.
    tensors, _ = read_adapter_file(path)
    bad = {("transformer." + k[len("diffusion_model."):]): v for k, v in tensors.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    bad_report = verify_lora_keys(tmp_path / "bad.safetensors", model_paths)
    assert not bad_report.ok and bad_report.applied_modules == 0 and len(bad_report.unloaded_keys) == len(bad)


def test_reference_path_mapping_only_at_start():
    assert diffusers_to_reference_path("time_embed.linear") == "adaln_single.linear"
    assert diffusers_to_reference_path("proj_in") == "patchify_proj"  # module names without a tail map too
    assert diffusers_to_reference_path("audio_time_embed") == "audio_adaln_single"
    assert diffusers_to_reference_path("av_cross_attn_video_a2v_gate.linear") == "av_ca_a2v_gate_adaln_single.linear"
    assert diffusers_to_reference_path("transformer_blocks.0.audio_attn1.norm_q") == "transformer_blocks.0.audio_attn1.q_norm"
    assert diffusers_to_reference_path("transformer_blocks.0.audio_attn1.to_q") == "transformer_blocks.0.audio_attn1.to_q"
