"""End to end through a real ComfyUI server: the training modes' shipped workflows (``tests/mode_workflows.py``).

Each workflow trains a LoRA in its mode on tiny models and then samples with ComfyUI's core nodes for that mode
(``LTXVImgToVideo``, ``GetICLoRAParameters`` + ``LTXVAddGuide`` + ``LTXVCropGuides``, ``LTXVReferenceAudio``, the
64x64 ``EmptyLTXVLatentVideo`` stand-in of audio-only generation). The home is the one of ``test_e2e_server.py``
plus the files the mode workflows name (an audio folder, IC clips with grey references, a first-frame image, a
reference video and a reference voice), all synthesised here.
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from safetensors import safe_open

from comfy_e2e import FRAMES, NO_COMFYUI, SIZE, TRAIN_STEPS, prepare_test_home, tiny_prompt
from comfy_server import comfyui_checkout, running_comfyui
from mode_workflows import (
    AUDIO_DATASET,
    FIRST_FRAME_IMAGE,
    IC_DATASET,
    IC_REFERENCE_VIDEO,
    MODE_WORKFLOW_FILES,
    REFERENCE_VOICE,
)
from workflow_format import nodes_of, set_inputs


def server_test(test):
    return pytest.mark.comfyui(pytest.mark.slow(test))


def prepare_mode_inputs(input_dir) -> None:
    """What the mode workflows read from ComfyUI's input folder, at the e2e home's tiny sizes."""
    from ltx2_av_trainer.trainer.data.media.encode import write_av_file, write_wav
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset, speaker, synthesize_voice
    from ltx2_av_trainer.trainer.data.synth_modes import make_audio_dataset, make_reference_folder, write_png

    make_audio_dataset(input_dir / AUDIO_DATASET, clips=3, seconds=0.8)
    clips = make_demo_dataset(input_dir / IC_DATASET, clips_per_speaker=3, seconds=0.8, width=SIZE, height=SIZE)
    references = make_reference_folder(clips, input_dir / "ltx2av_ic_references")
    with av.open(str(references[1])) as container:
        grey = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    write_av_file(input_dir / IC_REFERENCE_VIDEO, grey[:FRAMES], 25, None, 48000)  # at most the sample's length
    write_png(input_dir / FIRST_FRAME_IMAGE, grey[0])
    write_wav(input_dir / REFERENCE_VOICE, synthesize_voice(speaker(0), 1.0, sample_rate=48000, seed=5).audio, 48000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip(NO_COMFYUI)
    base = prepare_test_home(tmp_path_factory.mktemp("comfy_e2e_modes"), comfyui)
    prepare_mode_inputs(base / "input")
    with running_comfyui(comfyui, base) as running:
        yield running


def mode_prompt(object_info: dict, name: str) -> dict:
    """The shipped mode workflow at the e2e home's tiny sizes (its core sampling nodes shrunk too)."""
    prompt = tiny_prompt(object_info, name)
    shrink = {
        "EmptyLTXVLatentVideo": dict(length=FRAMES),  # the audio stand-in keeps its 64x64 (= SIZE here)
        "LTXVImgToVideo": dict(width=SIZE, height=SIZE, length=FRAMES),
        "LTXVEmptyLatentAudio": dict(frames_number=FRAMES),
        "LTXVScheduler": dict(steps=2),
    }
    for class_type, values in shrink.items():
        if nodes_of(prompt, class_type):
            set_inputs(prompt, class_type, **values)
    for node_id in nodes_of(prompt, "EmptyLTXVLatentVideo"):
        if prompt[node_id]["inputs"]["width"] != 64:
            prompt[node_id]["inputs"].update(width=SIZE, height=SIZE)
    return prompt


def one(prompt: dict, class_type: str) -> str:
    found = nodes_of(prompt, class_type)
    assert len(found) == 1, f"expected one {class_type}, found {len(found)}"
    return found[0]


@server_test
@pytest.mark.parametrize("name", sorted(MODE_WORKFLOW_FILES))
def test_mode_workflow_trains_then_samples_with_core_nodes(server, name):
    mode = MODE_WORKFLOW_FILES[name]
    prompt = mode_prompt(server.object_info(), name)
    entry = server.run(prompt, timeout_s=600)
    outputs = entry.outputs

    history = outputs[one(prompt, "LTX2AV_TrainLoRA")]["ltx2av_history"]
    assert [point["step"] for point in history] == list(range(1, TRAIN_STEPS + 1))
    assert all(point["loss_audio"] is not None for point in history), "the audio was not trained"
    lora_file = server.base_dir / "models" / "loras" / (prompt[one(prompt, "LTX2AV_SaveLoRA")]["inputs"]["filename"] + ".safetensors")
    with safe_open(str(lora_file), framework="pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["ltx2_av_trainer.mode"] == {"i2v": "av"}.get(mode, mode)
    verify_text = outputs[one(prompt, "LTX2AV_VerifyLoRAKeys")]["text"][0]
    assert "keys ComfyUI does not load" not in verify_text, verify_text

    if mode == "audio":
        assert all(point["loss_video"] is None for point in history)
        groups = set(json.loads(metadata["ltx2_av_trainer.groups"]))
        assert groups == {"audio_attn", "audio_ff"}, groups
        assert not any("audio_to_video_attn" in key or "video_to_audio_attn" in key for key in keys)
        saved = outputs[one(prompt, "SaveAudio")]["audio"]
        assert len(saved) == 1
        with av.open(str(server.base_dir / "output" / saved[0]["subfolder"] / saved[0]["filename"])) as container:
            assert container.streams.audio and not container.streams.video
        return
    if mode == "ic":
        assert metadata["reference_downscale_factor"] == "2"  # what GetICLoRAParameters read in the sampling half
    videos = outputs[one(prompt, "SaveVideo")]["images"]
    assert len(videos) == 1
    with av.open(str(server.base_dir / videos[0]["type"] / videos[0]["subfolder"] / videos[0]["filename"])) as container:
        assert container.streams.audio, "the sample has no sound"
        # LTXVCropGuides removed the IC guide frames: the video has the requested length.
        assert sum(1 for _ in container.decode(video=0)) == FRAMES
