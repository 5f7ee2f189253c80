"""Portability: the package imports where the Unix-only ``resource`` module does not exist (Windows, where many
ComfyUI users are), the config reads TOML without ``tomllib`` (Python 3.10 uses tomli), and the config tests pass
on a real Python 3.10 when one is installed (``make setup`` builds ``.venv310`` when it finds ``python3.10``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV310 = ROOT / ".venv310" / "bin" / "python"

# A meta-path finder that makes the named modules unimportable, as on a platform without them.
BLOCKER = """
import sys
class _Missing:
    def __init__(self, names):
        self.names = set(names)
    def find_spec(self, name, path=None, target=None):
        if name in self.names:
            raise ModuleNotFoundError("No module named " + repr(name), name=name)
        return None
sys.modules.pop(NAMES[0], None)
sys.meta_path.insert(0, _Missing(NAMES))
"""

IMPORT_EVERY_MODULE = """
import importlib, pkgutil
import ltx2_av_trainer.trainer as trainer
names = ["ltx2_av_trainer", "ltx2_av_trainer.trainer"]
names += [m.name for m in pkgutil.walk_packages(trainer.__path__, "ltx2_av_trainer.trainer.")]
for name in names:
    importlib.import_module(name)
try:
    import resource
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker did not hide resource")
from ltx2_av_trainer.trainer.training.loop import _peak_memory_bytes
import torch
assert _peak_memory_bytes(torch.device("cpu")) is None
print("imported", len(names))
"""


def _blocker(name: str) -> str:
    return BLOCKER.replace("NAMES", repr([name]))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_every_module_imports_without_the_resource_module():
    result = _run(_blocker("resource") + IMPORT_EVERY_MODULE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) > 40


def test_config_reads_toml_with_tomli_when_tomllib_is_missing(tmp_path):
    pytest.importorskip("tomli")
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 7\n[[dataset.sources]]\npath = "clips"\n', encoding="utf-8")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n", encoding="utf-8")
    code = _blocker("tomllib") + f"""
from ltx2_av_trainer.trainer.config import Config, ConfigError, tomllib
assert tomllib.__name__ == "tomli", tomllib.__name__
config = Config.from_toml({str(toml)!r})
assert config.train.steps == 7 and config.dataset.sources[0].path == "clips"
try:
    Config.from_toml({str(bad)!r})
except ConfigError as exc:
    print("error:", exc)
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not valid TOML" in result.stdout


def _python310() -> Path:
    if not VENV310.exists():
        pytest.skip("no .venv310: make setup builds it when a python3.10 interpreter is installed")
    return VENV310


def test_every_module_compiles_on_python_310():
    python = _python310()
    files = [str(p) for p in ROOT.glob("**/*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    # Compiled in memory (no .pyc written into the tree): a syntax error names its file.
    script = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\nprint(len(sys.argv) - 1)"
    result = subprocess.run([str(python), "-c", script, *files], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) == len(files) > 100


def test_config_tests_pass_on_python_310(tmp_path):
    python = _python310()
    # The package as the editable install maps it: the repository root is ``ltx2_av_trainer``.
    (tmp_path / "ltx2_av_trainer").symlink_to(ROOT, target_is_directory=True)
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_config.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "passed" in result.stdout and "3.10" in subprocess.run(
        [str(python), "-c", "import sys; print(sys.version)"], capture_output=True, text=True).stdout


@pytest.mark.comfyui
def test_the_node_pack_imports_without_the_resource_module(comfy):
    """What ComfyUI imports on Windows: every node module (and through them the trainer). ComfyUI is imported
    first: its Linux dependencies (psutil) use ``resource`` themselves, their Windows builds do not."""
    code = f"""
import importlib, pkgutil
from ltx2_av_trainer.trainer.backends.comfyui.env import import_model_management
import_model_management({os.environ["COMFYUI_PATH"]!r})
""" + _blocker("resource") + """
import ltx2_av_trainer.nodes as nodes
names = [m.name for m in pkgutil.walk_packages(nodes.__path__, "ltx2_av_trainer.nodes.")]
for name in names:
    importlib.import_module(name)
print("imported", len(names))
"""
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 6
