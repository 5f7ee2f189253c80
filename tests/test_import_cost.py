"""ComfyUI tier: what the pack adds to ComfyUI's start-up.

``main.py --cpu --quick-test-for-ci`` runs ComfyUI's real start-up (its own imports, the built-in nodes, then
every custom node through ``nodes.load_custom_node``, timed and logged under "Import times for custom nodes")
and exits. The pack's line in that log is the wall time a user waits at every start: importing the package
and its node classes on top of an already imported ComfyUI. On a machine busy with other work, wall time
also counts the time other processes hold the cores (0.6 s wall for 0.15 s of work was seen on this project's
busy 2-core machine), so the bound of 0.5 s is checked on the CPU time of the same call: the CPU time of the
thread across ComfyUI's own ``load_custom_node`` for the pack, plus that of any child process it waited for,
read by a wrapper installed when ComfyUI imports ``nodes`` (no ComfyUI file is changed). On an idle machine it
equals the wall time; other processes do not inflate it. Time spent sleeping or waiting on a network would not
count: the wall time of ComfyUI's log is printed next to it. Best of up to three starts.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from comfy_server import PACK_FOLDER_NAME, comfyui_checkout, prepare_base_directory

IMPORT_BOUND_S = 0.5
ATTEMPTS = 3
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_IMPORT_LINE = re.compile(r"^\s*(?:\[\w+\]\s*)?(\d+(?:\.\d+)?) seconds( \(IMPORT FAILED\))?: (.+)$")
_CPU_LINE = re.compile(r"^LTX2AV_IMPORT_CPU_S (\S+) (\S+)$", re.MULTILINE)

# Runs ComfyUI's main.py as `python main.py ...` would, with ComfyUI's load_custom_node wrapped (once ComfyUI
# imports its `nodes` module) to print the thread CPU time and wall time of each custom node's load.
_BOOTSTRAP = r"""
import importlib.abc, importlib.machinery, os, runpy, sys, time

class _WrapNodes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "nodes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            original = module.load_custom_node

            async def timed(module_path, *args, **kwargs):
                cpu, children = time.thread_time(), os.times()
                try:
                    return await original(module_path, *args, **kwargs)
                finally:
                    after = os.times()
                    spent = time.thread_time() - cpu + (after.children_user - children.children_user) + (
                        after.children_system - children.children_system)
                    print(f"LTX2AV_IMPORT_CPU_S {spent:.4f} {os.path.basename(module_path)}", flush=True)

            module.load_custom_node = timed

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _WrapNodes())
sys.argv = ["main.py"] + sys.argv[1:]
sys.path.insert(0, os.getcwd())
runpy.run_path("main.py", run_name="__main__")
"""


def custom_node_import_times(log: str) -> dict[str, tuple[float, bool]]:
    """``{folder name: (seconds, imported)}`` from the "Import times for custom nodes" block of a ComfyUI log."""
    lines = _ANSI.sub("", log).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if "Import times for custom nodes" in line)
    except StopIteration:
        return {}
    times = {}
    for line in lines[start + 1 :]:
        match = _IMPORT_LINE.match(line.strip())
        if match is None:
            break
        seconds, failed, path = match.groups()
        times[path.rstrip("/").rsplit("/", 1)[-1]] = (float(seconds), failed is None)
    return times


def start_comfyui_once(comfyui, base_dir) -> str:
    command = [sys.executable, "-c", _BOOTSTRAP, "--cpu", "--quick-test-for-ci", "--disable-api-nodes",
               "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    result = subprocess.run(command, cwd=comfyui, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"ComfyUI start-up failed (exit {result.returncode}):\n{log[-3000:]}"
    return log


def test_import_line_parser_reads_comfyui_format():
    log = ("\x1b[32m[INFO]\x1b[0m \nImport times for custom nodes:\n"
           "\x1b[32m[INFO]\x1b[0m    0.0 seconds: /x/custom_nodes/websocket_image_save.py\n"
           "\x1b[32m[INFO]\x1b[0m    1.3 seconds (IMPORT FAILED): /x/custom_nodes/broken\n"
           "\x1b[32m[INFO]\x1b[0m    0.2 seconds: /x/custom_nodes/ltx2-av-trainer\n\x1b[32m[INFO]\x1b[0m \n")
    assert custom_node_import_times(log) == {
        "websocket_image_save.py": (0.0, True), "broken": (1.3, False), "ltx2-av-trainer": (0.2, True)}


@pytest.mark.comfyui
def test_pack_adds_under_half_a_second_to_comfyui_startup(tmp_path):
    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI tier")
    base = prepare_base_directory(tmp_path)
    cpu_times, wall_times = [], []
    for _ in range(ATTEMPTS):
        log = start_comfyui_once(comfyui, base)
        times = custom_node_import_times(log)
        assert PACK_FOLDER_NAME in times, f"ComfyUI logged no import time for {PACK_FOLDER_NAME}: {times}"
        seconds, imported = times[PACK_FOLDER_NAME]
        assert imported, "ComfyUI reports IMPORT FAILED for the pack"
        cpu = {name: float(value) for value, name in _CPU_LINE.findall(log)}
        assert PACK_FOLDER_NAME in cpu, "the wrapper around ComfyUI's load_custom_node did not report the pack"
        wall_times.append(seconds)
        cpu_times.append(cpu[PACK_FOLDER_NAME])
        if cpu_times[-1] < IMPORT_BOUND_S:
            break
    print(f"pack import in ComfyUI start-up: CPU {cpu_times} s, wall (ComfyUI's log, 0.1 s resolution) {wall_times} s")
    assert min(cpu_times) < IMPORT_BOUND_S, (
        f"the pack adds {min(cpu_times):.2f} s of CPU time to ComfyUI's start-up (best of {len(cpu_times)}); keep heavy "
        "imports (torch-side modules, media libraries) inside the functions that need them")
