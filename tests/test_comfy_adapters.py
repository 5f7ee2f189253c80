"""ComfyUI tier: our LoRA / DoRA / LoKr / LoHa files load through ComfyUI's own key map and weight adapters,
and the weight ComfyUI patches in equals our adapter's effective weight, module by module.

Runs with ``COMFYUI_PATH`` pointing at a ComfyUI checkout (``make test-comfyui``); skipped otherwise.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ltx2_av_trainer.trainer.adapters.network import build_lora
from ltx2_av_trainer.trainer.config import NetworkConfig, TinyModelConfig
from ltx2_av_trainer.trainer.adapters.files import read_adapter_file, save_network
from ltx2_av_trainer.trainer.adapters.layers import factorization

TINY = TinyModelConfig()


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    """(ComfyUI ModelPatcher, our diffusers denoiser) with the same tiny LTXAV weights."""
    import comfy.sd
    from safetensors.torch import load_file

    from comfy_fixtures import CHECKPOINT_PREFIX, diffusers_denoiser_from_comfy_state, write_tiny_ltxav_checkpoint

    path = write_tiny_ltxav_checkpoint(tmp_path_factory.mktemp("ltxav"), "2.0", TINY)
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(path))
    state = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in load_file(str(path)).items()}
    return patcher, diffusers_denoiser_from_comfy_state(state, "2.0", TINY)


def _perturbed_network(denoiser, net: NetworkConfig):
    network = build_lora(denoiser, net, with_audio=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2 * (p.abs().mean() + 0.1))
    return network


@pytest.mark.comfyui
@pytest.mark.parametrize("net", [
    NetworkConfig(type="lora", rank=4, alpha=2.0, preset="av"),
    NetworkConfig(type="dora", rank=4, alpha=2.0, preset="av"),
    NetworkConfig(type="lokr", rank=4, alpha=2.0, preset="v2v"),  # full w2 (rank >= half of it)
    NetworkConfig(type="lokr", rank=2, alpha=3.0, preset="v2v", lokr_factor=2),  # factored w2_a·w2_b
    NetworkConfig(type="loha", rank=4, alpha=2.0, preset="av"),
], ids=["lora", "dora", "lokr-full", "lokr-factored", "loha"])
def test_comfyui_loads_our_file_and_applies_our_weight_delta(models, tmp_path, caplog, net):
    import comfy.lora

    patcher, denoiser = models
    network = _perturbed_network(denoiser, net)
    try:
        path = save_network(network, tmp_path / f"{net.type}.safetensors", config_json="{}", base_fingerprint="fp",
                            step=1, version="2.0", dtype="float32")
        tensors, _ = read_adapter_file(path)
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        with caplog.at_level(logging.WARNING):
            patches = comfy.lora.load_lora(tensors, key_map, log_missing=True)
        assert not [r for r in caplog.records if "not loaded" in r.getMessage()], "ComfyUI left keys of our file unused"
        layers = dict(network.named_layers())
        assert len(patches) == len(layers)
        names = {type(adapter).__name__ for adapter in patches.values()}
        assert names == {{"lora": "LoRAAdapter", "dora": "LoRAAdapter", "lokr": "LoKrAdapter", "loha": "LoHaAdapter"}[net.type]}

        patched = patcher.clone()
        applied = set(patched.add_patches(patches, 1.0))
        assert applied == {f"diffusion_model.{path}.weight" for path in layers}
        original = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
        patched.patch_model(force_patch_weights=True)
        try:
            merged = patched.model.diffusion_model.state_dict()
            ours_modules = dict(denoiser.transformer.named_modules())
            for module_path, layer in layers.items():
                key = f"{module_path}.weight"
                comfy_delta = merged[key].float() - original[key].float()
                with torch.no_grad():
                    our_delta = layer.weight_delta(ours_modules[module_path].weight)
                assert torch.allclose(comfy_delta, our_delta, rtol=1e-4, atol=1e-6), \
                    (module_path, (comfy_delta - our_delta).abs().max().item(), our_delta.abs().max().item())
        finally:
            patched.unpatch_model()
    finally:
        network.detach()


@pytest.mark.comfyui
def test_our_lokr_split_is_comfyuis(comfy):
    from comfy.weight_adapter.base import factorization as comfy_factorization

    for dimension in (16, 32, 64, 96, 128, 250, 1024, 2048, 4096, 8192, 16384):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dimension, factor) == comfy_factorization(dimension, factor), (dimension, factor)


@pytest.mark.comfyui
@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_adapter_on_comfyuis_own_forward_matches_comfyuis_merge(comfy, tmp_path, kind):
    """Our adapter wraps the forward of ComfyUI's cast/offload Linear ops (never merging); the output equals
    ComfyUI sampling with the same file merged into its weights."""
    import comfy.lora
    import comfy.sd

    from comfy_fixtures import write_tiny_ltxav_checkpoint
    from ltx2_av_trainer.trainer.backends.comfyui.denoiser import ComfyDenoiser
    from test_comfy_backend import reference_inputs, relative_error

    checkpoint = write_tiny_ltxav_checkpoint(tmp_path, "2.0", TINY)
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model(str(checkpoint))
    ours = ComfyDenoiser(patcher, "2.0")
    ours.load()
    inputs = reference_inputs("2.0")
    network = _perturbed_network(ours, NetworkConfig(type=kind, rank=4, alpha=2.0, preset="av"))
    try:
        with torch.no_grad():
            wrapped_video, wrapped_audio = ours(inputs)
            with network.disabled():
                base_video, _ = ours(inputs)
        path = save_network(network, tmp_path / f"{kind}.safetensors", config_json="{}", base_fingerprint="fp", step=1,
                            version="2.0", dtype="float32")
    finally:
        network.detach()
    tensors, _ = read_adapter_file(path)
    patched = patcher.clone()
    patched.add_patches(comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(patcher.model, {}), log_missing=False), 1.0)
    merged = ComfyDenoiser(patched, "2.0")
    merged.load()
    try:
        with torch.no_grad():
            merged_video, merged_audio = merged(inputs)
    finally:
        patched.unpatch_model()
    assert relative_error(wrapped_video, base_video) > 1e-2  # the adapter really changes the output
    assert relative_error(wrapped_video, merged_video) < 1e-5 and relative_error(wrapped_audio, merged_audio) < 1e-5
