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

The LoRA goes on a clone of the MODEL through ``comfy.sd.load_lora_for_models``, what ``LoraLoaderModelOnly``
does. Reference conditioning (a first frame, IC-LoRA guides, an ID-LoRA reference voice) belongs in
``build_conditioning``: it returns the MODEL too, because some of those core nodes patch it.
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


@dataclass
class SamplingInputs:
    """What sampling starts from: the MODEL (possibly patched by a conditioning node), the two conditionings and
    the latent to denoise."""

    model: Any
    positive: list
    negative: list
    latent: dict


def with_lora(model, lora_path: Path, strength: float = 1.0):
    """A clone of the MODEL with the LoRA file applied as ``LoraLoaderModelOnly`` applies it."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched


def build_conditioning(model, clip, audio_vae, request: GenerationRequest) -> SamplingInputs:
    """Text conditioning and the empty audio+video latent (step 1 of the module docstring)."""
    from comfy_extras.nodes_lt import EmptyLTXVLatentVideo, LTXVConcatAVLatent, LTXVConditioning
    from comfy_extras.nodes_lt_audio import LTXVEmptyLatentAudio

    import nodes

    encode = nodes.CLIPTextEncode()
    positive = encode.encode(clip, request.prompt)[0]
    negative = encode.encode(clip, request.negative_prompt)[0]
    positive, negative = LTXVConditioning.execute(positive, negative, float(request.frame_rate)).args
    video = EmptyLTXVLatentVideo.execute(request.width, request.height, request.frames, 1).args[0]
    audio = LTXVEmptyLatentAudio.execute(request.frames, request.frame_rate, 1, audio_vae).args[0]
    latent = LTXVConcatAVLatent.execute(video, audio).args[0]
    return SamplingInputs(model, positive, negative, latent)


def sample(inputs: SamplingInputs, request: GenerationRequest) -> dict:
    """The denoised audio+video latent (step 2 of the module docstring)."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_lt import LTXVScheduler

    sigmas = LTXVScheduler.execute(request.steps, latent=inputs.latent, **SCHEDULER).args[0]
    sampler = KSamplerSelect.execute(request.sampler_name).args[0]
    guider = CFGGuider.execute(inputs.model, inputs.positive, inputs.negative, request.guidance).args[0]
    noise = RandomNoise.execute(request.seed).args[0]
    return SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, inputs.latent).args[0]


def decode(vae, audio_vae, latent: dict) -> tuple[torch.Tensor, dict]:
    """(IMAGE ``[F, H, W, 3]``, AUDIO) of an audio+video latent (step 3 of the module docstring)."""
    from comfy_extras.nodes_lt import LTXVSeparateAVLatent
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode

    import nodes

    video, audio = LTXVSeparateAVLatent.execute(latent).args
    images = nodes.VAEDecode().decode(vae, video)[0]
    return images, LTXVAudioVAEDecode.execute(audio, audio_vae).args[0]


def generate(model, clip, vae, audio_vae, request: GenerationRequest) -> tuple[torch.Tensor, dict]:
    """One generation: conditioning, sampling, decoding."""
    return decode(vae, audio_vae, sample(build_conditioning(model, clip, audio_vae, request), request))
