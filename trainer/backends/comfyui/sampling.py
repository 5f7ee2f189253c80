"""Generation as a ComfyUI user's LTX-2 text-to-video workflow does it, for the A/B preview of a LoRA.

Every step calls the core node that a user's graph would hold, with the same arguments, so the preview is what
that graph gives for the same seed (``tests/test_e2e_server.py`` builds the graph from core nodes on a server
and compares):

1. conditioning (``build_conditioning``): ``CLIPTextEncode`` of the prompt and the negative prompt,
   ``LTXVConditioning`` (frame rate), and the empty audio+video latent (``EmptyLTXVLatentVideo``,
   ``LTXVEmptyLatentAudio``, ``LTXVConcatAVLatent``);
2. sampling (``sample``): ``LTXVScheduler`` σ for the latent's size, ``KSamplerSelect``, ``CFGGuider``,
   ``RandomNoise`` and ``SamplerCustomAdvanced``, which loads the MODEL through ComfyUI's model management, runs
   the LTX-2 model sampling, shows ComfyUI's progress bar and stops on Cancel;
3. decoding (``decode``): ``LTXVSeparateAVLatent``, ``VAEDecode`` and ``LTXVAudioVAEDecode``.

The LoRA goes on a clone of the MODEL through ``comfy.sd.load_lora_for_models`` with the file's metadata, what
``LoraLoaderModelOnly`` does. LoRAs trained in a training mode are sampled with the references of that mode
(``References``), each through the core node of ComfyUI's LTX-2 workflows for it: a first frame with
``LTXVImgToVideo``, an IC-LoRA guide video with ``GetICLoRAParameters`` + ``LTXVAddGuide`` (and
``LTXVCropGuides`` after sampling), an ID-LoRA reference voice with ``LTXVReferenceAudio``, which patches the
MODEL (hence ``build_conditioning`` returns the MODEL too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# LTXVScheduler's defaults, as in ComfyUI's LTX-2 text-to-video template.
SCHEDULER = dict(max_shift=2.05, base_shift=0.95, stretch=True, terminal=0.1)
DEFAULT_NEGATIVE = ("blurry, low quality, still frame, frames, watermark, overlay, titles, has blurbox, "
                    "has subtitles")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE
    seed: int = 0
    steps: int = 20
    frames: int = 97
    width: int = 768
    height: int = 512
    frame_rate: float = 25.0
    guidance: float = 4.0
    sampler_name: str = "euler_ancestral"


# LTXVReferenceAudio's defaults (identity guidance on over the whole σ range).
IDENTITY_GUIDANCE = dict(identity_guidance_scale=3.0, start_percent=0.0, end_percent=1.0)


@dataclass(frozen=True)
class References:
    """The references of the training modes; each one that is set conditions the generation.

    ``first_frame``: IMAGE, its first image is the clip's first frame (first-frame / image-to-video LoRAs).
    ``guide_video``: IMAGE frames, the IC-LoRA reference (scaled by the LoRA's ``reference_downscale_factor``).
    ``reference_audio``: AUDIO, the voice an ID-LoRA clones (about 5 s, as in training).
    ``iclora_parameters``: ``GetICLoRAParameters`` of the LoRA'd MODEL; the A/B gives both sides the LoRA's,
    so that they differ only by the LoRA.
    """

    first_frame: Any = None
    guide_video: Any = None
    reference_audio: Any = None
    iclora_parameters: dict | None = None


@dataclass
class SamplingInputs:
    """What sampling starts from: the MODEL (possibly patched by a conditioning node), the two conditionings and
    the latent to denoise; ``crop_guides``: the video latent carries IC-LoRA guide frames to drop after sampling."""

    model: Any
    positive: list
    negative: list
    latent: dict
    crop_guides: bool = False


def with_lora(model, lora_path: Path, strength: float = 1.0):
    """A clone of the MODEL with the LoRA file applied as ``LoraLoaderModelOnly`` applies it."""
    import comfy.sd
    import comfy.utils

    lora, metadata = comfy.utils.load_torch_file(str(lora_path), safe_load=True, return_metadata=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0, lora_metadata=metadata)
    return patched


def iclora_parameters(model) -> dict:
    """``GetICLoRAParameters`` of a LoRA'd MODEL (the guide's ``reference_downscale_factor``)."""
    from comfy_extras.nodes_lt import GetICLoRAParameters

    return GetICLoRAParameters.execute(model).args[0]


def build_conditioning(model, clip, vae, audio_vae, request: GenerationRequest,
                       references: References = References()) -> SamplingInputs:
    """Text conditioning, the references, and the audio+video latent (step 1 of the module docstring)."""
    from comfy_extras.nodes_lt import (
        EmptyLTXVLatentVideo,
        LTXVAddGuide,
        LTXVConcatAVLatent,
        LTXVConditioning,
        LTXVImgToVideo,
        LTXVReferenceAudio,
    )
    from comfy_extras.nodes_lt_audio import LTXVEmptyLatentAudio

    import nodes

    encode = nodes.CLIPTextEncode()
    positive = encode.encode(clip, request.prompt)[0]
    negative = encode.encode(clip, request.negative_prompt)[0]
    positive, negative = LTXVConditioning.execute(positive, negative, float(request.frame_rate)).args
    size = (request.width, request.height, request.frames, 1)
    if references.first_frame is not None:
        positive, negative, video = LTXVImgToVideo.execute(positive, negative, references.first_frame, vae, *size,
                                                           1.0).args
    else:
        video = EmptyLTXVLatentVideo.execute(*size).args[0]
    if references.guide_video is not None:
        parameters = references.iclora_parameters if references.iclora_parameters is not None else iclora_parameters(model)
        positive, negative, video = LTXVAddGuide.execute(positive, negative, vae, video, references.guide_video, 0, 1.0,
                                                         iclora_parameters=parameters).args
    if references.reference_audio is not None:
        model, positive, negative = LTXVReferenceAudio.execute(model, positive, negative, references.reference_audio,
                                                               audio_vae, **IDENTITY_GUIDANCE).args
    audio = LTXVEmptyLatentAudio.execute(request.frames, request.frame_rate, 1, audio_vae).args[0]
    latent = LTXVConcatAVLatent.execute(video, audio).args[0]
    return SamplingInputs(model, positive, negative, latent, crop_guides=references.guide_video is not None)


def sample(inputs: SamplingInputs, request: GenerationRequest) -> dict:
    """The denoised audio+video latent (step 2 of the module docstring)."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_lt import LTXVScheduler

    sigmas = LTXVScheduler.execute(request.steps, latent=inputs.latent, **SCHEDULER).args[0]
    sampler = KSamplerSelect.execute(request.sampler_name).args[0]
    guider = CFGGuider.execute(inputs.model, inputs.positive, inputs.negative, request.guidance).args[0]
    noise = RandomNoise.execute(request.seed).args[0]
    return SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, inputs.latent).args[0]


def decode(vae, audio_vae, latent: dict, inputs: SamplingInputs | None = None) -> tuple[torch.Tensor, dict]:
    """(IMAGE ``[F, H, W, 3]``, AUDIO) of an audio+video latent (step 3 of the module docstring); IC-LoRA guide
    frames are cropped first (``LTXVCropGuides``)."""
    from comfy_extras.nodes_lt import LTXVCropGuides, LTXVSeparateAVLatent
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode

    import nodes

    video, audio = LTXVSeparateAVLatent.execute(latent).args
    if inputs is not None and inputs.crop_guides:
        video = LTXVCropGuides.execute(inputs.positive, inputs.negative, video).args[2]
    images = nodes.VAEDecode().decode(vae, video)[0]
    return images, LTXVAudioVAEDecode.execute(audio, audio_vae).args[0]


def generate(model, clip, vae, audio_vae, request: GenerationRequest,
             references: References = References()) -> tuple[torch.Tensor, dict]:
    """One generation: conditioning, sampling, decoding."""
    inputs = build_conditioning(model, clip, vae, audio_vae, request, references)
    return decode(vae, audio_vae, sample(inputs, request), inputs)
