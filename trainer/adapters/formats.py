"""LoRA files of every LTX-2 trainer: read their key layouts, write ours, and say which runtime loads what.

The key layouts in use (``<path>`` is the reference (ComfyUI / ltx-core) module path, e.g.
``transformer_blocks.3.audio_attn1.to_q``):

============  ==========================================================================  ==============================
layout        keys of one module                                                          written by
============  ==========================================================================  ==============================
``lora_ab``   ``diffusion_model.<path>.lora_A.weight`` / ``.lora_B.weight``               this trainer (default, alpha/rank
                                                                                          folded into lora_B), ai-toolkit
                                                                                          (alpha forced to the rank),
                                                                                          Lightricks ltx-trainer (no alpha
                                                                                          stored), the musubi-tuner LTX-2
                                                                                          fork's ComfyUI export (folded)
``down_up``   ``diffusion_model.<path>.lora_down.weight`` / ``.lora_up.weight`` /         this trainer with
              ``.alpha``                                                                  ``output.lora_format = "down_up"``
``kohya``     ``lora_unet_<path, dots as underscores>.lora_down.weight`` / ... / ``.alpha``  the musubi-tuner LTX-2 fork's
                                                                                          training files
                                                                                          (``lora_unet_model_<path>``)
``diffusers`` ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``; alpha in    diffusers
              the ``lora_adapter_metadata`` JSON of the file                               ``LTX2Pipeline.save_lora_weights``
``peft``      ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` (alpha only in   raw PEFT ``save_pretrained``
              ``adapter_config.json``)
============  ==========================================================================  ==============================

LoKr / LoHa (``.lokr_w1``, ``.lokr_w2[_a|_b]``, ``.hada_w1_a`` ..., with ``.alpha``) and DoRA (``.dora_scale``
``[1, in]`` beside a LoRA pair) may use any of these prefixes.

Which runtime loads which keys, as each runtime's own loader does it (the rules of ``runtime_support``; the
tests hold them to diffusers' and ltx-core's real loaders):

- ComfyUI: ``lora_A``/``lora_B``, ``lora_down``/``lora_up`` with optional ``.alpha``, DoRA, LoKr, LoHa, under
  ``diffusion_model.``, no prefix, or kohya ``lora_unet_<path with underscores>``. Not the diffusers
  ``transformer.`` prefix, PEFT's ``base_model.model.``, diffusers-only module names, nor musubi's
  ``lora_unet_model_`` segment.
- diffusers 0.42.1 (``LTX2Pipeline.load_lora_weights``): ``lora_A``/``lora_B`` only, under ``diffusion_model.``
  (renamed to diffusers names) or ``transformer.`` (diffusers names). Any key without "lora" in it (``.alpha``,
  LoKr, LoHa) is refused, ``lora_down``/``lora_up`` crash its PEFT step, and ``dora_scale`` is dropped with a
  warning (a DoRA then loads as a plain LoRA).
- ltx-core / ltx-pipelines (``SingleGPUModelBuilder.lora`` with ``LTXV_LORA_COMFY_RENAMING_MAP``): fuses
  ``[diffusion_model.]<path>.lora_A.weight`` / ``.lora_B.weight`` and nothing else, silently; it never reads
  ``.alpha`` (the update is lora_B·lora_A) nor ``dora_scale``.

So the one layout all three apply identically is ``lora_ab`` with alpha/rank folded into lora_B: the default
export (``output.lora_format``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from ..backends.diffusers_backend import diffusers_to_reference_path
from ..backends.text_connectors import connector_reference_path
from ..config import ConfigError
from .layers import detect_type

LORA_FORMATS = ("lora_ab", "down_up")
KEY_PREFIX = "diffusion_model."
METADATA_PREFIX = "ltx2_av_trainer."

# Module groups: verify counts applied modules per group, and a file's metadata lists the groups it trains.
GROUPS = ("video_attn", "audio_attn", "a2v", "v2a", "video_ff", "audio_ff", "connector", "other")
_GROUP_RULES = [
    ("connector", re.compile(r"(^|\.)(video|audio)_embeddings_connector\.")),
    ("a2v", re.compile(r"(^|\.)audio_to_video_attn\.")),
    ("v2a", re.compile(r"(^|\.)video_to_audio_attn\.")),
    ("audio_attn", re.compile(r"(^|\.)audio_attn[12]\.")),
    ("video_attn", re.compile(r"(^|\.)attn[12]\.")),
    ("audio_ff", re.compile(r"(^|\.)audio_ff\.")),
    ("video_ff", re.compile(r"(^|\.)ff\.")),
]


def module_group(path: str) -> str:
    for group, rule in _GROUP_RULES:
        if rule.search(path):
            return group
    return "other"


# ---- the LTX-2 modules an adapter can sit on (Linear layers, reference names) -----------------------------------

_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "to_gate_logits")
BLOCK_LINEARS = tuple(f"{a}.{p}" for a in _ATTENTIONS for p in _ATTENTION_LINEARS) + (
    "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
_TIMESTEP_MODULES = ("adaln_single", "audio_adaln_single", "av_ca_video_scale_shift_adaln_single",
                     "av_ca_audio_scale_shift_adaln_single", "av_ca_a2v_gate_adaln_single", "av_ca_v2a_gate_adaln_single",
                     "prompt_adaln_single", "audio_prompt_adaln_single")
TOP_LEVEL_LINEARS = ("patchify_proj", "audio_patchify_proj", "proj_out", "audio_proj_out",
                     "caption_projection.linear_1", "caption_projection.linear_2",
                     "audio_caption_projection.linear_1", "audio_caption_projection.linear_2") + tuple(
    f"{m}.{p}" for m in _TIMESTEP_MODULES for p in ("emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2", "linear"))
CONNECTOR_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1.to_gate_logits",
                     "ff.net.0.proj", "ff.net.2")


def _templates() -> list[str]:
    """Every LTX-2 (2.0 and 2.3) Linear module path, with ``{i}`` for block indices."""
    out = list(TOP_LEVEL_LINEARS) + [f"transformer_blocks.{{i}}.{p}" for p in BLOCK_LINEARS]
    out += [f"{c}_embeddings_connector.transformer_1d_blocks.{{i}}.{p}" for c in ("video", "audio") for p in CONNECTOR_LINEARS]
    return out


_DOTTED = re.compile("^(" + "|".join(re.escape(t).replace(r"\{i\}", r"\d+") for t in _templates()) + ")$")
# Kohya names turn every dot into an underscore; module names have underscores of their own (audio_attn1), so
# a name is resolved by matching it against the known paths, never by turning underscores back into dots.
_UNDERSCORED = [(re.compile("^" + re.escape(t.replace(".", "_")).replace(r"\{i\}", r"(\d+)") + "$"), t)
                for t in _templates()]


def is_ltx2_linear(path: str) -> bool:
    return bool(_DOTTED.match(path))


def resolve_underscored(name: str) -> str | None:
    """``transformer_blocks_3_audio_attn1_to_out_0`` → ``transformer_blocks.3.audio_attn1.to_out.0``."""
    for pattern, template in _UNDERSCORED:
        match = pattern.match(name)
        if match:
            return template.replace("{i}", match.group(1)) if match.groups() else template
    return None


# ---- key suffixes ---------------------------------------------------------------------------------------------

# File suffix → the suffix our adapter layers use (``layers.FILE_SUFFIXES``).
_SUFFIXES = {
    ".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
    ".lora_down.weight": ".lora_down.weight", ".lora_up.weight": ".lora_up.weight",
    ".alpha": ".alpha", ".dora_scale": ".dora_scale",
    ".lokr_w1": ".lokr_w1", ".lokr_w2": ".lokr_w2", ".lokr_w2_a": ".lokr_w2_a", ".lokr_w2_b": ".lokr_w2_b",
    ".hada_w1_a": ".hada_w1_a", ".hada_w1_b": ".hada_w1_b", ".hada_w2_a": ".hada_w2_a", ".hada_w2_b": ".hada_w2_b",
}
# Tensors of other adapter kinds, and why they cannot become one of ours.
_UNCONVERTIBLE = {
    ".lora_magnitude_vector.weight": "DoRA magnitude per output row (PEFT / musubi-tuner layout): ComfyUI's DoRA scales "
                                     "input columns, and translating one into the other needs the base weights",
    ".lora_magnitude_vector": "DoRA magnitude per output row (PEFT layout): ComfyUI's DoRA scales input columns, and "
                              "translating one into the other needs the base weights",
    ".diff": "a full weight difference, not a low-rank adapter (merge it into the checkpoint instead)",
    ".diff_b": "a bias difference: adapters here change weights only",
    ".lora_mid.weight": "a LoCon/Tucker middle factor (convolutions): LTX-2 adapters sit on Linear layers",
    ".lokr_t2": "a Tucker-decomposed LoKr factor (convolutions): LTX-2 adapters sit on Linear layers",
    ".oft_R.weight": "an OFT adapter (the musubi-tuner fork's own runtime applies it, no LoRA runtime does)",
    ".oft_blocks": "an OFT adapter (no LoRA runtime applies it)",
    ".initial_norm": "a DoKr norm (the musubi-tuner fork's own runtime only)",
}
_ALL_SUFFIXES = sorted(list(_SUFFIXES) + list(_UNCONVERTIBLE), key=len, reverse=True)

# ---- prefixes and module names ----------------------------------------------------------------------------------

_KOHYA_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
LAYOUT_WRITERS = {
    "lora_ab": "this trainer (default), ai-toolkit, Lightricks ltx-trainer, the musubi-tuner LTX-2 fork's ComfyUI export",
    "down_up": "this trainer (output.lora_format = down_up), kohya-style ComfyUI exports",
    "kohya": "the musubi-tuner LTX-2 fork's training files (lora_unet_model_*), kohya-style trainers",
    "diffusers": "diffusers LTX2Pipeline.save_lora_weights (trainers built on diffusers + PEFT)",
    "peft": "raw PEFT save_pretrained / get_peft_model_state_dict",
    "bare": "a file without a key prefix (ComfyUI maps it; ltx-core too)",
}


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix in _ALL_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def _module_path(name: str) -> tuple[str | None, str, str]:
    """A file's module name → (reference path or None, layout, why it is unknown)."""
    for prefix in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            # The musubi-tuner fork wraps the transformer as `model` and calls the video connector
            # `embeddings_connector`.
            rest = rest.removeprefix("model_")
            if rest.startswith("embeddings_connector_"):
                rest = "video_" + rest
            path = resolve_underscored(rest)
            return path, "kohya", "" if path else f"no LTX-2 module is named {rest!r} (dots written as underscores)"
    if name.startswith("model.diffusion_model."):
        name, layout = name[len("model.diffusion_model."):], "lora_ab"
    elif name.startswith(KEY_PREFIX):
        name, layout = name[len(KEY_PREFIX):], "lora_ab"
    elif name.startswith("transformer."):
        name, layout = name[len("transformer."):], "diffusers"
    elif name.startswith("connectors."):
        name, layout = name[len("connectors."):], "diffusers"
    elif name.startswith("base_model.model."):
        name, layout = name[len("base_model.model."):], "peft"
    else:
        layout = "bare"
    if name.startswith("text_embedding_projection.") or name.startswith("text_proj_in"):
        return None, layout, "the text feature projection runs in the text encoder, not in the diffusion model"
    path = connector_reference_path(name) or diffusers_to_reference_path(name)
    if is_ltx2_linear(path):
        return path, layout, ""
    return None, layout, f"no LTX-2 Linear module is named {path!r}"


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass
class ParsedLoRA:
    """An adapter file in our terms: per reference module path, its tensors under our layers' suffixes
    (``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` / ``.dora_scale`` / ``.lokr_*`` / ``.hada_*``)."""

    layout: str
    modules: dict[str, dict[str, torch.Tensor]]
    unconvertible: dict[str, str] = field(default_factory=dict)  # file key → why it cannot be converted
    notes: list[str] = field(default_factory=list)

    @property
    def writers(self) -> str:
        return LAYOUT_WRITERS.get(self.layout, "")

    def kinds(self) -> dict[str, str]:
        return {path: detect_type(set(tensors)) for path, tensors in self.modules.items()}


def _metadata_alphas(metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) from diffusers' ``lora_adapter_metadata`` (a PEFT config per component)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None, {}
    alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
    pattern = config.get("transformer.alpha_pattern", config.get("alpha_pattern")) or {}
    return (float(alpha) if alpha is not None else None), {k: float(v) for k, v in pattern.items()}


def _pattern_alpha(path: str, diffusers_name: str, pattern: dict[str, float]) -> float | None:
    # PEFT matches a pattern key against the end of a module name.
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", diffusers_name) or re.search(rf"(^|\.){key}$", path):
            return value
    return None


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
               alpha: float | None = None) -> ParsedLoRA:
    """Read any layout of the module docstring. ``alpha`` is the alpha to assume for LoRA modules whose file
    stores none (ltx-trainer and PEFT files keep it outside the file); without it they apply at scale 1,
    as every runtime applies them."""
    metadata = metadata or {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    names: dict[str, str] = {}
    keys_of: dict[str, list[str]] = {}
    unconvertible: dict[str, str] = {}
    layouts: dict[str, int] = {}
    for key in sorted(tensors):
        split = _split_suffix(key)
        if split is None:
            unconvertible[key] = "not an adapter tensor (no LoRA / DoRA / LoKr / LoHa key suffix)"
            continue
        name, suffix = split
        path, layout, why = _module_path(name)
        layouts[layout] = layouts.get(layout, 0) + 1
        if suffix in _UNCONVERTIBLE:
            unconvertible[key] = _UNCONVERTIBLE[suffix]
        elif path is None:
            unconvertible[key] = why
        else:
            modules.setdefault(path, {})[_SUFFIXES[suffix]] = tensors[key]
            names[path] = name
            keys_of.setdefault(path, []).append(key)
    if layouts.get("lora_ab") and any(".lora_down.weight" in t for t in modules.values()) and not any(
            k.endswith(".lora_A.weight") for k in tensors):
        layouts["down_up"] = layouts.pop("lora_ab")
    layout = max(layouts, key=layouts.get) if layouts else "bare"
    parsed = ParsedLoRA(layout, {}, unconvertible)
    meta_alpha, pattern = _metadata_alphas(metadata)
    missing_alpha = 0
    for path, module in modules.items():
        try:
            kind = detect_type(set(module))
        except ValueError:
            for key in keys_of[path]:
                unconvertible[key] = "incomplete adapter: its first factor (lora_A / lora_down, lokr_w1, hada_w1_a) is missing"
            continue
        required = {"lora": (".lora_down.weight", ".lora_up.weight"), "dora": (".lora_down.weight", ".lora_up.weight"),
                    "lokr": (".lokr_w1",), "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")}[kind]
        absent = [s for s in required if s not in module]
        if kind == "lokr" and ".lokr_w2" not in module and not {".lokr_w2_a", ".lokr_w2_b"} <= set(module):
            absent.append(".lokr_w2 (or .lokr_w2_a and .lokr_w2_b)")
        if absent:
            for key in keys_of[path]:
                unconvertible[key] = f"incomplete {kind}: {', '.join(absent)} missing"
            continue
        if ".alpha" not in module and kind in ("lora", "dora"):
            found = _pattern_alpha(path, names[path], pattern)
            found = found if found is not None else meta_alpha
            found = found if found is not None else alpha
            if found is None:
                missing_alpha += 1
            else:
                module[".alpha"] = torch.tensor(float(found))
        parsed.modules[path] = module
    if missing_alpha:
        parsed.notes.append(f"{missing_alpha} LoRA modules store no alpha: runtimes apply them as lora_B·lora_A (scale 1); "
                            "if they were trained with alpha ≠ rank (ltx-trainer, PEFT keep it outside the file), give "
                            "that alpha to convert to keep the trained strength")
    if meta_alpha is not None or pattern:
        parsed.notes.append("alpha read from the file's lora_adapter_metadata (diffusers)")
    return parsed


# ---- writing --------------------------------------------------------------------------------------------------


def export_tensors(modules: dict[str, dict[str, torch.Tensor]], lora_format: str, dtype: torch.dtype,
                   prefix: str = KEY_PREFIX) -> dict[str, torch.Tensor]:
    """File keys for ``modules`` (our suffixes) in ``lora_format``. ``lora_ab``: ``.lora_A.weight`` /
    ``.lora_B.weight`` with alpha/rank folded into lora_B (in float32, before the cast); ``down_up``:
    ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. DoRA keeps ``.dora_scale``; LoKr and LoHa keep
    their own keys and ``.alpha`` in both formats."""
    if lora_format not in LORA_FORMATS:
        raise ConfigError(f"output.lora_format: {lora_format!r}; choose one of {', '.join(LORA_FORMATS)}")
    out: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        out[key] = tensor.detach().to("cpu", dtype).contiguous()

    for path, module in modules.items():
        kind = detect_type(set(module))
        base = prefix + path
        if kind not in ("lora", "dora"):
            for suffix, tensor in module.items():
                put(base + suffix, tensor)
            continue
        down, up = module[".lora_down.weight"], module[".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(module[".alpha"].item()) if ".alpha" in module else float(rank)
        if lora_format == "lora_ab":
            put(base + ".lora_A.weight", down)
            put(base + ".lora_B.weight", up.detach().float() * (alpha / rank))
        else:
            put(base + ".lora_down.weight", down)
            put(base + ".lora_up.weight", up)
            put(base + ".alpha", torch.tensor(alpha))
        if ".dora_scale" in module:
            put(base + ".dora_scale", module[".dora_scale"])
    return out


# ---- which runtime loads a file as it is --------------------------------------------------------------------------

RUNTIMES = ("comfyui", "diffusers", "ltx_core")


@dataclass
class RuntimeSupport:
    """What one runtime's own loader does with a file: the modules it applies and what it gets wrong."""

    modules: int
    status: str  # "loads" (every adapter module, correctly), "partial", "wrong" (applies, with a different result), "fails", "none"
    reason: str = ""

    def to_dict(self) -> dict:
        return {"modules": self.modules, "status": self.status, "reason": self.reason}


def comfyui_module(key: str) -> str | None:
    """The reference module path ComfyUI's key map gives a file key for LTX-2 (None when it has no entry):
    ``diffusion_model.<path>``, bare ``<path>`` or kohya ``lora_unet_<path with underscores>``, with a suffix one of
    its weight adapters reads; never diffusers' ``transformer.``, PEFT's ``base_model.model.`` nor musubi's
    ``lora_unet_model_``."""
    split = _split_suffix(key)
    if split is None or split[1] not in _SUFFIXES:
        return None
    name = split[0]
    if name.startswith("lora_unet_"):
        return resolve_underscored(name[len("lora_unet_"):])
    if name.startswith(KEY_PREFIX):
        name = name[len(KEY_PREFIX):]
    elif name.startswith(("transformer.", "base_model.", "model.", "connectors.", "lycoris_", "lora_transformer_")):
        return None
    return name if is_ltx2_linear(name) else None


def runtime_support(tensors: dict[str, torch.Tensor], parsed: ParsedLoRA | None = None) -> dict[str, RuntimeSupport]:
    """How ComfyUI, diffusers and ltx-core each load ``tensors`` as they are (module docstring)."""
    parsed = parsed if parsed is not None else parse_lora(tensors)
    split = {key: _split_suffix(key) for key in tensors}
    kinds = parsed.kinds()
    total = len(parsed.modules)
    has_dora = any(kind == "dora" for kind in kinds.values())
    scaled = [p for p, m in parsed.modules.items() if kinds[p] in ("lora", "dora") and ".alpha" in m
              and float(m[".alpha"].item()) != m[".lora_down.weight"].shape[0]]

    # ComfyUI: a module loads when its name maps and its factors are complete.
    comfy = {comfyui_module(key) for key in tensors} - {None}
    comfy &= set(parsed.modules)
    comfy_status = "loads" if comfy and len(comfy) == total and not parsed.unconvertible else ("partial" if comfy else "none")
    comfy_reason = "" if comfy_status == "loads" else "keys under a prefix or name ComfyUI's key map does not hold"

    # diffusers: every key must contain "lora"; lora_A/lora_B only; under diffusion_model. or transformer.
    suffixes = {s[1] for s in split.values() if s}
    if not tensors or not suffixes & {".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight"}:
        diffusers = RuntimeSupport(0, "fails", "no lora_A/lora_B keys")
    elif any("lora" not in key for key in tensors if not key.endswith(".dora_scale")):
        diffusers = RuntimeSupport(0, "fails", "its loader refuses keys without 'lora' in them (.alpha, LoKr, LoHa)")
    elif suffixes & {".lora_down.weight", ".lora_up.weight"}:
        diffusers = RuntimeSupport(0, "fails", "lora_down/lora_up keys crash its PEFT step (it expects lora_A/lora_B)")
    elif not all(key.startswith((KEY_PREFIX, "transformer.")) for key in tensors):
        diffusers = RuntimeSupport(0, "none", "keys outside diffusion_model. / transformer. are not loaded")
    else:
        loaded = {p for p, k in kinds.items() if k in ("lora", "dora") and not p.endswith("_embeddings_connector")
                  and "_embeddings_connector." not in p}
        if has_dora:
            diffusers = RuntimeSupport(len(loaded), "wrong", "it drops dora_scale: the DoRA modules load as plain LoRAs")
        elif len(loaded) < total:
            diffusers = RuntimeSupport(len(loaded), "partial", "text-connector modules are not loaded into the transformer")
        else:
            diffusers = RuntimeSupport(len(loaded), "loads")

    # ltx-core: [diffusion_model.]<path>.lora_A.weight / .lora_B.weight pairs, nothing else, alpha never read.
    fused = set()
    for key, s in split.items():
        if s and s[1] == ".lora_A.weight":
            name = s[0][len(KEY_PREFIX):] if s[0].startswith(KEY_PREFIX) else s[0]
            if is_ltx2_linear(name) and "_embeddings_connector." not in name and f"{s[0]}.lora_B.weight" in tensors:
                fused.add(name)
    if not fused:
        ltx_core = RuntimeSupport(0, "none", "it fuses only lora_A/lora_B pairs under reference names and skips every "
                                             "other key without a message")
    elif has_dora or any(p in fused for p in scaled):
        ltx_core = RuntimeSupport(len(fused), "wrong", "it ignores " + ("dora_scale" if has_dora else "the .alpha scale")
                                  + ": the update differs from the trained one")
    elif len(fused) < total:
        ltx_core = RuntimeSupport(len(fused), "partial", "it skips the modules that are not lora_A/lora_B pairs")
    else:
        ltx_core = RuntimeSupport(len(fused), "loads")
    return {"comfyui": RuntimeSupport(len(comfy), comfy_status, comfy_reason), "diffusers": diffusers, "ltx_core": ltx_core}


# ---- converting a file ------------------------------------------------------------------------------------------

# Metadata that describes the source's scaling, which the converted file no longer has (alpha is folded).
_STALE_METADATA = ("lora_adapter_metadata", "ss_network_alpha")


@dataclass
class Conversion:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    parsed: ParsedLoRA
    dropped: dict[str, str]  # source keys left out (skip_unconvertible) and why

    def summary(self) -> str:
        kinds = sorted(set(self.parsed.kinds().values()))
        line = (f"converted {len(self.parsed.modules)} modules ({', '.join(kinds) or 'none'}) from the {self.parsed.layout} "
                f"layout")
        if self.dropped:
            line += f"; left out {len(self.dropped)} keys that cannot be converted"
        return line


def convert_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, lora_format: str = "lora_ab",
                 alpha: float | None = None, dtype: torch.dtype | None = None, skip_unconvertible: bool = False,
                 module_paths: set[str] | None = None) -> Conversion:
    """Any layout ``parse_lora`` reads → our keys in ``lora_format`` (``export_tensors``). Keys that cannot be
    converted are an error naming them, or are left out with ``skip_unconvertible``. ``module_paths`` (a model's
    reference module paths) also refuses modules the model does not have. The source's metadata is kept (IC-LoRA
    settings such as ``reference_downscale_factor`` live there) except the entries that describe its scaling."""
    metadata = dict(metadata or {})
    parsed = parse_lora(tensors, metadata, alpha=alpha)
    problems = dict(parsed.unconvertible)
    if module_paths is not None:
        for path in [p for p in parsed.modules if p not in module_paths]:
            for suffix in parsed.modules.pop(path):
                problems[f"{path}{suffix}"] = "this model has no such module (a file for another model version?)"
    if problems and not skip_unconvertible:
        key, why = next(iter(problems.items()))
        raise ConfigError(f"{len(problems)} keys cannot be converted (first: {key}: {why}); "
                          "`ltx2-av-trainer verify` lists them, or leave them out (skip unconvertible)")
    if not parsed.modules:
        raise ConfigError("no adapter module to convert (no lora_A/B, lora_down/up, lokr_* or hada_* tensors of LTX-2 modules)")
    if dtype is None:
        found = [t.dtype for m in parsed.modules.values() for s, t in m.items() if s != ".alpha"]
        dtype = max(set(found), key=found.count)
    out = export_tensors(parsed.modules, lora_format, dtype)
    new_metadata = {k: v for k, v in metadata.items() if k not in _STALE_METADATA}
    kinds = parsed.kinds()
    new_metadata.update({
        METADATA_PREFIX + "lora_format": lora_format,
        METADATA_PREFIX + "groups": json.dumps(sorted({module_group(p) for p in parsed.modules} & set(GROUPS))),
        METADATA_PREFIX + "converted_from": json.dumps({
            "layout": parsed.layout, "keys": len(tensors), "modules": len(parsed.modules),
            "types": sorted(set(kinds.values())), "left_out": len(problems), "alpha_override": alpha}),
    })
    if kinds and all(k == "lora" for k in kinds.values()):
        new_metadata.setdefault(METADATA_PREFIX + "network_type", "lora")
    return Conversion(out, new_metadata, parsed, problems)
