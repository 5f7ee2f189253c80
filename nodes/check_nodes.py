"""Check nodes: does the LoRA load in ComfyUI, and what does it change?

Verify LoRA Keys uses ComfyUI's own key map and loader (what LoraLoaderModelOnly does), never our own
idea of the keys. Sample AV applies the LoRA the same way to a clone of the MODEL and samples with and
without it from the same seed through ``trainer/evaluation/generation``.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainer.adapters.files import read_adapter_file
from ..trainer.adapters.verify import VerifyReport, model_modules, verify_report
from ..trainer.backends.comfyui.denoiser import ComfyDenoiser, detect_comfy_version, ltxav_diffusion_model
from ..trainer.backends.comfyui.encoders import (
    audio_latent_count,
    check_audio_vae,
    check_video_vae,
    decode_audio,
    decode_video,
    encode_prompt,
)
from ..trainer.backends.comfyui.lora_keys import keys_comfyui_applies
from ..trainer.backends.interface import AUDIO_LATENTS_PER_SECOND, AUDIO_SAMPLE_RATE
from ..trainer.evaluation.generation import SampleRequest, sample_av
from .types import CATEGORY_CHECK, LoRAType, audio_value, image_batch, lora_payload

NO_FILE = "(none)"
SAMPLE_FPS = 25.0  # LTX-2's training frame rate (dataset.target_fps default)


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


def sample_with_and_without(model, clip, vae, audio_vae, lora_path: Path, prompt: str, *, seed: int, steps: int,
                            frames: int, width: int, height: int, guidance: float, fps: float = SAMPLE_FPS) -> dict:
    """{"lora": (frames, waveform, rate), "base": (...)} from the same seed and prompt: frames ``[3, F, H, W]`` in
    [-1, 1], waveform ``[1, C, S]`` cut to the clip length at the vocoder's ``rate``. The LoRA is applied as
    LoraLoaderModelOnly does (``comfy.sd.load_lora_for_models`` on a clone); the MODEL itself is untouched."""
    import comfy.sd
    import comfy.utils

    check_sample_geometry(frames, width, height)
    check_video_vae(vae)
    check_audio_vae(audio_vae)
    version = detect_comfy_version(ltxav_diffusion_model(model))
    lora_model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_path), safe_load=True), 1.0, 0.0)
    audio_samples = int(round(frames / fps * AUDIO_SAMPLE_RATE))
    results = {}
    for name, patcher in (("lora", lora_model), ("base", model)):
        # The text connectors are part of the MODEL (and of what a LoRA may change): encode with this variant.
        request = SampleRequest(
            text=encode_prompt(clip, patcher, prompt),
            latent_frames=(frames - 1) // 8 + 1,
            latent_height=height // 32,
            latent_width=width // 32,
            audio_frames=audio_latent_count(audio_vae, audio_samples),
            fps=fps,
            steps=steps,
            seed=seed,
            guidance=guidance,
            negative=encode_prompt(clip, patcher, "") if guidance != 1.0 else None,
        )
        video, audio = sample_av(ComfyDenoiser(patcher, version, checkpointing="none"), request, device=patcher.load_device)
        waveform, rate = decode_audio(audio_vae, audio)
        valid = int(round(request.audio_frames / AUDIO_LATENTS_PER_SECOND * rate))
        results[name] = (decode_video(vae, video)[0], waveform[:, :, :valid], rate)
    return results


class SampleAV(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_SampleAV",
            display_name="LTX2AV Sample A/B",
            category=CATEGORY_CHECK,
            description="Generates video + audio with the LoRA and without it, from the same seed and prompt, so you "
                        "can see and hear what the LoRA changed.",
            inputs=[
                io.Model.Input("model", tooltip="The LTX-2 audio-video MODEL (left unchanged; the LoRA goes on a clone)."),
                io.Clip.Input("clip", tooltip="The Gemma text encoder (Load LTXV Audio Text Encoder)."),
                io.Vae.Input("vae", tooltip="The LTX-2 video VAE."),
                io.Vae.Input("audio_vae", tooltip="The LTX-2 audio VAE (Load LTXV Audio VAE)."),
                io.String.Input("prompt", multiline=True, default="ohwx, a person speaks to the camera in a quiet room",
                                tooltip="The prompt; start it with your trigger word."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Noise seed (the same for both samples)."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Euler sampling steps."),
                io.Int.Input("frames", default=49, min=1, max=1025, step=8, tooltip="Frames, 8n+1 (49 = ~2 s at 25 fps)."),
                io.Int.Input("width", default=512, min=32, max=4096, step=32, tooltip="Width in pixels, a multiple of 32."),
                io.Int.Input("height", default=512, min=32, max=4096, step=32, tooltip="Height in pixels, a multiple of 32."),
                io.Float.Input("guidance", default=1.0, min=1.0, max=20.0, step=0.1, tooltip="Classifier-free guidance; above 1 an empty prompt is the negative (twice the compute)."),
                LoRAType.Input("lora", optional=True, tooltip="From LTX2AV Train LoRA (or use lora_name)."),
                io.Combo.Input("lora_name", options=lora_file_choices(), default=NO_FILE, optional=True,
                               tooltip="A LoRA file in ComfyUI's loras folder (used when no lora is connected)."),
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
                guidance: float, lora=None, lora_name: str | None = None) -> io.NodeOutput:
        results = sample_with_and_without(model, clip, vae, audio_vae, chosen_lora(lora, lora_name), prompt, seed=seed,
                                          steps=steps, frames=frames, width=width, height=height, guidance=guidance)
        outputs = []
        for name in ("lora", "base"):
            frames, waveform, rate = results[name]
            outputs += [image_batch(frames), audio_value(waveform, rate)]
        return io.NodeOutput(*outputs)
