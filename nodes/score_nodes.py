"""Voice Score: how close an AUDIO is to the dataset's voice (Resemblyzer speaker similarity).

Thin: the reference and the score come from ``trainer/evaluation/voice_score``. Connect the A/B outputs of Sample A/B to
two Voice Score nodes to see the gain the LoRA brings (same seed and prompt, with and without it).
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainer.evaluation.voice_score import VoiceReference, score_waveform
from .types import CACHE_ROOT, CATEGORY_CHECK, CacheType, file_state, resolve_input_path

# References are built once per cache folder and state (decoding and embedding every clip takes seconds).
_REFERENCES: dict[tuple, VoiceReference] = {}


def reference_path(reference_file: str) -> Path:
    """A saved reference JSON or a cache folder: relative names are looked up in ComfyUI's input folder, then
    in output/ltx2av_cache (so the cache_name of an earlier Cache Latents run works); confined to the folders
    nodes may read."""
    import folder_paths

    caches = Path(folder_paths.get_output_directory()) / CACHE_ROOT
    path = resolve_input_path(reference_file, "reference_file",
                              relative_to=[Path(folder_paths.get_input_directory()), caches])
    if not path.exists():
        raise ValueError(f"reference_file {reference_file!r}: neither {path} nor a cache of that name exists; give "
                         "the cache_name of a Cache Latents run or a reference saved with `ltx2-av-trainer score "
                         "--save-reference` (in ComfyUI's input folder)")
    return path


def reference_for(cache: dict | None, reference_file: str) -> VoiceReference:
    if reference_file.strip():
        path = reference_path(reference_file)
    elif cache is not None:
        path = Path(cache["cache_dir"])
    else:
        raise ValueError("no reference voice: connect the cache output of LTX2AV Cache Latents, or give "
                         "reference_file (a cache_name or a saved reference)")
    is_cache = path.is_dir()
    # A cache that was extended or rebuilt has another manifest: its voice is built again.
    key = (str(path.resolve()), file_state(path / "manifest.json" if is_cache else path))
    if key not in _REFERENCES:
        _REFERENCES[key] = VoiceReference.from_cache(path) if is_cache else VoiceReference.load(path)
    return _REFERENCES[key]


class VoiceScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LTX2AV_VoiceScore",
            display_name="LTX2AV Voice Score",
            category=CATEGORY_CHECK,
            description="Speaker similarity (0-1) of an AUDIO with the dataset's voice: the mean Resemblyzer embedding "
                        "of the voiced parts of the dataset's clips. Compare the LoRA and base samples of the same seed.",
            inputs=[
                io.Audio.Input("audio", tooltip="The audio to score, e.g. audio_lora or audio_base of LTX2AV Sample A/B."),
                CacheType.Input("cache", optional=True, tooltip="From LTX2AV Cache Latents: the dataset voice is built from its source clips."),
                io.String.Input("reference_file", default="", optional=True,
                                tooltip="Used instead of the cache input when set: the cache_name of a Cache Latents run (a folder in output/ltx2av_cache), or a reference JSON saved with `ltx2-av-trainer score --save-reference` (relative to ComfyUI's input folder)."),
            ],
            outputs=[
                io.Float.Output("score", tooltip="Cosine similarity with the dataset voice (higher is closer)."),
                io.String.Output("report", tooltip="The score, how the dataset's own clips score (the ceiling), and whether speech was detected."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, reference_file: str = "", **_):
        # A reference named by the widget is re-read when it changes (a connected cache re-runs this node itself).
        if not (reference_file or "").strip():
            return ""
        try:
            path = reference_path(reference_file)
        except ValueError as exc:
            return f"unusable: {exc}"
        return (str(path), file_state(path / "manifest.json" if path.is_dir() else path))

    @classmethod
    def execute(cls, audio, cache=None, reference_file: str = "") -> io.NodeOutput:
        reference = reference_for(cache, reference_file or "")
        waveform = audio["waveform"]
        if waveform.ndim == 3:
            waveform = waveform[0]
        score = score_waveform(waveform, int(audio["sample_rate"]), reference)
        text = (f"voice score {score.similarity:.3f} (the dataset's own clips score {reference.typical_similarity:.3f}); "
                f"{score.voiced_seconds:.1f} s of {score.seconds:.1f} s voiced"
                + ("" if score.speech_detected else "; no speech detected: the score means little"))
        return io.NodeOutput(score.similarity, text, ui={"text": [text]})
