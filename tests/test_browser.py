"""The ComfyUI frontend in a headless Chromium: the shipped workflows load with every node type known, the
Train node carries the live chart, the chart draws a real training run and comes back after a page reload.

Needs ``COMFYUI_PATH`` (the server, as in ``test_e2e_server.py``) and Debian's ``/usr/bin/chromium``
(``apt-get install -y chromium``), driven over the DevTools protocol (``cdp_browser.py``). Screenshots and
the browser console go to ``tests/artifacts/browser/`` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from build_workflows import CHARACTER_LTX2
from cdp_browser import Page, chromium_missing_reason, chromium_page
from comfy_e2e import NO_COMFYUI, WORKFLOW_VERSION, load_workflow, prepare_test_home, tiny_prompt
from comfy_server import PACK_FOLDER_NAME, comfyui_checkout, free_port, running_comfyui
from workflow_format import nodes_of, set_inputs, ui_to_api, upstream_of

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
TRAIN_NODE = "LTX2AV_TrainLoRA"
CHART_STEPS = 12
VIDEO_LOSS_RGB = (0x4E, 0xA1, 0xFF)  # the chart's video-loss colour (js/ltx2av_chart.js)

# The app is usable once the node definitions are registered and the first graph is on the canvas.
APP_READY = ("window.comfyAPI?.app?.app?.vueAppReady === true && !!window.LiteGraph?.registered_node_types?.KSampler"
             " && window.comfyAPI.app.app.canvas?.graph?.nodes?.length > 0")

LOAD_TEMPLATE = """(async (name) => {
  const app = window.comfyAPI.app.app;
  // The same URL the template browser uses for a custom node pack's workflows.
  const response = await fetch(`/api/workflow_templates/%(pack)s/${name}`);
  if (!response.ok) throw new Error(`template ${name}: HTTP ${response.status}`);
  await app.loadGraphData(await response.json(), true, true, name.replace(/\\.json$/, ""));
  const registered = window.LiteGraph.registered_node_types;
  const nodes = app.graph.nodes;
  return {
    missing: nodes.filter((n) => !registered[n.type]).map((n) => n.type),
    trainNodes: nodes.filter((n) => n.type === "%(train)s").map((n) => ({
      id: String(n.id),
      chart: n.widgets?.some((w) => w.name === "ltx2av_chart") ?? false,
      attached: !!n.ltx2avChart?.element.isConnected,
      status: n.ltx2avChart?.status.textContent ?? null,
    })),
    prompt: (await app.graphToPrompt()).output,
  };
})""" % {"pack": PACK_FOLDER_NAME, "train": TRAIN_NODE}

CHART_STATE = """((id) => {
  const chart = window.comfyAPI.app.app.graph.getNodeById(id)?.ltx2avChart;
  if (!chart) return null;
  const [r, g, b] = %(rgb)s;
  const pixels = chart.canvas.getContext("2d").getImageData(0, 0, chart.canvas.width, chart.canvas.height).data;
  let lossPixels = 0;  // pixels drawn in the video-loss colour
  for (let i = 0; i < pixels.length; i += 4) {
    if (Math.abs(pixels[i] - r) < 8 && Math.abs(pixels[i + 1] - g) < 8 && Math.abs(pixels[i + 2] - b) < 8) lossPixels++;
  }
  return { steps: chart.history.map((p) => p.step), status: chart.status.textContent, lossPixels };
})""" % {"rgb": list(VIDEO_LOSS_RGB)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip(NO_COMFYUI)
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    base = prepare_test_home(tmp_path_factory.mktemp("comfy_browser"), comfyui)
    with running_comfyui(comfyui, base) as running:
        yield running


async def open_app(page: Page, url: str) -> None:
    await page.navigate(url)
    await page.wait_for(APP_READY, timeout_s=120)


async def screenshot_around(page: Page, node_id: str | None, path: Path) -> Path:
    """Centre the canvas on a node at 100 % (or show the graph from its top-left corner) and take a screenshot."""
    await page.evaluate("""((id) => {
      const app = window.comfyAPI.app.app;
      // 0.6: the smallest zoom at which LiteGraph still draws widgets; the graph's top-left next to the sidebar
      if (id === null) { app.canvas.ds.scale = 0.6; app.canvas.ds.offset = [120 / 0.6, 90 / 0.6]; }
      else { app.canvas.ds.scale = 1.0; app.canvas.centerOnNode(app.graph.getNodeById(id)); }
      app.canvas.setDirty(true, true);
    })(%s)""" % json.dumps(node_id))
    await asyncio.sleep(1.0)  # a few frames for the canvas and the DOM widgets to follow
    return await page.screenshot(path)


def pack_errors(page: Page) -> list[str]:
    """Console errors raised from this pack's JavaScript (the frontend logs a few of its own)."""
    return [error for error in page.console_errors if f"/extensions/{PACK_FOLDER_NAME}/" in error]


def save_console(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_text("\n".join(page.console_errors) + "\n", encoding="utf-8")


def test_shipped_workflows_load_with_every_node_and_the_chart(server, tmp_path):
    async def scenario() -> dict:
        results = {}
        async with chromium_page(tmp_path / "profile", free_port()) as page:
            await open_app(page, server.url)
            for name in sorted(WORKFLOW_VERSION):
                results[name] = await page.evaluate(f"{LOAD_TEMPLATE}({json.dumps(name)})")
                await screenshot_around(page, None, ARTIFACTS / f"{name[:-5]}.png")
            save_console(page, "console_workflows.txt")
            results["pack_errors"] = pack_errors(page)
        return results

    results = asyncio.run(scenario())
    assert results.pop("pack_errors") == []
    for name, loaded in results.items():
        assert loaded["missing"] == [], f"{name}: node types unknown to the frontend: {loaded['missing']}"
        workflow = load_workflow(name)
        expected_train = [str(n["id"]) for n in workflow["nodes"] if n["type"] == TRAIN_NODE]
        assert [t["id"] for t in loaded["trainNodes"]] == expected_train
        for train in loaded["trainNodes"]:
            assert train["chart"] and train["attached"], f"{name}: node {train['id']} has no chart widget"
            assert "waiting for the first step" in train["status"]

        # The frontend's own UI → API conversion agrees with the one the server tests use.
        ours = ui_to_api(workflow, server.object_info())
        theirs = loaded["prompt"]
        assert sorted(theirs) == sorted(ours), name
        for node_id, node in theirs.items():
            assert (node["class_type"], node["inputs"]) == (ours[node_id]["class_type"], ours[node_id]["inputs"]), \
                f"{name}: node {node_id} ({node['class_type']}) converts differently"


def test_chart_draws_live_training_and_comes_back_after_a_reload(server, tmp_path):
    name = CHARACTER_LTX2
    prompt = tiny_prompt(server.object_info(), name)
    train = nodes_of(prompt, TRAIN_NODE)[0]
    set_inputs(prompt, "LTX2AV_TrainingConfig", train_steps=CHART_STEPS)
    set_inputs(prompt, TRAIN_NODE, steps_per_queue=CHART_STEPS)  # run_name as shipped, as the UI shows it
    prompt = upstream_of(prompt, train)  # the training branch only

    async def scenario() -> dict:
        async with chromium_page(tmp_path / "profile", free_port()) as page:
            await open_app(page, server.url)
            await page.evaluate(f"{LOAD_TEMPLATE}({json.dumps(name)})")
            before = await page.evaluate(f"{CHART_STATE}({train})")
            # A chart event for another node must be ignored.
            await page.evaluate("""window.comfyAPI.api.api.dispatchEvent(new CustomEvent("ltx2av.train",
                {detail: {node: "999999", step: 1, total: 1, loss_video: 1, loss_audio: 1, audio_weight: 1,
                          step_time_s: 1, eta_s: 0}}))""")
            foreign = await page.evaluate(f"{CHART_STATE}({train})")

            # Queue from this browser's websocket client, as the Run button does, so it also gets `executed`.
            client_id = await page.evaluate("window.comfyAPI.api.api.clientId")
            prompt_id = await asyncio.to_thread(server.queue, prompt, client_id)
            seen = []
            while True:
                state = await page.evaluate(f"{CHART_STATE}({train})")
                seen.append(len(state["steps"]))
                if server.history(prompt_id) is not None and len(state["steps"]) == CHART_STEPS:
                    break
                if len(seen) > 3000:
                    raise AssertionError(f"the chart did not reach {CHART_STEPS} steps: {state}")
                await asyncio.sleep(0.1)
            # The node's result (the whole run and the queue's status line) follows the last live step.
            state = await page.wait_for(f"(() => {{ const s = {CHART_STATE}({train}); "
                                        "return s.status.includes('the run is complete') ? s : null; })()", 30)
            await screenshot_around(page, train, ARTIFACTS / "ltx2av_train_chart.png")

            await open_app(page, server.url)  # a page reload: the workflow comes back, the chart starts empty
            restored = await page.wait_for(
                f"(() => {{ const s = {CHART_STATE}({train}); return s && s.steps.length ? s : null; }})()", 30)
            await screenshot_around(page, train, ARTIFACTS / "ltx2av_train_chart_after_reload.png")

            # Queued again, the finished run says so on the node.
            client_id = await page.evaluate("window.comfyAPI.api.api.clientId")
            again_id = await asyncio.to_thread(server.queue, prompt, client_id)
            await asyncio.to_thread(server.wait_for, again_id)
            again = await page.wait_for(f"(() => {{ const s = {CHART_STATE}({train}); "
                                        "return s.status.includes('already trained') ? s : null; })()", 30)
            await screenshot_around(page, train, ARTIFACTS / "ltx2av_train_already_trained.png")
            save_console(page, "console_chart.txt")
            return {"before": before, "foreign": foreign, "seen": seen, "final": state, "restored": restored,
                    "entry": server.history(prompt_id), "again": again, "pack_errors": pack_errors(page)}

    result = asyncio.run(scenario())
    assert result["entry"].status == "success"
    assert result["pack_errors"] == []
    assert result["before"]["steps"] == [] and result["foreign"]["steps"] == []
    # Live: the chart grew step by step while the queue ran (not only from the final ui payload).
    assert any(0 < count < CHART_STEPS for count in result["seen"]), result["seen"]
    final = result["final"]
    assert final["steps"] == list(range(1, CHART_STEPS + 1))
    assert all(part in final["status"] for part in (f"step {CHART_STEPS}/{CHART_STEPS}", "s/step", "ETA")), final
    assert final["lossPixels"] > 50, "no video-loss line was drawn"
    assert (result["restored"]["steps"], result["restored"]["status"]) == (final["steps"], final["status"])
    assert result["restored"]["lossPixels"] > 50
    # The queue's own line leads the status: what it trained, and then that the run has all its steps.
    assert f"trained steps 1-{CHART_STEPS}; the run is complete" in final["status"]
    assert f"already trained {CHART_STEPS} of {CHART_STEPS} steps" in result["again"]["status"], result["again"]


CONFIG_NODE = "LTX2AV_TrainingConfig"
CONFIG_STATE = """((id) => {
  const app = window.comfyAPI.app.app;
  const node = app.graph.getNodeById(id);
  return {
    visible: node.widgets.filter((w) => node.isWidgetVisible(w)).map((w) => w.name),
    values: Object.fromEntries(node.widgets.map((w) => [w.name, w.value])),
    height: node.size[1],
    menu: (app.canvas.getNodeMenuOptions(node) ?? []).filter(Boolean).map((o) => o.content),
  };
})"""


def test_training_config_shows_a_dozen_options_and_keeps_saved_values_on_their_widgets(server, tmp_path):
    """What a person sees: the shown options with their recommended values, the rest folded behind the node's
    "Show Advanced" (ComfyUI's advanced inputs), and a workflow saved before the last option was appended loads
    every value onto the widget it was saved from."""
    from test_training_config_widgets import RELEASED_ORDER

    info = server.object_info()[CONFIG_NODE]
    order = info["input_order"]["required"]
    shown = [name for name in order if not info["input"]["required"][name][1].get("advanced")]
    workflow = load_workflow(CHARACTER_LTX2)
    config_node = next(n for n in workflow["nodes"] if n["type"] == CONFIG_NODE)
    saved = dict(zip(order, config_node["widgets_values"]))
    # An older save: every value set to something else than the default, and the last option not yet there.
    older = json.loads(json.dumps(workflow))
    values = next(n for n in older["nodes"] if n["type"] == CONFIG_NODE)["widgets_values"]
    changed = {"train_steps": 1234, "network_rank": 16, "optimizer_lr": 0.0002, "logging_quiet": True,
               "validation_sigmas": "0.2, 0.8"}
    for name, value in changed.items():
        values[order.index(name)] = value
    del values[-1]

    async def scenario() -> dict:
        async with chromium_page(tmp_path / "profile", free_port()) as page:
            await open_app(page, server.url)
            await page.evaluate(f"{LOAD_TEMPLATE}({json.dumps(CHARACTER_LTX2)})")
            node_id = str(config_node["id"])
            folded = await page.evaluate(f"{CONFIG_STATE}({node_id})")
            await screenshot_around(page, node_id, ARTIFACTS / "training_config.png")
            await page.evaluate(f"window.comfyAPI.app.app.graph.getNodeById({node_id}).toggleAdvanced()")
            unfolded = await page.evaluate(f"{CONFIG_STATE}({node_id})")
            await screenshot_around(page, node_id, ARTIFACTS / "training_config_advanced.png")
            await page.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(older)}, true, true, 'older')")
            reloaded = await page.evaluate(f"{CONFIG_STATE}({node_id})")
            return {"folded": folded, "unfolded": unfolded, "reloaded": reloaded, "pack_errors": pack_errors(page)}

    result = asyncio.run(scenario())
    assert result["pack_errors"] == []
    folded = result["folded"]
    assert folded["visible"] == shown and len(shown) < 16 and folded["height"] < 500, folded
    assert "Show Advanced" in folded["menu"]
    assert folded["values"] == saved  # every option is there, folded or not, with the shipped values
    assert result["unfolded"]["visible"] == order and result["unfolded"]["height"] > 1500
    reloaded = result["reloaded"]["values"]
    for name in order[:-1]:
        assert reloaded[name] == changed.get(name, saved[name]), name
    assert reloaded[order[-1]] == info["input"]["required"][order[-1]][1]["default"]
    assert tuple(order[: len(RELEASED_ORDER)]) == RELEASED_ORDER


OPEN_TEMPLATES = """(async () => {
  await window.comfyAPI.app.app.extensionManager.command.execute("Comfy.BrowseTemplates");
  const findPack = () => [...document.querySelectorAll("[role=dialog] *")].find((e) => e.children.length === 0 &&
                                                                                 e.textContent.trim() === "%s");
  for (let i = 0; i < 200 && !findPack(); i++) await new Promise((r) => setTimeout(r, 100));
  const pack = findPack();
  (pack?.closest("button, a, li, [role=button], [role=option]") ?? pack)?.click();
  return !!pack;
})()""" % PACK_FOLDER_NAME

TEMPLATE_CARDS = """(() => {
  const dialog = document.querySelector("[role=dialog]");
  if (!dialog) return {text: "", images: []};
  // The frontend fetches each picture and shows it from a blob: URL; its size says which picture it is.
  const images = [...dialog.querySelectorAll("img")];
  return {
    text: dialog.innerText,
    images: images.map((img) => ({loaded: img.complete && img.naturalWidth > 0, size: [img.naturalWidth, img.naturalHeight]})),
  };
})()"""


def test_template_browser_lists_the_workflows_with_titles_and_pictures(server, tmp_path):
    async def scenario() -> dict:
        async with chromium_page(tmp_path / "profile", free_port()) as page:
            await open_app(page, server.url)
            found = await page.evaluate(OPEN_TEMPLATES)
            cards = await page.wait_for(f"(() => {{ const c = {TEMPLATE_CARDS}; "
                                        f"return c.images.length >= {len(WORKFLOW_VERSION)} && "
                                        "c.images.every((i) => i.loaded) ? c : null; })()", 60)
            await asyncio.sleep(1.0)  # the cards' fade-in
            await page.screenshot(ARTIFACTS / "template_browser.png")
            return {"found": found, "cards": cards, "pack_errors": pack_errors(page)}

    from build_workflows import THUMBNAIL_SIZE

    result = asyncio.run(scenario())
    assert result["found"], "the template browser has no entry for this pack"
    cards = result["cards"]
    assert f"Showing {len(WORKFLOW_VERSION)} of {len(WORKFLOW_VERSION)} templates" in cards["text"]
    for name in WORKFLOW_VERSION:
        assert name.removesuffix(".json") in cards["text"], f"{name} is not shown with its title"
    assert [image["size"] for image in cards["images"]] == [list(THUMBNAIL_SIZE)] * len(WORKFLOW_VERSION), cards
    assert result["pack_errors"] == []
