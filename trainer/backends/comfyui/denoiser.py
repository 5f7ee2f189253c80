"""The ComfyUI backend: the trainer's ``Denoiser`` on the MODEL a ComfyUI loader produced.

``ComfyDenoiser`` calls ComfyUI's ``comfy.ldm.lightricks.av_model.LTXAVModel`` directly::

    diffusion_model([vx, ax], (v_t, a_t), context, attention_mask=mask, frame_rate=fps,
                    transformer_options=..., denoise_mask=...)

so video and audio get their own σ (``BaseModel.apply_model``, the sampler's path, has only one σ). The
timesteps are σ in [0, 1], ``[B]`` or per token; the model multiplies them by ``timestep_scale_multiplier``
(1000) itself. Layouts in and out are the trainer's latent layouts (video ``[B, 128, F', H', W']``, audio
``[B, 8, T, 16]``); ComfyUI patchifies them in the same token order as the diffusers backend.

Text context. The MODEL consumes text-connector *outputs*: ``context`` is the video context and the audio
context concatenated on the last axis. For LTX-2.0 both halves have the caption width (3840 on the real
model; ``caption_channels``) and the model applies ``caption_projection`` / ``audio_caption_projection``
inside its forward; for LTX-2.3 (``caption_proj_before_connector``) they already have the video and audio
stream widths. That is exactly our ``TextContext``: ``context = cat(text.video, text.audio)``. The CLIP
output of ``LTXAVTEModel`` is *not* that: it is the projected Gemma features before the connectors, with the
padding trimmed, flagged ``unprocessed_ltxav_embeds``; ComfyUI runs the connectors (which live in the
diffusion model's weights) in ``LTXAV.extra_conds`` through ``LTXAVModel.preprocess_text_embeds``, which
appends learnable registers up to 1024 tokens and returns no mask (a text encoder file that carries the
connectors itself, ComfyUI's "compat mode", already returns processed context, recognised by its width).
``text_context_from_conditioning`` does the same for a CONDITIONING tensor. A text mask that is all ones is passed as ``None``, as at sampling time;
otherwise it becomes ComfyUI's integer mask (a float mask would be read as an additive bias).

One forward per batch. ComfyUI computes the a2v gate timestep as ``max()`` of σ_a over the whole batch and
the v2a gate as ``max()`` of σ_v over the whole batch, so in a batch whose samples have different σ each
output would depend on its neighbours (a relative change of about 0.6 video / 0.15 audio on the tiny model).
While our forward runs, forward pre-hooks on the two gate adaLN modules (``_cross_modal_sigma_hooks``) give
them each sample's own max instead: per sample this is exactly what ComfyUI computes for that sample alone
(the reference wiring: scale/shift from each modality's own per-token timestep, a2v gate from σ_a, v2a gate
from σ_v), so a batch with independent σ is one forward. Conditioning tokens (σ = 0) never change a sample's
max. The older wirings ("own", "cross", see ``ModelConfig.cross_modal_sigma``) replace the inputs of all
four cross-modal adaLN modules the same way. The hooks sit on the module instances only while our forward
runs and are removed after it (also on errors); ComfyUI executes one prompt at a time, so no sampler shares
the module meanwhile. They run outside the transformer blocks, so block checkpointing does not recompute
them. ComfyUI's own files and classes are never changed.

Per-token video σ. ComfyUI compresses video timesteps to one row per latent frame unless it is told the
mask is spatial; when σ varies inside a frame we pass it as ``denoise_mask`` so nothing is compressed.
ComfyUI looks at the first sample's mask only, so such a sample is moved to the front of the batch for the
forward (``_batch_order``) and the outputs are put back in order.

No audio. ``audio=None`` runs ``[vx]`` alone: ComfyUI gives the model an empty audio stream, which switches
off the audio branch and both cross-modal attentions (``run_ax``/``run_a2v``/``run_v2a`` are false for zero
audio tokens) — the same as the diffusers backend's ``isolate_modalities``.

Gradients. ``BasicAVTransformerBlock.forward`` updates the residual streams in place (``vx.addcmul_``,
``vx.add_``) after ``rms_norm`` has saved them for backward. Plain autograd then fails ("modified by an
inplace operation"), and inside ``torch.utils.checkpoint`` (which skips that check) the gradients come out
silently wrong (relative error 0.03-0.3 on the tiny model). While a forward records gradients, a small
``TorchFunctionMode`` (``_SnapshotNormInputs``) hands ``rms_norm``/``layer_norm`` a copy of a
grad-requiring input, so what autograd saves is a snapshot that the in-place updates cannot reach; memory
is what an out-of-place block would save, and no ComfyUI code or attribute is touched. Checkpointing:
``"block"`` (default) installs a ``("dit", "double_block", i)`` replace patch per block that runs the block
under ``torch.utils.checkpoint`` with ``(vx, ax)`` cloned on entry, calling the block it captured when the
patch was made. ``extra["original_block"]`` must not be used there: ComfyUI's wrapper closes over the loop
variable, so when backward recomputes it, it runs the *last* block. ``"model"`` checkpoints the whole
forward (saves no memory); ``"none"`` keeps every activation (fastest; autograd's in-place check stays
active). Calls without gradients run the model as ComfyUI does, with no patches and no mode.

Weights. Nodes run under ``torch.inference_mode()``, so a loader's MODEL holds inference tensors, which
autograd refuses to save. ``prepare_for_training`` replaces them by normal tensors one at a time in the
loader's own module (no second copy of the model; the MODEL keeps working for sampling).
``ComfyDenoiser.load`` loads through ``comfy.model_management.load_models_gpu`` (partial loading and
offloading as ComfyUI decides) and then prepares the weights. ``comfy.model_management.in_training`` is set
while a forward that records gradients runs (``comfy_training_mode``), so the blocks use autograd-friendly
RMSNorm/adaLN instead of fused inference kernels; the same holds when backward recomputes a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ...config import ConfigError
from ..diffusers_backend import CROSS_MODAL_SIGMA_WIRINGS
from ..features import BlockFeatures
from ..fingerprint import loaded_file_sizes, remembered, weights_identity
from ..interface import (
    AUDIO_LATENT_CHANNELS,
    AUDIO_LATENT_MEL_BINS,
    VIDEO_LATENT_CHANNELS,
    DenoiserInput,
    TextContext,
)
from ..layouts import dilate_guide, guide_downscale, guide_positions
from .env import comfy_training_mode, import_model_management
from .memory import is_comfy_linear

CHECKPOINTING_MODES = ("block", "model", "none")


# ---- the MODEL --------------------------------------------------------------------------------------------


def ltxav_diffusion_model(model_patcher) -> nn.Module:
    """The ``LTXAVModel`` inside a MODEL, or a clear error for any other model."""
    from comfy.ldm.lightricks.av_model import LTXAVModel

    base = getattr(model_patcher, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if not isinstance(diffusion_model, LTXAVModel):
        found = type(diffusion_model).__name__ if diffusion_model is not None else type(model_patcher).__name__
        raise ConfigError(
            f"the MODEL input holds {found}, not an LTX-2 audio-video model (LTXAVModel); load an LTX-2 or "
            "LTX-2.3 audio+video checkpoint (the video-only LTXV models cannot train audio)"
        )
    return diffusion_model


def detect_comfy_version(diffusion_model: nn.Module) -> str:
    """"2.3" when gated attention / cross-attention adaLN are on (read from the checkpoint metadata)."""
    if getattr(diffusion_model, "cross_attention_adaln", False) or getattr(diffusion_model, "apply_gated_attention", False):
        return "2.3"
    return "2.0"


def context_widths(diffusion_model: nn.Module) -> tuple[int, int]:
    """(video, audio) widths of the context the model's forward expects (connector outputs)."""
    if diffusion_model.caption_proj_before_connector:
        return diffusion_model.inner_dim, diffusion_model.audio_inner_dim
    return diffusion_model.caption_channels, diffusion_model.caption_channels


def text_context_from_conditioning(model_patcher, cross_attn: torch.Tensor, unprocessed: bool) -> TextContext:
    """A CONDITIONING tensor → ``TextContext``, running the text connectors as ``LTXAV.extra_conds`` does.

    ``unprocessed`` is the conditioning's ``unprocessed_ltxav_embeds`` flag (True for ``LTXAVTEModel``
    output: projected Gemma features before the connectors). The result has ≥1024 tokens (registers fill
    the rest) and an all-ones mask, exactly what ComfyUI's samplers feed the model.
    """
    diffusion_model = ltxav_diffusion_model(model_patcher)
    cross_attn = cross_attn.to(device=model_patcher.load_device, dtype=model_patcher.model.get_dtype_inference())
    processed = diffusion_model.preprocess_text_embeds(cross_attn, unprocessed=unprocessed)
    video_width, audio_width = context_widths(diffusion_model)
    if processed.shape[-1] != video_width + audio_width:
        raise ValueError(
            f"conditioning width {processed.shape[-1]} after the connectors does not match this MODEL "
            f"(video {video_width} + audio {audio_width}); use the text encoder that belongs to this checkpoint"
        )
    video, audio = processed.split([video_width, audio_width], dim=-1)
    mask = torch.ones(processed.shape[:2], dtype=torch.long, device=processed.device)
    return TextContext(video=video, audio=audio, mask=mask)


# ---- inference tensors → normal tensors ------------------------------------------------------------------


@dataclass
class TrainingPreparation:
    """What ``prepare_for_training`` changed: tensors replaced (parameters + buffers) and their bytes."""

    tensors_replaced: int
    bytes_replaced: int


def prepare_for_training(model_patcher) -> TrainingPreparation:
    """Replace inference tensors in the MODEL's module by normal tensors, one tensor at a time.

    Works from inside ``torch.inference_mode()``. Each replacement is a clone of one tensor, after which the
    inference tensor is dropped, so the peak extra memory is one tensor, not a model. The module is the
    loader's cached one: it stays usable for sampling. Parameters keep their ``requires_grad`` (False for
    a loaded MODEL). Call it after loading (``ComfyDenoiser.load`` does), because moving weights to another
    device inside inference mode creates inference tensors again.
    """
    replaced = 0
    nbytes = 0
    with torch.inference_mode(False):
        for module in model_patcher.model.modules():
            for table in (module._parameters, module._buffers):
                for name in list(table):
                    old = table[name]
                    if old is None or not old.is_inference():
                        continue
                    copy = old.clone()
                    table[name] = nn.Parameter(copy, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else copy
                    replaced += 1
                    nbytes += old.numel() * old.element_size()
                    del old  # the module no longer holds it: freed unless someone else does
    return TrainingPreparation(tensors_replaced=replaced, bytes_replaced=nbytes)


def has_inference_tensors(module: nn.Module) -> bool:
    return any(t.is_inference() for t in module.parameters()) or any(t.is_inference() for t in module.buffers())


# ---- the denoiser -----------------------------------------------------------------------------------------


class ComfyDenoiser:
    """``Denoiser`` on a ComfyUI LTXAV MODEL (``ModelPatcher``); see the module docstring for the wiring."""

    def __init__(
        self,
        model_patcher,
        version: str,
        checkpointing: Literal["block", "model", "none"] = "block",
        cross_modal_sigma: str = "reference",
    ):
        if checkpointing not in CHECKPOINTING_MODES:
            raise ConfigError(f"checkpointing: {checkpointing!r}; choose one of {CHECKPOINTING_MODES}")
        if cross_modal_sigma not in CROSS_MODAL_SIGMA_WIRINGS:
            raise ConfigError(f"model.cross_modal_sigma: {cross_modal_sigma!r}; choose one of {CROSS_MODAL_SIGMA_WIRINGS}")
        self.model_patcher = model_patcher
        self.diffusion_model = ltxav_diffusion_model(model_patcher)
        detected = detect_comfy_version(self.diffusion_model)
        if detected != version:
            raise ConfigError(
                f"model.version is {version!r} but the MODEL is LTX-{detected} (gated attention / cross-attention "
                f"adaLN {'present' if detected == '2.3' else 'absent'}); set model.version = \"{detected}\""
            )
        self.version = version
        self.checkpointing = checkpointing
        self.cross_modal_sigma = cross_modal_sigma
        self._block_features: BlockFeatures | None = None  # an open capture (representation regularisers)

    # ---- Denoiser protocol ------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.diffusion_model

    def adaptable_modules(self) -> Iterator[tuple[str, nn.Module]]:
        # ComfyUI's module names are the reference names (comfy.ops Linear subclasses nn.Linear).
        for name, module in self.diffusion_model.named_modules():
            # is_comfy_linear: nn.Linear, or the Linear of ComfyUI's scaled-fp8 / quantised checkpoints.
            if name.startswith("transformer_blocks.") and is_comfy_linear(module):
                yield name, module

    def fingerprint(self) -> str:
        """Identity of the architecture config and the *base* weights (``weights_identity``: keys, shapes, dtypes,
        the loaded file's size and a fixed sample of values; well under a second for a 19B model): weights that
        ComfyUI has patched in place (e.g. a LoRA from a LoRA loader) are read from the patcher's backup.
        Remembered per loaded model, so the new instance of every queue costs nothing."""

        def compute() -> str:
            backup = getattr(self.model_patcher, "backup", {})
            originals = {key.removeprefix("diffusion_model."): entry.weight for key, entry in backup.items()}
            state = {key: originals.get(key, value) for key, value in self.diffusion_model.state_dict().items()}
            h = hashlib.sha256()
            unet_config = getattr(getattr(self.model_patcher.model, "model_config", None), "unet_config", {})
            h.update(json.dumps(unet_config, sort_keys=True, default=str).encode())
            h.update(weights_identity(state.items(), loaded_file_sizes(self.model_patcher)).encode())
            return h.hexdigest()[:16]

        return remembered(self.diffusion_model, "base weights", compute)

    @property
    def num_blocks(self) -> int:
        return len(self.diffusion_model.transformer_blocks)

    @property
    def video_width(self) -> int:
        """Width of the video hidden states inside the blocks."""
        return int(self.diffusion_model.inner_dim)

    def block_features(self, indices, video_tokens: int) -> BlockFeatures:
        """Capture the video hidden states of blocks ``indices`` during the calls made while it is open (hooks on
        the blocks, cloned: the blocks update the streams in place; see ``backends/features.py``)."""
        return BlockFeatures(self.diffusion_model.transformer_blocks, indices, video_tokens,
                             on_open=lambda capture: setattr(self, "_block_features", capture))

    def place_on(self, device: torch.device) -> None:
        """The trainer asks the backend to place its weights: ComfyUI's model management decides (partial
        loading and offloading for a MODEL that does not fit), so nothing is moved here."""

    def load(self, memory_required: float = 0, force_full_load: bool = False) -> TrainingPreparation:
        """Load the MODEL through ComfyUI's model management (partial loading/offloading as it decides),
        then make its tensors trainable (``prepare_for_training``)."""
        mm = import_model_management()
        with torch.inference_mode(False):
            mm.load_models_gpu([self.model_patcher], memory_required=memory_required, force_full_load=force_full_load)
        return prepare_for_training(self.model_patcher)

    def __call__(self, inputs: DenoiserInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        mm = import_model_management()
        if self.model_patcher not in mm.loaded_models():
            self.load()
        training = torch.is_grad_enabled()
        # Checked every training call (~2 ms on a 19B model): sampling in between may have reloaded the MODEL
        # inside inference mode.
        if training and has_inference_tensors(self.model_patcher.model):
            raise RuntimeError(
                "the MODEL holds inference tensors (it was loaded inside torch.inference_mode, as ComfyUI nodes "
                "run); call prepare_for_training(model_patcher) or ComfyDenoiser.load() before training"
            )
        _validate(inputs, context_widths(self.diffusion_model))
        device = self.model_patcher.load_device
        dtype = self.model_patcher.model.get_dtype_inference()

        order = _batch_order(inputs.sigma_video, inputs.video.shape)
        index = torch.tensor(order, device=inputs.video.device)
        features = self._block_features
        with features.rows(order) if features is not None else contextlib.nullcontext():
            video, audio = self._forward_batch(inputs, index, device, dtype, training)
        if order != sorted(order):
            restore = torch.argsort(index).to(video.device)
            video = video.index_select(0, restore)
            audio = None if audio is None else audio.index_select(0, restore)
        video = video.to(inputs.video.dtype)
        if inputs.audio is None:
            return video, None
        return video, audio.to(inputs.audio.dtype)

    # ---- internals --------------------------------------------------------------------------

    def _forward_batch(self, inputs: DenoiserInput, index: torch.Tensor, device, dtype, training: bool):
        """One ComfyUI forward for the whole batch, its samples in ``index`` order."""
        # index_select copies, so inputs made inside torch.inference_mode (e.g. a node's latents) come out
        # as normal tensors that autograd may save.
        vx = inputs.video.index_select(0, index).to(device=device, dtype=dtype)
        v_t = inputs.sigma_video.index_select(0, index).to(device=device, dtype=torch.float32)
        text = inputs.text.select(index)
        context = torch.cat([text.video, text.audio], dim=-1).to(device=device, dtype=dtype)
        mask = None if bool((text.mask != 0).all()) else (text.mask != 0).to(device=device, dtype=torch.long)
        kwargs: dict[str, Any] = dict(attention_mask=mask, frame_rate=float(inputs.fps))
        video_frames = vx.shape[2]
        v_seen = v_t  # the video timesteps of the tokens the model sees (for the cross-modal σ hooks)
        if inputs.video_guide is not None:
            guide = inputs.video_guide.index_select(0, index).to(device=device, dtype=dtype)
            vx, v_t, v_seen, guide_kwargs = _append_guide(vx, v_t, guide)
            kwargs.update(guide_kwargs)
        else:
            denoise_mask = _spatial_sigma_mask(v_t, vx.shape)
            if denoise_mask is not None:
                kwargs["denoise_mask"] = denoise_mask

        if inputs.audio is None:
            # ComfyUI adds an empty audio stream; its timestep only needs a shape that broadcasts over zero
            # tokens (a per-token video σ would not).
            x: list[torch.Tensor] = [vx]
            timestep: Any = (v_t, _per_sample(v_t))
            a_t = a_seen = None
        else:
            ax = inputs.audio.index_select(0, index).to(device=device, dtype=dtype)
            a_t = inputs.sigma_audio.index_select(0, index).to(device=device, dtype=torch.float32)
            a_seen = a_t
            if inputs.audio_reference is not None:
                # LTXVReferenceAudio's conditioning: ComfyUI prepends these tokens with σ = 0 at negative times
                # and strips them from the output itself.
                reference = inputs.audio_reference.index_select(0, index).to(device=device, dtype=dtype)
                kwargs["ref_audio"] = {"tokens": reference.permute(0, 2, 1, 3).flatten(2)}
                a_seen = torch.cat([a_t.new_zeros(a_t.shape[0], reference.shape[2]), _per_token(a_t, ax.shape[2])], dim=1)
            x = [vx, ax]
            timestep = (v_t, a_t)

        def run(*streams: torch.Tensor):
            options = self._transformer_options(training)
            with contextlib.ExitStack() as stack:
                if training:
                    stack.enter_context(_grad_safe_forward())
                stack.enter_context(_cross_modal_sigma_hooks(self.diffusion_model, self.cross_modal_sigma, v_seen, a_seen))
                out = self.diffusion_model(list(streams), timestep, context, transformer_options=options, **kwargs)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        if training and self.checkpointing == "model":
            out = checkpoint(run, *x, use_reentrant=False)
        else:
            out = run(*x)
        # Guide frames are conditioning only: their outputs are dropped.
        return out[0][:, :, :video_frames], (out[1] if inputs.audio is not None else None)

    def _transformer_options(self, training: bool) -> dict:
        """The MODEL's transformer options (other patches stay active), plus per-block checkpointing."""
        base = self.model_patcher.model_options.get("transformer_options", {})
        options = dict(base)
        if not (training and self.checkpointing == "block"):
            return options
        replace = {key: dict(value) for key, value in base.get("patches_replace", {}).items()}
        dit = replace.setdefault("dit", {})
        for i, block in enumerate(self.diffusion_model.transformer_blocks):
            dit[("double_block", i)] = _checkpointed_block(block, dit.get(("double_block", i)))
        options["patches_replace"] = replace
        return options


def _checkpointed_block(block: nn.Module, inner_patch: Callable | None) -> Callable:
    """A ``("dit", "double_block", i)`` replace patch running ``block`` (captured here) under checkpoint.

    The block updates ``(vx, ax)`` in place, so they are cloned on entry: the checkpoint's saved inputs
    must still hold the block's inputs when backward recomputes it. A replace patch the MODEL already had
    for this block is kept and given this captured block as its ``original_block``.
    """

    def call_block(args: dict) -> dict:
        out = block(
            args["img"],
            v_context=args["v_context"],
            a_context=args["a_context"],
            attention_mask=args["attention_mask"],
            v_timestep=args["v_timestep"],
            a_timestep=args["a_timestep"],
            v_pe=args["v_pe"],
            a_pe=args["a_pe"],
            v_cross_pe=args["v_cross_pe"],
            a_cross_pe=args["a_cross_pe"],
            v_cross_scale_shift_timestep=args["v_cross_scale_shift_timestep"],
            a_cross_scale_shift_timestep=args["a_cross_scale_shift_timestep"],
            v_cross_gate_timestep=args["v_cross_gate_timestep"],
            a_cross_gate_timestep=args["a_cross_gate_timestep"],
            transformer_options=args["transformer_options"],
            self_attention_mask=args.get("self_attention_mask"),
            v_prompt_timestep=args.get("v_prompt_timestep"),
            a_prompt_timestep=args.get("a_prompt_timestep"),
        )
        return {"img": out}

    def run(vx: torch.Tensor, ax: torch.Tensor, args: dict) -> tuple[torch.Tensor, torch.Tensor]:
        local = dict(args, img=(vx.clone(), ax.clone()))
        # Backward recomputes this outside our forward: the recompute needs the same code path.
        with _grad_safe_forward():
            out = inner_patch(local, {"original_block": call_block}) if inner_patch is not None else call_block(local)
        return tuple(out["img"])

    def patch(args: dict, extra: dict) -> dict:
        vx, ax = args["img"]
        return {"img": checkpoint(run, vx, ax, args, use_reentrant=False)}

    return patch


class _SnapshotNormInputs(TorchFunctionMode):
    """Give ``rms_norm``/``layer_norm`` a copy of an input that requires grad (see the module docstring):
    the residual stream they normalise is updated in place afterwards, and autograd saves the norm's input."""

    _NORMS = (torch.nn.functional.rms_norm, torch.nn.functional.layer_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._NORMS and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args = (args[0].clone(),) + tuple(args[1:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _grad_safe_forward() -> Iterator[None]:
    """ComfyUI's training code path (``in_training``) plus norm-input snapshots, for a forward with grad."""
    with comfy_training_mode(), _SnapshotNormInputs():
        yield


@contextlib.contextmanager
def _cross_modal_sigma_hooks(diffusion_model: nn.Module, wiring: str, v_t: torch.Tensor, a_t: torch.Tensor | None):
    """Forward pre-hooks giving the cross-modal adaLN modules the σ of the chosen wiring, per sample.

    "reference" is ComfyUI's own wiring with the batch-wide max of the two gates replaced by each sample's
    own max (see the module docstring). The replacement keeps the shape of the input ComfyUI computed
    (flattened per token or per sample), so the rest of its code is unchanged. Without audio the cross-modal
    attentions are off and nothing is hooked.
    """
    if a_t is None:
        yield
        return
    scale = float(diffusion_model.timestep_scale_multiplier)
    gate_ratio = float(diffusion_model.av_ca_timestep_scale_multiplier) / scale
    v_sample = _per_sample(v_t) * scale
    a_sample = _per_sample(a_t) * scale
    batch = v_t.shape[0]

    def per_sample_like(values: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return values.to(original.dtype).view(batch, 1).expand(batch, original.numel() // batch).reshape(original.shape)

    per_sample_gates = {
        "av_ca_a2v_gate_adaln_single": lambda original: per_sample_like(a_sample * gate_ratio, original),
        "av_ca_v2a_gate_adaln_single": lambda original: per_sample_like(v_sample * gate_ratio, original),
    }
    if wiring == "reference":  # ComfyUI's gates, from each sample's σ instead of the batch max
        replacements = per_sample_gates
    elif wiring == "own":  # everything from the modality's own (per-token) timestep
        replacements = {
            "av_ca_a2v_gate_adaln_single": lambda original: (v_t * scale * gate_ratio).to(original.dtype).reshape(original.shape),
            "av_ca_v2a_gate_adaln_single": lambda original: (a_t * scale * gate_ratio).to(original.dtype).reshape(original.shape),
        }
    else:  # "cross": scale/shift and gates from the other modality's per-sample σ
        replacements = {
            "av_ca_video_scale_shift_adaln_single": lambda original: per_sample_like(a_sample, original),
            "av_ca_audio_scale_shift_adaln_single": lambda original: per_sample_like(v_sample, original),
            **per_sample_gates,
        }
    handles = []
    try:
        for name, replace in replacements.items():
            module = getattr(diffusion_model, name)
            hook = lambda _module, args, replace=replace: (replace(args[0]),) + tuple(args[1:])
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- helpers --------------------------------------------------------------------------------------------


def _validate(inputs: DenoiserInput, widths: tuple[int, int]) -> int:
    vx, ax = inputs.video, inputs.audio
    if vx.ndim != 5 or vx.shape[1] != VIDEO_LATENT_CHANNELS:
        raise ValueError(f"video latents must be [B, {VIDEO_LATENT_CHANNELS}, F', H', W'], got {tuple(vx.shape)}")
    batch = vx.shape[0]
    _check_sigma("sigma_video", inputs.sigma_video, batch, vx.shape[2] * vx.shape[3] * vx.shape[4])
    if ax is not None:
        if ax.ndim != 4 or ax.shape[0] != batch or ax.shape[1] != AUDIO_LATENT_CHANNELS or ax.shape[3] != AUDIO_LATENT_MEL_BINS:
            raise ValueError(
                f"audio latents must be [{batch}, {AUDIO_LATENT_CHANNELS}, T, {AUDIO_LATENT_MEL_BINS}], got {tuple(ax.shape)}"
            )
        if inputs.sigma_audio is None:
            raise ValueError("sigma_audio is None but audio latents were given; pass σ_a ([B] or per token [B, T])")
        _check_sigma("sigma_audio", inputs.sigma_audio, batch, ax.shape[2])
    guide, reference = inputs.video_guide, inputs.audio_reference
    if guide is not None:
        if guide.ndim != 5 or guide.shape[0] != batch or guide.shape[1] != VIDEO_LATENT_CHANNELS:
            raise ValueError(f"video_guide must be [{batch}, {VIDEO_LATENT_CHANNELS}, Fg, H'/f, W'/f], got {tuple(guide.shape)}")
        guide_downscale(vx.shape, guide.shape)
    if reference is not None:
        if ax is None:
            raise ValueError("audio_reference needs audio latents: reference audio conditions the audio branch")
        if reference.ndim != 4 or reference.shape[0] != batch or reference.shape[1] != AUDIO_LATENT_CHANNELS or reference.shape[3] != AUDIO_LATENT_MEL_BINS:
            raise ValueError(f"audio_reference must be [{batch}, {AUDIO_LATENT_CHANNELS}, Tr, {AUDIO_LATENT_MEL_BINS}], got {tuple(reference.shape)}")
    text = inputs.text
    if text.video.shape[0] != batch or text.audio.shape[0] != batch or text.mask.shape[0] != batch:
        raise ValueError(f"text context batch ({text.video.shape[0]}) differs from the latent batch ({batch})")
    if (text.video.shape[-1], text.audio.shape[-1]) != widths:
        raise ValueError(
            f"text context widths (video {text.video.shape[-1]}, audio {text.audio.shape[-1]}) do not match this "
            f"MODEL's connector outputs (video {widths[0]}, audio {widths[1]}); encode the prompts with this "
            "checkpoint's text encoder and connectors"
        )
    return batch


def _check_sigma(name: str, sigma: torch.Tensor, batch: int, tokens: int) -> None:
    if not (sigma.shape == (batch,) or sigma.shape == (batch, tokens)):
        raise ValueError(f"{name} must be [{batch}] or per token [{batch}, {tokens}], got {tuple(sigma.shape)}")


def _batch_order(sigma_video: torch.Tensor, video_shape: torch.Size) -> list[int]:
    """The order of the samples in the forward: a sample whose per-token σ varies inside a latent frame
    first, because ComfyUI decides from the first sample's ``denoise_mask`` alone whether σ may be
    compressed to one value per frame (see the module docstring); otherwise the batch order."""
    order = list(range(sigma_video.shape[0]))
    if sigma_video.ndim == 1:
        return order
    _, _, frames, height, width = video_shape
    flat = sigma_video.reshape(len(order), frames, height * width)
    varies = (flat != flat[..., :1]).flatten(1).any(dim=1).tolist()
    if varies[0] or not any(varies):
        return order
    first = varies.index(True)
    return [first] + [sample for sample in order if sample != first]


def _append_guide(vx: torch.Tensor, v_t: torch.Tensor, guide: torch.Tensor):
    """The video stream with the IC-LoRA guide appended as ``LTXVAddGuide`` (frame 0) appends it.

    Returns (video with the guide's frames spread over the video grid, per-token σ over all of it, the σ of the
    tokens the model keeps, the ``denoise_mask`` / ``keyframe_idxs`` arguments). The mask is the σ grid with -1
    on the cells between a downscaled guide's tokens, which ComfyUI drops from the sequence (it keeps cells >= 0);
    ``keyframe_idxs`` are the guide's positions over the whole spread grid (``layouts.guide_positions``)."""
    batch, _, frames, height, width = vx.shape
    factor = guide_downscale(vx.shape, guide.shape)
    spread, keep = dilate_guide(guide, factor)
    target_tokens = frames * height * width
    sigma = torch.cat([_per_token(v_t, target_tokens), v_t.new_zeros(batch, keep[0].numel())], dim=1)
    mask = sigma.reshape(batch, 1, frames + guide.shape[2], height, width).clone()
    guide_cells = mask[:, :, frames:]
    guide_cells[~keep] = -1.0
    kept = torch.cat([torch.ones(target_tokens, dtype=torch.bool, device=vx.device), keep[0].flatten()])
    positions = guide_positions(*guide.shape[2:], factor, batch, dilated=True, device=vx.device)
    return (torch.cat([vx, spread], dim=2), sigma, sigma[:, kept],
            {"denoise_mask": mask, "keyframe_idxs": positions.to(vx.dtype)})


def _per_token(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B] → [B, tokens]; per-token [B, tokens] stays."""
    return t.view(-1, 1).expand(-1, tokens) if t.ndim == 1 else t


def _spatial_sigma_mask(v_t: torch.Tensor, video_shape: torch.Size) -> torch.Tensor | None:
    """``denoise_mask`` that stops ComfyUI compressing per-token σ to one value per frame, when σ varies
    inside a frame of any sample (ComfyUI checks the first sample only: ``_batch_order`` puts such a sample
    first)."""
    if v_t.ndim == 1:
        return None
    batch, _, frames, height, width = video_shape
    grid = v_t.reshape(batch, 1, frames, height, width)
    flat = grid.reshape(batch, frames, height * width)
    if bool((flat == flat[..., :1]).all()):
        return None
    return grid


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """[B] stays; per token [B, N] → the sample's σ of its noisy part (conditioning tokens carry σ = 0)."""
    return t if t.ndim == 1 else t.amax(dim=1)
