"""A tiny ComfyUI home for the end-to-end tiers (``test_e2e_server.py``, ``test_browser.py``).

``prepare_test_home`` fills a ComfyUI base directory:

- ``custom_nodes/``: this pack (as ``ltx2-av-trainer``) and the test-only pack ``tests/comfy_test_pack``;
- ``models/checkpoints/<official name>``: a tiny LTX-2-style single-file checkpoint per version, read by both
  ``CheckpointLoaderSimple`` (``model.diffusion_model.*`` = the LTXAV transformer, ``vae.*`` = the video VAE)
  and ``LTXVAudioVAELoader`` (``audio_vae.*`` + ``vocoder.*``); its metadata ``config`` carries the
  ``transformer``, ``vae``, ``audio_vae`` and ``vocoder`` sections as the real checkpoints do. Built with
  ComfyUI's own classes by the builders of ``comfy_fixtures`` / ``comfy_model_fixtures``, so the shipped
  workflows load them with their file names unchanged;
- ``models/text_encoders/``: a tiny Gemma text encoder per version. ComfyUI's ``LTXAVTextEncoderLoader``
  always builds the full-size Gemma-3-12B (fixed config, plus a vision tower), so ``tiny_prompt`` swaps that
  one node for ``LTX2AVTest_TinyTextEncoderLoader`` (same inputs, the same ``LTXAVTEModel`` at tiny size);
- ``input/ltx2av_dataset``: synthesised talking clips with captions (the folder the workflows name);
- ``user/default/comfy.settings.json``: a returning user (no first-run template dialog).

``tiny_prompt`` turns a shipped workflow into an API prompt (``workflow_format.ui_to_api``) at tiny sizes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors import safe_open

from build_workflows import CHARACTER_LTX2, CHARACTER_LTX23, VOICE_CHECK_LTX2, WORKFLOWS_DIR
from comfy_server import prepare_base_directory
from mode_workflows import MODE_WORKFLOW_FILES
from workflow_format import nodes_of, set_inputs, ui_to_api

from ltx2_av_trainer.trainer.config import TinyModelConfig
from ltx2_av_trainer.trainer.io_utils import save_safetensors_atomic

TINY = TinyModelConfig()
WORKFLOWS = WORKFLOWS_DIR
TEST_PACK = Path(__file__).resolve().parent / "comfy_test_pack"

# The files of ComfyUI's official LTX-2 / LTX-2.3 templates (see tests/build_workflows.py).
CHECKPOINTS = {"2.0": "ltx-2-19b-dev-fp8.safetensors", "2.3": "ltx-2.3-22b-dev-fp8.safetensors"}
TEXT_ENCODER = "gemma_3_12B_it_fp4_mixed.safetensors"
WORKFLOW_VERSION = {CHARACTER_LTX2: "2.0", CHARACTER_LTX23: "2.3", VOICE_CHECK_LTX2: "2.0"}
WORKFLOW_VERSION.update({name: "2.0" for name in MODE_WORKFLOW_FILES})  # the training modes' (mode_workflows.py)

NO_COMFYUI = "COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI tier (make test-comfyui)"

FRAMES, SIZE, CLIPS = 9, 64, 3
TRAIN_STEPS = 4


def tiny_text_encoder_name(version: str) -> str:
    """The tiny text encoder for ``version`` (2.0: one projection, 2.3: the dual video/audio projection)."""
    return f"tiny_ltxav_text_encoder_{version}.safetensors"


# ---- model files -----------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def write_tiny_checkpoint(path: Path, version: str, seed: int = 0) -> Path:
    """A single-file tiny LTX-2 (``version``) checkpoint: transformer, video VAE, audio VAE and vocoder."""
    import comfy_model_fixtures as parts
    from comfy_fixtures import write_tiny_ltxav_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        transformer, transformer_meta = _read(write_tiny_ltxav_checkpoint(folder, version, TINY, seed))
        video_vae, video_meta = _read(parts.write_tiny_video_vae(folder, seed + 1))
        audio, audio_meta = _read(parts.write_tiny_audio_vae(folder, seed + 2))
    state = {**transformer, **{"vae." + key: value for key, value in video_vae.items()}, **audio}
    config = {**json.loads(transformer_meta["config"]), **json.loads(video_meta["config"]),
              **json.loads(audio_meta["config"])}
    save_safetensors_atomic(state, path, metadata={"config": json.dumps(config)})
    return path


def install_tiny_models(models_dir: Path) -> None:
    """The tiny checkpoints (official names) and text encoders of both versions in a ComfyUI models folder."""
    import comfy_model_fixtures as parts

    for index, (version, name) in enumerate(sorted(CHECKPOINTS.items())):
        write_tiny_checkpoint(models_dir / "checkpoints" / name, version, seed=10 * index)
        written = parts.write_tiny_text_encoder(models_dir / "text_encoders", version, TINY)
        written.rename(written.with_name(tiny_text_encoder_name(version)))


# ---- the home -------------------------------------------------------------------------------------------------


def write_frontend_settings(base_dir: Path) -> None:
    settings = base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}), encoding="utf-8")


def prepare_test_home(base_dir: Path, comfyui: Path) -> Path:
    from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    import_model_management(comfyui)  # the tiny models are built with ComfyUI's classes, in this process
    prepare_base_directory(base_dir, extra_custom_nodes={"ltx2av_test_pack": TEST_PACK})
    write_frontend_settings(base_dir)
    install_tiny_models(base_dir / "models")
    make_demo_dataset(base_dir / "input" / "ltx2av_dataset", clips_per_speaker=CLIPS, seconds=0.8,
                      width=SIZE, height=SIZE)
    return base_dir


# ---- prompts ----------------------------------------------------------------------------------------------------


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))


def tiny_prompt(object_info: dict, workflow_name: str) -> dict:
    """The shipped workflow as an API prompt, with the tiny text encoder and tiny sizes and step counts."""
    prompt = ui_to_api(load_workflow(workflow_name), object_info)
    for node_id in nodes_of(prompt, "LTXAVTextEncoderLoader"):
        prompt[node_id]["class_type"] = "LTX2AVTest_TinyTextEncoderLoader"
        prompt[node_id]["inputs"]["text_encoder"] = tiny_text_encoder_name(WORKFLOW_VERSION[workflow_name])
    shrink = {
        "LTX2AV_LoadDataset": dict(frames=FRAMES, width=SIZE, height=SIZE),
        "LTX2AV_TrainingConfig": dict(train_steps=TRAIN_STEPS, train_mixed_precision="fp32", network_rank=4,
                                      network_alpha=4.0, optimizer_lr=1e-3),
        "LTX2AV_TrainLoRA": dict(steps_per_queue=TRAIN_STEPS),
        "LTX2AV_SampleAV": dict(steps=2, frames=FRAMES, width=SIZE, height=SIZE),
    }
    for class_type, values in shrink.items():
        if nodes_of(prompt, class_type):
            set_inputs(prompt, class_type, **values)
    return prompt
