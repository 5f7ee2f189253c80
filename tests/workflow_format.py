"""ComfyUI workflow files (the UI/"litegraph" format the shipped ``workflows/*.json`` use) and API prompts.

ComfyUI has no server-side converter: the browser turns the graph into the API prompt
(``app.graphToPrompt()``). The tests need the same prompt without a browser, so ``ui_to_api`` does the
conversion with the server's ``/object_info`` as the schema, the way the frontend does:

- a node's ``widgets_values`` hold one value per widget input, in the node's input order (required, then
  optional); an INT with ``control_after_generate`` is followed by its control value ("fixed", ...);
- a V3 dynamic combo (``COMFY_DYNAMICCOMBO_V3``) is followed by the widgets of the option chosen, named
  ``<combo>.<input>`` in the prompt;
- a linked input becomes ``[source node id, output slot]``; frontend-only notes are dropped.

``test_browser.py`` checks this converter against the frontend's own ``graphToPrompt`` on every shipped
workflow. ``WorkflowBuilder`` writes workflows in the same format from the same schema (see
``tests/build_workflows.py``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # never sent to the server
UNSUPPORTED_NODES = {"Reroute", "PrimitiveNode"}  # the shipped workflows do not use these
MODE_ALWAYS = 0


class WorkflowFormatError(ValueError):
    """The workflow does not match the server's node schema; the message names the node and input."""


def input_specs(node_info: dict) -> Iterator[tuple[str, list]]:
    """(name, spec) of every declared input, in the order the frontend creates them."""
    order = node_info.get("input_order") or {group: list(specs) for group, specs in node_info["input"].items()}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            yield name, node_info["input"][group][name]


def _sub_input_specs(option_inputs: dict) -> Iterator[tuple[str, list]]:
    for group in ("required", "optional"):
        yield from option_inputs.get(group, {}).items()


def input_type(spec: list) -> str:
    kind = spec[0]
    if isinstance(kind, list):
        return "COMBO"
    # A V3 multi-type input ("FLOAT,INT") shows the widget of its first type, named by "widgetType".
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return options.get("widgetType", kind) if "," in kind else kind


def is_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (input_type(spec) in WIDGET_TYPES or input_type(spec) == DYNAMIC_COMBO) and not options.get("forceInput")


def _is_advanced(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(options.get("advanced"))


def has_control_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return input_type(spec) == "INT" and bool(options.get("control_after_generate"))


def widget_names(node_info: dict, chosen: dict[str, Any] | None = None) -> list[str]:
    """Prompt input names of the node's widgets in ``widgets_values`` order (control values as ``None``).

    ``chosen`` gives the value of each dynamic combo, which decides the sub-widgets that follow it."""
    chosen = chosen or {}
    names: list[str | None] = []

    def walk(specs: Iterator[tuple[str, list]], prefix: str) -> None:
        for name, spec in specs:
            if not is_widget(spec):
                continue
            full = prefix + name
            names.append(full)
            if has_control_widget(spec):
                names.append(None)
            if input_type(spec) == DYNAMIC_COMBO:
                option = _dynamic_option(spec, chosen.get(full, _default(spec)), full)
                walk(_sub_input_specs(option["inputs"]), full + ".")

    walk(input_specs(node_info), "")
    return names


def _dynamic_option(spec: list, key: Any, name: str) -> dict:
    for option in spec[1]["options"]:
        if option["key"] == key:
            return option
    keys = [option["key"] for option in spec[1]["options"]]
    raise WorkflowFormatError(f"input {name!r}: {key!r} is not one of the options {keys}")


def _default(spec: list) -> Any:
    """The value a new widget starts with in the frontend."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    kind = input_type(spec)
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        return choices[0] if choices else ""
    if kind == DYNAMIC_COMBO:
        return options["options"][0]["key"]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


# ---- UI → API ---------------------------------------------------------------------------------------------


def _node_label(node: dict) -> str:
    return f"node {node['id']} ({node['type']}{', ' + repr(node['title']) if node.get('title') else ''})"


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API prompt (``{node id: {class_type, inputs}}``) for a UI-format workflow."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowFormatError("subgraphs are not supported by this converter; the shipped workflows are flat")
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY_NODES:
            continue
        if kind in UNSUPPORTED_NODES or node.get("mode", MODE_ALWAYS) != MODE_ALWAYS:
            raise WorkflowFormatError(f"{_node_label(node)}: muted/bypassed nodes, reroutes and primitives "
                                      "are not supported by this converter")
        if kind not in object_info:
            raise WorkflowFormatError(f"{_node_label(node)}: the server has no node type {kind!r}")
        inputs = _widget_inputs(node, object_info[kind])
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, source_id, source_slot, target_id, _, _ = links[slot["link"]]
            if target_id != node["id"]:
                raise WorkflowFormatError(f"{_node_label(node)}: link {slot['link']} targets node {target_id}")
            inputs[slot["name"]] = [str(source_id), source_slot]
        title = node.get("title") or object_info[kind].get("display_name", kind)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _widget_inputs(node: dict, node_info: dict) -> dict[str, Any]:
    values = list(node.get("widgets_values") or [])
    inputs: dict[str, Any] = {}
    position = 0

    def take(name: str) -> Any:
        nonlocal position
        if position >= len(values):
            raise WorkflowFormatError(f"{_node_label(node)}: widgets_values has {len(values)} values, "
                                      f"the server's schema needs more (missing {name!r})")
        position += 1
        return values[position - 1]

    def walk(specs: Iterator[tuple[str, list]], prefix: str) -> None:
        for name, spec in specs:
            if not is_widget(spec):
                continue
            full = prefix + name
            inputs[full] = take(full)
            if has_control_widget(spec):
                take(full + " (control_after_generate)")
            if input_type(spec) == DYNAMIC_COMBO:
                option = _dynamic_option(spec, inputs[full], f"{_node_label(node)} {full}")
                walk(_sub_input_specs(option["inputs"]), full + ".")

    walk(input_specs(node_info), "")
    if position != len(values):
        raise WorkflowFormatError(f"{_node_label(node)}: widgets_values has {len(values)} values but the "
                                  f"server's schema has {position} widgets: the workflow is out of date")
    return inputs


def set_inputs(prompt: dict, class_type: str, **values: Any) -> None:
    """Override widget inputs of every node of ``class_type`` in an API prompt (each name must exist)."""
    nodes = [node for node in prompt.values() if node["class_type"] == class_type]
    if not nodes:
        raise KeyError(f"the prompt has no {class_type} node")
    for node in nodes:
        for name, value in values.items():
            if name not in node["inputs"]:
                raise KeyError(f"{class_type} has no input {name!r} (inputs: {sorted(node['inputs'])})")
            node["inputs"][name] = value


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def upstream_of(prompt: dict, node_id: str) -> dict:
    """Only ``node_id`` and the nodes it depends on (ComfyUI then runs just that branch)."""
    keep, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        if current not in keep:
            keep.add(current)
            todo += [value[0] for value in prompt[current]["inputs"].values() if isinstance(value, list)]
    return {key: prompt[key] for key in keep}


# ---- building UI workflows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    node_id: int
    slot: int
    type: str


@dataclass
class BuiltNode:
    data: dict
    info: dict | None

    def __getitem__(self, name: str) -> Output:
        names = self.info["output_name"]
        if name not in names:
            raise KeyError(f"{self.data['type']} has no output {name!r} (outputs: {names})")
        slot = names.index(name)
        return Output(self.data["id"], slot, self.info["output"][slot])


@dataclass
class WorkflowBuilder:
    """Writes a flat UI-format workflow from the server schema: widgets by input name, links by output name."""

    object_info: dict
    nodes: list[dict] = field(default_factory=list)
    links: list[list] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    def add(self, kind: str, pos: tuple[float, float], width: float = 320, title: str | None = None,
            extra_height: float = 0, properties: dict | None = None, widgets: dict[str, Any] | None = None,
            **values: Any) -> BuiltNode:
        """``values``: inputs by name (widget values or links); ``widgets``: the same for inputs whose names are this
        method's own arguments (``width``, ``title``, ``kind``, ...)."""
        values = {**values, **(widgets or {})}
        if kind not in self.object_info:
            raise WorkflowFormatError(f"the server has no node type {kind!r}")
        info = self.object_info[kind]
        node_id = len(self.nodes) + 1
        links_in = {name: value for name, value in values.items() if isinstance(value, Output)}
        widget_values = {name: value for name, value in values.items() if not isinstance(value, Output)}
        declared = dict(input_specs(info))
        for name in values:
            if name.split(".")[0] not in declared:
                raise WorkflowFormatError(f"{kind} has no input {name!r} (inputs: {list(declared)})")

        inputs = []
        for name, spec in input_specs(info):
            if is_widget(spec) and name not in links_in:
                continue
            slot = {"name": name, "type": input_type(spec), "link": None}
            if is_widget(spec):
                slot["widget"] = {"name": name}
            if name in links_in:
                slot["link"] = self._link(links_in[name], node_id, len(inputs))
            inputs.append(slot)

        ordered = widget_names(info, widget_values)
        widgets = []
        for name in ordered:
            if name is None:
                widgets.append("fixed")  # control_after_generate: keep the seed the workflow ships with
                continue
            spec = self._spec(info, name)
            widgets.append(widget_values.pop(name, _default(spec)))
        unused = [name for name in widget_values if name not in ordered]
        if unused:
            raise WorkflowFormatError(f"{kind}: {unused} are not widgets of this node")

        rows = max(len(inputs), len(info["output"]))
        # Advanced inputs stay folded until the user shows them: they take no room on the canvas.
        shown = [name for name in ordered if name is None or not _is_advanced(self._spec(info, name))]
        height = 30 + 22 * rows + 26 * len(shown) + extra_height
        node = {
            "id": node_id, "type": kind, "pos": list(pos), "size": [width, height], "flags": {},
            "order": node_id - 1, "mode": MODE_ALWAYS, "inputs": inputs,
            "outputs": [
                {"name": name, "type": kind_out, "links": [], "slot_index": slot}
                for slot, (name, kind_out) in enumerate(zip(info["output_name"], info["output"]))
            ],
            "properties": {"Node name for S&R": kind, **(properties or {})},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return BuiltNode(node, info)

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float], title: str = "Read me") -> None:
        """A MarkdownNote (frontend-only: shown on the canvas, never sent to the server)."""
        self.nodes.append({
            "id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": MODE_ALWAYS, "inputs": [], "outputs": [], "title": title,
            "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653",
        })

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str) -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    def workflow(self, name: str) -> dict:
        """The workflow; ``name`` (its file name) gives it a stable id, so rebuilding changes nothing."""
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "ltx2-av-trainer/workflows/" + name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [60, 60]}},
            "version": 0.4,
        }

    def _link(self, source: Output, target_id: int, target_slot: int) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, source.node_id, source.slot, target_id, target_slot, source.type])
        self.nodes[source.node_id - 1]["outputs"][source.slot]["links"].append(link_id)
        return link_id

    @staticmethod
    def _spec(info: dict, full_name: str) -> list:
        """The spec of a (possibly nested ``combo.input``) widget."""
        specs = dict(input_specs(info))
        parts = full_name.split(".")
        spec = specs[parts[0]]
        for part in parts[1:]:
            nested = {}
            for option in spec[1]["options"]:
                nested.update(dict(_sub_input_specs(option["inputs"])))
            spec = nested[part]
        return spec
