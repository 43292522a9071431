"""Pixels to token grids: the encode half of the VQ tokenizer, for edits (completion keeps
the input image's top rows as the prompt's prefix).

Always fp32, on the decoder's device: a code is the nearest codebook entry, and half
precision moves near-ties to a neighbour, so the kept rows would no longer be the codes of
the input image.
"""

from __future__ import annotations

import torch

from vq_decoder.decoder import default_device
from vq_decoder.vq_model import VQConfig, VQModel


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the original's preprocessing
    (ToTensor, then Normalize with mean and std 0.5)."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class VQEncoder:
    """`encode_uint8(pixels)` takes (B, H, W, 3) uint8 images whose sides are multiples of the
    downsample factor and returns (B, H/ds, W/ds) codes. `state_dict` must hold exactly the
    VQModel keys (strict load)."""

    def __init__(self, config: VQConfig, state_dict: dict[str, torch.Tensor], *,
                 device: str | torch.device | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        with torch.device("meta"):
            model = VQModel(config)
        model.load_state_dict(state_dict, assign=True, strict=True)
        model.decoder = model.post_quant_conv = None  # encoding only
        self.model = model.to(device=self.device, dtype=torch.float32).eval()

    @torch.inference_mode()
    def encode_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        ds = self.config.downsample
        if pixels.dim() != 4 or pixels.shape[-1] != 3 or pixels.dtype != torch.uint8:
            raise ValueError(f"pixels must be uint8 (B, H, W, 3), got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        b, h, w, _ = pixels.shape
        if h % ds or w % ds:
            raise ValueError(f"image sides must be multiples of {ds}, got {h}x{w}")
        indices = self.model.encode(from_uint8(pixels.to(self.device))).indices
        return indices.view(b, h // ds, w // ds).cpu()
