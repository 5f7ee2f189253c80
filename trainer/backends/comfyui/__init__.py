"""The ComfyUI runtime: the denoiser on a loader's MODEL (``denoiser``), ComfyUI's VAE / audio VAE / CLIP as
the trainer's encoders (``encoders``), fp8 and quantised Linears (``memory``) and importing ComfyUI as a
library (``env``). ComfyUI is imported lazily, so the package imports without it."""
