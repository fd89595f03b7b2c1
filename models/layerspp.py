"""Layers of NCSN++ / DDPM++ (score_sde_pytorch's models/layerspp.py, plus the Soft Truncation repo's fixed
Fourier input features). Parameter names and shapes follow the originals (checkpoint compatibility)."""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers, up_or_down_sampling

conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
NIN = layers.NIN
default_init = layers.default_init

FIR_KERNEL = (1, 3, 3, 1)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups and eps 1e-6 (the NCSN++ choice)."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _residual_sum(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    """x + h, divided by sqrt(2) when skip_rescale (keeps the variance of the sum)."""
    return (x + h) / math.sqrt(2.0) if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar: [sin(2 pi s W), cos(2 pi s W)], W ~ N(0, scale^2), not trained."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.normal(0.0, float(scale), size=(embedding_size,)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_proj = x[:, None] * self.W[None, :] * (2 * np.pi)
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class FixedFourierProjection(nn.Module):
    """Soft Truncation repo input features [x, sin(a x), cos(a x), sin(2 a x), cos(2 a x)], a = 128 pi."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x * (128 * np.pi), x * (256 * np.pi)
        return torch.cat([x, torch.sin(a), torch.cos(a), torch.sin(b), torch.cos(b)], dim=1)


FixedFouriereProjection = FixedFourierProjection  # the Soft Truncation repo's spelling


class Combine(nn.Module):
    """Merge a skip input into the trunk: Conv_0 (1x1) of x, concatenated ('cat') or added ('sum') to y."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"progressive_combine must be 'cat' or 'sum', got {method!r}")
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class AttnBlockpp(nn.Module):
    """Channel-wise self-attention over all pixels, residual, optionally divided by sqrt(2)."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.GroupNorm_0(x)
        h = layers.spatial_self_attention(self.NIN_0(h), self.NIN_1(h), self.NIN_2(h))
        return _residual_sum(x, self.NIN_3(h), self.skip_rescale)


class Upsample(nn.Module):
    """x2 upsampling: nearest (+ optional 3x3 conv), or FIR (+ optional fused 3x3 conv) when fir=True."""

    def __init__(self, in_ch=None, out_ch=None, with_conv=False, fir=False, fir_kernel=FIR_KERNEL):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = up_or_down_sampling.Conv2d(
                    in_ch,
                    out_ch,
                    kernel=3,
                    up=True,
                    resample_kernel=fir_kernel,
                    use_bias=True,
                )
                layers.init_weight_(self.Conv2d_0.weight)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch)
        self.fir = fir
        self.with_conv = with_conv
        self.fir_kernel = tuple(fir_kernel)
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if not self.fir:
            x = F.interpolate(x, (h * 2, w * 2), mode="nearest")
            return self.Conv_0(x) if self.with_conv else x
        if self.with_conv:
            return self.Conv2d_0(x)
        return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)


class Downsample(nn.Module):
    """/2 downsampling: stride-2 3x3 conv ('SAME' padding) or average pool; FIR (+ fused conv) if fir=True."""

    def __init__(self, in_ch=None, out_ch=None, with_conv=False, fir=False, fir_kernel=FIR_KERNEL):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv:
            if fir:
                self.Conv2d_0 = up_or_down_sampling.Conv2d(
                    in_ch,
                    out_ch,
                    kernel=3,
                    down=True,
                    resample_kernel=fir_kernel,
                    use_bias=True,
                )
                layers.init_weight_(self.Conv2d_0.weight)
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.fir = fir
        self.fir_kernel = tuple(fir_kernel)
        self.with_conv = with_conv
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.with_conv:
                return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
            return F.avg_pool2d(x, 2, stride=2)
        if self.with_conv:
            return self.Conv2d_0(x)
        return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block, GroupNorm(min(C/4, 32)), init_scale on the last conv, optional skip rescale."""

    def __init__(
        self,
        act,
        in_ch,
        out_ch=None,
        temb_dim=None,
        conv_shortcut=False,
        dropout=0.1,
        skip_rescale=False,
        init_scale=0.0,
    ):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = layers.dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return _residual_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block; up=True / down=True resample both branches (FIR or nearest / average)."""

    def __init__(
        self,
        act,
        in_ch,
        out_ch=None,
        temb_dim=None,
        up=False,
        down=False,
        dropout=0.1,
        fir=False,
        fir_kernel=FIR_KERNEL,
        skip_rescale=True,
        init_scale=0.0,
    ):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up = up
        self.down = down
        self.fir = fir
        self.fir_kernel = tuple(fir_kernel)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = layers.dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this block's x2 up- or /2 down-sampling (identity when neither)."""
        if self.up:
            if self.fir:
                return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
            return up_or_down_sampling.naive_upsample_2d(x, factor=2)
        if self.down:
            if self.fir:
                return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
            return up_or_down_sampling.naive_downsample_2d(x, factor=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return _residual_sum(x, h, self.skip_rescale)
