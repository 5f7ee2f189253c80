"""Voice Score: how close an AUDIO is to the dataset's voice (Resemblyzer speaker similarity).

Thin: the reference and the score come from ``trainer/evaluation/voice_score``. Connect the A/B outputs of Sample A/B to
two Voice Score nodes to see the gain the LoRA brings (same seed and prompt, with and without it).
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainer.evaluation.voice_score import VoiceReference, score_waveform
from .types import CATEGORY_CHECK, CacheType

# References are built once per cache folder (decoding and embedding every clip takes seconds).
_REFERENCES: dict[str, VoiceReference] = {}


def reference_for(cache: dict | None, reference_file: str) -> VoiceReference:
    if reference_file.strip():
        path = Path(reference_file.strip())
        if not path.is_file():
            raise ValueError(f"reference_file {path} does not exist; save one with `ltx2-av-trainer score --save-reference`")
        key = f"file:{path.resolve()}"
        if key not in _REFERENCES:
            _REFERENCES[key] = VoiceReference.load(path)
        return _REFERENCES[key]
    if cache is None:
        raise ValueError("no reference voice: connect the cache output of LTX2AV Cache Latents, or give reference_file")
    key = f"cache:{Path(cache['cache_dir']).resolve()}"
    if key not in _REFERENCES:
        _REFERENCES[key] = VoiceReference.from_cache(cache["cache_dir"])
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
                                tooltip="Or a saved reference JSON (`ltx2-av-trainer score --save-reference`); used instead of the cache when set."),
            ],
            outputs=[
                io.Float.Output("score", tooltip="Cosine similarity with the dataset voice (higher is closer)."),
                io.String.Output("report", tooltip="The score, how the dataset's own clips score (the ceiling), and whether speech was detected."),
            ],
            is_output_node=True,
        )

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
