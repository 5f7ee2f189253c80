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
import shutil
from pathlib import Path
from urllib.parse import quote

import av
import pytest
from safetensors import safe_open

from build_workflows import CHARACTER_LTX2, CHARACTER_LTX23, VOICE_CHECK_LTX2
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
from comfy_server import PACK_FOLDER_NAME, ComfyServer, ComfyServerError, comfyui_checkout, running_comfyui
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


ALLOWED_ELSEWHERE = "datasets_elsewhere"  # a folder outside ComfyUI's; the server's owner allows it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip(NO_COMFYUI)
    base = prepare_test_home(tmp_path_factory.mktemp("comfy_e2e"), comfyui)
    (base / ALLOWED_ELSEWHERE).mkdir()
    with running_comfyui(comfyui, base, env={"LTX2AV_DATASET_ROOTS": str(base / ALLOWED_ELSEWHERE)}) as running:
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

    # The template browser lists and serves the shipped workflows, titled by their readable file names, each with
    # the thumbnail the frontend asks for (<name>.jpg next to the workflow).
    assert sorted(server.get_json("/workflow_templates")[PACK_FOLDER_NAME]) == sorted(n[:-5] for n in SHIPPED)
    for name in SHIPPED:
        served = server.get_json(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{quote(name)}")
        assert served == load_workflow(name)
        picture = server.get_bytes(f"/api/workflow_templates/{PACK_FOLDER_NAME}/{quote(name[:-5])}.jpg")
        assert picture[:3] == b"\xff\xd8\xff", f"{name}: the thumbnail is not a JPEG"


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
    for name in (CHARACTER_LTX2, CHARACTER_LTX23):
        prompt = tiny_prompt(server.object_info(), name)
        runs[name] = (prompt, server.run(prompt, timeout_s=600))
    return runs


@server_test
@pytest.mark.parametrize("name", [CHARACTER_LTX2, CHARACTER_LTX23])
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
    # Each A/B voice gets a Voice Score against the dataset's voice.
    scores = [outputs[node]["text"][0] for node in nodes_of(prompt, "LTX2AV_VoiceScore")]
    assert len(scores) == 2 and all(text.startswith("voice score ") for text in scores), scores

    videos = [item for node in nodes_of(prompt, "SaveVideo") for item in outputs[node]["images"]]
    audios = [item for node in nodes_of(prompt, "PreviewAudio") for item in outputs[node]["audio"]]
    assert len(videos) == 2 and len(audios) >= 2
    for item in videos:
        with av.open(str(server.base_dir / item["type"] / item["subfolder"] / item["filename"])) as container:
            assert container.streams.audio, f"{item['filename']} has no sound"
            assert sum(1 for _ in container.decode(video=0)) == FRAMES


@server_test
@pytest.mark.parametrize("name", [CHARACTER_LTX2, CHARACTER_LTX23])
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

    prompt, _ = character_runs[CHARACTER_LTX2]
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
    character_prompt, _ = character_runs[CHARACTER_LTX2]
    saved = saved_lora(server, character_prompt).name
    prompt = tiny_prompt(server.object_info(), VOICE_CHECK_LTX2)
    shipped_name = prompt[one_node(prompt, "LTX2AV_VerifyLoRAKeys")]["inputs"]["lora_name"]
    assert shipped_name == saved, "the voice check workflow should pick the character workflow's LoRA by default"

    entry = server.run(prompt, timeout_s=300)
    verify_text = entry.outputs[one_node(prompt, "LTX2AV_VerifyLoRAKeys")]["text"][0]
    assert saved in verify_text and "keys ComfyUI does not load" not in verify_text, verify_text
    assert len([n for n in nodes_of(prompt, "SaveVideo") if entry.outputs[n]["images"]]) == 2
    # The voice scores use the cache the character workflow built, named in reference_file.
    scores = [entry.outputs[node]["text"][0] for node in nodes_of(prompt, "LTX2AV_VoiceScore")]
    assert len(scores) == 2 and all(text.startswith("voice score ") for text in scores), scores


# ---- Cancel and resume ------------------------------------------------------------------------------------------


@server_test
def test_interrupt_mid_training_keeps_state_and_the_next_queue_resumes(server):
    prompt = tiny_prompt(server.object_info(), CHARACTER_LTX2)
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


# ---- the graph notices changed data (issue: graphs that notice changes) ------------------------------------------


def cached_nodes(entry) -> set[str]:
    """The nodes ComfyUI took from its execution cache for this prompt."""
    data = entry.message("execution_cached") or {}
    return set(data.get("nodes", []))


def preview_text(entry, prompt: dict, source_class: str) -> str:
    """The text a PreviewAny shows for the output of the ``source_class`` node."""
    source = one_node(prompt, source_class)
    preview = next(node for node in nodes_of(prompt, "PreviewAny") if prompt[node]["inputs"]["source"][0] == source)
    return entry.outputs[preview]["text"][0]


@server_test
def test_added_clip_is_cached_on_the_next_queue_and_an_unchanged_dataset_stays_cached(server):
    folder = server.base_dir / "input" / "growing_dataset"
    shutil.copytree(server.base_dir / "input" / "ltx2av_dataset", folder)
    prompt = tiny_prompt(server.object_info(), CHARACTER_LTX2)
    set_inputs(prompt, "LTX2AV_LoadDataset", folder="growing_dataset")
    set_inputs(prompt, "LTX2AV_CacheLatents", cache_name="growing", decode_previews=False)
    cache_preview = next(n for n in nodes_of(prompt, "PreviewAny")
                         if prompt[n]["inputs"]["source"][0] == one_node(prompt, "LTX2AV_CacheLatents"))
    doctor_preview = next(n for n in nodes_of(prompt, "PreviewAny")
                          if prompt[n]["inputs"]["source"][0] == one_node(prompt, "LTX2AV_DatasetDoctor"))
    branch = upstream_of(prompt, cache_preview) | upstream_of(prompt, doctor_preview)
    data_nodes = {one_node(branch, kind) for kind in ("LTX2AV_LoadDataset", "LTX2AV_DatasetDoctor", "LTX2AV_CacheLatents")}
    clips = sorted(folder.glob("*.mp4"))

    first = server.run(branch)
    assert preview_text(first, branch, "LTX2AV_CacheLatents").startswith(f"Audio latent caching: {len(clips)} encoded")

    shutil.copy(clips[0], folder / "added_clip.mp4")
    (folder / "added_clip.txt").write_text("a person says a new sentence\n", encoding="utf-8")
    added = server.run(branch)
    summary = preview_text(added, branch, "LTX2AV_CacheLatents")
    assert summary.startswith("Audio latent caching: 1 encoded, 0 failed"), summary
    assert f"reused {len(clips)}" in summary and "added_clip.mp4" in preview_text(added, branch, "LTX2AV_DatasetDoctor")
    assert not data_nodes & cached_nodes(added)

    again = server.run(branch)
    assert data_nodes <= cached_nodes(again), "an unchanged dataset was read again"

    (folder / "added_clip.txt").write_text("a person says another sentence\n", encoding="utf-8")
    edited = server.run(branch)
    assert preview_text(edited, branch, "LTX2AV_CacheLatents").startswith("Audio latent caching: 1 encoded")

    shutil.rmtree(server.base_dir / "output" / "ltx2av_cache" / "growing")  # deleted to rebuild it
    rebuilt = server.run(branch)
    assert preview_text(rebuilt, branch, "LTX2AV_CacheLatents").startswith(f"Audio latent caching: {len(clips) + 1} encoded")


# ---- a Training Config a person can use -----------------------------------------------------------------------------


@server_test
def test_training_config_declares_the_released_widget_order_ranges_and_folds_the_rest(server):
    from test_training_config_widgets import RELEASED_ORDER

    info = server.object_info()["LTX2AV_TrainingConfig"]
    order = info["input_order"]["required"]
    assert tuple(order[: len(RELEASED_ORDER)]) == RELEASED_ORDER
    specs = info["input"]["required"]
    shown = [name for name in order if not specs[name][1].get("advanced")]
    assert shown == list(RELEASED_ORDER[: len(shown)]) and 8 <= len(shown) <= 15
    assert not [name for name in order if name.startswith("memory_")]
    assert specs["network_rank"][1]["min"] == 1 and specs["network_dropout"][1]["max"] < 1
    assert all(specs[name][0] != "STRING" or not str(specs[name][1].get("default", "")).startswith("[")
               for name in order), "a list option is still a JSON text"

    prompt = upstream_of(tiny_prompt(server.object_info(), CHARACTER_LTX2),
                         one_node(tiny_prompt(server.object_info(), CHARACTER_LTX2), "LTX2AV_TrainLoRA"))
    for name, value, message in (("network_rank", 0, "smaller than min"), ("train_batch_size", 0, "smaller than min"),
                                 ("network_dropout", 1e6, "bigger than max")):
        bad = json.loads(json.dumps(prompt))
        set_inputs(bad, "LTX2AV_TrainingConfig", **{name: value})
        with pytest.raises(ComfyServerError, match=message):
            server.queue(bad)


@server_test
def test_lora_trains_on_the_fp8_weights_comfyuis_loader_gives(server, character_runs):
    """Memory in ComfyUI is ComfyUI's: a MODEL loaded with Load Diffusion Model's fp8 weight_dtype trains as it is."""
    prompt, _ = character_runs[CHARACTER_LTX2]
    checkpoint = prompt[one_node(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"]
    fp8_file = server.base_dir / "models" / "diffusion_models" / checkpoint
    if not fp8_file.exists():
        fp8_file.symlink_to(server.base_dir / "models" / "checkpoints" / checkpoint)
    train = one_node(prompt, "LTX2AV_TrainLoRA")
    branch = upstream_of(json.loads(json.dumps(prompt)), train)
    branch["fp8"] = {"class_type": "UNETLoader", "inputs": {"unet_name": checkpoint, "weight_dtype": "fp8_e4m3fn"}}
    branch[train]["inputs"].update(model=["fp8", 0], run_name="fp8_run", steps_per_queue=2)
    entry = server.run(branch, timeout_s=600)
    history = entry.outputs[train]["ltx2av_history"]
    assert [point["step"] for point in history] == [1, 2]
    assert all(point["loss_audio"] is not None and point["loss_video"] == point["loss_video"] for point in history)


# ---- sampling the way users sample --------------------------------------------------------------------------------


def core_generation(checkpoint: str, text_encoder: str, lora_name: str, seed: int, steps: int, cfg: float) -> dict:
    """LTX-2 text-to-video with audio built from ComfyUI's core nodes, as in its LTX-2 template, with the LoRA from
    LoraLoaderModelOnly; the result goes to LTX2AVTest_SaveTensors."""
    from ltx2_av_trainer.trainer.backends.comfyui.sampling import DEFAULT_NEGATIVE, SCHEDULER

    from comfy_e2e import SIZE

    def node(class_type, **inputs):
        return {"class_type": class_type, "inputs": inputs}

    return {
        "ckpt": node("CheckpointLoaderSimple", ckpt_name=checkpoint),
        "audio_vae": node("LTXVAudioVAELoader", ckpt_name=checkpoint),
        "clip": node("LTX2AVTest_TinyTextEncoderLoader", text_encoder=text_encoder, ckpt_name=checkpoint, device="default"),
        "lora": node("LoraLoaderModelOnly", model=["ckpt", 0], lora_name=lora_name, strength_model=1.0),
        "positive": node("CLIPTextEncode", clip=["clip", 0], text="ohwx, a person speaks"),
        "negative": node("CLIPTextEncode", clip=["clip", 0], text=DEFAULT_NEGATIVE),
        "conditioning": node("LTXVConditioning", positive=["positive", 0], negative=["negative", 0], frame_rate=25.0),
        "video_latent": node("EmptyLTXVLatentVideo", width=SIZE, height=SIZE, length=FRAMES, batch_size=1),
        "audio_latent": node("LTXVEmptyLatentAudio", frames_number=FRAMES, frame_rate=25, batch_size=1,
                             audio_vae=["audio_vae", 0]),
        "latent": node("LTXVConcatAVLatent", video_latent=["video_latent", 0], audio_latent=["audio_latent", 0]),
        "sigmas": node("LTXVScheduler", steps=steps, latent=["latent", 0], **SCHEDULER),
        "sampler": node("KSamplerSelect", sampler_name="euler_ancestral"),
        "guider": node("CFGGuider", model=["lora", 0], positive=["conditioning", 0], negative=["conditioning", 1], cfg=cfg),
        "noise": node("RandomNoise", noise_seed=seed),
        "sample": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0], sampler=["sampler", 0],
                       sigmas=["sigmas", 0], latent_image=["latent", 0]),
        "separate": node("LTXVSeparateAVLatent", av_latent=["sample", 0]),
        "video": node("VAEDecode", samples=["separate", 0], vae=["ckpt", 2]),
        "audio": node("LTXVAudioVAEDecode", samples=["separate", 1], audio_vae=["audio_vae", 0]),
        "save": node("LTX2AVTest_SaveTensors", images=["video", 0], audio=["audio", 0], name="core_lora"),
    }


def sample_ab_prompt(server: ComfyServer, lora_name: str, seed: int, steps: int, cfg: float) -> tuple[dict, str]:
    prompt = tiny_prompt(server.object_info(), VOICE_CHECK_LTX2)
    sample = one_node(prompt, "LTX2AV_SampleAV")
    set_inputs(prompt, "LTX2AV_SampleAV", lora_name=lora_name, seed=seed, steps=steps, guidance=cfg)
    prompt[sample]["inputs"]["prompt"] = "ohwx, a person speaks"
    prompt = upstream_of(prompt, sample)
    prompt["save"] = {"class_type": "LTX2AVTest_SaveTensors",
                      "inputs": {"images": [sample, 0], "audio": [sample, 1], "name": "sample_ab_lora"}}
    return prompt, sample


@server_test
def test_sample_ab_equals_the_same_generation_from_core_nodes(server, character_runs):
    from safetensors.torch import load_file

    from comfy_e2e import tiny_text_encoder_name

    character_prompt, _ = character_runs[CHARACTER_LTX2]
    lora_name = saved_lora(server, character_prompt).name
    checkpoint = character_prompt[one_node(character_prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"]
    prompt, _ = sample_ab_prompt(server, lora_name, seed=7, steps=3, cfg=4.0)
    server.run(prompt, timeout_s=600)
    server.run(core_generation(checkpoint, tiny_text_encoder_name("2.0"), lora_name, seed=7, steps=3, cfg=4.0),
               timeout_s=600)
    ours = load_file(server.base_dir / "output" / "ltx2av_test" / "sample_ab_lora.safetensors")
    core = load_file(server.base_dir / "output" / "ltx2av_test" / "core_lora.safetensors")
    assert ours["images"].shape == (FRAMES, 64, 64, 3) and ours["waveform"].shape[:2] == (1, 2)
    for key in ("images", "waveform", "sample_rate"):
        assert torch_equal(ours[key], core[key]), key


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


@server_test
def test_sample_ab_shows_comfyuis_progress_and_stops_on_cancel(server, character_runs):
    character_prompt, _ = character_runs[CHARACTER_LTX2]
    prompt, sample = sample_ab_prompt(server, saved_lora(server, character_prompt).name, seed=1, steps=40, cfg=4.0)
    progress = []

    def cancel_after_two_steps(event: str, data: dict) -> bool:
        if event == "progress" and str(data.get("node")) == sample:
            progress.append((data["value"], data["max"]))
            if data["value"] >= 2 and len([v for v, _ in progress if v >= 2]) == 1:
                server.interrupt()
        return event == "execution_interrupted"

    server.run_with_events(prompt, cancel_after_two_steps, timeout_s=600)
    # ComfyUI's own sampling progress, attributed to the Sample A/B node, and Cancel stops it within the first sample.
    assert progress and {total for _, total in progress} == {40}, progress
    assert max(value for value, _ in progress) < 40, progress


# ---- safety and conventions ---------------------------------------------------------------------------------------


@server_test
def test_datasets_outside_the_input_folder_need_the_servers_permission(server):
    from ltx2_av_trainer.trainer.data.synth import make_demo_dataset

    from comfy_e2e import SIZE

    allowed = server.base_dir / ALLOWED_ELSEWHERE / "clips"
    refused = server.base_dir / "not_allowed" / "clips"
    for folder in (allowed, refused):
        make_demo_dataset(folder, clips_per_speaker=1, seconds=0.8, width=SIZE, height=SIZE)
    prompt = tiny_prompt(server.object_info(), CHARACTER_LTX2)
    doctor_preview = next(n for n in nodes_of(prompt, "PreviewAny")
                          if prompt[n]["inputs"]["source"][0] == one_node(prompt, "LTX2AV_DatasetDoctor"))
    branch = upstream_of(prompt, doctor_preview)

    for folder in (str(refused), "../not_allowed/clips"):
        set_inputs(branch, "LTX2AV_LoadDataset", folder=folder)
        entry = server.wait_for(server.queue(branch), expect_success=False)
        error = (entry.message("execution_error") or {}).get("exception_message", "")
        assert entry.status == "error" and "outside the folders ComfyUI nodes may read" in error, entry.messages
        assert "LTX2AV_DATASET_ROOTS" in error
    set_inputs(branch, "LTX2AV_LoadDataset", folder=str(allowed))
    entry = server.run(branch)
    assert str(allowed) in preview_text(entry, branch, "LTX2AV_DatasetDoctor")


@server_test
def test_save_lora_counts_instead_of_replacing_and_progress_follows_each_queue(server):
    prompt = tiny_prompt(server.object_info(), CHARACTER_LTX2)
    save = one_node(prompt, "LTX2AV_SaveLoRA")
    train = one_node(prompt, "LTX2AV_TrainLoRA")
    set_inputs(prompt, "LTX2AV_TrainingConfig", train_steps=4)
    set_inputs(prompt, "LTX2AV_TrainLoRA", steps_per_queue=2, run_name="save_twice")
    set_inputs(prompt, "LTX2AV_SaveLoRA", filename="save_twice")
    branch = upstream_of(prompt, save)
    loras = server.base_dir / "models" / "loras"
    run_loras = server.base_dir / "output" / "ltx2av_runs" / "save_twice" / "lora"

    def queue_and_watch() -> tuple[list, dict]:
        progress = []

        def until_done(event: str, data: dict) -> bool:
            if event == "progress" and str(data.get("node")) == train:
                progress.append((data["value"], data["max"]))
            return event == "execution_success"

        server.run_with_events(branch, until_done, timeout_s=600)
        return progress, server.get_json("/history?max_items=1")

    first, _ = queue_and_watch()
    second, _ = queue_and_watch()
    assert first[-1] == (2, 2) and second[-1] == (2, 2), (first, second)  # each queue's own steps, not 2/4, 4/4
    assert (loras / "save_twice.safetensors").read_bytes() == (run_loras / "save_twice_000002.safetensors").read_bytes()
    assert (loras / "save_twice_00001.safetensors").read_bytes() == (run_loras / "save_twice_000004.safetensors").read_bytes()

    set_inputs(branch, "LTX2AV_SaveLoRA", overwrite=True)
    entry = server.run(branch)  # the run already has its 4 steps
    assert "already trained 4 of 4 steps" in entry.outputs[train]["ltx2av_status"][0]
    assert (loras / "save_twice.safetensors").read_bytes() == (run_loras / "save_twice_000004.safetensors").read_bytes()
    assert sorted(p.name for p in loras.glob("save_twice*")) == ["save_twice.safetensors", "save_twice_00001.safetensors"]
