"""Check nodes: does the LoRA load in ComfyUI, and what does it change?

Verify LoRA Keys uses ComfyUI's own key map and loader (what LoraLoaderModelOnly does), never our own
idea of the keys. Sample A/B applies the LoRA the same way to a clone of the MODEL and samples with and
without it from the same seed through ComfyUI's own sampling (``trainer/backends/comfyui/sampling``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from comfy_api.latest import io

from ..trainer.adapters.files import read_adapter_file
from ..trainer.adapters.verify import VerifyReport, model_modules, verify_report
from ..trainer.backends.comfyui.denoiser import detect_comfy_version, ltxav_diffusion_model
from ..trainer.backends.comfyui.encoders import check_audio_vae, check_video_vae
from ..trainer.backends.comfyui.lora_keys import keys_comfyui_applies
from ..trainer.backends.comfyui.sampling import (
    DEFAULT_NEGATIVE,
    GenerationRequest,
    References,
    generate,
    iclora_parameters,
    with_lora,
)
from .types import CATEGORY_CHECK, LoRAType, lora_payload

NO_FILE = "(none)"


# ---- which LoRA -----------------------------------------------------------------------------------------


def lora_file_choices() -> list[str]:
    import folder_paths

    return [NO_FILE] + folder_paths.get_filename_list("loras")


def chosen_lora(lora, lora_name: str | None) -> Path:
    """The LoRA file from the ``lora`` socket or the ``lora_name`` list (exactly one of them)."""
    import folder_paths

    named = lora_name not in (None, "", NO_FILE)
    if lora is not None and named:
        raise ValueError(f"both a lora input and lora_name={lora_name!r} are set; connect the lora or choose a file, not both")
    if lora is not None:
        return Path(lora_payload(lora)["path"])
    if named:
        return Path(folder_paths.get_full_path_or_raise("loras", lora_name))
    raise ValueError("no LoRA: connect the lora output of LTX2AV Train LoRA, or choose a file in lora_name")


# ---- verify ---------------------------------------------------------------------------------------------


def verify_with_comfyui(model_patcher, path: Path) -> VerifyReport:
    """The verify report of ``path`` as ComfyUI's own LoRA loader applies it to the MODEL, with every applied
    module's tensor shapes checked against its layer (ComfyUI would skip a mismatched patch with a log line) and
    what a file of another trainer would apply after Convert LoRA."""
    tensors, metadata = read_adapter_file(path)
    applied, unloaded = keys_comfyui_applies(model_patcher, tensors)
    return verify_report(path, tensors, metadata, applied, unloaded, model_modules(ltxav_diffusion_model(model_patcher)))


class VerifyLoRAKeys(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_VerifyLoRAKeys",
            display_name="LTX2AV Verify LoRA Keys",
            category=CATEGORY_CHECK,
            description="Loads the LoRA with ComfyUI's own key map onto the MODEL and counts the modules it changes "
                        "per group (video/audio attention, a2v, v2a, FFs, connectors). Fails when a group the run "
                        "trained would not load. For LoRAs of other trainers it also says what Convert LoRA would "
                        "make load, and how diffusers and ltx-core load the file.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL the LoRA is meant for."),
                LoRAType.Input("lora", optional=True, tooltip="From LTX2AV Train LoRA (or use lora_name)."),
                io.Combo.Input("lora_name", options=lora_file_choices(), default=NO_FILE, optional=True,
                               tooltip="A LoRA file in ComfyUI's loras folder (used when no lora is connected)."),
            ],
            outputs=[
                io.String.Output("report", tooltip="Applied modules per group and the keys ComfyUI would not load."),
                io.Boolean.Output("ok", tooltip="True when every key loads and every trained group is applied."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, lora=None, lora_name: str | None = None) -> io.NodeOutput:
        report = verify_with_comfyui(model, chosen_lora(lora, lora_name))
        text = report.to_text()
        if report.missing_groups:
            raise ValueError(f"LTX2AV Verify LoRA Keys: the run trained {', '.join(report.missing_groups)} but ComfyUI "
                             f"applies nothing there: those weights would be silently ignored.\n{text}")
        return io.NodeOutput(text, report.ok, ui={"text": [text]})


# ---- sample ---------------------------------------------------------------------------------------------


def check_sample_geometry(frames: int, width: int, height: int) -> None:
    if (frames - 1) % 8:
        raise ValueError(f"frames must be 8n+1 (9, 17, 25, 49, 97, ...), got {frames}")
    if width % 32 or height % 32:
        raise ValueError(f"width and height must be multiples of 32, got {width}x{height}")


def sample_with_and_without(model, clip, vae, audio_vae, lora_path: Path, request: GenerationRequest,
                            strength: float = 1.0, references: References = References()) -> dict:
    """{"lora": (IMAGE, AUDIO), "base": (IMAGE, AUDIO)}: the same generation through ComfyUI's own sampling
    (``trainer/backends/comfyui/sampling``), with the LoRA applied as LoraLoaderModelOnly does (on a clone; the
    MODEL itself is untouched) and without it, both with the same references (an IC-LoRA guide scaled as the
    LoRA's metadata says on both sides)."""
    check_sample_geometry(request.frames, request.width, request.height)
    check_video_vae(vae)
    check_audio_vae(audio_vae)
    detect_comfy_version(ltxav_diffusion_model(model))
    with_the_lora = with_lora(model, lora_path, strength)
    if references.guide_video is not None:
        references = dataclasses.replace(references, iclora_parameters=iclora_parameters(with_the_lora))
    return {"lora": generate(with_the_lora, clip, vae, audio_vae, request, references),
            "base": generate(model, clip, vae, audio_vae, request, references)}


class SampleAV(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        defaults = GenerationRequest(prompt="")
        return io.Schema(
            node_id="LTX2AV_SampleAV",
            display_name="LTX2AV Sample A/B",
            category=CATEGORY_CHECK,
            description="Generates video + audio with the LoRA and without it, from the same seed and prompt, through "
                        "ComfyUI's own LTX-2 sampling (LTXVScheduler, CFG guider, sampler; progress bar and Cancel), "
                        "so you see and hear what the LoRA changes in a normal LTX-2 workflow.",
            inputs=[
                io.Model.Input("model", tooltip="The LTX-2 audio-video MODEL (left unchanged; the LoRA goes on a clone)."),
                io.Clip.Input("clip", tooltip="The Gemma text encoder (Load LTXV Audio Text Encoder)."),
                io.Vae.Input("vae", tooltip="The LTX-2 video VAE."),
                io.Vae.Input("audio_vae", tooltip="The LTX-2 audio VAE (Load LTXV Audio VAE)."),
                io.String.Input("prompt", multiline=True, default="ohwx, a person speaks to the camera in a quiet room",
                                tooltip="The prompt; start it with your trigger word."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Noise seed (the same for both samples; RandomNoise)."),
                io.Int.Input("steps", default=defaults.steps, min=1, max=200, tooltip="Sampling steps (LTXVScheduler)."),
                io.Int.Input("frames", default=defaults.frames, min=1, max=1025, step=8, tooltip="Frames, 8n+1 (97 = 3.9 s at 25 fps)."),
                io.Int.Input("width", default=defaults.width, min=32, max=4096, step=32, tooltip="Width in pixels, a multiple of 32."),
                io.Int.Input("height", default=defaults.height, min=32, max=4096, step=32, tooltip="Height in pixels, a multiple of 32."),
                io.Float.Input("guidance", default=defaults.guidance, min=1.0, max=20.0, step=0.1, tooltip="CFG scale (CFGGuider); above 1 the negative prompt is sampled too (twice the compute). ComfyUI's LTX-2 template uses 4."),
                LoRAType.Input("lora", optional=True, tooltip="From LTX2AV Train LoRA (or use lora_name)."),
                io.Combo.Input("lora_name", options=lora_file_choices(), default=NO_FILE, optional=True,
                               tooltip="A LoRA file in ComfyUI's loras folder (used when no lora is connected)."),
                io.String.Input("negative_prompt", multiline=True, default=defaults.negative_prompt, optional=True,
                                advanced=True, tooltip="The negative prompt (used when guidance is above 1); the default is the one of ComfyUI's LTX-2 template."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.SAMPLER_NAMES), default=defaults.sampler_name,
                               optional=True, advanced=True, tooltip="The sampler (KSamplerSelect); ComfyUI's LTX-2 template uses euler_ancestral."),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.01, optional=True, advanced=True,
                               tooltip="Strength of the LoRA on the model (LoraLoaderModelOnly's strength_model)."),
                io.Float.Input("frame_rate", default=defaults.frame_rate, min=1.0, max=120.0, step=0.01, optional=True,
                               advanced=True, tooltip="Frames per second of the video and the length of the audio (LTXVConditioning, LTXVEmptyLatentAudio)."),
                # The training modes' references (conditioning.mode): what the LoRA was trained to be given.
                io.Image.Input("first_frame", optional=True, advanced=True,
                               tooltip="For first-frame (image-to-video) LoRAs: the clip's first frame (LTXVImgToVideo, strength 1)."),
                io.Image.Input("guide_video", optional=True, advanced=True,
                               tooltip="For IC-LoRAs: the reference video's frames (GetICLoRAParameters + LTXVAddGuide at frame 0, strength 1; cropped with LTXVCropGuides). Both sides get the guide scaled as the LoRA's metadata says."),
                io.Audio.Input("reference_audio", optional=True, advanced=True,
                               tooltip="For ID-LoRAs: the voice to clone, about 5 s (LTXVReferenceAudio, identity guidance 3)."),
            ],
            outputs=[
                io.Image.Output("video_lora", tooltip="Frames with the LoRA."),
                io.Audio.Output("audio_lora", tooltip="Audio with the LoRA."),
                io.Image.Output("video_base", tooltip="Frames without the LoRA (same seed)."),
                io.Audio.Output("audio_base", tooltip="Audio without the LoRA (same seed)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, audio_vae, prompt: str, seed: int, steps: int, frames: int, width: int, height: int,
                guidance: float, lora=None, lora_name: str | None = None, negative_prompt: str = DEFAULT_NEGATIVE,
                sampler_name: str = "euler_ancestral", lora_strength: float = 1.0,
                frame_rate: float = 25.0, first_frame=None, guide_video=None, reference_audio=None) -> io.NodeOutput:
        request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                    frames=frames, width=width, height=height, frame_rate=frame_rate, guidance=guidance,
                                    sampler_name=sampler_name)
        references = References(first_frame=first_frame, guide_video=guide_video, reference_audio=reference_audio)
        results = sample_with_and_without(model, clip, vae, audio_vae, chosen_lora(lora, lora_name), request,
                                          strength=lora_strength, references=references)
        return io.NodeOutput(*results["lora"], *results["base"])
