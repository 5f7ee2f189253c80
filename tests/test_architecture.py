"""The shape of the code: wings by stage with imports only downwards, no import cycle, ComfyUI imported only where
it belongs, and every package listed for installation.

Every import of the pack's own modules counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ltx2_av_trainer"

# Wings, lowest first: a module may import from its own wing and from the wings before it.
WINGS = [
    ("base", ("trainer.config", "trainer.io_utils", "trainer")),
    ("memory", ("trainer.memory",)),
    ("backends", ("trainer.backends",)),
    ("data", ("trainer.data",)),
    ("adapters", ("trainer.adapters",)),
    ("training", ("trainer.training",)),
    ("evaluation", ("trainer.evaluation",)),
    ("app", ("trainer.app",)),
    ("nodes", ("nodes",)),
    ("entry", ("",)),
]
# Top-level modules of a ComfyUI installation: imported only by the ComfyUI backend and the nodes.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "server",
                   "node_helpers", "execution", "latent_preview", "nodes", "app"}
COMFYUI_ALLOWED = ("trainer.backends.comfyui", "nodes")
# The official reference implementation is a test oracle only (its licence is not ours).
NEVER_IMPORTED = {"ltx_core", "ltx_pipelines"}


def package_modules() -> dict[str, Path]:
    """Dotted module name relative to the package ("" for the root) → file."""
    modules = {}
    for path in [ROOT / "__init__.py", *(ROOT / "trainer").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(the pack's modules ``name`` imports, the external top-level modules it imports)."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    package = [p for p in package if p]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{target}.{alias.name}".strip(".")
                internal.add(submodule if submodule in modules else target)
        elif isinstance(node, ast.ImportFrom):
            top = node.module.split(".")[0]
            if top == PACKAGE:
                internal.add(node.module.removeprefix(PACKAGE).strip("."))
            else:
                external.add(top)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == PACKAGE:
                    internal.add(alias.name.removeprefix(PACKAGE).strip("."))
                else:
                    external.add(top)
    internal.discard(name)
    return internal, external


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = package_modules()
    graph, externals = {}, {}
    for name, path in modules.items():
        internal, external = imports_of(name, path, modules)
        unknown = internal - set(modules)
        assert not unknown, f"{path}: imports {sorted(unknown)}, which do not exist"
        graph[name], externals[name] = internal, external
    return graph, externals


def wing_of(module: str) -> int:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(WINGS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    return best


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_no_import_cycle():
    graph, _ = import_graph()
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_wings_import_only_downwards():
    graph, _ = import_graph()
    upward = []
    for module, targets in graph.items():
        for target in targets:
            if wing_of(target) > wing_of(module):
                upward.append(f"{module or PACKAGE} ({WINGS[wing_of(module)][0]}) imports {target} ({WINGS[wing_of(target)][0]})")
    assert upward == [], "\n".join(sorted(upward))


def test_comfyui_is_imported_only_by_its_backend_and_the_nodes():
    _, externals = import_graph()
    wrong = []
    for module, names in externals.items():
        allowed = any(module == a or module.startswith(a + ".") for a in COMFYUI_ALLOWED)
        if names & COMFYUI_MODULES and not allowed:
            wrong.append(f"{module}: {sorted(names & COMFYUI_MODULES)}")
        if names & NEVER_IMPORTED:
            wrong.append(f"{module}: {sorted(names & NEVER_IMPORTED)} (a test oracle, never imported by the pack)")
    assert wrong == []


def test_the_core_imports_without_comfyui():
    """In a fresh interpreter, importing every module outside the ComfyUI backend and the nodes loads no
    ComfyUI module (and needs none: COMFYUI_PATH is unset)."""
    import os
    import subprocess
    import sys

    core = sorted(n for n in package_modules() if not any(n == a or n.startswith(a + ".") for a in COMFYUI_ALLOWED))
    script = (
        "import importlib, sys\n"
        f"for name in {core!r}:\n"
        f"    importlib.import_module(('{PACKAGE}.' + name).rstrip('.'))\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(COMFYUI_MODULES - {'nodes', 'app'})!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_package_is_installed():
    """pyproject's explicit package list covers every folder with an __init__.py (a wheel would miss the rest)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    folders = {PACKAGE} | {
        ".".join([PACKAGE, *init.parent.relative_to(ROOT).parts])
        for top in ("trainer", "nodes") for init in (ROOT / top).rglob("__init__.py")
    }
    assert listed == folders
