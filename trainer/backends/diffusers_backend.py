"""The headless backend: diffusers' ``LTX2VideoTransformer3DModel`` for LTX-2 and LTX-2.3.

Cross-modal σ wiring (README, "How it trains"): no diffusers argument combination reproduces the current
reference when σ_a ≠ σ_v. The call that does passes each modality's own timestep for its scale/shift
(``use_cross_timestep=False``) and overrides the inputs of the two gate adaLN modules with forward
pre-hooks: the a2v gate gets σ_a, the v2a gate gets σ_v. Those modules run outside the transformer
blocks, so this also holds under gradient checkpointing.

Memory (``[memory]``, ``trainer/memory``): ``build_denoiser`` quantises the blocks' Linear layers, sets up
gradient checkpointing (with the block inputs offloaded to the CPU when asked) and compiles the blocks;
``DiffusersDenoiser.place_on`` then selects the attention kernel and places the model, streaming swapped
blocks from CPU memory. The base fingerprint is taken before quantisation: the LoRA belongs to the
unquantised base.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..config import ConfigError, MemoryConfig, ModelConfig, TinyModelConfig, validate_memory
from ..memory.attention import text_mask_for
from ..memory.setup import MemoryPlan, apply_memory_options
from .features import BlockFeatures
from .fingerprint import module_fingerprint
from .interface import DenoiserInput
from .layouts import guide_downscale, guide_positions, reference_audio_positions

CROSS_MODAL_SIGMA_WIRINGS = ("reference", "own", "cross")

# The real checkpoints' positioning settings (from their metadata: split RoPE with float64 frequencies,
# middle-of-patch positions, causal temporal offset, cross-attention timestep multiplier 1000); the tiny model carries them too so that it
# behaves like the real model and matches ComfyUI's LTXAV built with the same metadata.
REAL_CHECKPOINT_SETTINGS = dict(
    rope_type="split",
    rope_double_precision=True,
    causal_offset=1,
    timestep_scale_multiplier=1000,
    cross_attn_timestep_scale_multiplier=1000,
)


def tiny_transformer_config(version: str, tiny: TinyModelConfig) -> dict:
    """diffusers config of the embedded tiny model (random weights, real-checkpoint RoPE settings)."""
    inner = tiny.num_attention_heads * tiny.attention_head_dim
    audio_inner = tiny.audio_num_attention_heads * tiny.audio_attention_head_dim
    is_23 = version == "2.3"
    return dict(
        in_channels=128,
        out_channels=128,
        num_attention_heads=tiny.num_attention_heads,
        attention_head_dim=tiny.attention_head_dim,
        cross_attention_dim=inner,
        audio_in_channels=128,
        audio_out_channels=128,
        audio_num_attention_heads=tiny.audio_num_attention_heads,
        audio_attention_head_dim=tiny.audio_attention_head_dim,
        audio_cross_attention_dim=audio_inner,
        num_layers=tiny.num_layers,
        caption_channels=tiny.caption_channels,
        # LTX-2.3 switches these on (gated attention, cross-attention adaLN, caption projection moved
        # into the text connectors).
        gated_attn=is_23,
        audio_gated_attn=is_23,
        cross_attn_mod=is_23,
        audio_cross_attn_mod=is_23,
        use_prompt_embeddings=not is_23,
        **REAL_CHECKPOINT_SETTINGS,
    )


def build_tiny_transformer(version: str, tiny: TinyModelConfig):
    from diffusers import LTX2VideoTransformer3DModel

    # Seeded, self-contained initialisation: the same config always gives the same weights.
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(tiny.seed)
        model = LTX2VideoTransformer3DModel(**tiny_transformer_config(version, tiny))
    return model


def load_transformer(source: str):
    """A local diffusers-format transformer: a pipeline folder (with ``transformer/``) or the folder itself."""
    from diffusers import LTX2VideoTransformer3DModel

    path = Path(source)
    if (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.source: {source!r} is not a diffusers LTX-2 folder (no config.json in it or in its "
            "transformer/ subfolder); use model.source = \"tiny\" for the embedded test model"
        )
    return LTX2VideoTransformer3DModel.from_pretrained(str(path), local_files_only=True)


def detect_version(transformer) -> str:
    cfg = transformer.config
    return "2.3" if (cfg.get("cross_attn_mod") or cfg.get("gated_attn")) else "2.0"


class DiffusersDenoiser:
    """``Denoiser`` on a diffusers ``LTX2VideoTransformer3DModel``."""

    def __init__(self, transformer, version: str, cross_modal_sigma: str = "reference", attention: str = "sdpa"):
        if cross_modal_sigma not in CROSS_MODAL_SIGMA_WIRINGS:
            raise ConfigError(f"model.cross_modal_sigma: {cross_modal_sigma!r}; choose one of {CROSS_MODAL_SIGMA_WIRINGS}")
        detected = detect_version(transformer)
        if detected != version:
            raise ConfigError(
                f"model.version is {version!r} but the weights are LTX-{detected} (gated attention / cross-attention "
                f"adaLN {'present' if detected == '2.3' else 'absent'}); set model.version = \"{detected}\""
            )
        self.transformer = transformer
        self.version = version
        self.cross_modal_sigma = cross_modal_sigma
        self.attention = attention
        self.memory_plan: MemoryPlan | None = None  # set by build_denoiser when [memory] options apply
        cfg = transformer.config
        self._gate_ratio = cfg.cross_attn_timestep_scale_multiplier / cfg.timestep_scale_multiplier
        self._timestep_scale = float(cfg.timestep_scale_multiplier)
        self._gate_override: dict[str, torch.Tensor | None] = {"a2v": None, "v2a": None}
        self._fingerprint: str | None = None
        transformer.av_cross_attn_video_a2v_gate.register_forward_pre_hook(_GatePreHook(self, "a2v"))
        transformer.av_cross_attn_audio_v2a_gate.register_forward_pre_hook(_GatePreHook(self, "v2a"))

    # ---- Denoiser protocol ------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.transformer

    def adaptable_modules(self) -> Iterator[tuple[str, nn.Module]]:
        # Inside the blocks diffusers uses the reference (ComfyUI) module names, so the path is the
        # reference path. Top-level layers are renamed in diffusers and are not adapter targets.
        for name, module in self.transformer.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("transformer_blocks."):
                yield name, module

    def fingerprint(self) -> str:
        # The base weights are frozen: hash them once (every bit, where they live).
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.transformer)
        return self._fingerprint

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    # ---- hidden states (representation regularisers) ----------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def video_width(self) -> int:
        """Width of the video hidden states inside the blocks."""
        cfg = self.transformer.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    def block_features(self, indices, video_tokens: int) -> BlockFeatures:
        """Capture the video hidden states of blocks ``indices`` during the calls made while it is open."""
        return BlockFeatures(self.transformer.transformer_blocks, indices, video_tokens)

    def place_on(self, device: torch.device | str) -> None:
        """The trainer's placement call: the model to ``device`` (with ``[memory]``: attention kernel, swapped
        blocks kept in CPU memory and streamed in); plain ``module.to(device)`` otherwise."""
        if self.memory_plan is not None:
            self.memory_plan.place(self.transformer, device)
        else:
            self.transformer.to(device)

    def __call__(self, inputs: DenoiserInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        vx, ax = inputs.video, inputs.audio
        batch, _, frames, height, width = vx.shape
        has_audio = ax is not None
        if not has_audio:
            # No audio in this batch: one dummy audio token, and cross-modal attention switched off
            # (isolate_modalities) so the video prediction does not depend on it.
            ax = torch.zeros(batch, 8, 1, 16, device=vx.device, dtype=vx.dtype)
            sigma_audio = torch.ones(batch, device=vx.device, dtype=torch.float32)
        else:
            sigma_audio = inputs.sigma_audio
        sigma_video = inputs.sigma_video
        audio_frames = ax.shape[2]

        scale = self._timestep_scale
        video_t = sigma_video.float() * scale
        audio_t = sigma_audio.float() * scale
        video_t_sample = _per_sample(video_t)
        audio_t_sample = _per_sample(audio_t)

        text_mask = text_mask_for(self.attention, inputs.text.mask)
        use_cross = self.cross_modal_sigma == "cross"
        if self.cross_modal_sigma == "reference":
            self._gate_override = {"a2v": audio_t_sample * self._gate_ratio, "v2a": video_t_sample * self._gate_ratio}
        video_tokens, video_t, video_coords = self._with_guide(vx, video_t, inputs)
        audio_tokens, audio_t, audio_coords = self._with_audio_reference(ax, audio_t, inputs)
        try:
            video_out, audio_out = self.transformer(
                hidden_states=video_tokens,
                audio_hidden_states=audio_tokens,
                encoder_hidden_states=inputs.text.video,
                audio_encoder_hidden_states=inputs.text.audio,
                timestep=video_t,
                audio_timestep=audio_t,
                # sigma / audio_sigma feed the cross-modal terms when use_cross_timestep=True and the
                # LTX-2.3 prompt adaLN; per sample, on the timestep scale (as diffusers' pipeline passes).
                sigma=video_t_sample,
                audio_sigma=audio_t_sample,
                encoder_attention_mask=text_mask,
                audio_encoder_attention_mask=text_mask,
                num_frames=frames,
                height=height,
                width=width,
                fps=float(inputs.fps),
                audio_num_frames=audio_frames,
                video_coords=video_coords,
                audio_coords=audio_coords,
                isolate_modalities=not has_audio,
                use_cross_timestep=use_cross,
                return_dict=False,
            )
        finally:
            self._gate_override = {"a2v": None, "v2a": None}
        # Guide and reference tokens are conditioning only: their outputs are dropped.
        video_out = video_out[:, : frames * height * width]
        audio_out = audio_out[:, audio_out.shape[1] - audio_frames :]
        video_velocity = video_out.transpose(1, 2).reshape(batch, -1, frames, height, width)
        if not has_audio:
            return video_velocity, None
        audio_velocity = audio_out.reshape(batch, audio_frames, 8, 16).permute(0, 2, 1, 3)
        return video_velocity, audio_velocity

    def _with_guide(self, vx: torch.Tensor, video_t: torch.Tensor, inputs: DenoiserInput):
        """(video tokens, timesteps, explicit positions or None): the IC-LoRA guide appended with σ = 0 at the
        positions of ``layouts.guide_positions`` (times divided by the frame rate, as diffusers' own positions are)."""
        tokens = vx.flatten(2).transpose(1, 2)
        guide = inputs.video_guide
        if guide is None:
            return tokens, video_t, None
        batch, _, frames, height, width = vx.shape
        factor = guide_downscale(vx.shape, guide.shape)
        guide_tokens = guide.to(vx.dtype).flatten(2).transpose(1, 2)
        timesteps = torch.cat([_per_token(video_t, tokens.shape[1]), video_t.new_zeros(batch, guide_tokens.shape[1])], dim=1)
        fps = float(inputs.fps)
        own = self.transformer.rope.prepare_video_coords(batch, frames, height, width, vx.device, fps=fps)
        guide_coords = guide_positions(*guide.shape[2:], factor, batch, device=vx.device)
        guide_coords[:, 0] = guide_coords[:, 0] / fps
        return torch.cat([tokens, guide_tokens], dim=1), timesteps, torch.cat([own, guide_coords.to(own.dtype)], dim=2)

    def _with_audio_reference(self, ax: torch.Tensor, audio_t: torch.Tensor, inputs: DenoiserInput):
        """(audio tokens, timesteps, explicit positions or None): the reference audio prepended with σ = 0 at the
        negative times of ``layouts.reference_audio_positions``."""
        tokens = ax.permute(0, 2, 1, 3).flatten(2)
        reference = inputs.audio_reference
        if reference is None:
            return tokens, audio_t, None
        if inputs.audio is None:
            raise ValueError("audio_reference needs audio latents: reference audio conditions the audio branch")
        batch, reference_frames = reference.shape[0], reference.shape[2]
        reference_tokens = reference.to(ax.dtype).permute(0, 2, 1, 3).flatten(2)
        timesteps = torch.cat([audio_t.new_zeros(batch, reference_frames), _per_token(audio_t, tokens.shape[1])], dim=1)
        own = self.transformer.audio_rope.prepare_audio_coords(batch, tokens.shape[1], ax.device)
        positions = reference_audio_positions(reference_frames, batch, device=ax.device).to(own.dtype)
        return torch.cat([reference_tokens, tokens], dim=1), timesteps, torch.cat([positions, own], dim=2)


class _GatePreHook:
    """Forward pre-hook replacing a gate adaLN's timestep input by the stashed override (if any)."""

    def __init__(self, denoiser: DiffusersDenoiser, which: str):
        self.denoiser = denoiser
        self.which = which

    def __call__(self, module, args):
        override = self.denoiser._gate_override[self.which]
        if override is None:
            return None
        return (override,) + tuple(args[1:])


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """[B] stays; per-token [B, N] → the sample's σ of its noisy part (max over tokens; conditioning
    tokens carry σ = 0)."""
    return t if t.ndim == 1 else t.amax(dim=1)


def _per_token(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B] → [B, tokens]; per-token [B, tokens] stays."""
    return t.view(-1, 1).expand(-1, tokens) if t.ndim == 1 else t


def build_denoiser(model_cfg: ModelConfig, memory: MemoryConfig | None = None) -> DiffusersDenoiser:
    """The denoiser for ``[model]``, with the ``[memory]`` options applied when given (see the module docstring)."""
    if memory is not None:
        validate_memory(memory, model_cfg)
    if model_cfg.source == "tiny":
        transformer = build_tiny_transformer(model_cfg.version, model_cfg.tiny)
    else:
        transformer = load_transformer(model_cfg.source)
    transformer.requires_grad_(False)
    transformer.eval()
    attention = memory.attention if memory is not None else "sdpa"
    denoiser = DiffusersDenoiser(transformer, model_cfg.version, model_cfg.cross_modal_sigma, attention)
    if memory is None:
        if model_cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        return denoiser
    if memory.quantization != "none":
        denoiser.fingerprint()  # cached: the unquantised base's, which the exported LoRA applies to
    denoiser.memory_plan = apply_memory_options(transformer, memory, gradient_checkpointing=model_cfg.gradient_checkpointing)
    return denoiser


# Reference (ComfyUI / ltx-core) names of the diffusers top-level modules, for key conversion.
_DIFFUSERS_TO_REFERENCE_PREFIX = [
    (r"^proj_in(?=\.|$)", "patchify_proj"),
    (r"^audio_proj_in(?=\.|$)", "audio_patchify_proj"),
    (r"^time_embed(?=\.|$)", "adaln_single"),
    (r"^audio_time_embed(?=\.|$)", "audio_adaln_single"),
    (r"^av_cross_attn_video_scale_shift(?=\.|$)", "av_ca_video_scale_shift_adaln_single"),
    (r"^av_cross_attn_audio_scale_shift(?=\.|$)", "av_ca_audio_scale_shift_adaln_single"),
    (r"^av_cross_attn_video_a2v_gate(?=\.|$)", "av_ca_a2v_gate_adaln_single"),
    (r"^av_cross_attn_audio_v2a_gate(?=\.|$)", "av_ca_v2a_gate_adaln_single"),
    (r"^prompt_adaln(?=\.|$)", "prompt_adaln_single"),
    (r"^audio_prompt_adaln(?=\.|$)", "audio_prompt_adaln_single"),
]


def diffusers_to_reference_path(path: str) -> str:
    """Map a diffusers module path to the reference naming (only at the start of the path: a
    substring replace would corrupt ``av_ca_*_adaln_single``)."""
    for pattern, repl in _DIFFUSERS_TO_REFERENCE_PREFIX:
        if re.match(pattern, path):
            return re.sub(pattern, repl, path, count=1)
    path = re.sub(r"\.norm_q(\.|$)", r".q_norm\1", path)
    path = re.sub(r"\.norm_k(\.|$)", r".k_norm\1", path)
    return path
