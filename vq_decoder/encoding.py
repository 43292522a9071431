"""Image files with provenance: PNG, JPEG and WebP through Pillow, and reading it back.

Every image says where it came from: model, checkpoint sha256, seed, sampling parameters,
class or prompt, software version, creation time, and the IPTC digital source type for
AI-generated media. The record is JSON, stored the way each format carries text:

- PNG: a `llamagen` iTXt chunk with the JSON, plus XMP (iTXt `XML:com.adobe.xmp`);
- JPEG and WebP: EXIF `ImageDescription` with the JSON, `Software`, `DateTime`, plus XMP.

The XMP packet holds `Iptc4xmpExt:DigitalSourceType` = trainedAlgorithmicMedia, which
content-credential tools read.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, PngImagePlugin

ImageFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class FormatSpec:
    """One image format: its API name, file extension, media type and how Pillow saves it.

    compression is 0..100 as in the OpenAI API (`output_compression`): JPEG/WebP quality is
    100 - compression, PNG's zlib level is compression * 9 / 100. None: quality 90, level 6.
    """

    name: ImageFormat
    extension: str
    media_type: str
    pillow: str  # Pillow's format name

    def save_options(self, compression: int | None) -> dict[str, Any]:
        if self.name == "png":
            return {"compress_level": 6 if compression is None else round(compression * 9 / 100)}
        return {"quality": 90 if compression is None else max(1, 100 - compression)}


# The one image-format table: encoding, the image store, the API protocol and the CLI read it.
IMAGE_FORMATS: dict[str, FormatSpec] = {
    "png": FormatSpec("png", "png", "image/png", "PNG"),
    "jpeg": FormatSpec("jpeg", "jpg", "image/jpeg", "JPEG"),
    "webp": FormatSpec("webp", "webp", "image/webp", "WEBP"),
}
assert tuple(IMAGE_FORMATS) == get_args(ImageFormat)
BY_EXTENSION = {spec.extension: spec for spec in IMAGE_FORMATS.values()}
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# An edit keeps part of its input image and generates the rest.
EDITED_SOURCE_TYPE = ("http://cv.iptc.org/newscodes/digitalsourcetype/"
                      "compositeWithTrainedAlgorithmicMedia")
PNG_KEY = "llamagen"
EXIF_IMAGE_DESCRIPTION, EXIF_SOFTWARE, EXIF_DATETIME = 0x010E, 0x0131, 0x0132


def provenance(*, model: str, checkpoint_sha256: str, seed: int | None,
               sampling: dict[str, Any], software: str, label: int | None = None,
               class_name: str | None = None, prompt: str | None = None,
               unconditional: bool = False, edit: dict[str, Any] | None = None,
               resampled: dict[str, Any] | None = None,
               negative: dict[str, Any] | None = None,
               lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record every image carries; `edit` (for a completion of an input image: rows
    kept, the input's sha256) makes its digital source type a composite; `unconditional`:
    drawn under the null condition (a variation); `resampled`: the size drawn, the size
    delivered and the filter between them; `negative`: what guidance steered away from (a
    class's label and name, or a caption); `lora`: the LoRA adapter the model ran with (its
    name and the sha256 of its weights)."""
    record: dict[str, Any] = {
        "model": model, "checkpoint_sha256": checkpoint_sha256, "seed": seed,
        "sampling": sampling, "software": software,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "digital_source_type": DIGITAL_SOURCE_TYPE if edit is None else EDITED_SOURCE_TYPE,
    }
    if edit is not None:
        record["edit"] = edit
    if label is not None:
        record["class_label"] = label
    if class_name is not None:
        record["class_name"] = class_name
    if prompt is not None:
        record["prompt"] = prompt
    if unconditional:
        record["unconditional"] = True
    if negative is not None:
        record["negative"] = negative
    if lora is not None:
        record["lora"] = lora
    if resampled is not None:
        record["resampled"] = resampled
    return record


# A size other than the model's native one is resampled with Lanczos (a windowed sinc:
# sharp edges without the blockiness of nearest-neighbour or the blur of bilinear; Pillow's
# implementation also antialiases when shrinking).
RESAMPLE_FILTER = "lanczos"


def resample(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), with RESAMPLE_FILTER."""
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def _xmp(record: dict[str, Any]) -> bytes:
    source = record.get("digital_source_type", DIGITAL_SOURCE_TYPE)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'Iptc4xmpExt:DigitalSourceType="{escape(str(source))}" '
        f'xmp:CreatorTool="{escape(str(record.get("software", "")), {chr(34): "&quot;"})}" '
        f'xmp:CreateDate="{escape(str(record.get("created", "")))}">'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        f'{escape(json.dumps(record))}</rdf:li></rdf:Alt></dc:description>'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def encode_image(pixels: np.ndarray, fmt: ImageFormat = "png", *,
                 metadata: dict[str, Any] | None = None, compression: int | None = None
                 ) -> bytes:
    """uint8 (H, W, 3) -> file bytes (compression: see `FormatSpec`)."""
    spec = IMAGE_FORMATS.get(fmt)
    if spec is None:
        raise ValueError(f"unsupported image format {fmt!r}; choose one of "
                         f"{', '.join(IMAGE_FORMATS)}")
    if compression is not None and not 0 <= compression <= 100:
        raise ValueError("compression must be in 0..100")
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    record = metadata or {}
    text = json.dumps(record)
    buf = io.BytesIO()
    if spec.name == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PNG_KEY, text)
        info.add_itxt("XML:com.adobe.xmp", _xmp(record).decode())
        image.save(buf, spec.pillow, pnginfo=info, **spec.save_options(compression))
    else:
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = text
        exif[EXIF_SOFTWARE] = str(record.get("software", "llamagen-serve"))
        exif[EXIF_DATETIME] = datetime.now(UTC).strftime("%Y:%m:%d %H:%M:%S")
        image.save(buf, spec.pillow, exif=exif, xmp=_xmp(record),
                   **spec.save_options(compression))
    return buf.getvalue()


def read_metadata(data: bytes) -> dict[str, Any]:
    """The provenance record of an image made by `encode_image` ({} if it has none), with the
    XMP digital source type as `xmp_digital_source_type`."""
    image = Image.open(io.BytesIO(data))
    record: dict[str, Any] = {}
    if image.format == "PNG":
        raw = image.info.get(PNG_KEY)
        if raw:
            record = json.loads(raw)
        xmp = image.info.get("XML:com.adobe.xmp", "")
    else:
        description = image.getexif().get(EXIF_IMAGE_DESCRIPTION)
        if description:
            record = json.loads(description)
        xmp = image.info.get("xmp", b"")
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    match = re.search(r'Iptc4xmpExt:DigitalSourceType="([^"]+)"', xmp or "")
    if match:
        record["xmp_digital_source_type"] = match.group(1)
    return record
