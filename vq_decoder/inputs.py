"""Images coming in (an edit's input image and mask): read safely, fitted to the model.

An upload must be a PNG, JPEG or WebP (the formats of `encoding.IMAGE_FORMATS`) of at most
`max_pixels` pixels; anything else is an `ImageInputError` saying what is wrong. A picture
that is not the model's size is fitted the way the original prepares its training images
(ADM's `center_crop_arr`): halved with a box filter while its short side is at least twice
the target, resized with bicubic filtering so the short side equals the target, then cropped
to the centred square. A mask takes exactly the same geometry with nearest-neighbour
sampling, so its transparent pixels stay where they were drawn.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from vq_decoder.encoding import IMAGE_FORMATS, FormatSpec

BY_PILLOW = {spec.pillow: spec for spec in IMAGE_FORMATS.values()}


class ImageInputError(ValueError):
    """An uploaded file that cannot be used; the message says why."""


def read_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, FormatSpec]:
    """File bytes -> a decoded Pillow image and its format, or ImageInputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning,
            Image.DecompressionBombError, OSError) as e:
        raise ImageInputError("not a readable image: send a PNG, JPEG or WebP file") from e
    spec = BY_PILLOW.get(image.format or "")
    if spec is None:
        raise ImageInputError(f"unsupported image format {image.format}: send a PNG, JPEG or "
                              "WebP file")
    if image.width * image.height > max_pixels:
        raise ImageInputError(f"the image has {image.width}x{image.height} pixels, more than "
                              f"the {max_pixels} accepted")
    try:
        image.load()
    except Exception as e:  # truncated or corrupt data: Pillow raises several kinds
        raise ImageInputError(f"the {spec.name} file is damaged: {e}") from e
    return image, spec


def _fit(image: Image.Image, size: int, reduce: Image.Resampling,
         resize: Image.Resampling) -> Image.Image:
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=reduce)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=resize)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """Any picture -> uint8 (size, size, 3) RGB, by the original's centre-crop rule (an
    alpha channel is dropped: the model draws opaque images)."""
    rgb = image.convert("RGB")
    if rgb.size == (size, size):
        return np.asarray(rgb, dtype=np.uint8).copy()
    return np.asarray(_fit(rgb, size, Image.Resampling.BOX, Image.Resampling.BICUBIC),
                      dtype=np.uint8).copy()


def mask_redrawn(mask: Image.Image, size: int) -> np.ndarray:
    """A mask (transparent where to redraw) -> bool (size, size), True where fully
    transparent, fitted with the image's geometry."""
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise ImageInputError("the mask has no alpha channel: its fully transparent pixels "
                              "mark what to redraw")
    alpha = mask.convert("RGBA").getchannel("A")
    if alpha.size != (size, size):
        alpha = _fit(alpha, size, Image.Resampling.NEAREST, Image.Resampling.NEAREST)
    return np.asarray(alpha) == 0
