"""ComfyUI's own LoRA training step (``comfy_extras.nodes_train``, the step of its "Train LoRA" node), driven by
the bench next to ours on the same model.

Set up the way ``TrainLoraNode.execute`` sets it up: a deep copy of the MODEL (``clone(force_deepcopy=True)``)
with its compute dtype set, trainable LoRA weight wrappers from ``comfy.weight_adapter`` added with
``add_weight_wrapper``, torch AdamW, MSE, gradient checkpointing through ``nodes_train.patch`` on the modules
``find_modules_at_depth`` returns, a ``TrainGuider`` and a ``TrainSampler``, run through ``guider.sample``. Two
things differ, both for a like-for-like comparison: adapters go only on the given module paths (the node adapts
every weight, norms and biases included), so both sides train the same modules at the same rank; and the
sampler calls hooks around each of its steps, where the bench runs our step and reads its counters. The step
itself is ComfyUI's code, unchanged.

Video only: the node trains one latent tensor per item and has no audio path. On LTX-2 it also needs
checkpointing: without it autograd stops at the blocks' in-place residual updates ("modified by an inplace
operation"), so ``checkpoint_depth`` is required (1 = the whole diffusion model, the node's default; 2 = each
child module of the diffusion model: every transformer block, as our ``checkpointing="block"``, and the top-level
layers).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from .env import comfy_training_mode, import_model_management


class StepHooks(Protocol):
    def before(self, step: int) -> None:
        """Runs before ComfyUI's step ``step``, outside it (the bench runs our step here)."""

    def started(self, step: int) -> None:
        """ComfyUI's step ``step`` starts now."""

    def finished(self, step: int) -> None:
        """ComfyUI's step ``step`` (forward, backward, optimizer update) has ended."""


class ComfyBuiltinTrainer:
    """ComfyUI's Train LoRA step on ``latents`` ``[N, 128, F', H', W']`` with one conditioning tensor per item."""

    def __init__(self, model_patcher, latents: torch.Tensor, contexts: list[torch.Tensor], module_paths: list[str], *,
                 rank: int, learning_rate: float, seed: int, batch_size: int, checkpoint_depth: int,
                 dtype: torch.dtype = torch.float32):
        import comfy_extras.nodes_train as nodes_train
        from comfy.weight_adapter import adapter_maps

        if checkpoint_depth < 1:
            raise ValueError("ComfyUI's trainer needs checkpoint_depth >= 1 on LTX-2 (its blocks update their streams in place)")
        if len(contexts) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {len(contexts)} conditionings")
        self.nodes_train = nodes_train
        with torch.inference_mode(False):
            self.patcher = model_patcher.clone(force_deepcopy=True)
            self.patcher.set_model_compute_dtype(dtype)
            self.patcher.model.requires_grad_(False).train()
            modules = dict(self.patcher.model.named_modules())
            self.parameters: list[torch.nn.Parameter] = []
            self.adapters = []
            for path in module_paths:
                name = f"diffusion_model.{path}"
                module = modules.get(name)
                if module is None or not hasattr(module, "weight_function"):
                    raise ValueError(f"ComfyUI's trainer cannot adapt {path!r}: not a ComfyUI weight layer of this MODEL")
                adapter = adapter_maps["LoRA"].create_train(module.weight, rank=rank, alpha=1.0).to(dtype)
                adapter.train().requires_grad_(True)
                self.patcher.add_weight_wrapper(f"{name}.weight", adapter)
                self.adapters.append(adapter)
                self.parameters += [p for p in adapter.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate)
            self.checkpointed = nodes_train.find_modules_at_depth(self.patcher.model.diffusion_model, depth=checkpoint_depth)
            for module in self.checkpointed:
                nodes_train.patch(module)
        self.latents = latents.to(dtype)
        self.conditioning = [[context, {}] for context in contexts]
        self.seed = seed
        self.batch_size = batch_size
        self.dtype = dtype
        self.losses: list[float] = []

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    def run(self, steps: int, hooks: StepHooks) -> None:
        """``steps`` of ComfyUI's training loop, with ``hooks`` around each step."""
        import comfy.utils
        from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

        nodes_train = self.nodes_train

        class HookedTrainSampler(nodes_train.TrainSampler):
            """ComfyUI's sampler; a step ends where the next one starts (its optimizer update runs in between)."""

            current: int | None = None
            next_step = 0

            def _finish_current(self) -> None:
                if self.current is not None:
                    hooks.finished(self.current)
                    self.current = None

            def _train_step_standard_mode(self, *args, **kwargs):
                self._finish_current()
                hooks.before(self.next_step)
                hooks.started(self.next_step)
                self.current, self.next_step = self.next_step, self.next_step + 1
                return super()._train_step_standard_mode(*args, **kwargs)

        sampler = HookedTrainSampler(
            torch.nn.MSELoss(), self.optimizer, loss_callback=self.losses.append, batch_size=self.batch_size,
            grad_acc=1, total_steps=steps, seed=self.seed, training_dtype=self.dtype,
        )
        guider = nodes_train.TrainGuider(self.patcher)
        guider.set_conds(self.conditioning)
        noise = Noise_RandomNoise(self.seed)
        import_model_management()
        progress_bar, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
        try:
            with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode(), warnings.catch_warnings():
                # Its step enters autocast with the training dtype, which CPU autocast rejects (with a warning) for fp32.
                warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
                # As the node's training loop: the latent indices are the "sigmas" its sampler draws items from.
                guider.sample(noise.generate_noise({"samples": self.latents}), self.latents, sampler,
                              torch.tensor(range(self.latents.shape[0])), seed=noise.seed)
            sampler._finish_current()
        finally:
            comfy.utils.PROGRESS_BAR_ENABLED = progress_bar

    def close(self) -> None:
        """Undo the checkpointing patches (the deep-copied MODEL is dropped with this object)."""
        for module in self.checkpointed:
            self.nodes_train.unpatch(module)
