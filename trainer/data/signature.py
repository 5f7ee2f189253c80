"""A cheap content signature of a dataset: what changes when a clip is added, removed, replaced or edited, or a
caption is rewritten, without decoding or hashing any media.

ComfyUI re-executes a node only when its inputs' signature changes, and a dataset node's inputs (a folder name)
stay the same when the folder's content changes; the Load Dataset node returns this signature from its
``fingerprint_inputs``. It lists the dataset as the trainer does (``scan_dataset``, which reads the captions) and
records, per item, the media and audio files' sizes and modification times and the caption text, plus the
listing's problems and the JSONL files themselves. Cost: one directory walk and the caption files, a few
milliseconds per hundred clips.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..config import DatasetConfig
from .dataset import scan_dataset


def _file_state(path: Path | None) -> list:
    if path is None:
        return []
    try:
        stat = path.stat()
    except OSError:
        return [str(path), "absent"]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def dataset_signature(dataset: DatasetConfig) -> str:
    """A digest that changes with the dataset's settings, its list of items, any media or audio file's size or
    modification time, and any caption's text."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(dataset), sort_keys=True, default=str).encode())
    for source in dataset.sources:
        if source.kind == "jsonl":
            h.update(json.dumps(_file_state(Path(source.path))).encode())
    scan = scan_dataset(dataset)
    for problem in scan.problems:
        h.update(f"problem|{problem.severity}|{problem.message}\n".encode())
    for item in sorted(scan.items, key=lambda item: item.key):
        row = [item.key, item.raw_caption, _file_state(item.media_path), _file_state(item.audio_path), item.problems]
        h.update(json.dumps(row).encode() + b"\n")
    return h.hexdigest()
