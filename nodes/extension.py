"""The ComfyUI extension: the node list, and the per-node help pages.

Help pages. ComfyUI's frontend (comfyui-frontend-package, NodeHelpService) looks for a custom node's help
at ``/extensions/<pack folder>/docs/<node id>/<locale>.md`` and then ``/extensions/<pack folder>/docs/<node
id>.md``; ``/extensions/<pack folder>/`` is the pack's WEB_DIRECTORY (``js/``). The pages live in
``nodes/docs/<node id>.md`` next to the code they describe, so ``on_load`` registers a static route for
``/extensions/<pack folder>/docs`` on ComfyUI's server before it starts; aiohttp matches that longer prefix
before the ``js/`` folder's route. The schema ``description`` of each node is the short version (node
tooltip).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

from .check_nodes import SampleAV, VerifyLoRAKeys
from .data_nodes import CacheLatents, DatasetDoctor, ExtractAudio, LoadDataset, PreviewCachedAudio
from .lora_nodes import ApplyTrainedLoRA, ConvertLoRA, MergeLoRAs
from .score_nodes import VoiceScore
from .train_nodes import SaveLoRA, TrainingConfig, TrainLoRA

log = logging.getLogger(__name__)

# Not resolved: the frontend names the pack by the folder ComfyUI imported it from, which may be a symlink.
PACK_DIR = Path(os.path.abspath(__file__)).parent.parent
DOCS_DIR = PACK_DIR / "nodes" / "docs"

NODES: list[type[io.ComfyNode]] = [
    LoadDataset,
    DatasetDoctor,
    ExtractAudio,
    CacheLatents,
    PreviewCachedAudio,
    TrainingConfig,
    TrainLoRA,
    SaveLoRA,
    VerifyLoRAKeys,
    SampleAV,
    VoiceScore,
    ConvertLoRA,
    MergeLoRAs,
    ApplyTrainedLoRA,
]


def docs_url_prefix(pack_folder: str | None = None) -> str:
    """Where the frontend asks for this pack's help pages: ``/extensions/<pack folder name>/docs``."""
    return f"/extensions/{pack_folder or PACK_DIR.name}/docs"


def add_docs_route(routes, pack_folder: str | None = None) -> None:
    """Serve ``nodes/docs`` at ``docs_url_prefix`` on an aiohttp route table (ComfyUI's ``PromptServer.routes``)."""
    routes.static(docs_url_prefix(pack_folder), str(DOCS_DIR))


def register_docs_route() -> bool:
    """Add the help-page route to the running ComfyUI server (before it starts serving); False without one."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    add_docs_route(instance.routes)
    return True


class LTX2AVTrainerExtension(ComfyExtension):
    async def on_load(self) -> None:
        if register_docs_route():
            log.info("LTX-2 AV Trainer: node help pages served at %s/", docs_url_prefix())

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
