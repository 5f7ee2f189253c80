"""LoRA files in the key layouts other LTX-2 trainers write, built at test time from their documented layouts
(no downloads): what each trainer's save code produces, and the weight update each runtime applies from it.

- ai-toolkit (``extensions_built_in/diffusion_models/ltx2``): PEFT-format LoRA on every Linear of the diffusers
  transformer, keys renamed to ``diffusion_model.<reference path>.lora_A.weight`` / ``.lora_B.weight``; alpha is
  forced to the rank and not stored (update B·A).
- Lightricks ltx-trainer (``packages/ltx-trainer``, ``_save_checkpoint``): PEFT on ltx-core's model (reference
  names; q/k/v/out of the attentions by default), ``base_model.model.`` replaced by ``diffusion_model.``; the
  training alpha (``lora.alpha``) is not stored, so every runtime applies B·A (alpha/rank·B·A was trained).
- musubi-tuner LTX-2 fork (training files): kohya keys ``lora_unet_model_<path with underscores>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``; the video connector as ``lora_unet_embeddings_connector_``; DoRA as
  ``.lora_magnitude_vector.weight`` (update alpha/rank·up·down).
- diffusers (``LTX2Pipeline.save_lora_weights``) and raw PEFT (``save_pretrained``) are written by those libraries
  themselves (see ``diffusers_file`` / ``peft_file``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from ltx2_av_trainer.trainer.backends.diffusers_backend import diffusers_to_reference_path
from safetensors.torch import save_file

# One module per group and a few outside the blocks (ai-toolkit adapts every Linear).
BLOCK_MODULES = [
    "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_out.0", "transformer_blocks.0.audio_attn1.to_k",
    "transformer_blocks.1.audio_attn2.to_v", "transformer_blocks.0.audio_to_video_attn.to_q",
    "transformer_blocks.1.video_to_audio_attn.to_out.0", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.1.audio_ff.net.2",
]
TOP_LEVEL_MODULES = ["patchify_proj", "adaln_single.linear", "av_ca_a2v_gate_adaln_single.emb.timestep_embedder.linear_1",
                     "audio_caption_projection.linear_2"]
ATTENTION_MODULES = [p for p in BLOCK_MODULES if ".ff." not in p and "_ff." not in p]
RANK = 4


def linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    """Reference path → (out, in) of every Linear of a diffusers LTX-2 transformer."""
    return {diffusers_to_reference_path(name): (m.out_features, m.in_features)
            for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def random_factors(shapes, paths, seed: int = 0, rank: int = RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path → (A [rank, in], B [out, rank]) with non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        rows, cols = shapes[path]
        out[path] = (torch.randn(rank, cols, generator=g) / cols ** 0.5, torch.randn(rows, rank, generator=g) * 0.3)
    return out


def ai_toolkit_file(folder: Path, factors) -> Path:
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"diffusion_model.{path}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"diffusion_model.{path}.lora_B.weight"] = b.to(torch.bfloat16)
    path = folder / "ai_toolkit_ltx2.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "software": '{"name": "ai-toolkit"}'})
    return path


def ltx_trainer_file(folder: Path, factors, metadata: dict[str, str] | None = None) -> Path:
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"diffusion_model.{path}.lora_A.weight"] = a
        tensors[f"diffusion_model.{path}.lora_B.weight"] = b
    path = folder / "lora_weights_step_02000.safetensors"
    save_file(tensors, str(path), metadata=metadata or {})
    return path


def musubi_file(folder: Path, factors, alpha: float, connector_factors=None, dora_magnitude_of: str | None = None) -> Path:
    tensors = {}
    for path, (a, b) in factors.items():
        name = "lora_unet_model_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        if path == dora_magnitude_of:
            tensors[f"{name}.lora_magnitude_vector.weight"] = torch.ones(b.shape[0])
    for path, (a, b) in (connector_factors or {}).items():
        video = path.startswith("video_embeddings_connector.")
        rest = path.split(".", 1)[1].replace(".", "_")
        name = ("lora_unet_embeddings_connector_" if video else "lora_unet_audio_embeddings_connector_") + rest
        tensors[f"{name}.lora_down.weight"] = a.clone()
        tensors[f"{name}.lora_up.weight"] = b.clone()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path = folder / "musubi_ltx2_lora.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(alpha)})
    return path


DIFFUSERS_TARGETS = ["to_q", "to_out.0", "proj_in", "time_embed.linear", "audio_ff.net.2"]


def peft_wrapped(transformer, alpha: float, seed: int = 0):
    """The transformer with a PEFT LoRA (diffusers' own ``add_adapter``), every factor non-trivial."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=DIFFUSERS_TARGETS, init_lora_weights=False)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return config


def diffusers_file(folder: Path, transformer, config) -> Path:
    """What ``LTX2Pipeline.save_lora_weights`` writes for a PEFT-adapted transformer (with its adapter config)."""
    from diffusers import LTX2Pipeline
    from peft.utils import get_peft_model_state_dict

    LTX2Pipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def peft_file(folder: Path, transformer, alpha: float, seed: int = 0):
    """What PEFT's ``save_pretrained`` writes (``adapter_model.safetensors``, alpha only in adapter_config.json)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(transformer, LoraConfig(r=RANK, lora_alpha=alpha, target_modules=DIFFUSERS_TARGETS,
                                                   init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(folder))
    return folder / "adapter_model.safetensors", model


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """Reference path → the weight update PEFT's own layers apply (``get_delta_weight``)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix("base_model.model.")
            out[diffusers_to_reference_path(name)] = module.get_delta_weight("default").detach().float()
    return out
