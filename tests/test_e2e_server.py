"""End to end through a real ComfyUI server: the pack installed as a user installs it, the shipped workflows
queued over HTTP, the LoRA loaded by ComfyUI's own LoraLoaderModelOnly, Cancel and resume over the API.

``main.py --cpu`` runs from ``COMFYUI_PATH`` with a temporary base directory prepared by ``comfy_e2e``:
``custom_nodes/`` links this repository (and the test-only pack ``tests/comfy_test_pack``), ``models/`` holds
tiny random-weight models under the official file names the workflows use, ``input/ltx2av_dataset``
synthesised talking clips. Each shipped workflow (UI format) is turned into an API prompt with the server's
``/object_info`` (``workflow_format.ui_to_api``; the browser test checks that converter against the frontend's
own ``graphToPrompt``), shrunk to tiny sizes and step counts, and POSTed to ``/prompt``. The one node swapped:
``LTXAVTextEncoderLoader`` → ``LTX2AVTest_TinyTextEncoderLoader`` (same inputs), because ComfyUI's loader
always builds the full-size Gemma-3-12B.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import pytest
from safetensors import safe_open

from comfy_e2e import (
    FRAMES,
    NO_COMFYUI,
    TRAIN_STEPS,
    WORKFLOW_VERSION,
    WORKFLOWS,
    load_workflow,
    prepare_test_home,
    tiny_prompt,
)
from comfy_server import PACK_FOLDER_NAME, ComfyServer, comfyui_checkout, running_comfyui
from workflow_format import nodes_of, set_inputs, ui_to_api, upstream_of


def server_test(test):
    """A test that needs the ComfyUI server (skipped without COMFYUI_PATH). Marked slow: the module's server
    start and tiny runs take about a minute on 2 cores."""
    return pytest.mark.comfyui(pytest.mark.slow(test))


SHIPPED = sorted(path.name for path in WORKFLOWS.glob("*.json"))
NODE_IDS = {
    "LTX2AV_LoadDataset", "LTX2AV_DatasetDoctor", "LTX2AV_ExtractAudio", "LTX2AV_CacheLatents",
    "LTX2AV_PreviewCachedAudio", "LTX2AV_TrainingConfig", "LTX2AV_TrainLoRA", "LTX2AV_SaveLoRA",
    "LTX2AV_VerifyLoRAKeys", "LTX2AV_SampleAV", "LTX2AV_ApplyTrainedLoRA",
}
EVENT_KEYS = {"node", "step", "total", "loss_video", "loss_audio", "audio_weight", "step_time_s", "eta_s"}
# LoRA modules a voice needs: both audio attentions and both cross-modal attentions.
AUDIO_MODULES = ("audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")


# ---- the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip(NO_COMFYUI)
    base = prepare_test_home(tmp_path_factory.mktemp("comfy_e2e"), comfyui)
    with running_comfyui(comfyui, base) as running:
        yield running


def one_node(prompt: dict, class_type: str) -> str:
    found = nodes_of(prompt, class_type)
    assert len(found) == 1, f"expected one {class_type} in the workflow, found {len(found)}"
    return found[0]


def saved_lora(server: ComfyServer, prompt: dict) -> Path:
    """Where the workflow's Save LoRA node wrote the LoRA (ComfyUI's loras folder)."""
    filename = prompt[one_node(prompt, "LTX2AV_SaveLoRA")]["inputs"]["filename"] + ".safetensors"
    return server.base_dir / "models" / "loras" / filename


def log_since(server: ComfyServer, offset: int) -> str:
    return server.log()[offset:]


def saved_step(run_dir: Path) -> int:
    from ltx2_av_trainer.trainer.training.state import find_latest_state

    state = find_latest_state(run_dir)
    assert state is not None, f"{run_dir} holds no resumable state"
    return json.loads((state / "state.json").read_text(encoding="utf-8"))["step"]


# ---- the workflow files (no server needed) ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_file_links_are_consistent(name):
    workflow = load_workflow(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        output = nodes[source]["outputs"][source_slot]
        target_input = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and target_input["link"] == link_id, f"link {link_id}"
        assert output["type"] == kind, f"link {link_id}: {output['type']} output into a {kind} link"
    listed = {link for node in nodes.values() for output in node["outputs"] for link in output["links"] or []}
    assert listed == {link[0] for link in workflow["links"]}


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_uses_the_official_model_files(name):
    from comfy_e2e import CHECKPOINTS, TEXT_ENCODER

    checkpoint = CHECKPOINTS[WORKFLOW_VERSION[name]]
    loaders = {node["type"]: node for node in load_workflow(name)["nodes"] if node["type"].endswith("Loader")
               or node["type"] == "CheckpointLoaderSimple"}
    assert loaders["CheckpointLoaderSimple"]["widgets_values"] == [checkpoint]
    assert loaders["LTXVAudioVAELoader"]["widgets_values"] == [checkpoint]
    assert loaders["LTXAVTextEncoderLoader"]["widgets_values"][:2] == [TEXT_ENCODER, checkpoint]
    for node in loaders.values():  # the frontend offers these downloads when a file is missing
        for model in node["properties"]["models"]:
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])


# ---- installation ------------------------------------------------------------------------------------------------


@server_test
def test_pack_imports_cleanly_and_serves_its_web_parts(server):
    log = server.log()
    assert "IMPORT FAILED" not in log, log
    assert re.search(rf"\d+\.\d+ seconds: \S*custom_nodes/{re.escape(PACK_FOLDER_NAME)}\s*$", log, re.M), log
    assert NODE_IDS <= set(server.object_info())

    # The JS extension (WEB_DIRECTORY) and the per-node help pages, where the frontend asks for them.
    assert f"/extensions/{PACK_FOLDER_NAME}/ltx2av_chart.js" in server.get_json("/extensions")
    for node_id in sorted(NODE_IDS):
        server.get_text(f"/extensions/{PACK_FOLDER_NAME}/docs/{node_id}.md")

    # The template browser lists and serves the shipped workflows.
    assert sorted(server.get_json("/workflow_templates")[PACK_FOLDER_NAME]) == sorted(n[:-5] for n in SHIPPED)
    for name in SHIPPED:
        served = server.get_json(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{name}")
        assert served == load_workflow(name)


@server_test
def test_shipped_workflows_are_what_build_workflows_writes(server):
    from build_workflows import build_all

    for name, built in build_all(server.object_info()).items():
        assert load_workflow(name) == built, f"workflows/{name} is out of date: run tests/build_workflows.py"


@server_test
def test_every_shipped_workflow_matches_the_node_schemas(server):
    assert set(SHIPPED) == set(WORKFLOW_VERSION), "a new workflow needs an entry in WORKFLOW_VERSION"
    for name in SHIPPED:
        # ui_to_api raises on an unknown node type or a widget count that differs from the schema.
        prompt = ui_to_api(load_workflow(name), server.object_info())
        loaders = {node["class_type"] for node in prompt.values() if "Loader" in node["class_type"]}
        assert {"CheckpointLoaderSimple", "LTXVAudioVAELoader", "LTXAVTextEncoderLoader"} <= loaders, name


# ---- the character workflows ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def character_runs(server):
    """Both character workflows, run once each: {workflow name: (prompt, history entry)}."""
    runs = {}
    for name in ("ltx2_av_character_lora.json", "ltx23_av_character_lora.json"):
        prompt = tiny_prompt(server.object_info(), name)
        runs[name] = (prompt, server.run(prompt, timeout_s=600))
    return runs


@server_test
@pytest.mark.parametrize("name", ["ltx2_av_character_lora.json", "ltx23_av_character_lora.json"])
def test_character_workflow_trains_saves_checks_and_samples(server, character_runs, name):
    prompt, entry = character_runs[name]
    outputs = entry.outputs

    history = outputs[one_node(prompt, "LTX2AV_TrainLoRA")]["ltx2av_history"]
    assert [point["step"] for point in history] == list(range(1, TRAIN_STEPS + 1))
    assert all(EVENT_KEYS <= set(point) and point["node"] == one_node(prompt, "LTX2AV_TrainLoRA") for point in history)
    assert all(point["loss_audio"] is not None for point in history), "the audio was not trained"

    assert saved_lora(server, prompt).is_file()
    verify_text = outputs[one_node(prompt, "LTX2AV_VerifyLoRAKeys")]["text"][0]
    assert "keys ComfyUI does not load" not in verify_text, verify_text
    for group in ("audio_attn", "a2v", "v2a"):  # applied module counts per group, as ComfyUI loads the file
        assert re.search(rf"\b{group}=[1-9]", verify_text), f"no {group} module applied:\n{verify_text}"

    # The A/B renders were written as videos with sound, and both voices are playable.
    videos = [item for node in nodes_of(prompt, "SaveVideo") for item in outputs[node]["images"]]
    audios = [item for node in nodes_of(prompt, "PreviewAudio") for item in outputs[node]["audio"]]
    assert len(videos) == 2 and len(audios) >= 2
    for item in videos:
        with av.open(str(server.base_dir / item["type"] / item["subfolder"] / item["filename"])) as container:
            assert container.streams.audio, f"{item['filename']} has no sound"
            assert sum(1 for _ in container.decode(video=0)) == FRAMES


@server_test
@pytest.mark.parametrize("name", ["ltx2_av_character_lora.json", "ltx23_av_character_lora.json"])
def test_saved_lora_loads_in_loraloadermodelonly_without_dropped_keys(server, character_runs, name):
    prompt, _ = character_runs[name]
    lora_file = saved_lora(server, prompt)
    with safe_open(str(lora_file), framework="pt") as handle:
        keys = list(handle.keys())
    for module in AUDIO_MODULES:
        assert any(f".{module}." in key for key in keys), f"{lora_file.name} adapts no {module} module"

    checkpoint = prompt[one_node(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"]
    log = load_with_loraloadermodelonly(server, checkpoint, lora_file.name)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log


def load_with_loraloadermodelonly(server: ComfyServer, checkpoint: str, lora_name: str) -> str:
    """Run CheckpointLoaderSimple → LoraLoaderModelOnly → PreviewAny; returns what the server logged meanwhile."""
    load_only = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                              "strength_model": 1.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},  # an output node that needs the MODEL
    }
    offset = len(server.log())
    server.run(load_only)
    return log_since(server, offset)


@server_test
def test_dropped_lora_keys_do_show_in_the_server_log(server, character_runs):
    """The check above can fail: a key in diffusers naming (which ComfyUI does not map) is reported."""
    from safetensors.torch import load_file, save_file

    prompt, _ = character_runs["ltx2_av_character_lora.json"]
    lora_file = saved_lora(server, prompt)
    tensors = load_file(lora_file)
    down = next(key for key in tensors if key.startswith("diffusion_model.") and key.endswith(".lora_A.weight"))
    module = down.removesuffix(".lora_A.weight")  # rename all of one module's keys (lora_A, lora_B)
    for key in [key for key in tensors if key.startswith(module + ".")]:
        tensors["transformer." + key.removeprefix("diffusion_model.")] = tensors.pop(key)
    save_file(tensors, lora_file.with_name("diffusers_named_module.safetensors"))

    checkpoint = prompt[one_node(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"]
    log = load_with_loraloadermodelonly(server, checkpoint, "diffusers_named_module.safetensors")
    assert "lora key not loaded: transformer." + down.removeprefix("diffusion_model.") in log, log


@server_test
def test_voice_check_workflow_verifies_and_compares_a_saved_lora(server, character_runs):
    character_prompt, _ = character_runs["ltx2_av_character_lora.json"]
    saved = saved_lora(server, character_prompt).name
    prompt = tiny_prompt(server.object_info(), "ltx2_voice_check.json")
    shipped_name = prompt[one_node(prompt, "LTX2AV_VerifyLoRAKeys")]["inputs"]["lora_name"]
    assert shipped_name == saved, "the voice check workflow should pick the character workflow's LoRA by default"

    entry = server.run(prompt, timeout_s=300)
    verify_text = entry.outputs[one_node(prompt, "LTX2AV_VerifyLoRAKeys")]["text"][0]
    assert saved in verify_text and "keys ComfyUI does not load" not in verify_text, verify_text
    assert len([n for n in nodes_of(prompt, "SaveVideo") if entry.outputs[n]["images"]]) == 2


# ---- Cancel and resume ------------------------------------------------------------------------------------------


@server_test
def test_interrupt_mid_training_keeps_state_and_the_next_queue_resumes(server):
    prompt = tiny_prompt(server.object_info(), "ltx2_av_character_lora.json")
    train = one_node(prompt, "LTX2AV_TrainLoRA")
    set_inputs(prompt, "LTX2AV_TrainingConfig", train_steps=400)
    set_inputs(prompt, "LTX2AV_TrainLoRA", steps_per_queue=400, run_name="interrupted_run")
    prompt = upstream_of(prompt, train)
    run_dir = server.base_dir / "output" / "ltx2av_runs" / "interrupted_run"

    steps_seen: list[int] = []

    def interrupt_after_two_steps(event: str, data: dict) -> bool:
        if event == "ltx2av.train":
            assert EVENT_KEYS <= set(data) and data["node"] == train, data
            steps_seen.append(data["step"])
            if len(steps_seen) == 2:
                server.interrupt()
        return event == "execution_interrupted"

    server.run_with_events(prompt, interrupt_after_two_steps, timeout_s=300)
    assert steps_seen[:2] == [1, 2] and len(steps_seen) < 400
    stopped_at = saved_step(run_dir)
    assert stopped_at == steps_seen[-1], f"state saved at step {stopped_at}, last step run {steps_seen[-1]}"

    set_inputs(prompt, "LTX2AV_TrainLoRA", steps_per_queue=2)
    resumed: list[int] = []

    def until_done(event: str, data: dict) -> bool:
        if event == "ltx2av.train":
            resumed.append(data["step"])
        return event == "execution_success"

    server.run_with_events(prompt, until_done, timeout_s=300)
    assert resumed == [stopped_at + 1, stopped_at + 2]
    assert saved_step(run_dir) == stopped_at + 2
