"""ComfyUI tier: the Convert LoRA and Merge LoRAs nodes on a tiny LTXAV MODEL, their files loaded by ComfyUI's own
LoRA loader (no "lora key not loaded"), and Verify LoRA Keys on a file of another trainer.

Runs with ``COMFYUI_PATH`` pointing at a ComfyUI checkout (``make test-comfyui``); skipped otherwise. ComfyUI's
loras folder is redirected to a temporary folder for the module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ltx2_av_trainer.trainer.adapters.files import module_group, read_adapter_file, save_network
from ltx2_av_trainer.trainer.adapters.network import build_lora
from ltx2_av_trainer.trainer.config import NetworkConfig, TinyModelConfig

pytestmark = pytest.mark.comfyui
TINY = TinyModelConfig()


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    """(loras folder, ComfyUI MODEL, our diffusers denoiser with the same weights)."""
    import comfy.sd
    from comfy_fixtures import (
        CHECKPOINT_PREFIX,
        comfy_model_folders,
        diffusers_denoiser_from_comfy_state,
        write_tiny_ltxav_checkpoint,
    )
    from safetensors.torch import load_file

    loras = tmp_path_factory.mktemp("loras")
    with comfy_model_folders({"loras": loras}):
        checkpoint = write_tiny_ltxav_checkpoint(tmp_path_factory.mktemp("ltxav"), "2.0", TINY)
        with torch.inference_mode():
            patcher = comfy.sd.load_diffusion_model(str(checkpoint))
        state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in load_file(str(checkpoint)).items()}
        yield loras, patcher, diffusers_denoiser_from_comfy_state(state, "2.0", TINY)


def comfy_deltas(patcher, tensors, caplog) -> dict[str, torch.Tensor]:
    """Module path → the weight change ComfyUI's own loader patches in; asserts it loads every key."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map, log_missing=True)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    patched = patcher.clone()
    applied = patched.add_patches(patches, 1.0)
    original = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    patched.patch_model(force_patch_weights=True)
    try:
        merged = patched.model.diffusion_model.state_dict()
        return {k.removeprefix("diffusion_model.").removesuffix(".weight"):
                merged[k.removeprefix("diffusion_model.")].float() - original[k.removeprefix("diffusion_model.")].float()
                for k in applied}
    finally:
        patched.unpatch_model()


def trained(denoiser, net, seed):
    network = build_lora(denoiser, net, with_audio=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.abs().mean() + 0.1))
    modules = dict(denoiser.transformer.named_modules())
    with torch.no_grad():
        deltas = {p: layer.weight_delta(modules[p].weight).float() for p, layer in network.named_layers()}
    return network, deltas


def test_verify_and_convert_a_musubi_tuner_file(setup, caplog):
    import lora_layouts as layouts
    from ltx2_av_trainer.nodes.check_nodes import VerifyLoRAKeys
    from ltx2_av_trainer.nodes.lora_nodes import ConvertLoRA

    loras, patcher, denoiser = setup
    factors = layouts.random_factors(layouts.linear_shapes(denoiser.transformer), layouts.BLOCK_MODULES, seed=7)
    source = layouts.musubi_file(loras, factors, alpha=2.0, dora_magnitude_of=layouts.BLOCK_MODULES[0])
    with torch.inference_mode():
        report, ok = VerifyLoRAKeys.execute(patcher, lora_name=source.name).args
    assert not ok and "key layout: kohya" in report and "8 modules would load" in report
    assert "lora_magnitude_vector.weight: DoRA magnitude per output row" in report
    with pytest.raises(Exception, match="cannot be converted"):
        ConvertLoRA.execute("converted_musubi", "lora_ab", lora_name=source.name)
    with torch.inference_mode():
        lora, text = ConvertLoRA.execute("converted_musubi", "lora_ab", lora_name=source.name, model=patcher,
                                         skip_unconvertible=True).args
    assert "left out" in text and lora["path"].endswith("converted_musubi.safetensors")
    tensors, _ = read_adapter_file(lora["path"])
    deltas = comfy_deltas(patcher, tensors, caplog)
    assert deltas.keys() == factors.keys()
    for path, (a, b) in factors.items():
        assert torch.allclose(deltas[path], (2.0 / layouts.RANK) * b @ a, rtol=1e-4, atol=1e-6), path
    with torch.inference_mode():
        report, ok = VerifyLoRAKeys.execute(patcher, lora_name="converted_musubi.safetensors").args
    assert ok and "comfyui loads" in report and "ltx_core loads" in report


def test_merge_node_takes_the_voice_from_a_and_the_look_from_b(setup, caplog):
    from ltx2_av_trainer.nodes.lora_nodes import MergeLoRAs

    loras, patcher, denoiser = setup
    sources = {}
    for name, net, seed in (("voice", NetworkConfig(rank=4, alpha=2.0, preset="voice"), 1),
                            ("look", NetworkConfig(rank=2, alpha=4.0, preset="v2v"), 2)):
        network, deltas = trained(denoiser, net, seed)
        try:
            save_network(network, loras / f"{name}.safetensors", config_json="{}", base_fingerprint="fp", step=1,
                         version="2.0", dtype="float32")
        finally:
            network.detach()
        sources[name] = deltas
    with torch.inference_mode():
        lora, report = MergeLoRAs.execute("voice.safetensors", "look.safetensors", 1.0, 0.0, 0.0, 1.0, "concat", 32,
                                          "voice_and_look", lora_format="lora_ab").args
    assert "merged 2 LoRAs (concat)" in report
    deltas = comfy_deltas(patcher, read_adapter_file(lora["path"])[0], caplog)
    audio = {"audio_attn", "audio_ff", "v2a"}
    expected = {p: d for p, d in sources["voice"].items() if module_group(p) in audio}
    expected.update({p: d for p, d in sources["look"].items() if module_group(p) not in audio})
    assert deltas.keys() == expected.keys()
    for path, delta in expected.items():  # the merged file is bf16 (as LoRA files are by default)
        assert float((deltas[path] - delta).norm() / delta.norm()) < 1e-2, path
    with torch.inference_mode():
        _, report = MergeLoRAs.execute("voice.safetensors", "look.safetensors", 1.0, 1.0, 1.0, 1.0, "svd", 3,
                                       "svd_merge", max_error=0.9).args
    assert "relative error per module: max" in report
    with pytest.raises(Exception, match="relative error"):
        MergeLoRAs.execute("voice.safetensors", "look.safetensors", 1.0, 1.0, 1.0, 1.0, "svd", 1, "too_small", max_error=1e-3)
    assert not (loras / "too_small.safetensors").exists()
    # A second merge under the same name never replaces the first file: it is numbered, as Save LoRA does.
    first = (loras / "voice_and_look.safetensors").read_bytes()
    with torch.inference_mode():
        again, _ = MergeLoRAs.execute("voice.safetensors", "look.safetensors", 1.0, 0.0, 0.0, 1.0, "svd", 2,
                                      "voice_and_look").args
    assert Path(again["path"]) == loras / "voice_and_look_00001.safetensors"
    assert (loras / "voice_and_look.safetensors").read_bytes() == first
