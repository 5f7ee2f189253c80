"""The one typed configuration object that drives the CLI, the ComfyUI nodes and the tests.

Every option lives here, with its default and its allowed values. ``Config.from_toml`` /
``Config.from_dict`` reject unknown keys and wrong values with a message that names the key and what
is allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (requirements.txt installs it there)
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration value or key; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def opt(default: Any, help: str) -> Any:
    """A config field with its help text (README reference, node tooltips, CLI)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: json.loads(json.dumps(d))) if isinstance(default, (list, dict)) else type(default)
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DatasetSource:
    """One folder (or JSONL list) of media with captions."""

    path: str = opt("", "Folder of clips (or images), or a .jsonl file of {media, caption, audio?} lines.")
    kind: Literal["video", "image", "jsonl", "audio"] = opt("video", "What the path holds: video clips, images (1-frame, video-only items), a JSONL list, or audio for the audio-only mode (wav/flac/mp3/m4a/ogg files, and the sound of any video files among them).")
    caption_extension: str = opt(".txt", "Extension of the sidecar caption file next to each clip.")
    audio_dir: str = opt("", "Optional folder of separate audio files (wav/flac/...) matched to clips by file stem; they replace the clip's own sound.")
    audio_stream: int = opt(0, "Which audio stream of the container to use (0 = the first).")
    repeats: int = opt(1, "How many times each item of this source appears per epoch.")
    video_loss_weight: float = opt(1.0, "Multiplier of the video loss for items of this source.")
    audio_loss_weight: float = opt(1.0, "Multiplier of the audio loss for items of this source.")
    fps_override: float = opt(0.0, "Source frame rate to assume instead of the detected one (0 = detect).")
    is_validation: bool = opt(False, "Use this source for validation only (never trained on).")
    reference_dir: str = opt("", "IC-LoRA (conditioning.mode = ic): folder of reference videos or images matched to clips by file stem (clip.mp4 ↔ clip.png or clip.mp4); relative paths as for audio_dir.")
    reference_audio_dir: str = opt("", "ID-LoRA (conditioning.mode = id): folder of reference audio (wav/flac/mp3/m4a/ogg, or a video's sound) matched to clips by file stem: the same speaker saying something else.")


@dataclass
class DatasetConfig:
    sources: list[DatasetSource] = opt([], "The media sources ([[dataset.sources]] tables).")
    trigger: str = opt("ohwx", "Trigger word prepended to every caption (use a rare, non-empty token).")
    caption_template: str = opt("{trigger}, {caption}", "How the trigger is added to a caption; must contain {caption}.")
    target_fps: float = opt(25.0, "Frame rate the clips are resampled to (LTX-2 is trained at 25 fps; audio latents are 25 per second).")
    frames: int = opt(97, "Frames per training clip, 8n+1 (97 = 3.9 s at 25 fps, the recommended voice clip; 49 = 2 s).")
    width: int = opt(768, "Training width in pixels, a multiple of 32.")
    height: int = opt(512, "Training height in pixels, a multiple of 32.")
    frame_buckets: list[int] = opt([49, 73], "Extra allowed frame counts (8n+1); a clip uses the largest that fits (so 2-4 s clips train too). Empty = only `frames`.")
    resolution_buckets: list[list[int]] = opt([], "Extra [width, height] buckets (multiples of 32); a clip uses the closest aspect. Empty = only width x height.")
    crop: Literal["center", "random"] = opt("center", "How a resized clip is cropped to its bucket.")
    allow_upscale: bool = opt(True, "Allow clips smaller than the bucket to be upscaled (false: such clips are reported and skipped).")
    retime: Literal["resample", "stretch"] = opt("resample", "resample: pick frames by timestamp at target_fps, audio cut to the same span. stretch: keep every frame and play it at target_fps, audio time-stretched with pitch preserved.")
    validation_split: float = opt(0.0, "Fraction of items held out for validation (deterministic by file path).")
    with_audio: bool = opt(True, "Train audio too (audio+video LoRA). False = video-only run: audio and cross-modal modules are never adapted.")
    reference_frames: int = opt(1, "IC-LoRA: frames of each reference (8n+1, at most frames); an image reference is repeated to this count. Encoded once into the cache as clean guide latents.")
    reference_downscale: int = opt(1, "IC-LoRA: references are encoded at 1/this of the clip's width and height (1 = same size; the latent width and height must divide by it). Saved in the LoRA as reference_downscale_factor, which ComfyUI's Get IC-LoRA Parameters reads.")
    reference_audio_seconds: float = opt(5.0, "ID-LoRA: seconds of reference audio used, from its start (about 5 s is what ComfyUI's LTXV Reference Audio node recommends). Shorter references are used whole; the doctor reports them.")
    reference_audio_same_speaker: bool = opt(False, "ID-LoRA: a clip without a reference file of its own takes the sound of another clip of the same speaker: the next clip in the same folder (one folder per speaker).")
    # The audio verdict of a clip (trainer/data/audio_verdict.py), shared by the doctor and the cache.
    audio_silent_fraction: float = opt(0.98, "A clip whose audio is at least this share below -60 dBFS is silent: not voice supervision (cached audio-free, see audio.missing_audio) and a doctor error.")
    audio_near_silent_lufs: float = opt(-50.0, "A clip's audio quieter than this integrated loudness (LUFS), or with no 400 ms block above the loudness gate, is near-silent: not voice supervision and a doctor error.")
    audio_quiet_lufs: float = opt(-35.0, "Audio quieter than this (LUFS) is reported as too quiet; it is still trained on.")
    audio_clipped_fraction: float = opt(0.001, "More than this share of samples at full scale is reported as clipped; it is still trained on.")
    audio_min_seconds: float = opt(0.2, "A clip with less real audio than this (seconds) is too short: not voice supervision and a doctor error.")
    audio_max_early_end_seconds: float = opt(0.1, "Audio that ends more than this many seconds before its clip is reported (the rest is padded with silence and masked in the loss).")


@dataclass
class CacheConfig:
    dir: str = opt("", "Cache folder; empty = the run directory's cache/ subfolder.")
    audio_dtype: Literal["float32"] = opt("float32", "Audio latents are always encoded and stored in fp32 (posterior mean).")
    video_dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "Storage type of cached video latents.")


@dataclass
class TinyModelConfig:
    """Dimensions of the embedded random-weight model (demo, tests, CPU bench)."""

    num_layers: int = opt(2, "Transformer blocks of the embedded tiny model.")
    num_attention_heads: int = opt(2, "Video attention heads of the tiny model.")
    attention_head_dim: int = opt(16, "Video head width of the tiny model.")
    audio_num_attention_heads: int = opt(2, "Audio attention heads of the tiny model.")
    audio_attention_head_dim: int = opt(8, "Audio head width of the tiny model.")
    caption_channels: int = opt(32, "Text feature width of the tiny model (3840 on the real model).")
    seed: int = opt(0, "Seed of the tiny model's random weights.")


@dataclass
class ModelConfig:
    version: Literal["2.0", "2.3"] = opt("2.0", "LTX-2 (19B) or LTX-2.3 (22B). Must match the weights; LoRAs do not transfer between them.")
    source: str = opt("tiny", "\"tiny\" (embedded random-weight test model) or a local diffusers-format LTX-2 folder.")
    cross_modal_sigma: Literal["reference", "own", "cross"] = opt(
        "reference",
        "Which σ drives the audio↔video cross-attention modulation; pick the one of the runtime you sample with. "
        "reference (ComfyUI, ltx-core >= 1.1.4): scale/shift from each modality's own timestep, a2v gate from σ_audio, "
        "v2a gate from σ_video. own: all from the modality's own timestep (diffusers use_cross_timestep=False). cross: "
        "all from the other modality's σ (ltx-core 1.0.0 from PyPI, diffusers' LTX2Pipeline default).",
    )
    gradient_checkpointing: bool = opt(True, "Recompute block activations in the backward pass (less memory, ~30 % slower; on for the recommended 49-97 frame clips).")
    tiny: TinyModelConfig = opt(TinyModelConfig(), "Dimensions of the embedded tiny model ([model.tiny]).")


@dataclass
class NetworkConfig:
    type: Literal["lora", "dora", "lokr", "loha"] = opt(
        "lora",
        "Adapter type; every type exports keys ComfyUI loads. lora: up·down, rank r. dora: LoRA plus a learned magnitude "
        "per input column (weight-decomposed; reads the base weight for its norm, never writes it; often better at the "
        "same rank, try lr 5e-5). lokr: Kronecker product w1 ⊗ w2 (w2 low-rank when rank < half its size; far fewer "
        "parameters). loha: Hadamard product of two rank-r pairs (rank² expressiveness, more memory per step).",
    )
    rank: int = opt(32, "LoRA rank (32 is enough for a face and a voice; 64-128 for hard voices).")
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha/rank (lokr: only when w2 is factored, as ComfyUI applies it).")
    preset: Literal["av", "audio", "voice", "video", "v2v", "full"] = opt(
        "av",
        "Target modules. av: q/k/v/out of all six attentions (official AV recipe). audio: audio attentions + audio FF. "
        "voice: audio attentions + audio FF + both cross-modal attentions. video: video attentions + FF. v2v: all "
        "attentions + both FFs. full: every Linear in the blocks. to_gate_logits is never adapted.",
    )
    include: list[str] = opt([], "Extra regular expressions on module paths to adapt (e.g. 'audio_ff\\.net\\.2$').")
    exclude: list[str] = opt([], "Regular expressions on module paths never to adapt (applied after include).")
    dropout: float = opt(0.0, "Dropout on the adapter input (0.0-0.1 helps small datasets).")
    rank_dropout: float = opt(0.0, "Probability of zeroing each rank channel (lora/dora) or output row (lokr/loha) of the update per sample; the rest is rescaled. 0.1 curbs overfitting at rank 32+.")
    module_dropout: float = opt(0.0, "Probability of skipping a whole adapted module for one forward pass (0 = off; 0.0-0.1).")
    lokr_factor: int = opt(-1, "lokr: split each dimension as factor x rest (-1 = as square as possible, as LyCORIS and ComfyUI do).")
    connectors: Literal["off", "audio", "video_audio"] = opt(
        "off",
        "Also adapt the text connectors (text → audio/video adaptation). Needs pre-connector text features in the cache and "
        "the diffusers backend; the ComfyUI nodes keep it off (ComfyUI runs the connectors in its text encoder).",
    )
    init_seed: int = opt(0, "Seed of the adapter initialisation.")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit", "prodigy", "schedule_free_adamw"] = opt(
        "adamw",
        "Optimizer. adamw: torch AdamW. adamw8bit: bitsandbytes 8-bit AdamW (CUDA only; pip install bitsandbytes). "
        "prodigy: learning-rate-free Adam (pip install prodigyopt; set lr = 1.0; one rate for all modules). "
        "schedule_free_adamw: schedule-free AdamW (pip install schedulefree; use schedule.name = constant or "
        "constant_with_warmup; exports and validation use its averaged weights).",
    )
    lr: float = opt(1e-4, "Learning rate (1e-4 for LoRA rank 32; 1.0 for prodigy).")
    audio_lr: float | None = opt(None, "Learning rate of the audio modules (audio attentions, audio FF and both cross-modal attentions); unset = lr.")
    lr_overrides: list[str] = opt(
        [],
        "Per-module learning rates as 'regex=lr' (searched in the module path, first match wins), e.g. "
        "'audio_attn=1e-6'. Priority: lr_overrides > audio_lr > lr.",
    )
    loraplus_ratio: float = opt(1.0, "LoRA+: the zero-initialised factor of each adapter (lora/dora up, loha hada_w2_a, lokr w2 or w2_b) trains at its group's lr x this ratio (1 = off; 16 is the paper's value).")
    weight_decay: float = opt(0.0, "Weight decay (decoupled).")
    betas: list[float] = opt([0.9, 0.999], "Adam betas.")
    eps: float = opt(1e-8, "Adam epsilon.")


@dataclass
class ScheduleConfig:
    name: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"] = opt(
        "constant_with_warmup", "Learning-rate schedule."
    )
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    num_cycles: int = opt(1, "Cycles (hard restarts) of cosine_with_restarts.")
    min_lr_ratio: float = opt(0.0, "Floor of the decaying schedules, as a fraction of lr.")


@dataclass
class TimestepConfig:
    sampling: Literal["shifted_logit_normal", "logit_normal", "uniform"] = opt(
        "shifted_logit_normal", "σ distribution. shifted_logit_normal: μ from each modality's token count (the LTX-2 default)."
    )
    shifted_mode: Literal["auto", "legacy", "stretched"] = opt(
        "auto", "legacy: sigmoid(N(μ, std)). stretched: spread over [ε, 1] with 10 % uniform draws. auto: legacy for 2.0, stretched for 2.3."
    )
    shift: float | None = opt(None, "Fixed μ of the logit-normal for both modalities (unset = from each modality's token count; 0 = centred on σ 0.5).")
    logit_std: float = opt(1.0, "Standard deviation of the logit-normal.")
    stretched_uniform_fraction: float = opt(0.1, "Fraction of uniform draws in stretched mode.")
    min_sigma: float = opt(0.0, "Lower bound of σ (draws are rescaled into [min_sigma, max_sigma]).")
    max_sigma: float = opt(1.0, "Upper bound of σ.")
    independent_audio: bool = opt(True, "Draw the audio σ independently of the video σ (recommended). False = one shared σ.")


@dataclass
class LossConfig:
    type: Literal["mse", "l1", "huber"] = opt("mse", "Element-wise loss for both modalities (computed in fp32).")
    huber_delta: float = opt(1.0, "Transition point of the huber loss.")
    video_weight: float = opt(1.0, "Weight of the video loss.")
    audio_weight: float = opt(1.0, "Base weight of the audio loss (w0 of the balancer; the fixed weight when balance = none).")
    balance: Literal["none", "ema_mag", "inv_freq"] = opt(
        "ema_mag",
        "Audio loss balancing. none: fixed audio_weight. ema_mag: keep audio loss at target_ratio of video loss (dampens "
        "and boosts). inv_freq: boost audio when audio batches are rare.",
    )
    target_ratio: float = opt(0.33, "ema_mag: the audio loss aims at this fraction of the video loss.")
    ema_decay: float = opt(0.99, "ema_mag: EMA decay of the loss magnitudes.")
    balance_min: float = opt(0.05, "Lowest effective audio weight.")
    balance_max: float = opt(4.0, "Highest effective audio weight.")
    inv_freq_beta: float = opt(0.01, "inv_freq: EMA rate of the observed audio-batch frequency.")
    inv_freq_eps: float = opt(0.05, "inv_freq: floor of the frequency in the denominator.")
    min_snr_gamma: float = opt(0.0, "Must stay 0: Min-SNR weighting does not exist for flow matching.")
    caption_dropout: float = opt(0.0, "Probability per sample of training without text (both contexts and the mask zeroed), for CFG at inference (0.05 is typical).")
    caption_dropout_video: float = opt(0.0, "Probability per sample of zeroing only the video text context (the mask is shared and stays).")
    caption_dropout_audio: float = opt(0.0, "Probability per sample of zeroing only the audio text context (the mask is shared and stays).")
    noise_offset: float = opt(0.0, "Video noise offset: adds offset·N(0,1) per sample and latent channel, constant over frames and pixels (0.05 widens the dynamic range).")
    audio_noise_offset: float = opt(0.0, "Audio noise offset: offset·N(0,1) per sample, latent channel and mel bin, constant over time.")


@dataclass
class AudioConfig:
    """Batches without audio, audio-aware sampling and the audio supervision monitor."""

    missing_audio: Literal["skip", "silence", "audio_dop"] = opt(
        "skip",
        "What an audio-free batch (image, silent clip, clip whose audio failed) does to the audio branch. skip: nothing "
        "(audio and cross-modal attention are off for it; no extra cost). silence: train the audio branch towards the "
        "audio VAE's encoded silence with weight silence_weight (no extra forward). audio_dop: keep the LoRA's audio "
        "prediction on silence equal to the base model's (+2 forwards, +1 backward on audio-free batches only). "
        "Never trains towards zero latents.",
    )
    silence_weight: float = opt(0.5, "Loss weight of the silence target (missing_audio = silence).")
    audio_dop_multiplier: float = opt(0.5, "Loss weight of audio DOP (missing_audio = audio_dop); 0.3-1.0.")
    batch_probability: float | None = opt(
        None, "Chance of drawing an audio batch whenever audio and audio-free batches are both left (unset = their natural share). Excludes min_batches_per_accum."
    )
    min_batches_per_accum: int = opt(
        0, "At least this many audio micro-batches in every gradient-accumulation window (0 = off; <= train.gradient_accumulation). Excludes batch_probability."
    )
    bucket_strategy: Literal["pad", "truncate"] = opt(
        "pad",
        "pad: audio keeps the clip's length, missing tail masked in the loss. truncate: audio cut to its valid length "
        "floored to a multiple of bucket_interval_seconds (clips shorter than one interval keep all their valid audio); "
        "no padding, no mask.",
    )
    bucket_interval_seconds: float = opt(1.0, "truncate: audio lengths are floored to multiples of this many seconds.")
    supervision_mode: Literal["off", "warn", "error"] = opt(
        "warn",
        "Audio supervision monitor: checks that enough batches of an audio run train on real audio. warn: print the "
        "cause; error: stop training with it (no audio in the cache, failed audio decodes, or a sampler starving audio).",
    )
    supervision_warmup: int = opt(50, "Micro-batches before the first supervision check.")
    supervision_interval: int = opt(50, "Micro-batches between supervision checks.")
    supervision_min_ratio: float = opt(0.5, "Lowest acceptable share of micro-batches trained on real audio (0-1).")


@dataclass
class PreservationConfig:
    """Regularisers that keep the LoRA from changing what it should not (each costs extra passes)."""

    dop: bool = opt(False, "Differential output preservation: the LoRA's prediction for the class prompt must match the base model's (+2 forwards, +1 backward per micro-batch).")
    dop_class_prompt: str = opt("", "The class prompt for dop, without the trigger word (e.g. 'a woman speaking').")
    dop_multiplier: float = opt(1.0, "Loss weight of dop (0.5-1.0).")
    blank: bool = opt(False, "Blank-prompt preservation: the LoRA's prediction for the empty prompt (the CFG baseline) must match the base model's (+2 forwards, +1 backward per micro-batch).")
    blank_multiplier: float = opt(1.0, "Loss weight of blank-prompt preservation (0.5-1.0).")
    prior_divergence: bool = opt(False, "Push the LoRA's prediction on the training prompt away from the base model's, against timid LoRAs (+1 forward, no extra backward). Unbounded: keep the multiplier small.")
    prior_divergence_multiplier: float = opt(0.1, "Weight of prior divergence (0.05-0.1).")


@dataclass
class ValidationConfig:
    every_steps: int = opt(100, "Validation loss every N optimizer steps and at the end, when the cache holds validation items (0 = never).")
    sigmas: list[float] = opt([0.1, 0.3, 0.5, 0.7, 0.9], "The fixed noise levels of the validation loss (each item is scored at every σ, both modalities).")
    seed: int = opt(0, "Seed of the validation noise (the same noise at every validation).")
    sample_every_steps: int = opt(-1, "Generate A/B samples (with and without the LoRA) every N steps, with voice scores (-1 = auto: 250 on a GPU, off on CPU; 0 = never).")
    prompts: list[str] = opt([], "Prompts of the validation samples (empty = \"<trigger>, a person speaks to the camera\").")
    sample_seeds: list[int] = opt([0], "Seeds of the validation samples (each prompt is sampled with each seed).")
    sample_steps: int = opt(20, "Denoising steps of the validation samples.")
    sample_seconds: float = opt(0.0, "Length of the validation samples in seconds (0 = the training clip length).")
    fixed_sigma: float = opt(0.5, "σ at which the validation samples' audio-branch loss is measured.")
    voice_score: bool = opt(True, "Score the validation samples' voice against the dataset voice (needs `pip install resemblyzer`).")
    report: bool = opt(True, "Write the HTML training report (report.html) into the run directory at the end of training.")


@dataclass
class TrainConfig:
    steps: int = opt(2000, "Optimizer steps (a voice typically needs 750-2000 at lr 1e-4).")
    batch_size: int = opt(1, "Clips per micro-batch (same-shape clips only).")
    gradient_accumulation: int = opt(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = opt("bf16", "Compute precision (autocast); LoRA weights stay fp32. fp16 uses loss scaling (CUDA or CPU).")
    seed: int = opt(42, "Seed of data order, σ and noise (runs are reproducible, resumes bit-for-bit).")
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda, cuda:1, ...")
    max_consecutive_nonfinite: int = opt(5, "Stop after this many non-finite steps in a row (each is skipped with a warning).")
    num_threads: int = opt(0, "CPU threads for torch (0 = torch's default).")


@dataclass
class LoggingConfig:
    log_every: int = opt(10, "Print raw audio loss, weighted audio loss, video loss and audio weight every N steps.")
    tensorboard: bool = opt(False, "Also write the metrics to TensorBoard (<run>/tensorboard; needs the tensorboard package).")
    quiet: bool = opt(False, "Print only errors.")


@dataclass
class OutputConfig:
    dir: str = opt("runs/ltx2_av_lora", "Run directory: metrics.jsonl, lora/, state/, report.json, config.json.")
    name: str = opt("ltx2_av_lora", "LoRA file name prefix (lora/<name>_<step>.safetensors).")
    save_every: int = opt(250, "Save the LoRA and a resumable state every N steps (and at the end).")
    keep_states: int = opt(2, "How many resumable states to keep on disk.")
    save_dtype: Literal["float32", "bfloat16", "float16"] = opt("bfloat16", "Precision of the exported LoRA tensors.")
    resume: Literal["auto", "never"] = opt("auto", "auto: continue from the latest state in the run directory.")
    lora_format: Literal["lora_ab", "down_up"] = opt(
        "lora_ab",
        "Key layout of the exported LoRA (and DoRA) files. lora_ab: diffusion_model.<module>.lora_A.weight / "
        ".lora_B.weight with alpha/rank folded into lora_B, which ComfyUI, diffusers (LTX2Pipeline.load_lora_weights) "
        "and ltx-core / ltx-pipelines all apply identically. down_up: .lora_down.weight / .lora_up.weight / .alpha "
        "(ComfyUI only: diffusers' loader fails on it and ltx-core skips it). LoKr and LoHa keep their own keys.",
    )


@dataclass
class MemoryConfig:
    quantization: Literal["none", "int8", "float8", "nf4"] = opt(
        "none",
        "Weight-only quantisation of the transformer blocks' Linear layers (torchao; the adapter trains on top, the "
        "base stays frozen). none: as loaded. int8: per-channel int8 (~half of bf16). float8: per-channel float8 e4m3 "
        "(~half of bf16). nf4: 4-bit NormalFloat, QLoRA's format (~quarter of bf16, largest error). Needs "
        "`pip install torchao` (0.18 for torch 2.11). Exported LoRAs apply to the unquantised base.",
    )
    blocks_to_swap: int = opt(
        0,
        "Keep this many transformer blocks in CPU memory and stream each to the GPU just before it runs (the next "
        "one is copied on a side CUDA stream while the current one computes). 0 = off. Needs "
        "model.gradient_checkpointing; at most the number of blocks - 1. Does nothing when training on the CPU.",
    )
    pin_memory: bool = opt(
        True, "Keep swapped blocks and offloaded activations in pinned (page-locked) CPU memory: faster, asynchronous copies."
    )
    activation_offload: bool = opt(
        False,
        "Keep the checkpointed blocks' inputs (the video and audio residual streams, the activations that "
        "checkpointing keeps per block) in CPU memory between forward and backward. Needs "
        "model.gradient_checkpointing. Saves GPU memory at the cost of PCIe copies; does nothing when training on the CPU.",
    )
    compile: bool = opt(
        False,
        "torch.compile each transformer block (the first steps are slow while it compiles; ~15-20 % faster after "
        "on a GPU). Switched off with a warning together with blocks_to_swap, whose hooks swap the block's weights "
        "at every call.",
    )
    attention: Literal["sdpa", "sdpa_flash", "flash"] = opt(
        "sdpa",
        "Attention kernel. sdpa: PyTorch scaled_dot_product_attention, kernel chosen by PyTorch (default, any "
        "device). sdpa_flash: PyTorch's built-in FlashAttention kernel (CUDA, bf16/fp16). flash: the flash-attn "
        "package (FlashAttention 2; CUDA; pip install flash-attn). Both flash kinds need a text mask without padding.",
    )


@dataclass
class ConditioningConfig:
    """The training mode: what the model is conditioned on during training, laid out as ComfyUI's core inference
    nodes lay it out (the references themselves are dataset options: they decide what the cache encodes)."""

    mode: Literal["av", "audio", "ic", "id"] = opt(
        "av",
        "av: text to audio+video (or video-only with dataset.with_audio = false). audio: audio-only LoRA from audio "
        "sources (kind = audio); only audio modules are adapted; generate with a 64x64 video stand-in (README). ic: "
        "IC-LoRA / video-to-video: each clip's reference (dataset.sources[].reference_dir) is a clean guide, as "
        "LTXVAddGuide + Get IC-LoRA Parameters add it at inference. id: ID-LoRA, voice from a reference clip "
        "(reference_audio_dir or reference_audio_same_speaker), as LTXVReferenceAudio feeds it at inference.",
    )
    first_frame_p: float = opt(
        0.0,
        "Probability per clip of conditioning on its first latent frame (image-to-video): the frame is fed clean "
        "with σ = 0 and left out of the loss, as LTXVImgToVideo conditions it at inference. 0 = off; any mode but audio.",
    )


@dataclass
class CrepaConfig:
    """Cross-frame representation alignment (CREPA, backbone mode): a small projector maps the video hidden states
    of one transformer block onto those of a deeper block of the same forward, frame by frame and across
    neighbouring frames (no extra forward; read with hooks). The projector trains with the LoRA, is saved in the
    run's state and never exported."""

    enabled: bool = opt(False, "Turn CREPA on: + one projector (two Linear layers of the video width, ~34M parameters on LTX-2) and the captured features of two blocks; no extra forward. Video only.")
    student_block_idx: int = opt(-1, "Block whose video hidden states are aligned (0-based; -1 = a third of the depth: block 16 of LTX-2's 48).")
    teacher_block_idx: int = opt(-1, "Deeper block whose video hidden states are the target (detached; must be deeper than the student; -1 = two thirds of the depth: block 32 of 48).")
    lambda_crepa: float = opt(0.1, "Loss weight of the CREPA term (0.05-0.5).")
    tau: float = opt(1.0, "Neighbour decay: frame f aligns with frame k with weight exp(-|f-k|/tau).")
    num_neighbors: int = opt(2, "Neighbouring latent frames on each side a frame aligns with (0 = the same frame only).")
    schedule: Literal["constant", "linear", "cosine"] = opt("constant", "Weight over the run: constant, or a linear / cosine decay to 0 at train.steps.")
    warmup_steps: int = opt(0, "Steps over which the weight ramps up linearly from 0.")
    projector_lr: float | None = opt(None, "Learning rate of the projector; unset = optimizer.lr.")


@dataclass
class SelfFlowConfig:
    """Self-Flow: the LoRA model's hidden states at a student block, through a projector, are aligned with the
    frozen base model's hidden states at a deeper teacher block (one extra forward without gradient, LoRA off),
    with dual-timestep noising: a share of the video tokens is noised more for the student than for the teacher.
    Optional temporal terms align per-frame features with neighbouring frames and frame-to-frame changes."""

    enabled: bool = opt(False, "Turn Self-Flow on: + one forward without gradient per micro-batch (the base model as teacher) and a projector (~34M parameters on LTX-2) saved in the run's state, never exported. Video only.")
    student_block_idx: int = opt(-1, "Student block (0-based; -1 = floor(0.3 x depth): block 14 of LTX-2's 48).")
    teacher_block_idx: int = opt(-1, "Teacher block of the base model, deeper than the student (-1 = ceil(0.7 x depth): block 34 of 48).")
    lambda_self_flow: float = opt(0.1, "Loss weight of the token-level alignment term.")
    dual_timestep: bool = opt(True, "Dual-timestep noising: a second σ is drawn; the masked tokens get the higher of the two σ in the training forward, every other token (and every teacher token) the lower one. Off: student and teacher see the same input.")
    mask_ratio: float = opt(0.1, "Share of video tokens (or latent frames) that get the higher σ (0-0.5).")
    frame_level_mask: bool = opt(False, "Mask whole latent frames instead of single tokens.")
    temporal_mode: Literal["off", "frame", "delta", "hybrid"] = opt("off", "Temporal terms on per-frame (mean-pooled) features: frame aligns each frame with the teacher's neighbouring frames, delta aligns frame-to-frame changes, hybrid both.")
    lambda_temporal: float = opt(0.1, "Loss weight of the frame-neighbour term (temporal_mode frame / hybrid).")
    lambda_delta: float = opt(0.05, "Loss weight of the frame-delta term (temporal_mode delta / hybrid).")
    num_neighbors: int = opt(2, "Neighbouring latent frames on each side for the frame term.")
    temporal_tau: float = opt(1.0, "Neighbour decay of the frame term: weight exp(-|f-k|/temporal_tau).")
    schedule: Literal["constant", "linear", "cosine"] = opt("constant", "All Self-Flow weights over the run: constant, or a linear / cosine decay to 0 at train.steps.")
    warmup_steps: int = opt(0, "Steps over which the weights ramp up linearly from 0.")
    projector_lr: float | None = opt(None, "Learning rate of the projector; unset = optimizer.lr.")


@dataclass
class SliderConfig:
    """Slider LoRA (``ltx2-av-trainer slider``): a direction between two prompts, learned from the base model alone
    (no dataset). With the LoRA at +1 the prediction for target_class moves by guidance_strength x (positive -
    negative), at -1 by the opposite; any strength in between (or beyond) works at inference. The synthetic latents
    have the size of dataset.frames / width / height (and audio when dataset.with_audio)."""

    positive: str = opt("", "The prompt the slider moves towards at positive strength (e.g. 'a person shouting loudly').")
    negative: str = opt("", "The prompt the slider moves towards at negative strength (e.g. 'a person whispering softly').")
    target_class: str = opt("", "The prompt the slider is trained on (empty = the empty prompt: the slider acts whatever the prompt).")
    guidance_strength: float = opt(1.0, "Size of the learned step along (positive - negative) at strength 1 (2-3: stronger, less stable).")
    denoise_steps: int = opt(2, "Euler steps of the base model (target_class prompt) from pure noise to each step's σ, so the slider trains on latents the model meets when sampling (0 = pure noise at σ = 1 only).")


def validate_memory(memory: MemoryConfig, model: ModelConfig) -> None:
    """Cross-field rules of ``[memory]`` (raises ``ConfigError`` naming the key and the fix); also checked by
    the diffusers backend, which is given the model and memory sections alone."""
    if memory.blocks_to_swap < 0:
        raise ConfigError(f"memory.blocks_to_swap: must be >= 0 (0 = off), got {memory.blocks_to_swap}")
    if memory.blocks_to_swap and not model.gradient_checkpointing:
        raise ConfigError(
            "memory.blocks_to_swap needs model.gradient_checkpointing = true: without checkpointing, autograd keeps "
            "every block's GPU weights alive until backward, so swapping would save nothing"
        )
    if memory.activation_offload and not model.gradient_checkpointing:
        raise ConfigError(
            "memory.activation_offload needs model.gradient_checkpointing = true: it keeps the checkpointed blocks' "
            "inputs in CPU memory (without checkpointing, use it off and lower the batch or clip size instead)"
        )
    if model.source == "tiny" and memory.blocks_to_swap >= model.tiny.num_layers:
        raise ConfigError(
            f"memory.blocks_to_swap = {memory.blocks_to_swap}: the model has {model.tiny.num_layers} blocks and at least "
            f"one must stay on the GPU; use at most {model.tiny.num_layers - 1}"
        )



@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    preservation: PreservationConfig = field(default_factory=PreservationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    crepa: CrepaConfig = field(default_factory=CrepaConfig)
    self_flow: SelfFlowConfig = field(default_factory=SelfFlowConfig)
    slider: SliderConfig = field(default_factory=SliderConfig)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        config = _build(cls, data, "")
        config.validate()
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or dotted keys replaced, validated: ``replace(**{"train.steps": 5})``."""
        data = self.to_dict()
        for dotted, value in sections.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return Config.from_dict(data)

    # ---- cross-field rules ------------------------------------------------------------------

    def validate(self) -> None:
        d, n, t, lo, tr = self.dataset, self.network, self.timesteps, self.loss, self.train
        _require((d.frames - 1) % 8 == 0 and d.frames >= 1, "dataset.frames", f"must be 8n+1 (1, 9, 17, 25, ...), got {d.frames}")
        for f in d.frame_buckets:
            _require((f - 1) % 8 == 0 and f >= 1, "dataset.frame_buckets", f"every entry must be 8n+1, got {f}")
        _require(d.width % 32 == 0 and d.width > 0, "dataset.width", f"must be a positive multiple of 32, got {d.width}")
        _require(d.height % 32 == 0 and d.height > 0, "dataset.height", f"must be a positive multiple of 32, got {d.height}")
        for wh in d.resolution_buckets:
            _require(
                len(wh) == 2 and all(v > 0 and v % 32 == 0 for v in wh),
                "dataset.resolution_buckets",
                f"every entry must be [width, height] in positive multiples of 32, got {wh}",
            )
        _require(d.target_fps > 0, "dataset.target_fps", "must be > 0")
        _require(0.0 <= d.validation_split < 1.0, "dataset.validation_split", "must be in [0, 1)")
        _require("{caption}" in d.caption_template, "dataset.caption_template", "must contain {caption}")
        _require(0.0 < d.audio_silent_fraction <= 1.0, "dataset.audio_silent_fraction", "must be in (0, 1]")
        _require(d.audio_near_silent_lufs <= d.audio_quiet_lufs, "dataset.audio_near_silent_lufs",
                 "must be at most dataset.audio_quiet_lufs (near-silent is quieter than too quiet)")
        _require(0.0 <= d.audio_clipped_fraction < 1.0, "dataset.audio_clipped_fraction", "must be in [0, 1)")
        _require(d.audio_min_seconds >= 0, "dataset.audio_min_seconds", "must be >= 0")
        _require(d.audio_max_early_end_seconds >= 0, "dataset.audio_max_early_end_seconds", "must be >= 0")
        for i, s in enumerate(d.sources):
            _require(s.repeats >= 1, f"dataset.sources[{i}].repeats", "must be >= 1")
            _require(s.caption_extension.startswith("."), f"dataset.sources[{i}].caption_extension", "must start with '.', e.g. '.txt'")
        _require(n.rank >= 1, "network.rank", "must be >= 1")
        _require(n.alpha > 0, "network.alpha", "must be > 0")
        _require(0.0 <= n.dropout < 1.0, "network.dropout", "must be in [0, 1)")
        _require(0.0 <= n.rank_dropout < 1.0, "network.rank_dropout", "must be in [0, 1)")
        _require(0.0 <= n.module_dropout < 1.0, "network.module_dropout", "must be in [0, 1)")
        _require(n.lokr_factor == -1 or n.lokr_factor >= 1, "network.lokr_factor", "must be -1 (automatic) or >= 1")
        self._validate_optimizer()
        self._validate_conditioning()
        self._validate_audio()
        self._validate_preservation()
        self._validate_representation()
        validate_memory(self.memory, self.model)
        v = self.validation
        _require(v.every_steps >= 0, "validation.every_steps", "must be >= 0 (0 = never)")
        _require(bool(v.sigmas) and all(0.0 < s <= 1.0 for s in v.sigmas), "validation.sigmas", "must be a non-empty list of σ in (0, 1]")
        _require(v.sample_every_steps >= -1, "validation.sample_every_steps", "must be -1 (auto), 0 (never) or a step count")
        _require(bool(v.sample_seeds), "validation.sample_seeds", "needs at least one seed")
        _require(v.sample_steps >= 1, "validation.sample_steps", "must be >= 1")
        _require(v.sample_seconds >= 0, "validation.sample_seconds", "must be >= 0 (0 = the training clip length)")
        _require(0.0 < v.fixed_sigma <= 1.0, "validation.fixed_sigma", "must be in (0, 1]")
        for key in ("caption_dropout", "caption_dropout_video", "caption_dropout_audio"):
            _require(0.0 <= getattr(lo, key) < 1.0, f"loss.{key}", "must be in [0, 1)")
        _require(lo.noise_offset >= 0, "loss.noise_offset", "must be >= 0")
        _require(lo.audio_noise_offset >= 0, "loss.audio_noise_offset", "must be >= 0")
        _require(self.schedule.num_cycles >= 1, "schedule.num_cycles", "must be >= 1")
        _require(0.0 <= t.min_sigma < t.max_sigma <= 1.0, "timesteps.min_sigma/max_sigma", "need 0 <= min_sigma < max_sigma <= 1")
        _require(t.logit_std > 0, "timesteps.logit_std", "must be > 0")
        _require(0.0 <= t.stretched_uniform_fraction <= 1.0, "timesteps.stretched_uniform_fraction", "must be in [0, 1]")
        _require(
            lo.min_snr_gamma == 0,
            "loss.min_snr_gamma",
            "Min-SNR weighting does not exist for flow matching (LTX-2 has no alphas_cumprod); set it to 0 and "
            "shape the noise levels with [timesteps] sampling/shift instead",
        )
        _require(0 < lo.balance_min <= lo.balance_max, "loss.balance_min/balance_max", "need 0 < balance_min <= balance_max")
        _require(0.0 < lo.ema_decay < 1.0, "loss.ema_decay", "must be in (0, 1)")
        _require(lo.target_ratio > 0, "loss.target_ratio", "must be > 0")
        _require(lo.huber_delta > 0, "loss.huber_delta", "must be > 0")
        _require(tr.steps >= 1, "train.steps", "must be >= 1")
        _require(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(tr.gradient_accumulation >= 1, "train.gradient_accumulation", "must be >= 1")
        _require(tr.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _require(tr.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
        _require(self.logging.log_every >= 1, "logging.log_every", "must be >= 1")
        _require(self.output.save_every >= 1, "output.save_every", "must be >= 1")
        _require(self.output.keep_states >= 1, "output.keep_states", "must be >= 1")
        _require(bool(self.output.name) and "/" not in self.output.name and "\\" not in self.output.name and ".." not in self.output.name,
                 "output.name", f"must be a plain file name without path separators, got {self.output.name!r}")


    def _validate_conditioning(self) -> None:
        d, c = self.dataset, self.conditioning
        _require(0.0 <= c.first_frame_p <= 1.0, "conditioning.first_frame_p", "must be in [0, 1]")
        _require(not (c.mode == "audio" and c.first_frame_p > 0), "conditioning.first_frame_p",
                 "has no meaning in the audio-only mode (there is no video to condition on); set it to 0")
        _require(not (c.mode == "audio" and not d.with_audio), "dataset.with_audio",
                 "conditioning.mode = \"audio\" trains audio only: set dataset.with_audio = true")
        _require(not (c.mode == "id" and not d.with_audio), "dataset.with_audio",
                 "conditioning.mode = \"id\" trains the voice from reference audio: set dataset.with_audio = true")
        _require(d.reference_frames >= 1 and (d.reference_frames - 1) % 8 == 0, "dataset.reference_frames",
                 f"must be 8n+1 (1, 9, 17, ...), got {d.reference_frames}")
        _require(d.reference_frames <= min([d.frames, *d.frame_buckets]), "dataset.reference_frames",
                 f"{d.reference_frames} is more than the shortest clip's {min([d.frames, *d.frame_buckets])} frames; a "
                 "reference may not be longer than the clip it guides")
        _require(d.reference_downscale >= 1, "dataset.reference_downscale", "must be >= 1 (1 = references at the clip's size)")
        for width, height in [(d.width, d.height), *d.resolution_buckets]:
            _require((width // 32) % d.reference_downscale == 0 and (height // 32) % d.reference_downscale == 0,
                     "dataset.reference_downscale",
                     f"{d.reference_downscale} does not divide the latent size {width // 32}x{height // 32} of "
                     f"{width}x{height} (ComfyUI's LTXVAddGuide refuses that); use sizes that are multiples of "
                     f"{32 * d.reference_downscale} px")
        _require(d.reference_audio_seconds > 0, "dataset.reference_audio_seconds", "must be > 0 (about 5 s is recommended)")

    def _validate_optimizer(self) -> None:
        o = self.optimizer
        _require(o.lr > 0, "optimizer.lr", "must be > 0")
        _require(o.audio_lr is None or o.audio_lr > 0, "optimizer.audio_lr", "must be > 0 (or unset to use lr)")
        _require(len(o.betas) == 2, "optimizer.betas", "must be two numbers, e.g. [0.9, 0.999]")
        _require(o.loraplus_ratio > 0, "optimizer.loraplus_ratio", "must be > 0 (1 = off)")
        for i, item in enumerate(o.lr_overrides):
            parse_lr_override(item, f"optimizer.lr_overrides[{i}]")
        if o.name == "prodigy":
            _require(
                o.audio_lr is None and not o.lr_overrides and o.loraplus_ratio == 1.0,
                "optimizer.name",
                "\"prodigy\" estimates one step size for all parameters and supports no per-module learning rates; "
                "unset optimizer.audio_lr and optimizer.lr_overrides and set optimizer.loraplus_ratio = 1",
            )
        if o.name == "schedule_free_adamw":
            _require(
                self.schedule.name in ("constant", "constant_with_warmup"),
                "schedule.name",
                f"{self.schedule.name!r} cannot be combined with optimizer.name = \"schedule_free_adamw\" (it replaces "
                "the schedule); use \"constant_with_warmup\" (its warm-up_steps are passed to the optimizer)",
            )

    def _validate_audio(self) -> None:
        a, tr = self.audio, self.train
        _require(
            a.missing_audio == "skip" or self.dataset.with_audio,
            "audio.missing_audio",
            f"{a.missing_audio!r} needs an audio run; dataset.with_audio = false trains video only (audio modules are "
            "never adapted), so use \"skip\"",
        )
        _require(a.silence_weight > 0, "audio.silence_weight", "must be > 0")
        _require(a.audio_dop_multiplier > 0, "audio.audio_dop_multiplier", "must be > 0")
        _require(a.batch_probability is None or 0.0 <= a.batch_probability <= 1.0, "audio.batch_probability", "must be in [0, 1] (or unset)")
        _require(a.min_batches_per_accum >= 0, "audio.min_batches_per_accum", "must be >= 0")
        _require(
            a.min_batches_per_accum <= tr.gradient_accumulation,
            "audio.min_batches_per_accum",
            f"{a.min_batches_per_accum} is more than the {tr.gradient_accumulation} micro-batches of an accumulation "
            "window (train.gradient_accumulation)",
        )
        _require(
            not (a.batch_probability is not None and a.min_batches_per_accum > 0),
            "audio.batch_probability/min_batches_per_accum",
            "are mutually exclusive: set one of them",
        )
        _require(a.bucket_interval_seconds > 0, "audio.bucket_interval_seconds", "must be > 0")
        _require(a.supervision_warmup >= 0, "audio.supervision_warmup", "must be >= 0")
        _require(a.supervision_interval >= 1, "audio.supervision_interval", "must be >= 1")
        _require(0.0 <= a.supervision_min_ratio <= 1.0, "audio.supervision_min_ratio", "must be in [0, 1]")

    def _validate_preservation(self) -> None:
        p = self.preservation
        if p.dop:
            _require(bool(p.dop_class_prompt.strip()), "preservation.dop_class_prompt",
                     "is empty; give the class the trigger stands for (e.g. 'a woman speaking'), or use preservation.blank")
            trigger = self.dataset.trigger.strip()
            _require(not trigger or trigger.lower() not in p.dop_class_prompt.lower(), "preservation.dop_class_prompt",
                     f"contains the trigger word {trigger!r}; the class prompt must describe the class without it")
        for key in ("dop_multiplier", "blank_multiplier", "prior_divergence_multiplier"):
            _require(getattr(p, key) > 0, f"preservation.{key}", "must be > 0")

    def _validate_representation(self) -> None:
        c, f = self.crepa, self.self_flow
        for name, section in (("crepa", c), ("self_flow", f)):
            if not section.enabled:
                continue
            _require(self.conditioning.mode != "audio", f"{name}.enabled",
                     "aligns video hidden states; the audio-only mode has no video (turn it off)")
            for key in ("student_block_idx", "teacher_block_idx"):
                _require(getattr(section, key) >= -1, f"{name}.{key}", "must be a block index >= 0, or -1 (automatic)")
            student, teacher = section.student_block_idx, section.teacher_block_idx
            _require(student < 0 or teacher < 0 or teacher > student, f"{name}.teacher_block_idx",
                     f"{teacher} must be deeper than student_block_idx {student}")
            _require(section.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
            _require(section.projector_lr is None or section.projector_lr > 0, f"{name}.projector_lr", "must be > 0 (or unset to use optimizer.lr)")
            _require(section.projector_lr is None or self.optimizer.name != "prodigy", f"{name}.projector_lr",
                     "\"prodigy\" supports no per-module learning rates; unset it")
        _require(c.lambda_crepa > 0, "crepa.lambda_crepa", "must be > 0")
        _require(c.tau > 0, "crepa.tau", "must be > 0")
        _require(c.num_neighbors >= 0, "crepa.num_neighbors", "must be >= 0")
        _require(f.lambda_self_flow > 0, "self_flow.lambda_self_flow", "must be > 0")
        _require(0.0 <= f.mask_ratio <= 0.5, "self_flow.mask_ratio", "must be in [0, 0.5]")
        for key in ("lambda_temporal", "lambda_delta"):
            _require(getattr(f, key) >= 0, f"self_flow.{key}", "must be >= 0")
        _require(f.temporal_tau > 0, "self_flow.temporal_tau", "must be > 0")
        _require(f.num_neighbors >= 0, "self_flow.num_neighbors", "must be >= 0")
        s = self.slider
        _require(s.guidance_strength > 0, "slider.guidance_strength", "must be > 0")
        _require(s.denoise_steps >= 0, "slider.denoise_steps", "must be >= 0")


def parse_lr_override(item: str, key: str = "optimizer.lr_overrides") -> tuple[str, float]:
    """'regex=lr' → (regex, lr), with a message naming the key when it is malformed."""
    import re

    pattern, sep, value = item.rpartition("=")
    if not sep or not pattern:
        raise ConfigError(f"{key}: {item!r} is not 'regex=lr' (e.g. 'audio_attn=1e-6')")
    try:
        lr = float(value)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} in {item!r} is not a number") from None
    if not lr > 0:
        raise ConfigError(f"{key}: the learning rate in {item!r} must be > 0")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({exc})") from None
    return pattern, lr


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------------------------
# Generic dict -> dataclass builder with strict checks
# --------------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key {_join(prefix, unknown[0])!r} in {where}; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(prefix, name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected nothing, got {value!r}")
        return None
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in this file
