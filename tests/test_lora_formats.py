"""LoRAs of other trainers (ai-toolkit, Lightricks ltx-trainer, the musubi-tuner LTX-2 fork, diffusers, PEFT):
verify says per group what would load on this model and why the rest cannot, ``convert`` writes them in our
layout, and the converted file applies the update the source trainer's runtime applies (module by module, and
through diffusers' and ltx-core's own loaders). Fixtures: ``lora_layouts.py`` (documented key layouts; the
diffusers and PEFT files written by those libraries)."""

from __future__ import annotations

import lora_layouts as layouts
import ltx_core_oracle as oracle_lib
import pytest
import test_lora_runtimes as runtimes
import torch
from ltx2_av_trainer.trainer.adapters.files import GROUPS, module_group, read_adapter_file
from ltx2_av_trainer.trainer.adapters.formats import (
    BLOCK_LINEARS,
    CONNECTOR_LINEARS,
    TOP_LEVEL_LINEARS,
    convert_lora,
    is_ltx2_linear,
    parse_lora,
    resolve_underscored,
)
from ltx2_av_trainer.trainer.adapters.network import load_lora_file
from ltx2_av_trainer.trainer.adapters.verify import verify_lora_keys
from ltx2_av_trainer.trainer.backends.diffusers_backend import build_denoiser, diffusers_to_reference_path
from ltx2_av_trainer.trainer.config import ConfigError, ModelConfig, TinyModelConfig
from safetensors.torch import load_file, save_file

TINY = TinyModelConfig()


@pytest.fixture(scope="module")
def base():
    return runtimes.bf16_base()


@pytest.fixture(scope="module")
def model_paths(base):
    return {diffusers_to_reference_path(n) for n, _ in base.transformer.named_modules() if n}


@pytest.fixture(scope="module")
def shapes(base):
    return layouts.linear_shapes(base.transformer)


def per_group(paths):
    counts = {g: 0 for g in GROUPS}
    for p in paths:
        counts[module_group(p)] += 1
    return counts


def write(folder, tensors, name="converted.safetensors", metadata=None):
    path = folder / name
    save_file(tensors, str(path), metadata=metadata or {})
    return path


def loaded_deltas(denoiser, path) -> dict[str, torch.Tensor]:
    """Reference path → the weight update our loader applies from ``path``."""
    network = load_lora_file(denoiser, path)
    try:
        modules = {diffusers_to_reference_path(n): m for n, m in denoiser.transformer.named_modules()}
        with torch.no_grad():
            return {p: layer.weight_delta(modules[p].weight).float() for p, layer in network.named_layers()}
    finally:
        network.detach()


# ---- the module grammar --------------------------------------------------------------------------------------


def test_the_module_grammar_is_exactly_the_models_linear_layers():
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from ltx2_av_trainer.trainer.backends.text_connectors import ConnectorStack
    from ltx2_av_trainer.trainer.backends.text_encoder import tiny_connectors_config

    found = set()
    for version in ("2.0", "2.3"):
        transformer = build_denoiser(ModelConfig(version=version)).transformer
        paths = {diffusers_to_reference_path(n) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        paths |= {p for p, _ in ConnectorStack(LTX2TextConnectors(**tiny_connectors_config(version, TINY))).adaptable_modules()}
        assert all(is_ltx2_linear(p) for p in paths), sorted(p for p in paths if not is_ltx2_linear(p))
        found |= paths
    block0 = {p.split(".", 2)[2] for p in found if p.startswith("transformer_blocks.0.")}
    connector0 = {p.split(".", 3)[3] for p in found if ".transformer_1d_blocks.0." in p}
    assert block0 == set(BLOCK_LINEARS) and connector0 == set(CONNECTOR_LINEARS)
    assert {p for p in found if "blocks." not in p} == set(TOP_LEVEL_LINEARS)
    assert not is_ltx2_linear("transformer_blocks.0.attn1.q_norm") and not is_ltx2_linear("time_embed.linear")


def test_underscored_names_resolve_against_the_module_grammar():
    assert resolve_underscored("transformer_blocks_11_audio_attn1_to_out_0") == "transformer_blocks.11.audio_attn1.to_out.0"
    assert resolve_underscored("transformer_blocks_0_audio_to_video_attn_to_k") == "transformer_blocks.0.audio_to_video_attn.to_k"
    assert resolve_underscored("transformer_blocks_3_attn1_to_q") == "transformer_blocks.3.attn1.to_q"
    assert resolve_underscored("av_ca_a2v_gate_adaln_single_emb_timestep_embedder_linear_1") == \
        "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1"
    assert resolve_underscored("audio_embeddings_connector_transformer_1d_blocks_1_ff_net_2") == \
        "audio_embeddings_connector.transformer_1d_blocks.1.ff.net.2"
    assert resolve_underscored("transformer_blocks_0_attn1_norm_q") is None


# ---- each trainer's file -------------------------------------------------------------------------------------------


def test_ai_toolkit_file(base, model_paths, shapes, tmp_path):
    factors = layouts.random_factors(shapes, layouts.BLOCK_MODULES + layouts.TOP_LEVEL_MODULES)
    source = layouts.ai_toolkit_file(tmp_path, factors)
    report = verify_lora_keys(source, model_paths)
    # ComfyUI, diffusers and ltx-core all load this layout as it is; alpha is the rank (update B·A).
    assert report.layout == "lora_ab" and report.ok and report.unloaded_keys == []
    assert report.by_group == report.convertible_by_group == per_group(factors) and report.by_group["other"] == 4
    assert {r["status"] for r in report.runtimes.values()} == {"loads"} and report.not_convertible == {}
    conversion = convert_lora(*read_adapter_file(source))
    assert conversion.tensors.keys() == load_file(str(source)).keys()  # already our layout
    deltas = loaded_deltas(base, write(tmp_path, conversion.tensors))
    for path, (a, b) in factors.items():
        expected = b.bfloat16().float() @ a.bfloat16().float()
        assert torch.allclose(deltas[path], expected, rtol=1e-5, atol=1e-7), path


def test_ltx_trainer_file_and_its_training_alpha(base, model_paths, shapes, tmp_path):
    factors = layouts.random_factors(shapes, layouts.ATTENTION_MODULES, seed=2)
    source = layouts.ltx_trainer_file(tmp_path, factors, metadata={"reference_downscale_factor": "2"})
    report = verify_lora_keys(source, model_paths)
    assert report.layout == "lora_ab" and report.ok
    assert report.convertible_by_group == per_group(factors)
    assert any("store no alpha" in note for note in report.notes)
    # As every runtime applies it (B·A), and with the training alpha folded in (lora.alpha 2 at rank 4: half).
    for alpha, scale in ((None, 1.0), (2.0, 0.5)):
        conversion = convert_lora(*read_adapter_file(source), alpha=alpha)
        assert conversion.metadata["reference_downscale_factor"] == "2"  # IC-LoRA settings survive
        deltas = loaded_deltas(base, write(tmp_path, conversion.tensors, f"ltx_trainer_{scale}.safetensors"))
        for path, (a, b) in factors.items():
            assert torch.allclose(deltas[path], scale * b @ a, rtol=1e-5, atol=1e-7), path


def test_musubi_tuner_training_file(base, model_paths, shapes, tmp_path):
    factors = layouts.random_factors(shapes, layouts.BLOCK_MODULES, seed=3)
    connector = {"audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q": factors["transformer_blocks.0.audio_attn1.to_k"]}
    dora_module = "transformer_blocks.1.audio_ff.net.2"
    source = layouts.musubi_file(tmp_path, factors, alpha=8.0, connector_factors=connector, dora_magnitude_of=dora_module)
    report = verify_lora_keys(source, model_paths)
    # ComfyUI has no key-map entry for the fork's lora_unet_model_ names: of the whole file it maps only the
    # connector module (lora_unet_<path>), which is not part of this denoiser.
    assert report.layout == "kohya" and not report.ok and report.applied_modules == 0
    assert report.runtimes["comfyui"] == {"modules": 1, "status": "partial", "reason": report.runtimes["comfyui"]["reason"]}
    assert report.runtimes["diffusers"]["status"] == "fails" and report.runtimes["ltx_core"]["status"] == "none"
    expected = per_group(factors)
    assert report.convertible_by_group == expected  # the connector module is not part of the denoiser
    magnitude_key = f"lora_unet_model_{dora_module.replace('.', '_')}.lora_magnitude_vector.weight"
    assert "DoRA magnitude per output row" in report.not_convertible[magnitude_key]
    assert "no such module" in report.not_convertible["audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.lora_down.weight"]
    assert "musubi" in report.written_by and f"cannot convert {magnitude_key}" in report.to_text()

    with pytest.raises(ConfigError, match="keys cannot be converted.*lora_magnitude_vector"):
        convert_lora(*read_adapter_file(source))
    conversion = convert_lora(*read_adapter_file(source), skip_unconvertible=True, module_paths=model_paths)
    assert set(conversion.dropped) == {magnitude_key} | {
        f"audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q{s}" for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert "ss_network_alpha" not in conversion.metadata  # the alpha is folded now
    converted = write(tmp_path, conversion.tensors)
    assert verify_lora_keys(converted, model_paths).by_group == expected
    deltas = loaded_deltas(base, converted)
    for path, (a, b) in factors.items():
        assert torch.allclose(deltas[path], 8.0 / layouts.RANK * b @ a, rtol=1e-5, atol=1e-7), path


def test_diffusers_file(model_paths, tmp_path):
    """Written by diffusers itself (``LTX2Pipeline.save_lora_weights``): diffusers names, alpha in its metadata."""
    source_model = build_denoiser(ModelConfig())
    config = layouts.peft_wrapped(source_model.transformer, alpha=8.0)
    source = layouts.diffusers_file(tmp_path, source_model.transformer, config)
    expected = layouts.peft_deltas(source_model.transformer)
    report = verify_lora_keys(source, model_paths)
    assert report.layout == "diffusers" and report.applied_modules == 0
    assert report.runtimes["diffusers"]["status"] == "loads" and report.runtimes["ltx_core"]["status"] == "none"
    assert report.convertible_by_group == per_group(expected) and report.convertible_by_group["other"] == 2
    conversion = convert_lora(*read_adapter_file(source))
    assert "lora_adapter_metadata" not in conversion.metadata  # it would scale the folded file again in diffusers
    deltas = loaded_deltas(build_denoiser(ModelConfig()), write(tmp_path, conversion.tensors))
    assert deltas.keys() == expected.keys() and "patchify_proj" in deltas and "adaln_single.linear" in deltas
    for path, delta in expected.items():
        assert torch.allclose(deltas[path], delta, rtol=1e-5, atol=1e-7), path


def test_peft_file_with_its_alpha(model_paths, tmp_path):
    source, peft_model = layouts.peft_file(tmp_path, build_denoiser(ModelConfig()).transformer, alpha=2.0)
    expected = layouts.peft_deltas(peft_model)
    report = verify_lora_keys(source, model_paths)
    assert report.layout == "peft" and {r["status"] for r in report.runtimes.values()} == {"none"}
    assert report.convertible_by_group == per_group(expected)
    conversion = convert_lora(*read_adapter_file(source), alpha=2.0)  # PEFT keeps alpha in adapter_config.json
    deltas = loaded_deltas(build_denoiser(ModelConfig()), write(tmp_path, conversion.tensors))
    for path, delta in expected.items():
        assert torch.allclose(deltas[path], delta, rtol=1e-5, atol=1e-7), path


def test_a_file_for_another_model_version(model_paths, tmp_path):
    """LTX-2.3's gated-attention modules do not exist in LTX-2.0: named, never silently dropped."""
    shapes23 = layouts.linear_shapes(build_denoiser(ModelConfig(version="2.3")).transformer)
    factors = layouts.random_factors(shapes23, ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_gate_logits"])
    source = layouts.ai_toolkit_file(tmp_path, factors)
    report = verify_lora_keys(source, model_paths)
    assert report.convertible_by_group["video_attn"] == 1
    assert report.not_convertible["transformer_blocks.0.attn1.to_gate_logits.lora_down.weight"].startswith("this model has no such module")
    with pytest.raises(ConfigError, match="to_gate_logits.*no such module"):
        convert_lora(*read_adapter_file(source), module_paths=model_paths)


def test_unknown_names_and_tensors_are_named_with_a_reason():
    tensors = {
        "diffusion_model.transformer_blocks.0.attn1.q_norm.lora_A.weight": torch.zeros(2, 16),
        "diffusion_model.transformer_blocks.0.attn1.q_norm.lora_B.weight": torch.zeros(16, 2),
        "diffusion_model.transformer_blocks.0.attn1.to_q.diff": torch.zeros(32, 32),
        "lora_unet_model_transformer_blocks_0_attn9_to_q.lora_down.weight": torch.zeros(2, 32),
        "diffusion_model.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(2, 32),
        "text_embedding_projection.aggregate_embed.lora_A.weight": torch.zeros(2, 8),
        "diffusion_model.transformer_blocks.0.attn1.to_v.alpha": torch.tensor(4.0),
        "diffusion_model.transformer_blocks.0.attn2.to_q.lokr_w1": torch.zeros(4, 4),
    }
    why = parse_lora(tensors).unconvertible
    assert "no LTX-2 Linear module" in why["diffusion_model.transformer_blocks.0.attn1.q_norm.lora_A.weight"]
    assert "full weight difference" in why["diffusion_model.transformer_blocks.0.attn1.to_q.diff"]
    assert "dots written as underscores" in why["lora_unet_model_transformer_blocks_0_attn9_to_q.lora_down.weight"]
    assert "incomplete lora" in why["diffusion_model.transformer_blocks.0.attn1.to_k.lora_A.weight"]
    assert "text encoder" in why["text_embedding_projection.aggregate_embed.lora_A.weight"]
    assert "incomplete lokr: .lokr_w2" in why["diffusion_model.transformer_blocks.0.attn2.to_q.lokr_w1"]
    assert "first factor" in why["diffusion_model.transformer_blocks.0.attn1.to_v.alpha"]


# ---- converted files in the other runtimes' own loaders ------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(base, tmp_path_factory):
    return oracle_lib.write_checkpoint(base, tmp_path_factory.mktemp("ltx_core"), TINY, dtype=torch.bfloat16)


@pytest.mark.parametrize("source_kind", ["musubi", "ai_toolkit"])
def test_converted_files_load_in_diffusers_and_ltx_core_like_ours(base, checkpoint, shapes, tmp_path, source_kind):
    """Outside the blocks too (ai-toolkit adapts patchify_proj, the adaLN and the caption projection): their
    reference names must reach diffusers' proj_in / time_embed / ... and ltx-core's own modules."""
    if source_kind == "musubi":
        factors = layouts.random_factors(shapes, layouts.BLOCK_MODULES, seed=4)
        source = layouts.musubi_file(tmp_path, factors, alpha=2.0)
    else:
        factors = layouts.random_factors(shapes, layouts.BLOCK_MODULES + layouts.TOP_LEVEL_MODULES, seed=5)
        source = layouts.ai_toolkit_file(tmp_path, factors)
    converted = write(tmp_path, convert_lora(*read_adapter_file(source), dtype=torch.float32).tensors)
    network = load_lora_file(base, converted)
    try:
        with torch.no_grad():
            ours = base(runtimes.inputs())
    finally:
        network.detach()
    model, adapted = runtimes.diffusers_load(base, converted)
    assert adapted == set(factors)
    with torch.no_grad():
        theirs = model(runtimes.inputs())
    assert all(oracle_lib.relative_error(o, m) < runtimes.TOLERANCE for m, o in zip(ours, theirs))
    model, fused, tolerance = runtimes.ltx_core_load(checkpoint, converted)
    assert fused == set(factors)
    with torch.no_grad():
        theirs = oracle_lib.ltx_core_forward(model, runtimes.inputs())
    assert all(oracle_lib.relative_error(o, m) < tolerance for m, o in zip(ours, theirs))
