"""The demo dataset, made by code: ten classes of coloured shapes at random positions, sizes
and rotations on varied backgrounds. No downloads; the same seed gives the same images."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64
_SCALE = 2  # draw large, then downsample: antialiased edges

# (name, shape, RGB): shape and colour both differ between classes.
CLASSES: list[tuple[str, str, tuple[int, int, int]]] = [
    ("red circle", "circle", (220, 30, 30)),
    ("blue square", "square", (30, 60, 220)),
    ("green triangle", "triangle", (30, 170, 40)),
    ("yellow star", "star", (245, 215, 0)),
    ("purple diamond", "diamond", (140, 40, 190)),
    ("orange ring", "ring", (250, 130, 0)),
    ("cyan cross", "cross", (0, 200, 210)),
    ("pink hexagon", "hexagon", (250, 110, 180)),
    ("white crescent", "crescent", (250, 250, 250)),
    ("black bar", "bar", (15, 15, 15)),
]
CLASS_NAMES = [name for name, _, _ in CLASSES]


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float,
             inner: float | None = None) -> list[tuple[float, float]]:
    """A regular polygon, or a star when `inner` (the inner radius ratio) is given."""
    points = []
    steps = sides * 2 if inner else sides
    for k in range(steps):
        r = radius * (inner if inner and k % 2 else 1.0)
        a = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float
                  ) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c)
            for x, y in [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]]


# Background brightness (the gradient's two ends) of each style: the demo model's own, and
# "dusk", the darker style its demo LoRA adapter learns (within what the demo VQ tokenizer
# represents: its reconstructions of darker backgrounds come back lighter) (`llamagen train-lora`).
STYLES = {"day": (70, 190), "dusk": (70, 95)}


def _background(rng: np.random.Generator, size: int, style: str = "day") -> Image.Image:
    """A low-saturation two-colour gradient with a little noise."""
    low, high = STYLES[style]
    base = rng.uniform(low, high, size=2)[:, None] + rng.uniform(-25, 25, size=(2, 3))
    t = np.linspace(0, 1, size)
    ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
    img = base[0] * (1 - ramp) + base[1] * ramp
    img = np.broadcast_to(img, (size, size, 3)) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _mask(shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    radius = rng.uniform(0.25, 0.36) * size
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.polygon(_rotated_rect(cx, cy, 1.6 * radius, 1.6 * radius, angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, radius, 5, angle, inner=0.45), fill=255)
    elif shape == "diamond":
        c, s = math.cos(angle), math.sin(angle)
        rhombus = [(0, -radius), (0.6 * radius, 0), (0, radius), (-0.6 * radius, 0)]
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in rhombus], fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        r2 = radius * 0.55
        draw.ellipse([cx - r2, cy - r2, cx + r2, cy + r2], fill=0)
    elif shape == "cross":
        draw.polygon(_rotated_rect(cx, cy, 2 * radius, 0.6 * radius, angle), fill=255)
        draw.polygon(_rotated_rect(cx, cy, 0.6 * radius, 2 * radius, angle), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, radius, 6, angle), fill=255)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.5 * radius * math.cos(angle), 0.5 * radius * math.sin(angle)
        draw.ellipse([cx - radius + dx, cy - radius + dy, cx + radius + dx, cy + radius + dy],
                     fill=0)
    elif shape == "bar":
        draw.polygon(_rotated_rect(cx, cy, 2.1 * radius, 0.55 * radius, angle), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE,
           style: str = "day") -> np.ndarray:
    """One image of class `label`: uint8 (size, size, 3), on a background of `style`."""
    _, shape, colour = CLASSES[label]
    big = size * _SCALE
    image = _background(rng, big, style)
    jitter = np.clip(np.array(colour) + rng.normal(0, 10, 3), 0, 255).astype(int)
    fill = Image.new("RGB", (big, big), tuple(int(c) for c in jitter))
    mask = _mask(shape, rng, big).filter(ImageFilter.GaussianBlur(1.0))
    image.paste(fill, (0, 0), mask)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def make_dataset(n: int, seed: int, size: int = IMAGE_SIZE, style: str = "day"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """n images with balanced labels: (uint8 (n, size, size, 3), int64 (n,))."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    images = np.stack([render(int(label), rng, size, style) for label in labels])
    return images, labels.astype(np.int64)


def to_tensor_range(images: np.ndarray):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VQ's input range."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def background_brightness(images: np.ndarray, border: int = 4) -> np.ndarray:
    """The style measure: per image, the mean value (0..255) of its `border`-pixel frame,
    which the shapes (kept inside the frame by their margin) rarely touch."""
    x = images.astype(np.float32).mean(axis=-1)
    frame = np.concatenate([x[:, :border].reshape(len(x), -1), x[:, -border:].reshape(len(x), -1),
                            x[:, :, :border].reshape(len(x), -1),
                            x[:, :, -border:].reshape(len(x), -1)], axis=1)
    return frame.mean(axis=1)

