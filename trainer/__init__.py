"""The trainer core: plain PyTorch, no ComfyUI (except lazily, in ``backends/comfyui``).

Wings by stage, each importing only from the wings listed before it (``tests/test_architecture.py`` holds
the rule): ``config`` and ``io_utils`` (the base), ``memory``, ``backends``, ``data``, ``adapters``,
``training``, ``evaluation``, ``app``.
"""
