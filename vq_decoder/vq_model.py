"""The LlamaGen VQ tokenizer (tokenizer/tokenizer_image/vq_model.py) in plain PyTorch.

Module and parameter names are the original's, so the official `vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`
and `vq_ds16_t2i.pt` load strictly from their `"model"` entry. Serving decodes through
`vq_decoder.decoder.VQDecoder`, which runs this model's codebook lookup and `decode` with its own
device, dtype and memory-format choices; `decode_code` is the original's one-call form. The
encoder and quantizer serve round-trip tests and training the demo tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    # Hard-coded in the original (128 and 2); fields here so smaller tokenizers can be described.
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        # JSON gives lists; keep the frozen dataclass hashable.
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult must have the same length")
        for width in [self.ch * m for m in self.decoder_ch_mult + self.encoder_ch_mult]:
            if width % 32:
                raise ValueError(f"channel width {width} is not divisible by GroupNorm's 32 groups")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.decoder_ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VQ config field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


VQ_MODELS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
}


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, scale c^-0.5, residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        # (b, 1, hw, c): SDPA computes the original's bmm-softmax-bmm with the same scale.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(h_), self.k(h_),
                                                                          self.v(h_)))
        h_ = F.scaled_dot_product_attention(q, k, v)
        h_ = h_.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        # No asymmetric padding in torch's conv: pad right/bottom by hand, as the original.
        self.conv = nn.Conv2d(in_channels, in_channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        ch, ch_mult = cfg.ch, cfg.encoder_ch_mult
        self.num_resolutions, self.num_res_blocks = len(ch_mult), cfg.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1, *ch_mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks):
                block.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(block_in))
            if i_level != self.num_resolutions - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout_p),
                                  AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, cfg.dropout_p)])
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, block in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks):
                h = block.res[i_block](h)
                if len(block.attn) > 0:
                    h = block.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = block.downsample(h)
        for mid_block in self.mid:
            h = mid_block(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        ch, ch_mult = cfg.ch, cfg.decoder_ch_mult
        self.num_resolutions, self.num_res_blocks = len(ch_mult), cfg.num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout_p),
                                  AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, cfg.dropout_p)])
        self.conv_blocks = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
                if i_level == self.num_resolutions - 1:
                    block.attn.append(AttnBlock(block_in))
            if i_level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for mid_block in self.mid:
            h = mid_block(h)
        for i_level, block in enumerate(self.conv_blocks):
            for i_block in range(self.num_res_blocks + 1):
                h = block.res[i_block](h)
                if len(block.attn) > 0:
                    h = block.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = block.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, C, h, w), straight-through in training
    indices: torch.Tensor  # (B*h*w,) raster order
    vq_loss: torch.Tensor | None = None
    commit_loss: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_embed_dim
        self.beta, self.l2_norm = cfg.commit_loss_beta, cfg.codebook_l2_norm
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        if self.l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if cfg.codebook_show_usage:
            # A usage ring buffer: in every official checkpoint, unused at inference.
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        z = z.permute(0, 2, 3, 1).contiguous()  # b h w c
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        z_flat = z.view(-1, self.e_dim)
        embedding = self.codebook()
        d = (z_flat.pow(2).sum(1, keepdim=True) + embedding.pow(2).sum(1)
             - 2 * z_flat @ embedding.t())
        indices = torch.argmin(d, dim=1)
        z_q = embedding[indices].view(z.shape)
        out = QuantizerOutput(z_q=z_q, indices=indices)
        if self.training:
            out.vq_loss = F.mse_loss(z_q, z.detach())
            out.commit_loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        out.z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return out

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int]
                           ) -> torch.Tensor:
        """indices (B, h*w) raster order, shape (B, C, h, w) -> z_q (B, C, h, w)."""
        z_q = self.codebook()[indices]
        return z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """code (B, h*w) -> image (B, 3, h*ds, w*ds), nominally in [-1, 1] (unclamped)."""
        z_q = self.quantize.get_codebook_entry(code, shape)
        return self.decode(z_q.to(self.post_quant_conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.encode(x)
        return self.decode(q.z_q), q
