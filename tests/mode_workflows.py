"""The shipped workflows of the training modes: each trains a LoRA in its mode, then samples with ComfyUI's CORE
inference nodes for that mode (``tests/build_workflows.py`` writes them with the other workflows; one function per
workflow here).

| workflow | trains | samples with |
|---|---|---|
| ``LTX-2 audio-only voice LoRA.json`` | audio-only (an audio folder) | ``EmptyLTXVLatentVideo`` 64x64 stand-in + ``LTXVEmptyLatentAudio`` |
| ``LTX-2 first-frame (image-to-video) LoRA.json`` | first-frame conditioning | ``LTXVImgToVideo`` |
| ``LTX-2 IC-LoRA (video-to-video).json`` | IC-LoRA with reference videos | ``GetICLoRAParameters`` + ``LTXVAddGuide``, ``LTXVCropGuides`` |
| ``LTX-2 ID-LoRA (reference voice).json`` | ID-LoRA (another clip of the speaker as reference) | ``LTXVReferenceAudio`` |

The sampling half is ComfyUI's LTX-2 path (``LTXVConditioning``, ``LTXVConcatAVLatent``, ``LTXVScheduler``,
``CFGGuider``, ``SamplerCustomAdvanced``, ``LTXVSeparateAVLatent``, the decoders); the trained LoRA reaches the
MODEL through ``LTX2AV_ApplyTrainedLoRA`` (ComfyUI's own loader, with the file's metadata), because a file that
does not exist yet cannot be picked in ``LoraLoaderModelOnly`` when the workflow is queued.
"""

from __future__ import annotations

from build_workflows import COLUMN_WIDTH, GAP, LTX2, TRIGGER, Column, add_loaders
from workflow_format import WorkflowBuilder

# Files in ComfyUI's input folder that the workflows name (the notes tell users what to put there).
AUDIO_DATASET = "ltx2av_audio_dataset"
CLIP_DATASET = "ltx2av_dataset"
IC_DATASET = "ltx2av_ic_dataset"
IC_REFERENCES = "../ltx2av_ic_references"  # next to the dataset folder, never inside it (it would be listed as clips)
FIRST_FRAME_IMAGE = "ltx2av_first_frame.png"
IC_REFERENCE_VIDEO = "ltx2av_ic_reference.mp4"
REFERENCE_VOICE = "ltx2av_reference_voice.wav"

MODE_WORKFLOW_FILES = {
    "LTX-2 audio-only voice LoRA.json": "audio",
    "LTX-2 first-frame (image-to-video) LoRA.json": "i2v",
    "LTX-2 IC-LoRA (video-to-video).json": "ic",
    "LTX-2 ID-LoRA (reference voice).json": "id",
}
SAMPLE_FRAMES, SAMPLE_WIDTH, SAMPLE_HEIGHT = 97, 768, 512
PROMPT = (f"{TRIGGER}, a person looks into the camera in a quiet, softly lit room and says clearly: "
          "\"Hello, this is my voice.\"")


def train_half(builder: WorkflowBuilder, name: str, note: str, dataset_inputs: dict, config_inputs: dict) -> dict:
    """Loaders → Load Dataset → Doctor → Cache → Training Config → Train → Save → Verify → Apply (the LoRA on the
    MODEL for the sampling half). Returns the loaders' and Apply's outputs and where the sampling half starts."""
    loaders = add_loaders(builder, LTX2, 0)
    builder.note(note, pos=(0, loaders["bottom"]), size=(COLUMN_WIDTH - GAP, 560))
    checkpoint, audio_vae, clip = loaders["checkpoint"], loaders["audio_vae"], loaders["clip"]
    data = Column(builder, COLUMN_WIDTH)
    dataset = data.add("LTX2AV_LoadDataset", trigger=TRIGGER, widgets=dataset_inputs)
    doctor = data.add("LTX2AV_DatasetDoctor", dataset=dataset["dataset"])
    data.add("PreviewAny", title="Dataset report", source=doctor["report"])
    cache_column = Column(builder, 2 * COLUMN_WIDTH)
    cache = cache_column.add("LTX2AV_CacheLatents", dataset=dataset["dataset"], model=checkpoint["MODEL"],
                             vae=checkpoint["VAE"], audio_vae=audio_vae["Audio VAE"], clip=clip["CLIP"], cache_name=name)
    cache_column.add("PreviewAny", title="Cache summary", source=cache["summary"])
    config = Column(builder, 3 * COLUMN_WIDTH).add("LTX2AV_TrainingConfig", **config_inputs)
    train = Column(builder, 4 * COLUMN_WIDTH, width=480)
    lora = train.add("LTX2AV_TrainLoRA", model=checkpoint["MODEL"], cache=cache["cache"], config=config["config"],
                     run_name=name, vae=checkpoint["VAE"], audio_vae=audio_vae["Audio VAE"], clip=clip["CLIP"])
    saved = train.add("LTX2AV_SaveLoRA", lora=lora["lora"], filename=name)
    train.add("PreviewAny", title="Saved LoRA", source=saved["path"])
    verify = train.add("LTX2AV_VerifyLoRAKeys", model=checkpoint["MODEL"], lora=lora["lora"])
    train.add("PreviewAny", title="LoRA key check", source=verify["report"])
    applied = train.add("LTX2AV_ApplyTrainedLoRA", model=checkpoint["MODEL"], lora=lora["lora"])
    return {"model": applied["model"], "vae": checkpoint["VAE"], "audio_vae": audio_vae["Audio VAE"], "clip": clip["CLIP"],
            "x": 4 * COLUMN_WIDTH + 520}


def prompts(column: Column, parts: dict, text: str = PROMPT):
    positive = column.add("CLIPTextEncode", title="Prompt", clip=parts["clip"], text=text)
    negative = column.add("CLIPTextEncode", title="Negative prompt", clip=parts["clip"], text="")
    return column.add("LTXVConditioning", positive=positive["CONDITIONING"], negative=negative["CONDITIONING"],
                      frame_rate=25.0)


def sample_av(column: Column, parts: dict, model, positive, negative, video_latent, *, scheduler_latent=None):
    """Audio latent next to ``video_latent``, one LTXVScheduler/CFG sampling pass; (video latent, audio latent)."""
    audio = column.add("LTXVEmptyLatentAudio", frames_number=SAMPLE_FRAMES, frame_rate=25.0, audio_vae=parts["audio_vae"])
    joint = column.add("LTXVConcatAVLatent", video_latent=video_latent, audio_latent=audio["Latent"])
    sigmas = column.add("LTXVScheduler", steps=20, latent=scheduler_latent or video_latent)
    guider = column.add("CFGGuider", model=model, positive=positive, negative=negative, cfg=3.0)
    sampler = column.add("KSamplerSelect", sampler_name="euler")
    noise = column.add("RandomNoise", noise_seed=42)
    sampled = column.add("SamplerCustomAdvanced", noise=noise["NOISE"], guider=guider["GUIDER"], sampler=sampler["SAMPLER"],
                         sigmas=sigmas["SIGMAS"], latent_image=joint["latent"])
    separated = column.add("LTXVSeparateAVLatent", av_latent=sampled["output"])
    return separated["video_latent"], separated["audio_latent"]


def save_video(column: Column, parts: dict, video_latent, audio_latent, prefix: str) -> None:
    images = column.add("VAEDecode", samples=video_latent, vae=parts["vae"])
    audio = column.add("LTXVAudioVAEDecode", samples=audio_latent, audio_vae=parts["audio_vae"])
    video = column.add("CreateVideo", images=images["IMAGE"], audio=audio["Audio"], fps=25.0)
    column.add("SaveVideo", video=video["VIDEO"], filename_prefix=f"ltx2av/{prefix}", format="mp4",
               **{"format.codec": "auto"})


# ---- the four workflows ----------------------------------------------------------------------------------------


def audio_only_lora(object_info: dict, file_name: str) -> dict:
    builder = WorkflowBuilder(object_info)
    name = "my_voice_ltx2_audio"
    parts = train_half(builder, name, AUDIO_NOTE.format(name=name),
                       {"folder": AUDIO_DATASET, "kind": "audio"},
                       {"conditioning_mode": "audio", "network_preset": "audio"})
    column = Column(builder, parts["x"])
    conditioning = prompts(column, parts, f"{TRIGGER}, a person says clearly: \"Hello, this is my voice.\"")
    standin = column.add("EmptyLTXVLatentVideo", title="Video stand-in (64x64, as trained)",
                         widgets=dict(width=64, height=64, length=SAMPLE_FRAMES))
    sample = Column(builder, parts["x"] + COLUMN_WIDTH)
    _, audio_latent = sample_av(sample, parts, parts["model"], conditioning["positive"], conditioning["negative"],
                                standin["LATENT"])
    audio = sample.add("LTXVAudioVAEDecode", samples=audio_latent, audio_vae=parts["audio_vae"])
    sample.add("SaveAudio", audio=audio["Audio"], filename_prefix=f"ltx2av/{name}")
    return builder.workflow(file_name)


def first_frame_lora(object_info: dict, file_name: str) -> dict:
    builder = WorkflowBuilder(object_info)
    name = "my_character_ltx2_i2v"
    parts = train_half(builder, name, I2V_NOTE.format(name=name), {"folder": CLIP_DATASET},
                       {"conditioning_first_frame_p": 0.5})
    column = Column(builder, parts["x"])
    conditioning = prompts(column, parts)
    image = column.add("LoadImage", title="First frame", image=FIRST_FRAME_IMAGE, extra_height=220)
    i2v = column.add("LTXVImgToVideo", positive=conditioning["positive"], negative=conditioning["negative"],
                     vae=parts["vae"], image=image["IMAGE"],
                     widgets=dict(width=SAMPLE_WIDTH, height=SAMPLE_HEIGHT, length=SAMPLE_FRAMES))
    sample = Column(builder, parts["x"] + COLUMN_WIDTH)
    video_latent, audio_latent = sample_av(sample, parts, parts["model"], i2v["positive"], i2v["negative"], i2v["latent"])
    save_video(Column(builder, parts["x"] + 2 * COLUMN_WIDTH), parts, video_latent, audio_latent, name)
    return builder.workflow(file_name)


def ic_lora(object_info: dict, file_name: str) -> dict:
    builder = WorkflowBuilder(object_info)
    name = "my_effect_ltx2_ic"
    parts = train_half(builder, name, IC_NOTE.format(name=name),
                       {"folder": IC_DATASET, "reference_dir": IC_REFERENCES, "reference_frames": 9,
                        "reference_downscale": 2},
                       {"conditioning_mode": "ic", "network_preset": "v2v"})
    column = Column(builder, parts["x"])
    conditioning = prompts(column, parts)
    reference = column.add("LoadVideo", title="Reference video", file=IC_REFERENCE_VIDEO, extra_height=220)
    frames = column.add("GetVideoComponents", video=reference["VIDEO"])
    parameters = column.add("GetICLoRAParameters", iclora_model=parts["model"])
    empty = column.add("EmptyLTXVLatentVideo", widgets=dict(width=SAMPLE_WIDTH, height=SAMPLE_HEIGHT, length=SAMPLE_FRAMES))
    guided = column.add("LTXVAddGuide", positive=conditioning["positive"], negative=conditioning["negative"],
                        vae=parts["vae"], latent=empty["LATENT"], image=frames["images"], frame_idx=0, strength=1.0,
                        iclora_parameters=parameters["iclora_parameters"])
    sample = Column(builder, parts["x"] + COLUMN_WIDTH)
    # The scheduler's shift comes from the clip's own tokens, as in training (the guide is not counted there).
    video_latent, audio_latent = sample_av(sample, parts, parts["model"], guided["positive"], guided["negative"],
                                           guided["latent"], scheduler_latent=empty["LATENT"])
    out = Column(builder, parts["x"] + 2 * COLUMN_WIDTH)
    cropped = out.add("LTXVCropGuides", positive=guided["positive"], negative=guided["negative"], latent=video_latent)
    save_video(out, parts, cropped["latent"], audio_latent, name)
    return builder.workflow(file_name)


def id_lora(object_info: dict, file_name: str) -> dict:
    builder = WorkflowBuilder(object_info)
    name = "my_voice_ltx2_id"
    parts = train_half(builder, name, ID_NOTE.format(name=name),
                       {"folder": CLIP_DATASET, "reference_audio_same_speaker": True},
                       {"conditioning_mode": "id", "network_preset": "voice"})
    column = Column(builder, parts["x"])
    conditioning = prompts(column, parts)
    voice = column.add("LoadAudio", title="Reference voice", audio=REFERENCE_VOICE, extra_height=70)
    reference = column.add("LTXVReferenceAudio", model=parts["model"], positive=conditioning["positive"],
                           negative=conditioning["negative"], reference_audio=voice["AUDIO"], audio_vae=parts["audio_vae"])
    empty = column.add("EmptyLTXVLatentVideo", widgets=dict(width=SAMPLE_WIDTH, height=SAMPLE_HEIGHT, length=SAMPLE_FRAMES))
    sample = Column(builder, parts["x"] + COLUMN_WIDTH)
    video_latent, audio_latent = sample_av(sample, parts, reference["MODEL"], reference["positive"],
                                           reference["negative"], empty["LATENT"])
    save_video(Column(builder, parts["x"] + 2 * COLUMN_WIDTH), parts, video_latent, audio_latent, name)
    return builder.workflow(file_name)


COMMON_STEPS = """Each queue trains *steps_per_queue* more steps of `output/ltx2av_runs/{name}` (Cancel keeps a resumable
state); then the LoRA is applied with ComfyUI's own loader and the right half samples with ComfyUI's own LTX-2
nodes. Later, sample with `Load LoRA (model only)` on `models/loras/{name}.safetensors` instead of Apply."""

AUDIO_NOTE = """## LTX-2 audio-only LoRA

1. **Data**: recordings of one voice in `ComfyUI/input/""" + AUDIO_DATASET + """` (wav, flac, mp3, m4a, or videos,
   whose sound is used), each with a `.txt` caption (the words and how the voice sounds).
2. **Train**: `conditioning_mode = audio`: only the audio attentions and audio feed-forward are adapted; the
   video branch sees a 64x64 stand-in. """ + COMMON_STEPS + """
3. **Generate audio**: the stand-in is `EmptyLTXVLatentVideo` at **64x64** with the length you want; give the
   scheduler that latent, decode only the audio.
"""

I2V_NOTE = """## LTX-2 image-to-video (first frame) LoRA

1. **Data**: talking clips of your character in `ComfyUI/input/""" + CLIP_DATASET + """` with `.txt` captions.
2. **Train**: `conditioning_first_frame_p = 0.5`: half the time the clip's first frame is given clean, as
   `LTXV Img To Video` gives your image at inference. """ + COMMON_STEPS + """
3. **Generate**: put the first frame in `ComfyUI/input/""" + FIRST_FRAME_IMAGE + """` (or pick another image).
"""

IC_NOTE = """## LTX-2 IC-LoRA (video-to-video)

1. **Data**: clips in `ComfyUI/input/""" + IC_DATASET + """` with captions, and a reference per clip with the same
   file name in `ComfyUI/input/ltx2av_ic_references` (a video, or an image): what the LoRA turns into the clip.
2. **Train**: `conditioning_mode = ic`, references of 9 frames at half size (`reference_downscale = 2`, saved in
   the LoRA). """ + COMMON_STEPS + """
3. **Generate**: a reference video in `ComfyUI/input/""" + IC_REFERENCE_VIDEO + """`. `Get IC-LoRA Parameters`
   reads the downscale factor from the LoRA; `LTXV Add Guide` (frame 0) adds the reference; `LTXV Crop Guides`
   removes it after sampling.
"""

ID_NOTE = """## LTX-2 ID-LoRA (voice from a reference clip)

1. **Data**: clips of one speaker in `ComfyUI/input/""" + CLIP_DATASET + """` (one folder per speaker); each clip's
   reference is another clip of the same speaker (or put references with the clips' names in a reference
   audio folder).
2. **Train**: `conditioning_mode = id`, preset `voice`; the reference is prepended to the audio as
   `LTXV Reference Audio` does at inference. """ + COMMON_STEPS + """
3. **Generate**: about 5 s of the voice in `ComfyUI/input/""" + REFERENCE_VOICE + """`; `LTXV Reference Audio`
   conditions on it (identity guidance 3).
"""


# file name → builder(object_info, file name) → workflow, for ``build_workflows.build_all``.
MODE_BUILD_FUNCTIONS = {"audio": audio_only_lora, "i2v": first_frame_lora, "ic": ic_lora, "id": id_lora}
MODE_WORKFLOW_BUILDERS = {name: (lambda info, file_name, f=MODE_BUILD_FUNCTIONS[mode]: f(info, file_name))
                          for name, mode in MODE_WORKFLOW_FILES.items()}
