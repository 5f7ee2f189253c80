"""Lightricks' reference implementation (``ltx-core``) as a CPU oracle for our diffusers backend.

A tiny ltx-core ``LTXModel`` is built by ltx-core's own loader (``SingleGPUModelBuilder`` with
``LTXModelConfigurator`` and ``LTXV_MODEL_COMFY_RENAMING_MAP``, what ltx-pipelines uses) from a checkpoint that
holds exactly the weights of our tiny diffusers model, renamed to the reference names (the diffusers
single-file renames plus the two per-block ``scale_shift_table_a2v_ca_*`` tables). Its positions come from
ltx-core's own latent tools, so the oracle also checks how our backend lets diffusers place the tokens.

ltx-core is a test/dev dependency only (``tests/test_architecture.py`` keeps it out of the pack). The release
pinned in requirements-dev.txt is used, unless ``LTX_CORE_PATH`` names a source tree (a checkout of
Lightricks/LTX-2, its ``packages/ltx-core``, or that folder's ``src``): then that version is imported and the
tests expect the wiring it implements (``WIRING_BY_VERSION``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from ltx2_av_trainer.trainer.backends.diffusers_backend import DiffusersDenoiser, diffusers_to_reference_path
from ltx2_av_trainer.trainer.backends.interface import DenoiserInput, TextContext
from ltx2_av_trainer.trainer.config import TinyModelConfig
from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

ENV_VAR = "LTX_CORE_PATH"
CHECKPOINT_PREFIX = "model.diffusion_model."

# Which cross-modal σ wiring (model.cross_modal_sigma) each ltx-core release implements: the PyPI release 1.0.0
# (March 2026) drives the a2v/v2a scale/shift and gates from the other modality's σ; since 1.1.4 (May 2026)
# scale/shift follow each modality's own timestep and the a2v/v2a gates σ_a/σ_v, as ComfyUI does.
WIRING_BY_VERSION = [((1, 1, 4), "reference"), ((0, 0, 0), "cross")]


def expected_wiring(version: str) -> str:
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    return next(wiring for first, wiring in WIRING_BY_VERSION if parts >= first)


# ---- importing the oracle --------------------------------------------------------------------------------------


def _source_root(path: str) -> Path:
    """The folder that holds the ``ltx_core`` package inside a source tree."""
    root = Path(path).expanduser().resolve()
    for candidate in (root, root / "src", root / "packages" / "ltx-core" / "src"):
        if (candidate / "ltx_core" / "__init__.py").is_file():
            return candidate
    raise FileNotFoundError(f"{ENV_VAR}={path}: no ltx_core package in it, its src/ or packages/ltx-core/src/ "
                            "(point it at a checkout of github.com/Lightricks/LTX-2)")


def _source_version(src: Path) -> str:
    text = (src.parent / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        raise ValueError(f"{src.parent / 'pyproject.toml'}: no version line")
    return match.group(1)


@dataclass(frozen=True)
class Oracle:
    version: str
    origin: str  # "PyPI" or the source tree

    @property
    def wiring(self) -> str:
        return expected_wiring(self.version)


def load_oracle() -> Oracle:
    """Import ltx-core (from ``LTX_CORE_PATH`` when set) and say which release it is."""
    path = os.environ.get(ENV_VAR)
    if path:
        src = _source_root(path)
        loaded = sys.modules.get("ltx_core")
        if loaded is not None and Path(loaded.__file__).resolve().parent.parent != src:
            raise RuntimeError(f"ltx_core was already imported from {loaded.__file__}, not from {ENV_VAR}")
        if str(src) not in sys.path:
            sys.path.insert(0, str(src))
        importlib.import_module("ltx_core")
        return Oracle(_source_version(src), str(src))
    try:
        importlib.import_module("ltx_core")
    except ImportError as exc:
        raise ImportError("ltx-core is not installed: `make setup` installs the pinned release from requirements-dev.txt "
                          f"(or set {ENV_VAR} to a Lightricks/LTX-2 checkout)") from exc
    return Oracle(importlib.metadata.version("ltx-core"), "PyPI")


# ---- our tiny model as an ltx-core checkpoint -------------------------------------------------------------------

_BLOCK_TABLES = {
    "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
    "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
}


def reference_key(diffusers_key: str) -> str:
    """A diffusers ``LTX2VideoTransformer3DModel`` state-dict key in reference (ComfyUI / ltx-core) naming."""
    if "." not in diffusers_key:
        return diffusers_key  # top-level tables keep their names
    module, leaf = diffusers_key.rsplit(".", 1)
    if leaf in _BLOCK_TABLES:
        return f"{module}.{_BLOCK_TABLES[leaf]}"
    return f"{diffusers_to_reference_path(module)}.{leaf}"


def reference_state_dict(transformer) -> dict[str, torch.Tensor]:
    return {reference_key(k): v.detach().clone() for k, v in transformer.state_dict().items()}


def ltx_core_config(version: str, tiny: TinyModelConfig) -> dict:
    """The checkpoint metadata config ltx-core's ``LTXModelConfigurator`` reads, with the real checkpoints'
    positioning settings (split RoPE, float64 frequencies, cross-attention timestep multiplier 1000)."""
    inner = tiny.num_attention_heads * tiny.attention_head_dim
    audio_inner = tiny.audio_num_attention_heads * tiny.audio_attention_head_dim
    transformer = dict(
        dropout=0.0, attention_bias=True, num_vector_embeds=None, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, use_linear_projection=False, only_cross_attention=False, cross_attention_norm=True,
        double_self_attention=False, upcast_attention=False, standardization_norm="rms_norm",
        norm_elementwise_affine=False, qk_norm="rms_norm", positional_embedding_type="rope",
        use_audio_video_cross_attention=True, share_ff=False, av_cross_ada_norm=True, use_middle_indices_grid=True,
        num_attention_heads=tiny.num_attention_heads, attention_head_dim=tiny.attention_head_dim,
        cross_attention_dim=inner, audio_num_attention_heads=tiny.audio_num_attention_heads,
        audio_attention_head_dim=tiny.audio_attention_head_dim, audio_cross_attention_dim=audio_inner,
        in_channels=128, out_channels=128, audio_in_channels=128, audio_out_channels=128,
        num_layers=tiny.num_layers, caption_channels=tiny.caption_channels, norm_eps=1e-6,
        rope_type="split", frequencies_precision="float64", av_ca_timestep_scale_multiplier=1000,
        timestep_scale_multiplier=1000,
    )
    if version == "2.3":
        # Gated attention, cross-attention adaLN; the caption projection lives in the text encoder.
        transformer.update(apply_gated_attention=True, cross_attention_adaln=True, caption_proj_before_connector=True)
    return {"transformer": transformer}


def write_checkpoint(denoiser: DiffusersDenoiser, folder: Path, tiny: TinyModelConfig, *,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Our tiny model's weights as an ltx-core checkpoint (``model.diffusion_model.*`` keys, config metadata)."""
    state = {CHECKPOINT_PREFIX + k: v.to(dtype).contiguous() for k, v in reference_state_dict(denoiser.transformer).items()}
    path = Path(folder) / f"tiny_ltx_core_{denoiser.version}_{str(dtype).split('.')[-1]}.safetensors"
    metadata = {"config": json.dumps(ltx_core_config(denoiser.version, tiny))}
    save_safetensors_atomic(state, path, metadata=metadata)
    return path


def build_model(checkpoint: Path, *, loras: tuple[tuple[str, float], ...] = (), dtype: torch.dtype | None = None):
    """ltx-core's ``LTXModel`` from a checkpoint, with LoRAs fused by ltx-core's own loader (what ltx-pipelines
    does: ``LTXV_LORA_COMFY_RENAMING_MAP``)."""
    from ltx_core.loader import LTXV_LORA_COMFY_RENAMING_MAP, SingleGPUModelBuilder
    from ltx_core.model.transformer.model_configurator import LTXV_MODEL_COMFY_RENAMING_MAP, LTXModelConfigurator

    builder = SingleGPUModelBuilder(model_class_configurator=LTXModelConfigurator, model_path=str(checkpoint),
                                    model_sd_ops=LTXV_MODEL_COMFY_RENAMING_MAP)
    for path, strength in loras:
        builder = builder.lora(str(path), strength, LTXV_LORA_COMFY_RENAMING_MAP)
    model = builder.build(device=torch.device("cpu"), dtype=dtype)
    if dtype is not None:
        # With LoRAs, ltx-core gives only the fused weights the requested dtype and leaves the rest as stored
        # (bf16): cast the rest too (lossless from bf16) so every tensor has the dtype asked for.
        model = model.to(dtype)
    # ltx-core only logs a warning for tensors the checkpoint did not provide: the oracle must be complete.
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise AssertionError(f"ltx-core left {len(missing)} tensors without weights: {missing[:5]}")
    return model.eval()


# ---- the same call on both models ---------------------------------------------------------------------------------


def make_inputs(version: str, tiny: TinyModelConfig, sigma_video: torch.Tensor, sigma_audio: torch.Tensor, *,
                batch: int = 2, frames: int = 2, height: int = 2, width: int = 3, audio_frames: int = 9,
                text_len: int = 6, seed: int = 0) -> DenoiserInput:
    g = torch.Generator().manual_seed(seed)
    if version == "2.3":
        dv = tiny.num_attention_heads * tiny.attention_head_dim
        da = tiny.audio_num_attention_heads * tiny.audio_attention_head_dim
    else:
        dv = da = tiny.caption_channels
    return DenoiserInput(
        video=torch.randn(batch, 128, frames, height, width, generator=g),
        audio=torch.randn(batch, 8, audio_frames, 16, generator=g),
        sigma_video=sigma_video,
        sigma_audio=sigma_audio,
        text=TextContext(torch.randn(batch, text_len, dv, generator=g), torch.randn(batch, text_len, da, generator=g),
                         torch.ones(batch, text_len)),
        fps=25.0,
    )


def _per_token(sigma: torch.Tensor, tokens: int) -> torch.Tensor:
    return sigma if sigma.ndim == 2 else sigma[:, None].expand(-1, tokens)


def ltx_core_forward(model, inputs: DenoiserInput, *, swap_sigmas: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ltx-core's velocity predictions for ``inputs``, in our latent layouts. Positions and patchification
    come from ltx-core's own latent tools (``VideoLatentTools`` / ``AudioLatentTools``, causal fix on, as in
    ltx-pipelines). ``swap_sigmas`` hands each modality the other one's σ (a negative control; per-sample σ only)."""
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier
    from ltx_core.model.transformer.modality import Modality
    from ltx_core.tools import AudioLatentTools, VideoLatentTools
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    vx, ax = inputs.video, inputs.audio
    video_tools = VideoLatentTools(VideoLatentPatchifier(patch_size=1), VideoLatentShape.from_torch_shape(vx.shape),
                                   fps=float(inputs.fps))
    audio_tools = AudioLatentTools(AudioPatchifier(patch_size=1), AudioLatentShape.from_torch_shape(ax.shape))
    video_state = video_tools.create_initial_state(torch.device("cpu"), torch.float32, vx)
    audio_state = audio_tools.create_initial_state(torch.device("cpu"), torch.float32, ax)

    sigma_video, sigma_audio = inputs.sigma_video.float(), inputs.sigma_audio.float()
    if swap_sigmas:
        if sigma_video.ndim != 1 or sigma_audio.ndim != 1:
            raise ValueError("swap_sigmas needs per-sample σ for both modalities")
        sigma_video, sigma_audio = sigma_audio, sigma_video
    video_timesteps = _per_token(sigma_video, video_state.latent.shape[1])
    audio_timesteps = _per_token(sigma_audio, audio_state.latent.shape[1])
    mask = inputs.text.mask.to(torch.int64)
    video = Modality(latent=video_state.latent, sigma=video_timesteps.amax(dim=1), timesteps=video_timesteps,
                     positions=video_state.positions, context=inputs.text.video, context_mask=mask)
    audio = Modality(latent=audio_state.latent, sigma=audio_timesteps.amax(dim=1), timesteps=audio_timesteps,
                     positions=audio_state.positions, context=inputs.text.audio, context_mask=mask)
    video_out, audio_out = model(video, audio, None)  # no perturbation (None is accepted by every release)
    video_out = video_tools.unpatchify(_with_latent(video_state, video_out)).latent
    audio_out = audio_tools.unpatchify(_with_latent(audio_state, audio_out)).latent
    return video_out, audio_out


def _with_latent(state, latent):
    from dataclasses import replace

    return replace(state, latent=latent, clean_latent=latent)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
