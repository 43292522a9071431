"""Image files with provenance: what every path that writes an image (API responses, stream
events, `llamagen generate --out-dir`) encodes through. Each file carries the unsigned
provenance record (PNG text, EXIF, XMP) and, when signing is on, the same record in a signed
C2PA manifest (`engine.credentials`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from engine.conditions import Condition
from engine.credentials import ContentCredentials
from engine.decoding import decode_grids
from engine.sampling import SamplingOptions
from model_registry.convert import software_version
from model_registry.model_dir import ModelDir
from vq_decoder.encoding import (
    IMAGE_FORMATS,
    RESAMPLE_FILTER,
    ImageFormat,
    encode_image,
    provenance,
    resample,
)


@dataclass(frozen=True)
class EditSource:
    """An edit's input: the uploaded file (the C2PA ingredient), its media type, and how
    many token rows of it the result keeps."""

    data: bytes
    media_type: str
    kept_rows: int
    grid_rows: int
    variation: bool = False  # the rest redrawn without a condition

    @cached_property
    def sha256(self) -> str:  # once per request, not per image written
        return hashlib.sha256(self.data).hexdigest()

    def recorded(self) -> dict[str, Any]:
        record = {"kept_rows": self.kept_rows, "grid_rows": self.grid_rows,
                  "source_sha256": self.sha256}
        return {**record, "variation": True} if self.variation else record


def prefix_record(prefix: Sequence[int], grid_tokens: int) -> dict[str, Any]:
    """A completion of given image tokens (no input file): how many it starts from, and
    their sha256 (of the list as compact JSON, "[1,2,3]") to match them against a claim."""
    given = json.dumps([int(t) for t in prefix], separators=(",", ":"))
    return {"kept_tokens": len(prefix), "grid_tokens": grid_tokens,
            "prefix_sha256": hashlib.sha256(given.encode()).hexdigest()}


@dataclass(frozen=True)
class ImageWriter:
    """Encodes the images of one request: its model, sampling settings and output format."""

    model: ModelDir
    options: SamplingOptions
    format: ImageFormat = "png"
    compression: int | None = None
    credentials: ContentCredentials | None = None  # None: unsigned
    edit: EditSource | None = None  # an edit's images: what they were edited from
    size: int | None = None  # the side delivered, when not the model's own (resampled)
    adapter: dict[str, Any] | None = None  # the LoRA adapter drawn with (`Adapter.describe`)

    def provenance(self, condition: Condition, seed: int | None, prefix: Sequence[int] = ()
                   ) -> dict[str, Any]:
        """`prefix`: the given image tokens a completion starts from (without an input file:
        an edit's writer records its file instead)."""
        if self.edit is not None:
            edit = self.edit.recorded()
        else:
            edit = prefix_record(prefix, self.model.gpt.block_size) if prefix else None
        return provenance(model=self.model.name, checkpoint_sha256=self.model.gpt_sha256,
                          seed=seed, sampling=self.options.recorded(),
                          software=f"llamagen-serve {software_version()}", edit=edit,
                          resampled=self._resampled(), lora=self.adapter,
                          **condition.describe(self.model))

    def _resampled(self) -> dict[str, Any] | None:
        native = self.model.image_size
        if self.size is None or self.size == native:
            return None
        return {"native_size": f"{native}x{native}", "size": f"{self.size}x{self.size}",
                "filter": RESAMPLE_FILTER}

    def encode(self, pixels: np.ndarray, condition: Condition, seed: int | None,
               prefix: Sequence[int] = ()) -> bytes:
        """uint8 (H, W, 3) at the model's size -> the file's bytes at the writer's size,
        carrying the image's provenance (signed when the writer has credentials; raises
        SigningError if that fails)."""
        record = self.provenance(condition, seed, prefix)
        if "resampled" in record and self.size is not None:
            pixels = resample(pixels, self.size)
        data = encode_image(pixels, self.format, metadata=record, compression=self.compression)
        if self.credentials is None:
            return data
        if self.edit is None:
            return self.credentials.sign(data, self.format, record)
        return self.credentials.sign(data, self.format, record,
                                     ingredient=(self.edit.data, self.edit.media_type))

    def save(self, tokens: Sequence[Sequence[int]], conditions: Sequence[Condition],
             seeds: Sequence[int | None], out_dir: Path, batch_size: int = 32,
             prefixes: Sequence[Sequence[int]] | None = None) -> list[Path]:
        """Decode token grids and write exactly one file per image, `{index:04d}_{label}.{ext}`
        (c2i) or `{index:04d}.{ext}` (t2i); `prefixes`: the given tokens each completed."""
        extension = IMAGE_FORMATS[self.format].extension
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        pixels = decode_grids(self.model.vq_decoder(), tokens, batch_size)
        for i, (image, condition) in enumerate(zip(pixels, conditions, strict=True)):
            stem = f"{i:04d}" if condition.label is None else f"{i:04d}_{condition.label}"
            path = out_dir / f"{stem}.{extension}"
            prefix = prefixes[i] if prefixes is not None else ()
            path.write_bytes(self.encode(image, condition, seeds[i], prefix))
            paths.append(path)
        return paths
