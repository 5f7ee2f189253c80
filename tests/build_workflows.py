"""Writes the shipped workflows (``example_workflows/*.json``) from the node schemas of a running ComfyUI, and
their template-browser thumbnails (``example_workflows/<name>.jpg``).

The workflow files are what users load (template browser, drag and drop); this script is their source, so
that widget order and defaults always match the nodes. Re-run it after changing a node's inputs:

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python tests/build_workflows.py [--thumbnails]

It starts ComfyUI on a free port with this pack linked in (see ``comfy_server.py``), reads ``/object_info``
and writes every workflow of ``WORKFLOW_BUILDERS`` (one function per workflow; add a new one there; the training
modes' four come from ``mode_workflows.py``). The
template browser titles a pack's workflow with its file name and shows ``<name>.jpg`` next to it, hence the
readable names; ``--thumbnails`` renders each workflow in headless Chromium (``cdp_browser.py``) and saves the
picture. ``example_workflows`` is the folder name ComfyUI prefers for a pack's workflows. Model file names and
download links are those of ComfyUI's official LTX-2 / LTX-2.3 templates (package comfyui-workflow-templates), so
the frontend offers the same downloads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from comfy_server import REPO_ROOT, comfyui_checkout, prepare_base_directory, running_comfyui
from workflow_format import BuiltNode, WorkflowBuilder

WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
# Template-browser titles (the frontend shows a pack's workflow under its file name).
CHARACTER_LTX2 = "LTX-2 character LoRA (voice and face).json"
CHARACTER_LTX23 = "LTX-2.3 character LoRA (voice and face).json"
VOICE_CHECK_LTX2 = "LTX-2 LoRA voice check.json"
THUMBNAIL_SIZE = (512, 384)
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
                "LTX2AV_SampleAV": 60, "LTX2AV_VoiceScore": 20}


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


def add_ab_outputs(builder: WorkflowBuilder, sample: BuiltNode, x: float, y: float, prefix: str,
                   voice_reference: dict) -> None:
    """The two samples as playable videos with sound (CreateVideo → SaveVideo), their audio alone, and the voice
    score of each against the dataset's voice (``voice_reference``: Voice Score's cache input or reference_file)."""
    for side, label in (("lora", "with LoRA"), ("base", "without LoRA")):
        column = Column(builder, x, y)
        video = column.add("CreateVideo", title=f"Video {label}", images=sample[f"video_{side}"],
                           audio=sample[f"audio_{side}"], fps=25.0)
        column.add("SaveVideo", title=f"Save video {label}", video=video["VIDEO"],
                   filename_prefix=f"ltx2av/{prefix}_{side}", format="mp4", **{"format.codec": "auto"})
        column.add("PreviewAudio", title=f"Voice {label}", audio=sample[f"audio_{side}"])
        score = column.add("LTX2AV_VoiceScore", title=f"Voice score {label}", audio=sample[f"audio_{side}"],
                           **voice_reference)
        column.add("PreviewAny", title=f"Voice score {label}", source=score["report"])
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
    add_ab_outputs(builder, sample, sample_x, sample.data["size"][1] + 2 * GAP + 30, name,
                   voice_reference={"cache": cache["cache"]})
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
    # The dataset's voice from the cache the character workflow built (output/ltx2av_cache/<name>).
    add_ab_outputs(builder, sample, sample_x, sample.data["size"][1] + 2 * GAP + 30, "voice_check",
                   voice_reference={"reference_file": f"my_character_{model.slug}"})
    return builder.workflow(file_name)


CHARACTER_NOTE = """## {label} audio+video character LoRA

1. **Models** (same files as ComfyUI's official {label} templates): `{checkpoint}` in `models/checkpoints`,
   `gemma_3_12B_it_fp4_mixed.safetensors` in `models/text_encoders`.
2. **Dataset**: put 3-6 minutes of clean clips of one character in `ComfyUI/input/ltx2av_dataset`
   (mp4/mov/mkv with sound, 3-8 s each), each with a `.txt` caption: what is seen, the spoken words, how the
   voice sounds. The trigger word is added to every caption. Clips train as 97 frames (3.9 s at 25 fps) at
   768x512, shorter ones as 73 or 49 frames; lower frames or size in Load Dataset if memory runs out.
3. **Check** the Dataset Doctor report and listen to a clip and to the cached voice before training.
4. **Train**: each queue trains *steps_per_queue* more steps of the run `output/ltx2av_runs/{name}` and
   continues from its saved state; Cancel keeps a resumable state. The chart shows video loss, audio loss
   and the audio loss weight per step. `train_steps` in the Training Config is the run's total; its advanced
   inputs hold every other option.
5. **Use** the LoRA: Save LoRA copies it to `models/loras`; the key check must show the audio groups applied;
   the A/B videos use the same seed with and without the LoRA, sampled as ComfyUI's LTX-2 template samples,
   and each gets a voice score against the dataset's voice (compare the two).

{label} LoRAs do not work on the other LTX version.
"""

VOICE_CHECK_NOTE = """## Check an {label} audio+video LoRA

Pick the LoRA in both nodes (`lora_name`, from `models/loras`). The key check lists the modules applied per
group (video/audio attention, audio→video and video→audio cross-attention, feed-forwards) and every key
ComfyUI would not load. The A/B renders use the same seed with and without the LoRA: listen to both voices.
The voice scores compare each with the voice of the cache named in `reference_file` (the cache_name of
your character workflow).
"""


# One builder per shipped workflow: file name → function(object_info, file name) → workflow.
WORKFLOW_BUILDERS: dict[str, Callable[[dict, str], dict]] = {
    CHARACTER_LTX2: lambda info, name: character_lora(info, LTX2, name),
    CHARACTER_LTX23: lambda info, name: character_lora(info, LTX23, name),
    VOICE_CHECK_LTX2: lambda info, name: voice_check(info, LTX2, name),
}


def build_all(object_info: dict) -> dict[str, dict]:
    return {name: build(object_info, name) for name, build in all_builders().items()}


def all_builders() -> dict[str, Callable[[dict, str], dict]]:
    """This module's workflows and the training modes' (``mode_workflows`` builds on this module, hence the late
    import)."""
    from mode_workflows import MODE_WORKFLOW_BUILDERS

    return {**WORKFLOW_BUILDERS, **MODE_WORKFLOW_BUILDERS}


def thumbnail_path(workflow_name: str) -> Path:
    """Where the template browser looks for a workflow's picture: ``<name>.jpg`` next to it."""
    return WORKFLOWS_DIR / (workflow_name.removesuffix(".json") + ".jpg")


def prepare_thumbnail_home(base: Path) -> None:
    """What the pictures need from the ComfyUI home: a returning user without the minimap, and empty files under
    the model and input file names the workflows use (so no loader is drawn as missing)."""
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}), encoding="utf-8")
    for folder, name in [("checkpoints", LTX2.checkpoint), ("checkpoints", LTX23.checkpoint),
                         ("text_encoders", TEXT_ENCODER), ("loras", f"my_character_{LTX2.slug}_av.safetensors")]:
        (base / "models" / folder / name).touch()
    from mode_workflows import FIRST_FRAME_IMAGE, IC_REFERENCE_VIDEO, REFERENCE_VOICE  # files the mode workflows load

    for name in (FIRST_FRAME_IMAGE, IC_REFERENCE_VIDEO, REFERENCE_VOICE):
        (base / "input" / name).touch()


FIT_GRAPH = """(async (name) => {
  const app = window.comfyAPI.app.app;
  const response = await fetch(`/api/workflow_templates/%s/${encodeURIComponent(name)}`);
  await app.loadGraphData(await response.json(), true, true, name);
  if (!document.getElementById("ltx2av-thumbnail-style")) {  // no notifications over the graph
    const style = Object.assign(document.createElement("style"), {id: "ltx2av-thumbnail-style"});
    style.textContent = ".p-toast { display: none !important; }";
    document.head.append(style);
  }
  const nodes = app.graph.nodes;
  const left = Math.min(...nodes.map((n) => n.pos[0])), top = Math.min(...nodes.map((n) => n.pos[1] - 30));
  const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  // The part of the canvas right of the side bar and below the tab and tool bars.
  const page = app.canvas.canvas.getBoundingClientRect();
  const box = {x: page.x + 64, y: page.y + 100, width: page.width - 84, height: page.height - 160};
  const scale = Math.min(box.width / (right - left + 40), box.height / (bottom - top + 40));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [(box.x - page.x) / scale + (box.width / scale - (right - left)) / 2 - left,
                          (box.y - page.y) / scale + (box.height / scale - (bottom - top)) / 2 - top];
  app.canvas.setDirty(true, true);
  return box;
})"""


async def render_thumbnails(server, names: list[str], profile: Path) -> None:
    """Each workflow as the frontend draws it (fitted to the canvas), saved as its JPEG thumbnail."""
    import base64

    from PIL import Image

    from cdp_browser import chromium_page
    from comfy_server import PACK_FOLDER_NAME, free_port

    async with chromium_page(profile, free_port(), size=(2600, 1950)) as page:  # room to draw at full detail
        await page.navigate(server.url)
        await page.wait_for("window.comfyAPI?.app?.app?.vueAppReady === true && "
                            "window.comfyAPI.app.app.canvas?.graph?.nodes?.length > 0", 120)
        for name in names:
            box = await page.evaluate(f"{FIT_GRAPH % PACK_FOLDER_NAME}({json.dumps(name)})")
            await asyncio.sleep(1.5)
            shot = await page.send("Page.captureScreenshot", {"format": "png", "clip": {**box, "scale": 1}})
            (profile / "shot.png").write_bytes(base64.b64decode(shot["data"]))
            with Image.open(profile / "shot.png") as image:
                picture = image.convert("RGB")
                picture.thumbnail(THUMBNAIL_SIZE)
                canvas = Image.new("RGB", THUMBNAIL_SIZE, (32, 32, 32))
                canvas.paste(picture, ((THUMBNAIL_SIZE[0] - picture.width) // 2, (THUMBNAIL_SIZE[1] - picture.height) // 2))
                canvas.save(thumbnail_path(name), "JPEG", quality=88)
            print(f"wrote {thumbnail_path(name)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thumbnails", action="store_true", help="also render the template-browser pictures")
    args = parser.parse_args()
    comfyui = comfyui_checkout()
    if comfyui is None:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base_directory(Path(tmp) / "home")
        if args.thumbnails:
            prepare_thumbnail_home(base)
        with running_comfyui(comfyui, base) as server:
            object_info = server.object_info()
            WORKFLOWS_DIR.mkdir(exist_ok=True)
            for name, workflow in build_all(object_info).items():
                (WORKFLOWS_DIR / name).write_text(json.dumps(workflow, indent=1) + "\n", encoding="utf-8")
                print(f"wrote {WORKFLOWS_DIR / name} ({len(workflow['nodes'])} nodes)")
            if args.thumbnails:
                asyncio.run(render_thumbnails(server, list(all_builders()), Path(tmp) / "profile"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
