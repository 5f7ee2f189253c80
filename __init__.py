"""ltx2-av-trainer: a ComfyUI custom-node pack (this file is what ComfyUI imports) and, as the Python
package ``ltx2_av_trainer``, the headless ``ltx2-av-trainer`` command.

Importing this module must stay cheap and must not need ComfyUI: the CLI imports it too. The nodes
are loaded only when ComfyUI asks for the extension.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes.extension import LTX2AVTrainerExtension

    return LTX2AVTrainerExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
