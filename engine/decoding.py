"""The VQ tokenizer's services: token grids from many concurrent generations decoded in
micro-batches (`engine.batching`), grids of one shape together (a caller may decode only the
top rows of a grid); and, for edits, input images encoded to grids the same way.

A preview may have its own decoder (`preview_decoder`, the same weights in a cheaper dtype):
a preview is shown for a moment and replaced, so it need not be the final pixels' exact
numerics, and on a CPU it is most of streaming's cost (three previews are three whole-grid
decodes). Previews and final grids never share a batch, and a final grid ready to decode goes
before any preview.

Batch-invariant mode pads every batch to `max_batch_size` grids: the convolution kernels
pick their algorithm by batch size, so a grid decoded with one other grid and alone can
differ by a level in a few values. With a fixed shape, the same request and seed give the
same pixels whatever else is in flight (position in the batch and the padding's content do
not change a grid's result; tests/test_vq_decoder.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.batching import BatchObserver, MicroBatcher
from vq_decoder.decoder import VQDecoder
from vq_decoder.encoder import VQEncoder


def stack_batch(items: list[torch.Tensor], pad_to: int | None) -> torch.Tensor:
    """One batch of same-shape items; padded with copies of the first to `pad_to` items when
    given (batch invariance: a fixed shape, whose padding changes no item's result)."""
    if pad_to is not None:
        items = items + [items[0]] * (pad_to - len(items))
    return torch.stack(items)


def decode_grids(decoder: VQDecoder, grids: Sequence[Sequence[int]], batch_size: int = 32
                 ) -> list[np.ndarray]:
    """Offline decoding (`generate --out-dir`, `sample`): token grids -> uint8 (H, W, 3)
    images, in batches padded to `batch_size`, so an image's pixels depend on its grid alone,
    not on how many others were decoded with it (the server's batch-invariant mode)."""
    side = int(len(grids[0]) ** 0.5) if grids else 0
    images: list[np.ndarray] = []
    for start in range(0, len(grids), batch_size):
        chunk = [torch.tensor(g).view(side, side) for g in grids[start: start + batch_size]]
        images += list(decoder.decode_uint8(stack_batch(chunk, batch_size)).numpy()[: len(chunk)])
    return images


def encode_images(encoder: VQEncoder, images: Sequence[np.ndarray], batch_size: int = 32
                  ) -> list[list[int]]:
    """Offline encoding (`sample`'s edit lines): model-sized uint8 (H, W, 3) images -> their
    raster-order token grids, in batches padded to `batch_size` (as `decode_grids`, so a
    near-tie code does not depend on the images encoded beside it)."""
    grids: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        chunk = [torch.from_numpy(np.ascontiguousarray(image))
                 for image in images[start: start + batch_size]]
        codes = encoder.encode_uint8(stack_batch(chunk, batch_size))[: len(chunk)]
        grids += [c.flatten().tolist() for c in codes]
    return grids


class DecoderService:
    def __init__(self, decoder: VQDecoder, *, preview_decoder: VQDecoder | None = None,
                 max_batch_size: int = 32, max_wait_s: float = 0.005,
                 cpu_threads: int | None = None, on_batch: BatchObserver | None = None,
                 invariant: bool = False):
        self.decoder, self.cpu_threads = decoder, cpu_threads
        self.preview_decoder = preview_decoder or decoder
        self.max_batch_size, self.invariant = max_batch_size, invariant
        self._batcher: MicroBatcher[tuple[torch.Tensor, bool], np.ndarray] = MicroBatcher(
            self._decode, name="decoder service", max_batch_size=max_batch_size,
            max_wait_s=max_wait_s, on_batch=on_batch)

    def _decode(self, jobs: list[tuple[torch.Tensor, bool]]) -> Sequence[np.ndarray]:
        grids = [grid for grid, _ in jobs]
        decoder = self.preview_decoder if jobs[0][1] else self.decoder  # keys never mix
        batch = stack_batch(grids, self.max_batch_size if self.invariant else None)
        return list(decoder.decode_uint8(batch).numpy()[: len(grids)])

    @property
    def alive(self) -> bool:
        return self._batcher.alive

    async def start(self) -> None:
        if self.decoder.device.type == "cpu" and self.cpu_threads:
            # Process-wide: in the server the vLLM worker lives in its own process.
            torch.set_num_threads(self.cpu_threads)
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    async def decode(self, tokens: Sequence[int] | torch.Tensor, columns: int, *,
                     preview: bool = False) -> np.ndarray:
        """Raster-order tokens covering whole rows of a grid `columns` wide -> uint8
        (rows*ds, columns*ds, 3), by the preview decoder when `preview`."""
        codes = torch.as_tensor(tokens, dtype=torch.long)
        if codes.numel() == 0 or codes.numel() % columns:
            raise ValueError(f"{codes.numel()} tokens do not fill whole rows of {columns}")
        codes = codes.view(-1, columns)
        (image,) = await self._batcher.submit(
            [(codes, preview)], key=(tuple(codes.shape), preview), priority=preview)
        return image


class EncoderService:
    """Edits' input images -> token grids, micro-batched on the decoder's device (padded to a
    fixed batch like the decoder when `invariant`: a near-tie code must not depend on what
    else is in flight)."""

    def __init__(self, encoder: VQEncoder, *, max_batch_size: int = 32,
                 max_wait_s: float = 0.005, on_batch: BatchObserver | None = None,
                 invariant: bool = False):
        self.encoder = encoder
        self.max_batch_size, self.invariant = max_batch_size, invariant
        self._batcher: MicroBatcher[torch.Tensor, torch.Tensor] = MicroBatcher(
            self._encode, name="encoder service", max_batch_size=max_batch_size,
            max_wait_s=max_wait_s, on_batch=on_batch)

    def _encode(self, images: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        batch = stack_batch(images, self.max_batch_size if self.invariant else None)
        return list(self.encoder.encode_uint8(batch)[: len(images)])

    @property
    def alive(self) -> bool:
        return self._batcher.alive

    async def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    async def encode(self, pixels: np.ndarray) -> list[int]:
        """uint8 (H, W, 3) -> the raster-order token grid."""
        image = torch.from_numpy(np.ascontiguousarray(pixels))
        (codes,) = await self._batcher.submit([image], key=tuple(image.shape))
        return codes.flatten().tolist()
