"""Common layers of the score networks (score_sde_pytorch's models/layers.py, DDPM part).

Parameter names and shapes follow score_sde exactly (checkpoint compatibility). Initialisers write in place
into the created tensors, so a whole network can be built on the 'meta' device (no memory, no compute).
"""

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def get_act(config) -> nn.Module:
    """Activation named by config.model.nonlinearity: elu | relu | lrelu (slope 0.2) | swish (SiLU)."""
    name = config.model.nonlinearity.lower()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    if name == "swish":
        return nn.SiLU()
    raise ValueError(
        f"config.model.nonlinearity={config.model.nonlinearity!r} is not supported; use 'elu', 'relu', "
        "'lrelu' or 'swish'."
    )


def compute_fans(shape: tuple[int, ...], in_axis: int = 1, out_axis: int = 0) -> tuple[float, float]:
    """(fan_in, fan_out) = (shape[in] * receptive, shape[out] * receptive), receptive = prod(shape) / both."""
    receptive = float(np.prod(shape)) / shape[in_axis] / shape[out_axis]
    return shape[in_axis] * receptive, shape[out_axis] * receptive


def variance_scaling(
    scale: float,
    mode: str,
    distribution: str,
    in_axis: int = 1,
    out_axis: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Callable:
    """JAX variance_scaling: Var = scale / fan (fan_in|fan_out|fan_avg), normal or uniform(+-sqrt(3 Var))."""
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"invalid mode for variance scaling initializer: {mode}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"invalid distribution for variance scaling initializer: {distribution}")

    def init(shape, dtype=dtype, device=device) -> torch.Tensor:
        shape = tuple(shape)
        fan_in, fan_out = compute_fans(shape, in_axis, out_axis)
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / denominator
        if distribution == "normal":
            return torch.randn(*shape, dtype=dtype, device=device) * math.sqrt(variance)
        return (torch.rand(*shape, dtype=dtype, device=device) * 2.0 - 1.0) * math.sqrt(3 * variance)

    return init


def default_init(scale: float = 1.0) -> Callable:
    """DDPM initialisation: variance_scaling(scale, 'fan_avg', 'uniform'), scale 0 replaced by 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    return variance_scaling(scale, "fan_avg", "uniform")


def init_weight_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fill `weight` in place with default_init(scale): U(+-sqrt(3 scale / fan_avg)), scale 0 -> 1e-10."""
    scale = 1e-10 if scale == 0 else scale
    fan_in, fan_out = compute_fans(tuple(weight.shape))
    bound = math.sqrt(3 * scale / ((fan_in + fan_out) / 2))
    with torch.no_grad():
        weight.uniform_(-bound, bound)
    return weight


def dense(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """nn.Linear with default_init weights and zero bias (score_sde's Dense layers)."""
    layer = nn.Linear(in_features, out_features)
    init_weight_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def ncsn_conv1x1(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1.0, padding=0) -> nn.Conv2d:
    """1x1 convolution with PyTorch's init scaled by init_scale (NCSNv1/v2)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias, dilation=dilation, padding=padding)
    init_scale = 1e-10 if init_scale == 0 else init_scale
    with torch.no_grad():
        conv.weight.mul_(init_scale)
        if bias:
            conv.bias.mul_(init_scale)
    return conv


def ncsn_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1.0, padding=1) -> nn.Conv2d:
    """3x3 convolution with PyTorch's init scaled by init_scale (NCSNv1/v2)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, bias=bias, dilation=dilation, padding=padding)
    init_scale = 1e-10 if init_scale == 0 else init_scale
    with torch.no_grad():
        conv.weight.mul_(init_scale)
        if bias:
            conv.bias.mul_(init_scale)
    return conv


def ddpm_conv1x1(in_planes, out_planes, stride=1, bias=True, init_scale=1.0, padding=0) -> nn.Conv2d:
    """1x1 convolution with DDPM initialisation (default_init weights, zero bias)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=padding, bias=bias)
    init_weight_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def ddpm_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1.0, padding=1) -> nn.Conv2d:
    """3x3 convolution with DDPM initialisation (default_init weights, zero bias)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=padding, dilation=dilation, bias=bias)
    init_weight_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


conv1x1 = ddpm_conv1x1
conv3x3 = ddpm_conv3x3


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [sin(t w_i), cos(t w_i)], w_i = max_positions^(-i / (d/2 - 1)) (DDPM)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(timesteps.shape)}")
    half_dim = embedding_dim // 2
    if half_dim < 2:
        raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}")
    step = math.log(max_positions) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) * -step)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class NIN(nn.Module):
    """Per-pixel linear map over channels (network-in-network): y[b, :, h, w] = x[b, :, h, w] @ W + b."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, num_units))
        init_weight_(self.W, init_scale)
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


def spatial_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out[b, :, p] = sum_p' softmax_p'(q_p . k_p' / sqrt(C)) v[b, :, p'] over all pixels p' (one head)."""
    b, c, h, w = q.shape
    q_ = q.reshape(b, 1, c, h * w).transpose(2, 3)
    k_ = k.reshape(b, 1, c, h * w).transpose(2, 3)
    v_ = v.reshape(b, 1, c, h * w).transpose(2, 3)
    out = F.scaled_dot_product_attention(q_, k_, v_)  # scale 1/sqrt(C)
    return out.transpose(2, 3).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    """DDPM's channel-wise self-attention block: x + NIN_3(attention(GroupNorm(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.GroupNorm_0(x)
        h = spatial_self_attention(self.NIN_0(h), self.NIN_1(h), self.NIN_2(h))
        return x + self.NIN_3(h)


class Upsample(nn.Module):
    """DDPM upsampling: nearest x2, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = False):
        super().__init__()
        if with_conv:
            self.Conv_0 = ddpm_conv3x3(channels, channels)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        x = F.interpolate(x, (h * 2, w * 2), mode="nearest")
        if self.with_conv:
            x = self.Conv_0(x)
        return x


class Downsample(nn.Module):
    """DDPM downsampling: 3x3 stride-2 conv, TF 'SAME' padding (right/bottom by 1), or 2x2 average pool."""

    def __init__(self, channels: int, with_conv: bool = False):
        super().__init__()
        if with_conv:
            self.Conv_0 = ddpm_conv3x3(channels, channels, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2, padding=0)


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block: x' + Conv_1(Dropout(act(GN(Conv_0(act(GN(x))) + Dense_0(act(temb)))))."""

    def __init__(self, act, in_ch, out_ch=None, temb_dim=None, conv_shortcut=False, dropout=0.1):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = nn.GroupNorm(num_groups=32, num_channels=in_ch, eps=1e-6)
        self.act = act
        self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = nn.GroupNorm(num_groups=32, num_channels=out_ch, eps=1e-6)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=0.0)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = ddpm_conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
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
        return x + h
