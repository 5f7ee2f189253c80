"""Tiny LTXAV checkpoints built with ComfyUI's own classes, and their conversion to the diffusers model.

The checkpoint is what ``comfy.sd.load_diffusion_model`` detects as LTXAV: keys ``model.diffusion_model.*``
and safetensors metadata ``{"config": json.dumps({"transformer": cfg})}``. ``cfg`` carries the real
checkpoints' positioning settings (split RoPE, float64 frequencies, middle-indices grid, causal positioning,
cross-attention timestep multiplier 1000) because ComfyUI's code defaults differ from them on all five;
without them no diffusers model could match ComfyUI's forward.

Needs ComfyUI importable (the ComfyUI-tier tests put ``COMFYUI_PATH`` on ``sys.path`` first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ltx2_av_trainer.trainer.backends.diffusers_backend import DiffusersDenoiser, tiny_transformer_config
from ltx2_av_trainer.trainer.config import TinyModelConfig
from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

# ComfyUI config keys of the real-checkpoint settings (comfy/ldm/lightricks/model.py: LTXRopeType.KEY,
# LTXFrequenciesPrecision.KEY, and LTXAVModel's constructor arguments).
REAL_CHECKPOINT_COMFY_SETTINGS = dict(
    rope_type="split",
    frequencies_precision="float64",
    use_middle_indices_grid=True,
    causal_temporal_positioning=True,
    av_ca_timestep_scale_multiplier=1000,
)

CHECKPOINT_PREFIX = "model.diffusion_model."


def comfy_transformer_config(version: str, tiny: TinyModelConfig) -> dict:
    """The ``transformer`` config ComfyUI reads from the checkpoint metadata (same dims as the diffusers tiny model)."""
    inner = tiny.num_attention_heads * tiny.attention_head_dim
    audio_inner = tiny.audio_num_attention_heads * tiny.audio_attention_head_dim
    cfg = dict(
        num_attention_heads=tiny.num_attention_heads,
        attention_head_dim=tiny.attention_head_dim,
        cross_attention_dim=inner,
        audio_num_attention_heads=tiny.audio_num_attention_heads,
        audio_attention_head_dim=tiny.audio_attention_head_dim,
        audio_cross_attention_dim=audio_inner,
        in_channels=128,
        audio_in_channels=128,  # ComfyUI's audio patchifier assumes 8 channels x 16 mel bins
        caption_channels=tiny.caption_channels,
        num_layers=tiny.num_layers,
        **REAL_CHECKPOINT_COMFY_SETTINGS,
    )
    if version == "2.0":
        # Both connectors run at the caption width; the model projects their output itself.
        cfg.update(
            connector_num_attention_heads=tiny.num_attention_heads,
            connector_attention_head_dim=tiny.caption_channels // tiny.num_attention_heads,
        )
    elif version == "2.3":
        # Gated attention, cross-attention adaLN, and the caption projection before the connectors (done by
        # the text encoder's dual projection here, so the model holds no caption projection): each connector
        # runs at its stream's width.
        cfg.update(
            apply_gated_attention=True,
            cross_attention_adaln=True,
            caption_proj_before_connector=True,
            caption_projection_first_linear=False,
            connector_num_attention_heads=tiny.num_attention_heads,
            connector_attention_head_dim=tiny.attention_head_dim,
            audio_connector_num_attention_heads=tiny.audio_num_attention_heads,
            audio_connector_attention_head_dim=tiny.audio_attention_head_dim,
        )
    else:
        raise ValueError(f"unknown LTX version {version!r}; use '2.0' or '2.3'")
    return cfg


def build_tiny_ltxav_state_dict(version: str, tiny: TinyModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's ``LTXAVModel`` at tiny size (keys without the checkpoint prefix)."""
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    cfg = comfy_transformer_config(version, tiny)
    # disable_weight_init leaves parameters uninitialised (torch.empty), as ComfyUI does before loading.
    model = LTXAVModel(**cfg, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in sorted(model.state_dict().items()):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        if tensor.ndim >= 2:
            value = noise / tensor.shape[-1] ** 0.5  # ~unit activations through Linear layers and tables
        elif name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        state[name] = value
    return state


def write_tiny_ltxav_checkpoint(folder: Path, version: str, tiny: TinyModelConfig, seed: int = 0) -> Path:
    """Save the tiny checkpoint as ``folder/tiny_ltxav_<version>.safetensors`` and return its path."""
    state = build_tiny_ltxav_state_dict(version, tiny, seed)
    metadata = {"config": json.dumps({"transformer": comfy_transformer_config(version, tiny)})}
    path = Path(folder) / f"tiny_ltxav_{version}.safetensors"
    save_safetensors_atomic({CHECKPOINT_PREFIX + k: v for k, v in state.items()}, path, metadata=metadata)
    return path


# ---- ComfyUI / ltx-core keys → diffusers LTX2VideoTransformer3DModel keys -----------------------------

# Top-level renames apply only at the start of a key: a substring replace would corrupt
# av_ca_*_adaln_single (which contains "adaln_single.").
_TOP_LEVEL = [
    ("patchify_proj.", "proj_in."),
    ("audio_patchify_proj.", "audio_proj_in."),
    ("adaln_single.", "time_embed."),
    ("audio_adaln_single.", "audio_time_embed."),
    ("av_ca_video_scale_shift_adaln_single.", "av_cross_attn_video_scale_shift."),
    ("av_ca_audio_scale_shift_adaln_single.", "av_cross_attn_audio_scale_shift."),
    ("av_ca_a2v_gate_adaln_single.", "av_cross_attn_video_a2v_gate."),
    ("av_ca_v2a_gate_adaln_single.", "av_cross_attn_audio_v2a_gate."),
    ("prompt_adaln_single.", "prompt_adaln."),
    ("audio_prompt_adaln_single.", "audio_prompt_adaln."),
]
_IN_BLOCK = [
    (r"\.scale_shift_table_a2v_ca_video$", ".video_a2v_cross_attn_scale_shift_table"),
    (r"\.scale_shift_table_a2v_ca_audio$", ".audio_a2v_cross_attn_scale_shift_table"),
    (r"\.q_norm\.", ".norm_q."),
    (r"\.k_norm\.", ".norm_k."),
]
_CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.")


def comfy_to_diffusers_key(key: str) -> str:
    key = key.removeprefix(CHECKPOINT_PREFIX)
    for old, new in _TOP_LEVEL:
        if key.startswith(old):
            return new + key[len(old):]
    for pattern, repl in _IN_BLOCK:
        key = re.sub(pattern, repl, key)
    return key


def comfy_to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's weights in diffusers naming. The text connectors are left out: in diffusers they
    are a separate model (``LTX2TextConnectors``), and they run before the denoiser in both stacks."""
    out = {}
    for key, value in state.items():
        bare = key.removeprefix(CHECKPOINT_PREFIX)
        if bare.startswith(_CONNECTOR_PREFIXES):
            continue
        out[comfy_to_diffusers_key(bare)] = value
    return out


def diffusers_denoiser_from_comfy_state(
    state: dict[str, torch.Tensor], version: str, tiny: TinyModelConfig, cross_modal_sigma: str = "reference"
) -> DiffusersDenoiser:
    """Our diffusers backend with exactly the ComfyUI checkpoint's weights (``strict=True``)."""
    from diffusers import LTX2VideoTransformer3DModel

    transformer = LTX2VideoTransformer3DModel(**tiny_transformer_config(version, tiny))
    transformer.load_state_dict(comfy_to_diffusers_state_dict(state), strict=True)
    transformer.requires_grad_(False).eval()
    return DiffusersDenoiser(transformer, version, cross_modal_sigma)
