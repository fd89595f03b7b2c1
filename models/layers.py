"""Common layers of the score networks (score_sde_pytorch's models/layers.py: DDPM part and the RefineNet blocks
of NCSN / NCSNv2).

Parameter names and shapes follow score_sde exactly (checkpoint compatibility). Initialisers write in place
into the created tensors, so a whole network can be built on the 'meta' device (no memory, no compute).
"""

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .normalization import ConditionalInstanceNorm2dPlus


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


# ----------------------------------------------------------------------------------------------------------------
# RefineNet blocks of NCSN (v1) and NCSNv2. The conditional ("Cond") versions take the noise-level label y and
# normalise with a noise-conditional normaliser `normalizer(num_features, num_classes, bias=True)`.


def _act_or(act: nn.Module | None, default: type[nn.Module]) -> nn.Module:
    """`act`, or a new `default()` activation when it is None."""
    return default() if act is None else act


def _mean_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling as the mean of the four strided sub-grids (the original's summation order)."""
    total = x[:, :, ::2, ::2] + x[:, :, 1::2, ::2]
    total = total + x[:, :, ::2, 1::2]
    total = total + x[:, :, 1::2, 1::2]
    return total / 4.0


def _dilated_conv3x3(in_planes: int, out_planes: int, dilation: int) -> nn.Conv2d:
    """3x3 convolution with `dilation` and padding = dilation, so the spatial size is kept (NCSNv2, JAX 'SAME')."""
    return ncsn_conv3x3(in_planes, out_planes, dilation=dilation, padding=dilation)


class CRPBlock(nn.Module):
    """Chained residual pooling: x = act(x); path = conv_i(pool(path)) for each stage, x += path after each."""

    def __init__(self, features: int, n_stages: int, act: nn.Module | None = None, maxpool: bool = True):
        super().__init__()
        self.convs = nn.ModuleList([ncsn_conv3x3(features, features, stride=1, bias=False) for _ in range(n_stages)])
        self.n_stages = n_stages
        if maxpool:
            self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        else:
            self.pool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)
        self.act = _act_or(act, nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for conv in self.convs:
            path = conv(self.pool(path))
            x = path + x
        return x


class CondCRPBlock(nn.Module):
    """Conditional chained residual pooling: path = conv_i(avgpool(norm_i(path, y))), x += path after each stage."""

    def __init__(self, features: int, n_stages: int, num_classes: int, normalizer, act: nn.Module | None = None):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.normalizer = normalizer
        for _ in range(n_stages):
            self.norms.append(normalizer(features, num_classes, bias=True))
            self.convs.append(ncsn_conv3x3(features, features, stride=1, bias=False))
        self.n_stages = n_stages
        self.pool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)
        self.act = _act_or(act, nn.ReLU)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(self.pool(norm(path, y)))
            x = path + x
        return x


def _rcu_name(block: int, stage: int, kind: str) -> str:
    """Attribute name '{block}_{stage}_{kind}' (1-based) of a residual conv unit's layers (state_dict keys)."""
    return f"{block + 1}_{stage + 1}_{kind}"


class RCUBlock(nn.Module):
    """Residual conv units: n_blocks times x += (conv . act)^n_stages (x), bias-free 3x3 convs."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: nn.Module | None = None):
        super().__init__()
        for i in range(n_blocks):
            for j in range(n_stages):
                setattr(self, _rcu_name(i, j, "conv"), ncsn_conv3x3(features, features, stride=1, bias=False))
        self.stride = 1
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        self.act = _act_or(act, nn.ReLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = getattr(self, _rcu_name(i, j, "conv"))(self.act(x))
            x = x + residual
        return x


class CondRCUBlock(nn.Module):
    """Conditional residual conv units: n_blocks times x += (conv . act . norm(., y))^n_stages (x)."""

    def __init__(
        self, features: int, n_blocks: int, n_stages: int, num_classes: int, normalizer, act: nn.Module | None = None
    ):
        super().__init__()
        for i in range(n_blocks):
            for j in range(n_stages):
                setattr(self, _rcu_name(i, j, "norm"), normalizer(features, num_classes, bias=True))
                setattr(self, _rcu_name(i, j, "conv"), ncsn_conv3x3(features, features, stride=1, bias=False))
        self.stride = 1
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        self.act = _act_or(act, nn.ReLU)
        self.normalizer = normalizer

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = getattr(self, _rcu_name(i, j, "norm"))(x, y)
                x = getattr(self, _rcu_name(i, j, "conv"))(self.act(x))
            x = x + residual
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: sum_i bilinear-resize(conv_i(x_i), shape) (align_corners=True)."""

    def __init__(self, in_planes: list[int] | tuple[int, ...], features: int):
        super().__init__()
        if not isinstance(in_planes, (list, tuple)):
            raise TypeError(f"in_planes must be a list or tuple of channel counts, got {type(in_planes).__name__}")
        self.convs = nn.ModuleList([ncsn_conv3x3(planes, features, stride=1, bias=True) for planes in in_planes])
        self.features = features

    def forward(self, xs: list[torch.Tensor], shape) -> torch.Tensor:
        total = None
        for conv, x in zip(self.convs, xs):
            h = F.interpolate(conv(x), size=tuple(shape), mode="bilinear", align_corners=True)
            total = h if total is None else total + h
        return total


class CondMSFBlock(nn.Module):
    """Conditional multi-resolution fusion: sum_i bilinear-resize(conv_i(norm_i(x_i, y)), shape)."""

    def __init__(self, in_planes: list[int] | tuple[int, ...], features: int, num_classes: int, normalizer):
        super().__init__()
        if not isinstance(in_planes, (list, tuple)):
            raise TypeError(f"in_planes must be a list or tuple of channel counts, got {type(in_planes).__name__}")
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.features = features
        self.normalizer = normalizer
        for planes in in_planes:
            self.convs.append(ncsn_conv3x3(planes, features, stride=1, bias=True))
            self.norms.append(normalizer(planes, num_classes, bias=True))

    def forward(self, xs: list[torch.Tensor], y: torch.Tensor, shape) -> torch.Tensor:
        total = None
        for norm, conv, x in zip(self.norms, self.convs, xs):
            h = F.interpolate(conv(norm(x, y)), size=tuple(shape), mode="bilinear", align_corners=True)
            total = h if total is None else total + h
        return total


class RefineBlock(nn.Module):
    """RefineNet block: RCU per input, fusion to `output_shape` (several inputs), CRP, then output RCUs."""

    def __init__(
        self,
        in_planes: list[int] | tuple[int, ...],
        features: int,
        act: nn.Module | None = None,
        start: bool = False,
        end: bool = False,
        maxpool: bool = True,
    ):
        super().__init__()
        if not isinstance(in_planes, (list, tuple)):
            raise TypeError(f"in_planes must be a list or tuple of channel counts, got {type(in_planes).__name__}")
        act = _act_or(act, nn.ReLU)
        self.n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList([RCUBlock(planes, 2, 2, act) for planes in in_planes])
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
        if not start:
            self.msf = MSFBlock(in_planes, features)
        self.crp = CRPBlock(features, 2, act, maxpool=maxpool)

    def forward(self, xs: list[torch.Tensor], output_shape) -> torch.Tensor:
        hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, output_shape) if self.n_blocks > 1 else hs[0]
        return self.output_convs(self.crp(h))


class CondRefineBlock(nn.Module):
    """Conditional RefineNet block: CondRCU per input, CondMSF fusion, CondCRP, then output CondRCUs."""

    def __init__(
        self,
        in_planes: list[int] | tuple[int, ...],
        features: int,
        num_classes: int,
        normalizer,
        act: nn.Module | None = None,
        start: bool = False,
        end: bool = False,
    ):
        super().__init__()
        if not isinstance(in_planes, (list, tuple)):
            raise TypeError(f"in_planes must be a list or tuple of channel counts, got {type(in_planes).__name__}")
        act = _act_or(act, nn.ReLU)
        self.n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList(
            [CondRCUBlock(planes, 2, 2, num_classes, normalizer, act) for planes in in_planes]
        )
        self.output_convs = CondRCUBlock(features, 3 if end else 1, 2, num_classes, normalizer, act)
        if not start:
            self.msf = CondMSFBlock(in_planes, features, num_classes, normalizer)
        self.crp = CondCRPBlock(features, 2, num_classes, normalizer, act)

    def forward(self, xs: list[torch.Tensor], y: torch.Tensor, output_shape) -> torch.Tensor:
        hs = [adapt(x, y) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, y, output_shape) if self.n_blocks > 1 else hs[0]
        return self.output_convs(self.crp(h, y), y)


class ConvMeanPool(nn.Module):
    """Convolution (stride 1, 'same' padding) then 2x2 mean pooling; adjust_padding first zero-pads left/top by 1."""

    def __init__(
        self, input_dim: int, output_dim: int, kernel_size: int = 3, biases: bool = True, adjust_padding: bool = False
    ):
        super().__init__()
        conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return _mean_pool_2x2(self.conv(inputs))


class MeanPoolConv(nn.Module):
    """2x2 mean pooling then a convolution (stride 1, 'same' padding)."""

    def __init__(self, input_dim: int, output_dim: int, kernel_size: int = 3, biases: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.conv(_mean_pool_2x2(inputs))


class UpsampleConv(nn.Module):
    """x2 upsampling by a pixel shuffle of four stacked copies of the input, then a convolution ('same' padding).

    Sub-pixel (i, j) of output channel c copies input channel (4c + 2i + j) mod C (nearest upsampling when C = 1).
    """

    def __init__(self, input_dim: int, output_dim: int, kernel_size: int = 3, biases: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
        self.pixelshuffle = nn.PixelShuffle(upscale_factor=2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pixelshuffle(torch.cat([inputs] * 4, dim=1)))


def _residual_layers(input_dim: int, output_dim: int, resample, dilation: int, adjust_padding: bool):
    """(conv1, conv2, make_shortcut, conv1 output channels) of an NCSN residual block.

    resample='down' without dilation halves the resolution (mean-pooled conv2 and 1x1 shortcut); dilated blocks
    keep the resolution (3x3 convs with padding = dilation, the shortcut a dilated 3x3 conv too).
    """
    if resample == "down":
        mid = input_dim
        if dilation > 1:
            conv2 = _dilated_conv3x3(input_dim, output_dim, dilation)

            def make_shortcut(cin, cout):
                return _dilated_conv3x3(cin, cout, dilation)
        else:
            conv2 = ConvMeanPool(input_dim, output_dim, 3, adjust_padding=adjust_padding)

            def make_shortcut(cin, cout):
                return ConvMeanPool(cin, cout, kernel_size=1, adjust_padding=adjust_padding)
    elif resample is None:
        mid = output_dim
        if dilation > 1:
            conv2 = _dilated_conv3x3(output_dim, output_dim, dilation)

            def make_shortcut(cin, cout):
                return _dilated_conv3x3(cin, cout, dilation)
        else:
            conv2 = ncsn_conv3x3(output_dim, output_dim)
            make_shortcut = ncsn_conv1x1
    else:
        raise ValueError(f"resample must be 'down' or None, got {resample!r}")
    conv1 = _dilated_conv3x3(input_dim, mid, dilation) if dilation > 1 else ncsn_conv3x3(input_dim, mid)
    return conv1, conv2, make_shortcut, mid


class ResidualBlock(nn.Module):
    """NCSNv2 residual block: shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        resample=None,
        act: nn.Module | None = None,
        normalization=nn.InstanceNorm2d,
        adjust_padding: bool = False,
        dilation: int | None = 1,
        norm_args: tuple = (),
    ):
        super().__init__()
        dilation = 1 if dilation is None else dilation
        self.non_linearity = _act_or(act, nn.ELU)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.resample = resample
        self.normalization = normalization
        conv1, conv2, make_shortcut, mid = _residual_layers(input_dim, output_dim, resample, dilation, adjust_padding)
        self.conv1 = conv1
        self.normalize2 = normalization(mid, *norm_args)
        self.conv2 = conv2
        if output_dim != input_dim or resample is not None:
            self.shortcut = make_shortcut(input_dim, output_dim)
        self.normalize1 = normalization(input_dim, *norm_args)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """cond: the noise-level labels y of the conditional variant (passed to the normalisers)."""
        h = self.conv1(self.non_linearity(self.normalize1(x, *cond)))
        h = self.conv2(self.non_linearity(self.normalize2(h, *cond)))
        shortcut = x if self.output_dim == self.input_dim and self.resample is None else self.shortcut(x)
        return shortcut + h


class ConditionalResidualBlock(ResidualBlock):
    """NCSN residual block with noise-conditional normalisers: shortcut(x) + conv2(act(n2(conv1(act(n1(x, y))), y)))."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_classes: int,
        resample=None,
        act: nn.Module | None = None,
        normalization=ConditionalInstanceNorm2dPlus,
        adjust_padding: bool = False,
        dilation: int | None = None,
    ):
        super().__init__(
            input_dim, output_dim, resample, act, normalization, adjust_padding, dilation, norm_args=(num_classes,)
        )
