"""Installing the pack as ComfyUI-Manager and the Comfy Registry do.

- ``requirements.txt`` is what the nodes need (ComfyUI-Manager installs it line by line); it changes no package
  that ComfyUI's own requirements bring (pip's dry-run report), and the headless command line's extra needs sit in
  ``pyproject.toml``'s ``cli`` extra.
- The pack imports, and ComfyUI loads it, with its optional dependencies missing; what needs them says what to
  install.
- ``pyproject.toml`` follows the Comfy Registry's specification (docs.comfy.org/registry/specifications), checked
  by the rules of comfy-cli's parser and by ComfyUI's own ``comfy_config`` parser.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# Installed packages the pack can do without at import time (each is imported where it is used).
OPTIONAL = ("resemblyzer", "soxr", "matplotlib", "diffusers", "webrtcvad", "librosa")


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split(" #")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "-"))]


# ---- requirements ------------------------------------------------------------------------------------------------


def test_requirements_are_the_nodes_and_the_cli_extra_the_rest():
    nodes = requirement_lines(REPO / "requirements.txt")
    assert sorted(nodes) == sorted(d.replace("'", '"') for d in PYPROJECT["project"]["dependencies"]), \
        "requirements.txt and pyproject's dependencies must list the same packages"
    names = {requirement_name(line) for line in nodes}
    assert not names & {"torch", "torchvision", "torchaudio"}, "ComfyUI owns the torch trio"
    assert {"resemblyzer", "soxr", "av"} <= names, "Voice Score and audio decoding need these at run time"
    cli = {requirement_name(line) for line in PYPROJECT["project"]["optional-dependencies"]["cli"]}
    assert {"diffusers", "transformers"} <= cli and not cli & names


def blocked_import_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python refuses to import the OPTIONAL packages (as if they were not installed)."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        class _Missing:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, _Missing())
    """), encoding="utf-8")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_the_core_needs_no_optional_package_until_it_is_used(tmp_path):
    code = textwrap.dedent("""
        import numpy as np
        import ltx2_av_trainer.trainer.app.pipeline
        from ltx2_av_trainer.trainer.data.media.audio import resample
        from ltx2_av_trainer.trainer.evaluation.voice_score import require_resemblyzer
        for call in (lambda: resample(np.zeros((1, 100), np.float32), 48000, 16000), require_resemblyzer):
            try:
                call()
            except ImportError as exc:
                print("ERROR", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], env=blocked_import_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2 and "pip install soxr" in errors[0] and "pip install resemblyzer" in errors[1], errors


@pytest.mark.comfyui
@pytest.mark.slow
def test_comfyui_loads_the_pack_without_its_optional_packages(tmp_path):
    from comfy_server import comfyui_checkout, prepare_base_directory

    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip("COMFYUI_PATH is not set")
    base = prepare_base_directory(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base),
         "--database-url", "sqlite:///:memory:"],
        cwd=comfyui, env=blocked_import_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    log = result.stdout + result.stderr
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert re.search(r"\d+\.\d+ seconds: \S*custom_nodes/ltx2-av-trainer\s*$", log, re.M), log[-4000:]


def dry_run(arguments: list[str], report: Path) -> dict:
    """pip's dry-run install report (nothing is installed)."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        if re.search(r"(Connection|NewConnectionError|Temporary failure|No matching distribution|Could not find a "
                     r"version)", result.stderr) and "--no-index" not in arguments:
            pytest.skip(f"the package index cannot be reached or resolved: {result.stderr.strip()[-300:]}")
        raise AssertionError(f"pip {' '.join(arguments)} failed:\n{result.stderr}")
    return json.loads(report.read_text(encoding="utf-8"))


def resolved_versions(report: dict) -> dict[str, str]:
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in report["install"]}


@pytest.mark.comfyui
@pytest.mark.slow
def test_installing_requirements_changes_no_package_comfyui_needs(tmp_path):
    """What a ComfyUI-Manager install does to an environment built from ComfyUI's own requirements: (1) in this
    environment (ComfyUI's requirements installed), pip would install or change nothing; (2) resolving ComfyUI's
    requirements alone and together with ours from the index, every package ComfyUI's set resolves to keeps its
    version (a new dependency of ours that caps numpy, say, would show here)."""
    from comfy_server import comfyui_checkout

    comfyui = comfyui_checkout()
    if comfyui is None:
        pytest.skip("COMFYUI_PATH is not set")
    ours, theirs = REPO / "requirements.txt", comfyui / "requirements.txt"

    here = dry_run(["--no-index", "-r", str(ours)], tmp_path / "here.json")
    assert resolved_versions(here) == {}, f"installing requirements.txt here would change {resolved_versions(here)}"

    alone = resolved_versions(dry_run(["--ignore-installed", "-r", str(theirs)], tmp_path / "alone.json"))
    together = resolved_versions(dry_run(["--ignore-installed", "-r", str(theirs), "-r", str(ours)],
                                         tmp_path / "together.json"))
    changed = {name: (version, together.get(name)) for name, version in alone.items() if together.get(name) != version}
    assert not changed, f"our requirements change packages ComfyUI's requirements resolve to: {changed}"
    assert {"resemblyzer", "soxr"} <= set(together) - set(alone)


# ---- Comfy Registry metadata ----------------------------------------------------------------------------------------


def test_pyproject_follows_the_comfy_registry_specification():
    from PIL import Image

    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    license_table = project["license"]
    assert isinstance(license_table, dict) and set(license_table) <= {"file", "text"}, \
        'the registry reads license = {file = "..."} or {text = "..."}'
    assert (REPO / license_table["file"]).is_file()
    repository = project["urls"]["Repository"]
    assert repository.startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]

    # Icon: a URL to an SVG, PNG, JPG or GIF of at most 800 x 400 pixels; ours is the file in this repository.
    owner_repo = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = REPO / comfy["Icon"].removeprefix(prefix)
    assert icon.suffix.lower() in (".svg", ".png", ".jpg", ".jpeg", ".gif") and icon.is_file()
    with Image.open(icon) as image:
        assert image.width <= 800 and image.height <= 400, image.size

    # Classifiers the registry reads (comfy-cli's rules): operating systems and accelerators.
    classifiers = project["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    assert systems and all(s.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for s in systems)
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert set(accelerators) <= {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                                 "GPU :: Apple Metal"}
    for part in comfy["requires-comfyui"].split(","):
        assert re.fullmatch(r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?", part.strip())
    assert all((REPO / folder).is_dir() for folder in comfy["includes"])


@pytest.mark.comfyui
def test_comfyuis_own_parser_reads_the_metadata(comfy):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "ltx2-av-trainer" and config.project.license.file == "LICENSE"
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert config.project.supported_comfyui_version == PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    assert config.tool_comfy.publisher_id and config.tool_comfy.icon.endswith("/assets/icon.png")
    assert config.project.urls.repository.startswith("https://github.com/")
