"""A small noise-prediction UNet for 28x28 images: the denoiser of the library's diffusion prior (``mnist-ddpm``).

Architecture (after Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020, scaled down for a
CPU): a sinusoidal time embedding through a two-layer MLP; residual blocks (GroupNorm, SiLU, 3x3 convolutions, the
time embedding added between the convolutions) at three resolutions, 28 -> 14 -> 7, with ``channels`` features each;
one self-attention block at 7x7; skip connections by concatenation on the way up. About 1.9M parameters with the
default ``channels=(32, 64, 128)``.

Shapes: ``forward(x_t, t)``: ``x_t`` ``(B, C, 28, 28)`` (any real values: a noised image in [-1, 1] scale),
``t`` ``(B,)`` integer or float timesteps -> predicted noise ``(B, C, 28, 28)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` of (possibly fractional) timesteps, as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """Noise-prediction network ``eps_theta(x_t, t)`` for ``(C, 28, 28)`` images (see the module docstring).

    Args:
        in_channels: image channels ``C``.
        channels: features at 28x28, 14x14 and 7x7 (three entries).
        blocks: residual blocks per resolution on the way down (one more on the way up).
        dropout: dropout inside the residual blocks.
        attention: a self-attention block at the lowest resolution.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int, int] = (32, 64, 128),
        blocks: int = 1,
        dropout: float = 0.0,
        attention: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or any(not isinstance(c, int) or c <= 0 or c % 8 for c in channels):
            raise ValueError(f"expected three positive multiples of 8 as UNet channels, got {channels!r}")
        if not isinstance(blocks, int) or blocks <= 0:
            raise ValueError(f"expected a positive int number of UNet blocks, got {blocks!r}")
        self.in_channels, self.channels, self.blocks = in_channels, tuple(channels), blocks
        emb_dim = 4 * channels[0]
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = [channels[0]]
        c_prev = channels[0]
        for level, c in enumerate(channels):
            for _ in range(blocks):
                self.down.append(_ResBlock(c_prev, c, emb_dim, dropout))
                c_prev = c
                skip_channels.append(c)
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_channels.append(c)
        self.mid1 = _ResBlock(c_prev, c_prev, emb_dim, dropout)
        self.mid_attn: nn.Module = _Attention(c_prev) if attention else nn.Identity()
        self.mid2 = _ResBlock(c_prev, c_prev, emb_dim, dropout)
        self.up = nn.ModuleList()
        for c in reversed(channels):
            for _ in range(blocks + 1):
                self.up.append(_ResBlock(c_prev + skip_channels.pop(), c, emb_dim, dropout))
                c_prev = c
        self.out_norm = _norm(c_prev)
        self.out = nn.Conv2d(c_prev, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]  # Conv2d(bias=True) always has one

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (28, 28):
            raise ValueError(f"expected noised images (B, {self.in_channels}, 28, 28), got {tuple(x.shape)}")
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"expected timesteps (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.channels[0]))
        h = self.stem(x)
        skips = [h]
        blocks = iter(self.down)
        for level in range(len(self.channels)):
            for _ in range(self.blocks):
                h = next(blocks)(h, emb)
                skips.append(h)
            if level < len(self.channels) - 1:
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        ups = iter(self.up)
        for level in reversed(range(len(self.channels))):
            for _ in range(self.blocks + 1):
                h = next(ups)(torch.cat([h, skips.pop()], dim=1), emb)
            if level > 0:
                h = F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest")
        return self.out(F.silu(self.out_norm(h)))
