"""What a sampling run is: its inputs as items, cut into shards, and the settings every actor
builds its engine from. The job is written beside the outputs (`run.json`) before the first
shard, so a resumed run can prove it is the same run.

Seeds: sample i of a class or caption run uses seed `seed + i` (mod 2**63), exactly what
`llamagen generate --seed S` gives its image i, so one sample is regenerated alone with
`llamagen generate --labels L --seed <its seed>`. A Batch line's images use the line's own
`seed` (+ i, as the server does) or, without one, `seed + line * max_images_per_request + i`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from model_registry.model_dir import ModelDir

Kind = Literal["classes", "captions", "batch"]
Output = Literal["npz", "images"]
SEED_MODULUS = 2**63


class SampleJob(BaseModel):
    """Everything an actor needs, and everything that decides a sample's pixels."""

    kind: Kind
    model: str  # the model directory (on every node of a cluster)
    model_sha256: str
    served_names: list[str]  # what a Batch line's `model` may say
    seed: int = Field(ge=0, lt=SEED_MODULUS)
    sampling: dict[str, Any]  # the given sampling values (the model's defaults fill the rest)
    engine: dict[str, Any]  # EngineSettings
    outputs: list[Output]
    image_format: str = "png"
    compression: int | None = None
    shard_size: int = Field(ge=1)
    decode_batch: int = Field(32, ge=1)
    max_images_per_request: int = 10
    max_output_size: int = 2048
    items: int  # samples (classes, captions) or lines (batch)
    items_sha256: str

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed run to continue this one (not where it runs)."""
        return self.model_dump(exclude={"model"})

    def sample_seed(self, index: int) -> int:
        return (self.seed + index) % SEED_MODULUS

    def line_seed(self, line: int) -> int:
        return (self.seed + line * self.max_images_per_request) % SEED_MODULUS


def digest(items: Sequence[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def shards(items: Sequence[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [list(items[start: start + size]) for start in range(0, len(items), size)]


# ---- inputs -> items (one per sample, or one per Batch line) ----

class InputError(ValueError):
    """An input that cannot start a run (one line, exit 2)."""


def class_items(model: ModelDir, num_samples: int, labels: str, seed: int,
                label_file: str | None = None) -> list[dict[str, Any]]:
    """`uniform`: labels drawn uniformly over the classes from the run's seed (as the
    original's sampler draws them); `balanced`: sample i has class i mod classes, so every
    class has N / classes samples when the classes divide N (else the first N mod classes
    classes have one more). `label_file`: one class id or name per line."""
    if label_file is not None:
        lines = read_lines(label_file)
        found = []
        for number, text in lines:
            try:
                found.append(model.resolve_label(text))
            except ValueError as e:
                raise InputError(f"{label_file}:{number}: {e}") from None
        if not found:
            raise InputError(f"{label_file}: no labels")
        chosen = found
    elif labels == "balanced":
        chosen = [i % model.gpt.num_classes for i in range(num_samples)]
    else:
        rng = np.random.Generator(np.random.PCG64(seed))
        chosen = rng.integers(0, model.gpt.num_classes, num_samples).tolist()
    return [{"index": i, "label": int(label)} for i, label in enumerate(chosen)]


def caption_items(path: str) -> list[dict[str, Any]]:
    """Text lines, one caption each, or JSONL with a `caption` (or `prompt`) string each;
    blank lines are skipped."""
    captions = []
    for number, text in read_lines(path):
        if path.endswith((".jsonl", ".json")) or text.lstrip().startswith("{"):
            try:
                record = json.loads(text)
            except ValueError:
                raise InputError(f"{path}:{number}: not a JSON object") from None
            caption = (record.get("caption", record.get("prompt"))
                       if isinstance(record, dict) else None)
            if not isinstance(caption, str) or not caption.strip():
                raise InputError(f"{path}:{number}: expected a non-empty \"caption\" string")
            text = caption
        captions.append(text)
    if not captions:
        raise InputError(f"{path}: no captions")
    return [{"index": i, "caption": c} for i, c in enumerate(captions)]


def batch_items(path: str) -> list[dict[str, Any]]:
    """OpenAI Batch input lines, kept as text: each is checked by the actor that runs it, so
    a bad line becomes its own error line and never stops the run."""
    lines, seen = [], set()
    for i, (_, text) in enumerate(read_lines(path)):
        item: dict[str, Any] = {"line": i, "text": text}
        try:
            custom_id = json.loads(text).get("custom_id")
        except (ValueError, AttributeError):
            custom_id = None
        if isinstance(custom_id, str):
            if custom_id in seen:
                item["duplicate"] = True
            seen.add(custom_id)
        lines.append(item)
    if not lines:
        raise InputError(f"{path}: no requests")
    return lines


def read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"{path}: {why}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
