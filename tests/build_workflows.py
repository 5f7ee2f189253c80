"""Writes the shipped workflows (``workflows/*.json``) from the node schemas of a running ComfyUI.

The workflow files are what users load (template browser, drag and drop); this script is their source, so
that widget order and defaults always match the nodes. Re-run it after changing a node's inputs:

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python tests/build_workflows.py

It starts ComfyUI on a free port with this pack linked in (see ``comfy_server.py``), reads ``/object_info``
and writes the workflows (the training modes' four come from ``mode_workflows.py``). Model file names and download links are those of ComfyUI's official LTX-2 /
LTX-2.3 templates (package comfyui-workflow-templates), so the frontend offers the same downloads.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from comfy_server import REPO_ROOT, comfyui_checkout, prepare_base_directory, running_comfyui
from workflow_format import BuiltNode, WorkflowBuilder

WORKFLOWS_DIR = REPO_ROOT / "workflows"
TEXT_ENCODER = "gemma_3_12B_it_fp4_mixed.safetensors"
TEXT_ENCODER_URL = "https://huggingface.co/Comfy-Org/ltx-2/resolve/main/split_files/text_encoders/" + TEXT_ENCODER


@dataclass(frozen=True)
class ModelChoice:
    label: str  # "LTX-2" / "LTX-2.3"
    checkpoint: str
    checkpoint_url: str
    slug: str  # used in cache/run/LoRA names so the two versions never share a cache


LTX2 = ModelChoice("LTX-2", "ltx-2-19b-dev-fp8.safetensors",
                   "https://huggingface.co/Lightricks/LTX-2/resolve/main/ltx-2-19b-dev-fp8.safetensors", "ltx2")
LTX23 = ModelChoice(
    "LTX-2.3", "ltx-2.3-22b-dev-fp8.safetensors",
    "https://huggingface.co/Lightricks/LTX-2.3-fp8/resolve/main/ltx-2.3-22b-dev-fp8.safetensors", "ltx23",
)

TRIGGER = "ohwx"
SAMPLE_PROMPT = (f"{TRIGGER}, a person looks into the camera in a quiet, softly lit room and says clearly: "
                 "\"Hello, this is my voice.\"")
COLUMN_WIDTH = 360
GAP = 40
# Room the frontend needs beyond the widgets: text/audio/video previews and the training chart.
EXTRA_HEIGHT = {"PreviewAny": 130, "PreviewAudio": 70, "SaveVideo": 260, "LTX2AV_TrainLoRA": 200,
                "LTX2AV_SampleAV": 60}


def model_entry(name: str, url: str, directory: str) -> dict:
    return {"name": name, "url": url, "directory": directory}


class Column:
    """Stacks nodes top to bottom at one x position."""

    def __init__(self, builder: WorkflowBuilder, x: float, y: float = 0, width: float = COLUMN_WIDTH - GAP):
        self.builder, self.x, self.y, self.width = builder, x, y, width

    def add(self, kind: str, **kwargs) -> BuiltNode:
        kwargs.setdefault("extra_height", EXTRA_HEIGHT.get(kind, 0))
        node = self.builder.add(kind, pos=(self.x, self.y), width=kwargs.pop("width", self.width), **kwargs)
        self.y += node.data["size"][1] + GAP + 30  # + the title bar
        return node


def add_loaders(builder: WorkflowBuilder, model: ModelChoice, x: float) -> dict[str, BuiltNode]:
    column = Column(builder, x)
    checkpoint_models = [model_entry(model.checkpoint, model.checkpoint_url, "checkpoints")]
    checkpoint = column.add("CheckpointLoaderSimple", title=f"Load {model.label} checkpoint",
                            properties={"models": checkpoint_models}, ckpt_name=model.checkpoint)
    audio_vae = column.add("LTXVAudioVAELoader", properties={"models": checkpoint_models}, ckpt_name=model.checkpoint)
    text_encoder = column.add(
        "LTXAVTextEncoderLoader",
        properties={"models": checkpoint_models + [model_entry(TEXT_ENCODER, TEXT_ENCODER_URL, "text_encoders")]},
        text_encoder=TEXT_ENCODER, ckpt_name=model.checkpoint,
    )
    return {"checkpoint": checkpoint, "audio_vae": audio_vae, "clip": text_encoder, "bottom": column.y}


def add_ab_outputs(builder: WorkflowBuilder, sample: BuiltNode, x: float, y: float, prefix: str) -> None:
    """The two samples as playable videos with sound (CreateVideo → SaveVideo), plus their audio alone."""
    for side, label in (("lora", "with LoRA"), ("base", "without LoRA")):
        column = Column(builder, x, y)
        video = column.add("CreateVideo", title=f"Video {label}", images=sample[f"video_{side}"],
                           audio=sample[f"audio_{side}"], fps=25.0)
        column.add("SaveVideo", title=f"Save video {label}", video=video["VIDEO"],
                   filename_prefix=f"ltx2av/{prefix}_{side}", format="mp4", **{"format.codec": "auto"})
        column.add("PreviewAudio", title=f"Voice {label}", audio=sample[f"audio_{side}"])
        x += COLUMN_WIDTH


def character_lora(object_info: dict, model: ModelChoice, file_name: str) -> dict:
    builder = WorkflowBuilder(object_info)
    name = f"my_character_{model.slug}"
    loaders = add_loaders(builder, model, 0)
    builder.note(CHARACTER_NOTE.format(label=model.label, checkpoint=model.checkpoint, name=name),
                 pos=(0, loaders["bottom"]), size=(COLUMN_WIDTH - GAP, 520))
    checkpoint, audio_vae, clip = loaders["checkpoint"], loaders["audio_vae"], loaders["clip"]

    data = Column(builder, COLUMN_WIDTH)
    dataset = data.add("LTX2AV_LoadDataset", folder="ltx2av_dataset", trigger=TRIGGER)
    doctor = data.add("LTX2AV_DatasetDoctor", dataset=dataset["dataset"])
    data.add("PreviewAny", title="Dataset report", source=doctor["report"])
    data.add("PreviewAudio", title="Listen: clip as the cache hears it", audio=doctor["audio"])

    cache_column = Column(builder, 2 * COLUMN_WIDTH)
    cache = cache_column.add("LTX2AV_CacheLatents", dataset=dataset["dataset"], model=checkpoint["MODEL"],
                             vae=checkpoint["VAE"], audio_vae=audio_vae["Audio VAE"], clip=clip["CLIP"],
                             cache_name=name)
    cache_column.add("PreviewAny", title="Cache summary", source=cache["summary"])
    cached_audio = cache_column.add("LTX2AV_PreviewCachedAudio", cache=cache["cache"], audio_vae=audio_vae["Audio VAE"])
    cache_column.add("PreviewAudio", title="Listen: cached voice (decoded)", audio=cached_audio["audio"])

    config = Column(builder, 3 * COLUMN_WIDTH).add("LTX2AV_TrainingConfig")
    train = Column(builder, 4 * COLUMN_WIDTH, width=480)
    lora = train.add("LTX2AV_TrainLoRA", model=checkpoint["MODEL"], cache=cache["cache"],
                     config=config["config"], run_name=name, vae=checkpoint["VAE"],
                     audio_vae=audio_vae["Audio VAE"], clip=clip["CLIP"])
    saved = train.add("LTX2AV_SaveLoRA", lora=lora["lora"], filename=f"{name}_av")
    train.add("PreviewAny", title="Saved LoRA", source=saved["path"])
    verify = train.add("LTX2AV_VerifyLoRAKeys", model=checkpoint["MODEL"], lora=lora["lora"])
    train.add("PreviewAny", title="LoRA key check", source=verify["report"])

    sample_x = 4 * COLUMN_WIDTH + 520
    sample = Column(builder, sample_x).add(
        "LTX2AV_SampleAV", model=checkpoint["MODEL"], clip=clip["CLIP"], vae=checkpoint["VAE"],
        audio_vae=audio_vae["Audio VAE"], lora=lora["lora"], prompt=SAMPLE_PROMPT,
    )
    add_ab_outputs(builder, sample, sample_x, sample.data["size"][1] + 2 * GAP + 30, name)
    return builder.workflow(file_name)


def voice_check(object_info: dict, model: ModelChoice, file_name: str) -> dict:
    builder = WorkflowBuilder(object_info)
    loaders = add_loaders(builder, model, 0)
    builder.note(VOICE_CHECK_NOTE.format(label=model.label), pos=(0, loaders["bottom"]),
                 size=(COLUMN_WIDTH - GAP, 320))
    checkpoint, audio_vae, clip = loaders["checkpoint"], loaders["audio_vae"], loaders["clip"]
    lora_name = f"my_character_{model.slug}_av.safetensors"

    check = Column(builder, COLUMN_WIDTH)
    verify = check.add("LTX2AV_VerifyLoRAKeys", model=checkpoint["MODEL"], lora_name=lora_name)
    check.add("PreviewAny", title="LoRA key check", source=verify["report"])

    sample_x = 2 * COLUMN_WIDTH
    sample = Column(builder, sample_x).add(
        "LTX2AV_SampleAV", model=checkpoint["MODEL"], clip=clip["CLIP"], vae=checkpoint["VAE"],
        audio_vae=audio_vae["Audio VAE"], lora_name=lora_name, prompt=SAMPLE_PROMPT,
    )
    add_ab_outputs(builder, sample, sample_x, sample.data["size"][1] + 2 * GAP + 30, "voice_check")
    return builder.workflow(file_name)


CHARACTER_NOTE = """## {label} audio+video character LoRA

1. **Models** (same files as ComfyUI's official {label} templates): `{checkpoint}` in `models/checkpoints`,
   `gemma_3_12B_it_fp4_mixed.safetensors` in `models/text_encoders`.
2. **Dataset**: put 3-6 minutes of clean clips of one character in `ComfyUI/input/ltx2av_dataset`
   (mp4/mov/mkv with sound), each with a `.txt` caption: what is seen, the spoken words, how the voice sounds.
   The trigger word is added to every caption.
3. **Check** the Dataset Doctor report and listen to a clip and to the cached voice before training.
4. **Train**: each queue trains *steps_per_queue* more steps of the run `output/ltx2av_runs/{name}` and
   continues from its saved state; Cancel keeps a resumable state. The chart shows video loss, audio loss
   and the audio loss weight per step. `train_steps` in the Training Config is the run's total.
5. **Use** the LoRA: Save LoRA copies it to `models/loras`; the key check must show the audio groups applied;
   the A/B videos use the same seed with and without the LoRA.

{label} LoRAs do not work on the other LTX version.
"""

VOICE_CHECK_NOTE = """## Check an {label} audio+video LoRA

Pick the LoRA in both nodes (`lora_name`, from `models/loras`). The key check lists the modules applied per
group (video/audio attention, audio→video and video→audio cross-attention, feed-forwards) and every key
ComfyUI would not load. The A/B renders use the same seed with and without the LoRA: listen to both voices.
"""


def build_all(object_info: dict) -> dict[str, dict]:
    builders = {
        "ltx2_av_character_lora.json": lambda name: character_lora(object_info, LTX2, name),
        "ltx23_av_character_lora.json": lambda name: character_lora(object_info, LTX23, name),
        "ltx2_voice_check.json": lambda name: voice_check(object_info, LTX2, name),
    }
    from mode_workflows import mode_workflow_builders  # the training modes' workflows (audio, i2v, ic, id)

    builders.update(mode_workflow_builders(object_info))
    return {name: build(name) for name, build in builders.items()}


def main() -> int:
    comfyui = comfyui_checkout()
    if comfyui is None:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base_directory(Path(tmp))
        with running_comfyui(comfyui, base) as server:
            object_info = server.object_info()
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    for name, workflow in build_all(object_info).items():
        (WORKFLOWS_DIR / name).write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {WORKFLOWS_DIR / name} ({len(workflow['nodes'])} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
