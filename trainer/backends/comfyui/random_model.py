"""Random-weight LTXAV checkpoints that ComfyUI loads as it loads a real one (for the bench and the tests).

The checkpoint is what ``comfy.sd.load_diffusion_model`` detects as LTXAV: keys ``model.diffusion_model.*``
and safetensors metadata ``{"config": json.dumps({"transformer": cfg})}``. ``cfg`` carries the real
checkpoints' positioning settings (split RoPE, float64 frequencies, middle-indices grid, causal positioning,
cross-attention timestep multiplier 1000) because ComfyUI's code defaults differ from them on all five;
without them no diffusers model could match ComfyUI's forward. The sizes come from a ``TinyModelConfig``
(the same fields as the diffusers tiny model, so both backends can be built with equal dimensions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...config import TinyModelConfig
from ...io_utils import save_safetensors_atomic

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
    """Random weights for ComfyUI's ``LTXAVModel`` at these sizes (keys without the checkpoint prefix)."""
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel

    cfg = comfy_transformer_config(version, tiny)
    # The meta device: only the names and shapes are read, and nothing the size of the model is allocated twice.
    model = LTXAVModel(**cfg, operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float32)
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
    """Save the checkpoint as ``folder/tiny_ltxav_<version>.safetensors`` and return its path."""
    state = build_tiny_ltxav_state_dict(version, tiny, seed)
    metadata = {"config": json.dumps({"transformer": comfy_transformer_config(version, tiny)})}
    path = Path(folder) / f"tiny_ltxav_{version}.safetensors"
    save_safetensors_atomic({CHECKPOINT_PREFIX + k: v for k, v in state.items()}, path, metadata=metadata)
    return path


def load_ltxav_checkpoint(path: Path):
    """The MODEL (a ``ModelPatcher``) that ComfyUI's diffusion-model loader makes of a checkpoint file."""
    import comfy.sd

    from .env import import_model_management

    import_model_management()
    return comfy.sd.load_diffusion_model(str(path))
