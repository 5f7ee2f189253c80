"""Our exported LoRA in other runtimes, each with its OWN loader and its own model built from the same tiny weights:
diffusers (``LTX2Pipeline.load_lora_weights``) and Lightricks' ltx-core (``SingleGPUModelBuilder.lora``, what
ltx-pipelines runs). Both must predict what our training-time model predicts, to float32 rounding, with every
module applied (counted per group). ComfyUI's ``LoraLoaderModelOnly`` is checked in the ComfyUI tier
(test_comfy_adapters.py, test_e2e_server.py).

ltx-core fuses LoRAs into bf16 / fp8 weights only, so the shared base weights are rounded to bf16 (then held in
float32 by every model); the LoRA itself is written in float32. The rules ``formats.runtime_support`` states for
each layout and adapter type (what verify reports) are held here to what the two loaders really do.
"""

from __future__ import annotations

import functools
import logging

import ltx_core_oracle as oracle_lib
import pytest
import torch
from ltx2_av_trainer.trainer.adapters.files import GROUPS, module_group, save_network
from ltx2_av_trainer.trainer.adapters.formats import parse_lora, runtime_support
from ltx2_av_trainer.trainer.adapters.network import build_lora, load_lora_file
from ltx2_av_trainer.trainer.backends.diffusers_backend import (
    DiffusersDenoiser,
    build_denoiser,
    diffusers_to_reference_path,
)
from ltx2_av_trainer.trainer.config import ModelConfig, NetworkConfig, TinyModelConfig
from safetensors.torch import load_file, save_file

ORACLE = oracle_lib.load_oracle()
TINY = TinyModelConfig()
# ltx-core's loader applies a file at strength 1 through its own wiring; ours runs with the same wiring.
WIRING = ORACLE.wiring
# Measured on a 2-core CPU (float32): diffusers 0.0, ltx-core 1.0.0 2.0e-7 / 2.4e-7 (video / audio) relative.
TOLERANCE = 1e-5
# ltx-core 1.0.0 fuses in the dtype it is asked for (float32 here); newer releases fuse in bf16 whatever is asked
# (1.2.0: 1.8e-3 relative), so with LTX_CORE_PATH on such a release the comparison is bounded at bf16 rounding.
BF16_FUSION_TOLERANCE = 1e-2


def bf16_base(version: str = "2.0") -> DiffusersDenoiser:
    denoiser = build_denoiser(ModelConfig(version=version, cross_modal_sigma=WIRING))
    with torch.no_grad():
        for p in denoiser.transformer.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return denoiser


def perturbed_network(denoiser, net: NetworkConfig, seed: int = 1):
    network = build_lora(denoiser, net, with_audio=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * (p.abs().mean() + 0.1))
    return network


def inputs(version: str = "2.0"):
    return oracle_lib.make_inputs(version, TINY, torch.tensor([0.8, 0.35]), torch.tensor([0.2, 0.6]))


@pytest.fixture(scope="module")
def base():
    return bf16_base()


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory):
    return oracle_lib.write_checkpoint(base, tmp_path_factory.mktemp("ltx_core"), TINY, dtype=torch.bfloat16)


def trained_file(base, folder, net: NetworkConfig, lora_format: str = "lora_ab"):
    """(file, our training-time prediction, applied module paths) for a perturbed network on ``base``."""
    network = perturbed_network(base, net)
    try:
        with torch.no_grad():
            prediction = base(inputs())
        path = save_network(network, folder / f"{net.type}_{lora_format}.safetensors", config_json="{}", base_fingerprint="fp",
                            step=1, version="2.0", dtype="float32", lora_format=lora_format)
        return path, prediction, {p for p, _ in network.named_layers()}
    finally:
        network.detach()


def per_group(paths) -> dict[str, int]:
    counts = {g: 0 for g in GROUPS}
    for path in paths:
        counts[module_group(path)] += 1
    return counts


# ---- the two runtimes' own loaders ------------------------------------------------------------------------------


def diffusers_load(base, path):
    """A fresh diffusers transformer with the base weights, the file loaded by ``LTX2Pipeline.load_lora_weights``:
    (our denoiser call on it, the reference paths of the modules PEFT adapted)."""
    from diffusers import LTX2Pipeline
    from peft.tuners.lora import LoraLayer

    fresh = build_denoiser(ModelConfig(version=base.version, cross_modal_sigma=WIRING))
    fresh.transformer.load_state_dict(base.transformer.state_dict())
    pipe = LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, text_encoder=None, tokenizer=None, connectors=None,
                        transformer=fresh.transformer, vocoder=None)
    pipe.load_lora_weights(str(path))
    adapted = {diffusers_to_reference_path(name) for name, m in fresh.transformer.named_modules() if isinstance(m, LoraLayer)}
    return fresh, adapted


@functools.lru_cache(maxsize=4)
def plain_state(checkpoint: str) -> dict[str, torch.Tensor]:
    """ltx-core's model without a LoRA (its weights are what a fused LoRA changes)."""
    return oracle_lib.build_model(checkpoint, dtype=torch.float32).state_dict()


def ltx_core_load(checkpoint, path, strength: float = 1.0):
    """ltx-core's model with the file fused by its own loader: (model, reference paths whose weight changed,
    the tolerance its fusion precision allows)."""
    fused = oracle_lib.build_model(checkpoint, loras=((str(path), strength),), dtype=torch.float32)
    before, after = plain_state(str(checkpoint)), fused.state_dict()
    changed = {key.removesuffix(".weight") for key in after if key.endswith(".weight") and not torch.equal(before[key], after[key])}
    in_bf16 = bool(changed) and all(torch.equal(after[f"{p}.weight"], after[f"{p}.weight"].bfloat16().float()) for p in changed)
    return fused, changed, BF16_FUSION_TOLERANCE if in_bf16 else TOLERANCE


# ---- our default export loads identically everywhere -------------------------------------------------------------


@pytest.mark.parametrize("preset", ["v2v", "av"])
def test_diffusers_loader_applies_our_lora_like_training(base, tmp_path, preset):
    path, ours, trained = trained_file(base, tmp_path, NetworkConfig(type="lora", rank=4, alpha=2.0, preset=preset))
    model, adapted = diffusers_load(base, path)
    assert adapted == trained
    assert per_group(adapted) == per_group(trained)
    with torch.no_grad():
        theirs = model(inputs())
    for mine, other in zip(ours, theirs):
        assert oracle_lib.relative_error(other, mine) < TOLERANCE
    with torch.no_grad():
        plain = base(inputs())
    assert oracle_lib.relative_error(plain[0], ours[0]) > 1e-2  # the LoRA matters


@pytest.mark.parametrize("preset", ["v2v", "av"])
def test_ltx_core_loader_fuses_our_lora_like_training(base, checkpoint, tmp_path, preset):
    path, ours, trained = trained_file(base, tmp_path, NetworkConfig(type="lora", rank=4, alpha=2.0, preset=preset))
    model, fused, tolerance = ltx_core_load(checkpoint, path)
    assert fused == trained
    assert per_group(fused) == per_group(trained)
    if preset == "v2v":
        assert all(per_group(trained)[g] for g in ("video_attn", "audio_attn", "a2v", "v2a", "video_ff", "audio_ff"))
    if ORACLE.origin == "PyPI":
        assert tolerance == TOLERANCE  # the pinned release fuses in float32: the comparison is exact
    with torch.no_grad():
        theirs = oracle_lib.ltx_core_forward(model, inputs())
    for mine, other in zip(ours, theirs):
        assert oracle_lib.relative_error(other, mine) < tolerance


def test_both_loaders_on_ltx_23(tmp_path):
    """LTX-2.3 (gated attention, cross-attention adaLN): the full preset (every Linear of the blocks but the gate
    logits) through both loaders."""
    base = bf16_base("2.3")
    checkpoint = oracle_lib.write_checkpoint(base, tmp_path, TINY, dtype=torch.bfloat16)
    network = perturbed_network(base, NetworkConfig(type="lora", rank=4, alpha=2.0, preset="full"))
    try:
        with torch.no_grad():
            ours = base(inputs("2.3"))
        path = save_network(network, tmp_path / "l23.safetensors", config_json="{}", base_fingerprint="fp", step=1,
                            version="2.3", dtype="float32")
        trained = {p for p, _ in network.named_layers()}
    finally:
        network.detach()
    model, adapted = diffusers_load(base, path)
    with torch.no_grad():
        theirs = model(inputs("2.3"))
    assert adapted == trained and all(oracle_lib.relative_error(o, m) < TOLERANCE for m, o in zip(ours, theirs))
    model, fused, tolerance = ltx_core_load(checkpoint, path)
    with torch.no_grad():
        theirs = oracle_lib.ltx_core_forward(model, inputs("2.3"))
    assert fused == trained and all(oracle_lib.relative_error(o, m) < tolerance for m, o in zip(ours, theirs))


def test_strength_scales_alike_in_ltx_core_and_ours(base, checkpoint, tmp_path):
    network = perturbed_network(base, NetworkConfig(type="lora", rank=4, alpha=8.0, preset="av"))
    try:
        network.set_multiplier(0.5)
        with torch.no_grad():
            ours = base(inputs())
        path = save_network(network, tmp_path / "half.safetensors", config_json="{}", base_fingerprint="fp", step=1,
                            version="2.0", dtype="float32")
    finally:
        network.detach()
    model, _, tolerance = ltx_core_load(checkpoint, path, strength=0.5)
    with torch.no_grad():
        theirs = oracle_lib.ltx_core_forward(model, inputs())
    assert all(oracle_lib.relative_error(o, m) < tolerance for m, o in zip(ours, theirs))


# ---- what each runtime does with the other layouts and types, against what verify says ---------------------------


def measured_support(base, checkpoint, path, prediction):
    """{runtime: (modules applied, status)} as the real loaders behave: 'loads' when the output equals training,
    'wrong' when modules apply with another output, 'fails' when the loader raises, 'none' when nothing applies."""
    out = {}
    try:
        model, adapted = diffusers_load(base, path)
    except Exception:  # the loader's own error (IndexError, ValueError, ...) is the finding
        out["diffusers"] = (0, "fails")
    else:
        with torch.no_grad():
            theirs = model(inputs())
        same = all(oracle_lib.relative_error(o, m) < TOLERANCE for m, o in zip(prediction, theirs))
        out["diffusers"] = (len(adapted), "none" if not adapted else ("loads" if same else "wrong"))
    model, fused, tolerance = ltx_core_load(checkpoint, path)
    with torch.no_grad():
        theirs = oracle_lib.ltx_core_forward(model, inputs())
    same = all(oracle_lib.relative_error(o, m) < tolerance for m, o in zip(prediction, theirs))
    out["ltx_core"] = (len(fused), "none" if not fused else ("loads" if same else "wrong"))
    return out


@pytest.mark.parametrize("net,lora_format", [
    (NetworkConfig(type="lora", rank=4, alpha=2.0, preset="av"), "lora_ab"),
    (NetworkConfig(type="lora", rank=4, alpha=2.0, preset="av"), "down_up"),
    (NetworkConfig(type="dora", rank=4, alpha=2.0, preset="av"), "lora_ab"),
    (NetworkConfig(type="lokr", rank=2, alpha=3.0, preset="av", lokr_factor=2), "lora_ab"),
    (NetworkConfig(type="loha", rank=4, alpha=2.0, preset="av"), "lora_ab"),
], ids=["lora", "lora-down_up", "dora", "lokr", "loha"])
def test_runtime_support_states_what_the_loaders_do(base, checkpoint, tmp_path, caplog, net, lora_format):
    """LoRA in lora_ab loads in both; down_up fails in diffusers and is skipped by ltx-core; DoRA applies in both
    without its magnitude (a different result); LoKr and LoHa: diffusers refuses them, ltx-core skips them."""
    path, prediction, trained = trained_file(base, tmp_path, net, lora_format)
    tensors = load_file(str(path))
    predicted = runtime_support(tensors, parse_lora(tensors))
    with caplog.at_level(logging.WARNING):
        measured = measured_support(base, checkpoint, path, prediction)
    for runtime, (modules, status) in measured.items():
        assert (predicted[runtime].modules, predicted[runtime].status) == (modules, status), (runtime, predicted[runtime])
    expected = {"lora": ("loads", "loads"), "lora-down_up": ("fails", "none"), "dora": ("wrong", "wrong"),
                "lokr": ("fails", "none"), "loha": ("fails", "none")}[net.type if lora_format == "lora_ab" else "lora-down_up"]
    assert (measured["diffusers"][1], measured["ltx_core"][1]) == expected
    assert predicted["comfyui"].status == "loads" and predicted["comfyui"].modules == len(trained)


def test_alpha_keys_beside_lora_a_b(base, checkpoint, tmp_path, caplog):
    """lora_A/lora_B with an .alpha ≠ rank (ComfyUI applies alpha/rank·B·A): diffusers refuses the .alpha keys,
    ltx-core fuses B·A at scale 1, a different update, and says nothing."""
    path, _, trained = trained_file(base, tmp_path, NetworkConfig(type="lora", rank=4, alpha=4.0, preset="av"))
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        tensors[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(8.0)
    with_alpha = tmp_path / "with_alpha.safetensors"
    save_file(tensors, str(with_alpha))
    network = load_lora_file(base, with_alpha)  # our loader reads it as ComfyUI does
    try:
        with torch.no_grad():
            prediction = base(inputs())
    finally:
        network.detach()
    predicted = runtime_support(tensors, parse_lora(tensors))
    with caplog.at_level(logging.WARNING):
        measured = measured_support(base, checkpoint, with_alpha, prediction)
    assert measured == {"diffusers": (0, "fails"), "ltx_core": (len(trained), "wrong")}
    for runtime, (modules, status) in measured.items():
        assert (predicted[runtime].modules, predicted[runtime].status) == (modules, status), runtime
