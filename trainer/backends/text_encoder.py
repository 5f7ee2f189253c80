"""Prompts → ``TextContext``: a Gemma-3 text model, all its hidden states, then LTX-2's text connectors.

Follows diffusers' ``LTX2Pipeline`` conditioning path: prompts are stripped and LEFT-padded to a fixed
length (1024 on the real model), Gemma-3 runs with ``output_hidden_states=True``, the embedding
output and every layer's output are stacked on a last axis and flattened to ``[B, L, D·(layers+1)]``,
and ``LTX2TextConnectors`` turn that into the video and audio contexts. With learnable registers the
connectors move the real tokens to the front and fill the rest with registers, so the context mask
they return is all ones; the tokenizer mask (``tokenize``) is the one with the left padding.

Also here: the embedded tiny text encoder (random Gemma-3, tokenizer built at run time, no download),
``PrecomputedText`` for contexts computed elsewhere, and the exact weight checksum used by the
encoder fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import ConfigError, TinyModelConfig
from ..io_utils import save_safetensors_atomic
from .fingerprint import module_fingerprint, tokenizer_digest
from .interface import TextContext

REAL_MAX_TEXT_LENGTH = 1024
TINY_MAX_TEXT_LENGTH = 96  # room for a demo caption with its transcript (~75 tokens)
TINY_CONNECTOR_REGISTERS = 8
TINY_TEXT_LAYERS = 2
PRECOMPUTED_FORMAT = "ltx2-av-trainer/text-context/v1"

# Gemma-3 classes whose forward returns the language model's hidden states for text-only input.
SUPPORTED_TEXT_MODELS = ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3Model")


class TextSource(Protocol):
    """What the encoders need from a text path: contexts for prompts, and a fingerprint for the cache."""

    version: str

    def encode_text(self, prompts: list[str]) -> TextContext: ...

    def fingerprint(self) -> str: ...


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # [B, L], left-padded
    attention_mask: torch.Tensor  # [B, L], 0 on the left padding
    token_counts: list[int]  # tokens per prompt before truncation (special tokens included)


class TextEncoder:
    """Tokenizer + Gemma-3 + ``LTX2TextConnectors`` → ``TextContext`` (outputs on the connectors' device)."""

    def __init__(self, tokenizer, text_model: nn.Module, connectors: nn.Module, version: str,
                 max_length: int = REAL_MAX_TEXT_LENGTH):
        _check_connectors_version(connectors, version)
        for registers in (connectors.config.video_connector_num_learnable_registers,
                          connectors.config.audio_connector_num_learnable_registers):
            if registers and max_length % registers != 0:
                raise ConfigError(
                    f"text max length {max_length} must be a multiple of the connectors' {registers} learnable "
                    f"registers (the real model uses 1024 tokens and 128 registers)"
                )
        layers = _hidden_state_count(text_model)
        expected = connectors.config.text_proj_in_factor
        if layers != expected:
            raise ConfigError(
                f"the text model gives {layers} hidden states (layers + embeddings) but the connectors expect "
                f"{expected}; use the Gemma-3 text encoder that belongs to this LTX-2 checkpoint"
            )
        width = _text_hidden_size(text_model)
        if width != connectors.config.caption_channels:
            raise ConfigError(
                f"the text model's hidden size is {width} but the connectors expect {connectors.config.caption_channels}; "
                "use the Gemma-3 text encoder that belongs to this LTX-2 checkpoint"
            )
        self.tokenizer = tokenizer
        self.text_model = text_model.eval().requires_grad_(False)
        self.connectors = connectors.eval().requires_grad_(False)
        self.version = version
        self.max_length = max_length
        # Gemma conditioning is left-padded (the connectors' masked statistics assume it).
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        prompts = _clean_prompts(prompts)
        # Untruncated lengths, to warn about truncation ourselves (verbose=False: no generic warning).
        counts = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
        for prompt, count in zip(prompts, counts):
            if count > self.max_length:
                warnings.warn(
                    f"prompt of {count} tokens truncated to {self.max_length}: {prompt[:80]!r}...; shorten the caption",
                    stacklevel=2,
                )
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return TokenizedPrompts(batch["input_ids"], batch["attention_mask"], counts)

    @torch.no_grad()
    def hidden_states(self, tokens: TokenizedPrompts) -> torch.Tensor:
        """All Gemma hidden states, stacked and flattened: ``[B, L, D·(layers+1)]`` (D-major, as the
        connectors unflatten it)."""
        device = _module_device(self.text_model)
        # The base model (no LM head): Gemma's 262k-token logits for 1024 tokens are ~1 GB per prompt.
        outputs = self.text_model.base_model(
            input_ids=tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
        )
        return torch.stack(outputs.hidden_states, dim=-1).flatten(2, 3)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextContext:
        tokens = self.tokenize(prompts)
        device = _module_device(self.connectors)
        dtype = _module_dtype(self.connectors)
        embeddings = self.hidden_states(tokens).to(device=device, dtype=dtype)
        video, audio, mask = self.connectors(
            embeddings, tokens.attention_mask.to(device), padding_side=self.tokenizer.padding_side
        )
        return TextContext(video=video, audio=audio, mask=mask.to(torch.int64))

    def to(self, device) -> "TextEncoder":
        if not _is_quantized(self.text_model):  # bitsandbytes models stay where they were loaded
            self.text_model.to(device)
        self.connectors.to(device)
        return self

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"version": self.version, "max_length": self.max_length,
                             "padding_side": self.tokenizer.padding_side}, sort_keys=True).encode())
        h.update(tokenizer_digest(self.tokenizer).encode())
        h.update(module_fingerprint(self.text_model).encode())
        h.update(module_fingerprint(self.connectors).encode())
        return h.hexdigest()[:16]


# ---- precomputed contexts -------------------------------------------------------------------


class PrecomputedText:
    """Text contexts read from a safetensors file (``save_precomputed_text`` writes it): tensors
    ``video [N, L, Dv]``, ``audio [N, L, Da]``, ``mask [N, L]`` and the N prompts in the metadata."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if self.path.suffix != ".safetensors":
            raise ConfigError(f"{self.path}: precomputed text embeddings must be a .safetensors file")
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: precomputed text embeddings file not found")
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ConfigError(f"{self.path}: not a readable safetensors file ({exc})") from None
        if metadata.get("format") != PRECOMPUTED_FORMAT:
            raise ConfigError(
                f"{self.path}: metadata 'format' is {metadata.get('format')!r}, expected {PRECOMPUTED_FORMAT!r}; "
                "write the file with save_precomputed_text"
            )
        missing = [key for key in ("video", "audio", "mask") if key not in tensors]
        if missing:
            raise ConfigError(f"{self.path}: missing tensors {missing}; expected video, audio and mask")
        self.version = metadata.get("model_version", "")
        if self.version not in ("2.0", "2.3"):
            raise ConfigError(f"{self.path}: metadata 'model_version' must be '2.0' or '2.3', got {self.version!r}")
        try:
            prompts = json.loads(metadata.get("prompts", ""))
        except json.JSONDecodeError:
            prompts = None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{self.path}: metadata 'prompts' must be a JSON list of the prompt strings")
        video, audio, mask = tensors["video"], tensors["audio"], tensors["mask"]
        count = len(prompts)
        if not (video.ndim == 3 and audio.ndim == 3 and mask.ndim == 2
                and video.shape[:2] == audio.shape[:2] == mask.shape and video.shape[0] == count):
            raise ConfigError(
                f"{self.path}: inconsistent shapes video {tuple(video.shape)}, audio {tuple(audio.shape)}, "
                f"mask {tuple(mask.shape)} for {count} prompts; expected [N, L, D], [N, L, D'], [N, L]"
            )
        self.index: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            if prompt in self.index:
                raise ConfigError(f"{self.path}: prompt {prompt!r} appears twice")
            self.index[prompt] = i
        self.prompts: list[str] = prompts
        self.video, self.audio, self.mask = video, audio, mask.to(torch.int64)

    @property
    def widths(self) -> tuple[int, int]:
        return int(self.video.shape[-1]), int(self.audio.shape[-1])

    def encode_text(self, prompts: list[str]) -> TextContext:
        rows = []
        for prompt in _clean_prompts(prompts):
            if prompt not in self.index:
                raise ConfigError(
                    f"{self.path}: no precomputed text context for prompt {prompt!r} ({len(self.prompts)} prompts "
                    "stored); recompute the file with the current captions"
                )
            rows.append(self.index[prompt])
        index = torch.tensor(rows, dtype=torch.long)
        return TextContext(self.video[index], self.audio[index], self.mask[index])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        return h.hexdigest()[:16]


def save_precomputed_text(path: str | Path, prompts: list[str], context: TextContext, version: str) -> None:
    """Write contexts for ``prompts`` (row i ↔ prompt i) in the format ``PrecomputedText`` reads."""
    prompts = _clean_prompts(prompts)
    if len(prompts) != context.video.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {context.video.shape[0]} context rows")
    if version not in ("2.0", "2.3"):
        raise ValueError(f"version must be '2.0' or '2.3', got {version!r}")
    metadata = {"format": PRECOMPUTED_FORMAT, "model_version": version, "prompts": json.dumps(prompts)}
    tensors = {"video": context.video, "audio": context.audio, "mask": context.mask.to(torch.int64)}
    save_safetensors_atomic(tensors, path, metadata=metadata)


# ---- the embedded tiny text encoder -------------------------------------------------------------

# Words the tiny tokenizer learns whole; anything else falls back to byte-level pieces.
_TINY_VOCABULARY_TEXT = """
a an the this that with without and or of in on at to from by for while as is are
person man woman boy girl child speaker singer actor character voice face head eyes mouth lips hair smile
speaks says talks sings laughs whispers shouts reads tells explains answers asks smiles nods looks turns
speaking saying talking singing laughing whispering shouting reading telling explaining smiling looking
calm deep high low bright warm soft loud quiet clear rough gentle happy sad angry serious friendly
close up medium wide shot camera frame scene video clip audio sound music noise silence background
room studio office street park kitchen stage outdoor indoor light dark day night window wall table
red blue green black white yellow brown grey gray young old short long
""".split()


def build_tiny_tokenizer(max_length: int = TINY_MAX_TEXT_LENGTH):
    """A byte-level BPE tokenizer trained here, deterministically, on a small built-in word list:
    every string is encodable (byte fallback), nothing is downloaded. ``<bos>`` is prepended like
    Gemma's tokenizer does; padding is on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _TINY_VOCABULARY_TEXT
    sentences = [" ".join(words[i : i + 8]) for i in range(len(words))]
    backend.train_from_iterator(sentences, trainer)
    bos_id = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=max_length,
    )


def tiny_gemma_config(tiny: TinyModelConfig, tokenizer):
    """A 2-layer Gemma-3 text config whose hidden size is the tiny model's caption width."""
    from transformers import Gemma3TextConfig

    heads = 2
    if tiny.caption_channels % heads != 0:
        raise ConfigError(f"model.tiny.caption_channels must be even, got {tiny.caption_channels}")
    head_dim = tiny.caption_channels // heads
    return Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.caption_channels,
        intermediate_size=2 * tiny.caption_channels,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        # Like the real model: local (sliding-window) layers followed by a global one.
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=TINY_MAX_TEXT_LENGTH // 2,
        max_position_embeddings=4 * TINY_MAX_TEXT_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def tiny_connectors_config(version: str, tiny: TinyModelConfig) -> dict:
    """``LTX2TextConnectors`` config matching ``tiny_transformer_config(version, tiny)``.

    LTX-2.0: one shared projection to the caption width; both connectors keep that width (the
    transformer projects the contexts itself). LTX-2.3: per-modality projections straight to the
    transformer's video / audio inner widths, gated attention, biased projections.
    """
    _check_version(version)
    common = dict(
        caption_channels=tiny.caption_channels,
        text_proj_in_factor=TINY_TEXT_LAYERS + 1,
        video_connector_num_layers=2,
        audio_connector_num_layers=2,
        video_connector_num_learnable_registers=TINY_CONNECTOR_REGISTERS,
        audio_connector_num_learnable_registers=TINY_CONNECTOR_REGISTERS,
        connector_rope_base_seq_len=4096,
        rope_theta=10000.0,
        rope_double_precision=True,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    if version == "2.0":
        heads = 2
        return dict(
            common,
            video_connector_num_attention_heads=heads,
            video_connector_attention_head_dim=tiny.caption_channels // heads,
            audio_connector_num_attention_heads=heads,
            audio_connector_attention_head_dim=tiny.caption_channels // heads,
            video_gated_attn=False,
            audio_gated_attn=False,
            per_modality_projections=False,
            proj_bias=False,
        )
    return dict(
        common,
        video_connector_num_attention_heads=tiny.num_attention_heads,
        video_connector_attention_head_dim=tiny.attention_head_dim,
        audio_connector_num_attention_heads=tiny.audio_num_attention_heads,
        audio_connector_attention_head_dim=tiny.audio_attention_head_dim,
        video_gated_attn=True,
        audio_gated_attn=True,
        per_modality_projections=True,
        video_hidden_dim=tiny.num_attention_heads * tiny.attention_head_dim,
        audio_hidden_dim=tiny.audio_num_attention_heads * tiny.audio_attention_head_dim,
        proj_bias=True,
    )


def build_tiny_text_encoder(version: str, tiny: TinyModelConfig, seed: int = 0) -> TextEncoder:
    """Seeded random Gemma-3 + connectors; the same arguments always give the same weights."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from transformers import Gemma3TextModel

    tokenizer = build_tiny_tokenizer(TINY_MAX_TEXT_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_model = Gemma3TextModel(tiny_gemma_config(tiny, tokenizer))
        torch.manual_seed(seed + 1)
        connectors = LTX2TextConnectors(**tiny_connectors_config(version, tiny))
    return TextEncoder(tokenizer, text_model, connectors, version, max_length=TINY_MAX_TEXT_LENGTH)


# ---- loading real weights -------------------------------------------------------------------


def load_text_encoder(
    text_model_dir: str | Path,
    tokenizer_dir: str | Path,
    connectors_dir: str | Path,
    version: str,
    dtype: torch.dtype = torch.bfloat16,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
    max_length: int = REAL_MAX_TEXT_LENGTH,
) -> TextEncoder:
    """Gemma-3 (``text_model_dir``), its tokenizer and ``LTX2TextConnectors`` from local folders only.

    ``quantization`` is None, ``"8bit"`` or ``"4bit"`` (bitsandbytes; CUDA only). A quantized model
    is placed on ``device`` when loaded and stays there.
    """
    import transformers
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    _check_version(version)
    text_model_dir, tokenizer_dir, connectors_dir = Path(text_model_dir), Path(tokenizer_dir), Path(connectors_dir)
    config_path = text_model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{text_model_dir}: no config.json; point the text encoder path at a Gemma-3 model folder")
    architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_TEXT_MODELS), None)
    if arch is None:
        raise ConfigError(
            f"{config_path}: architectures {architectures} is not a supported Gemma-3 text encoder; "
            f"expected one of {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    kwargs: dict = dict(local_files_only=True, dtype=dtype)
    if quantization is not None:
        kwargs["quantization_config"] = _bitsandbytes_config(quantization, dtype)
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    text_model = getattr(transformers, arch).from_pretrained(str(text_model_dir), **kwargs)
    if quantization is None:
        text_model.to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    connectors = LTX2TextConnectors.from_pretrained(str(connectors_dir), local_files_only=True, torch_dtype=dtype)
    connectors.to(device)
    return TextEncoder(tokenizer, text_model, connectors, version, max_length=max_length)


def _bitsandbytes_config(quantization: str, dtype: torch.dtype):
    if quantization not in ("8bit", "4bit"):
        raise ConfigError(f"text encoder quantization must be None, '8bit' or '4bit', got {quantization!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{quantization} Gemma needs a CUDA GPU (bitsandbytes); on this machine load the text encoder "
            "in bf16 or fp32 instead, or precompute the text contexts elsewhere (PrecomputedText)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{quantization} Gemma needs the bitsandbytes package: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


# ---- fingerprints -------------------------------------------------------------------------------

# ---- helpers ------------------------------------------------------------------------------------


def _check_version(version: str) -> None:
    if version not in ("2.0", "2.3"):
        raise ConfigError(f"model.version must be '2.0' or '2.3', got {version!r}")


def _check_connectors_version(connectors: nn.Module, version: str) -> None:
    _check_version(version)
    per_modality = bool(connectors.config.per_modality_projections)
    if per_modality != (version == "2.3"):
        found = "2.3" if per_modality else "2.0"
        raise ConfigError(
            f"model.version is {version!r} but the text connectors are LTX-{found} (per-modality projections "
            f"{'present' if per_modality else 'absent'}); set model.version = \"{found}\""
        )


def _clean_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    return [p.strip() for p in prompts]


def _text_config(text_model: nn.Module):
    config = text_model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _hidden_state_count(text_model: nn.Module) -> int:
    return int(_text_config(text_model).num_hidden_layers) + 1


def _text_hidden_size(text_model: nn.Module) -> int:
    return int(_text_config(text_model).hidden_size)


def _is_quantized(module: nn.Module) -> bool:
    return getattr(module, "quantization_method", None) is not None or getattr(module, "is_quantized", False)


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
