"""Tiny LTXAV checkpoints built with ComfyUI's own classes (``trainer.backends.comfyui.random_model``, which the
bench uses too), their conversion to the diffusers model, and ComfyUI's model folders redirected for a test.

Needs ComfyUI importable (the ComfyUI-tier tests put ``COMFYUI_PATH`` on ``sys.path`` first).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import torch

from ltx2_av_trainer.trainer.backends.comfyui.random_model import (  # noqa: F401  (re-exported for the tests)
    CHECKPOINT_PREFIX,
    REAL_CHECKPOINT_COMFY_SETTINGS,
    build_tiny_ltxav_state_dict,
    comfy_transformer_config,
    write_tiny_ltxav_checkpoint,
)
from ltx2_av_trainer.trainer.backends.diffusers_backend import DiffusersDenoiser, tiny_transformer_config
from ltx2_av_trainer.trainer.config import TinyModelConfig

@contextlib.contextmanager
def comfy_model_folders(folders: dict[str, Path]) -> Iterator[None]:
    """ComfyUI's model folders (``loras``, ``checkpoints``, ...) pointed at ``folders[name]`` while open, and
    restored after."""
    import folder_paths

    saved = {name: folder_paths.folder_names_and_paths[name] for name in folders}
    for name, folder in folders.items():
        folder_paths.folder_names_and_paths[name] = ([str(folder)], folder_paths.supported_pt_extensions)
    try:
        yield
    finally:
        folder_paths.folder_names_and_paths.update(saved)


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
