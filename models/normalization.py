"""Normalisation layers selected by config.model.normalization (score_sde_pytorch's models/normalization.py).

NCSN++, DDPM++ and DDPM use GroupNorm directly; NCSNv2 asks `get_normalization` for its (unconditional)
normaliser and NCSN (v1) for a noise-conditional one (`conditional_normalization`). The conditional layers look up
their per-noise-level scale / shift in an `embed` table indexed by the noise-level label. Parameter names, shapes
and order follow the original (checkpoint compatibility).
"""

import functools

import torch
import torch.nn as nn

from configs.defaults import complete_config


class VarianceNorm2d(nn.Module):
    """x / sqrt(Var_hw[x] + 1e-5) * gamma per channel (no mean subtraction, NCSN)."""

    def __init__(self, num_features: int, bias: bool = False):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.alpha = nn.Parameter(torch.empty(num_features))
        nn.init.normal_(self.alpha, 1.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.var(x, dim=(2, 3), keepdim=True)
        return x / torch.sqrt(var + 1e-5) * self.alpha.view(-1, self.num_features, 1, 1)


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (NCSNv2): IN(x) + alpha * normalised channel means, times gamma, plus beta."""

    def __init__(self, num_features: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.alpha = nn.Parameter(torch.empty(num_features))
        self.gamma = nn.Parameter(torch.empty(num_features))
        nn.init.normal_(self.alpha, 1.0, 0.02)
        nn.init.normal_(self.gamma, 1.0, 0.02)
        if bias:
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = torch.mean(x, dim=(2, 3))
        m = torch.mean(means, dim=-1, keepdim=True)
        v = torch.var(means, dim=-1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = self.instance_norm(x) + means[..., None, None] * self.alpha[..., None, None]
        h = self.gamma.view(-1, self.num_features, 1, 1) * h
        if self.bias:
            h = h + self.beta.view(-1, self.num_features, 1, 1)
        return h


def get_normalization(config, conditional: bool = False):
    """Normaliser class (called with the channel count) for config.model.normalization.

    Unconditional: 'GroupNorm' (32 groups, eps 1e-6 as in DDPM), 'InstanceNorm', 'InstanceNorm++',
    'VarianceNorm', 'BatchNorm'. Conditional (called with the channel count, input and label): the conditional
    layer of that name with num_classes bound to config.model.num_classes (config.model.num_scales if absent).
    """
    norm = config.model.normalization
    if conditional:
        num_classes = complete_config(config).model.num_classes
        return functools.partial(conditional_normalization(norm), num_classes=num_classes)
    if norm == "GroupNorm":
        return functools.partial(_group_norm, num_groups=32)
    if norm == "InstanceNorm":
        return nn.InstanceNorm2d
    if norm == "InstanceNorm++":
        return InstanceNorm2dPlus
    if norm == "VarianceNorm":
        return VarianceNorm2d
    if norm == "BatchNorm":
        return nn.BatchNorm2d
    raise ValueError(
        f"config.model.normalization={norm!r} is unknown; use 'GroupNorm', 'InstanceNorm', 'InstanceNorm++', "
        "'VarianceNorm' or 'BatchNorm'."
    )


def conditional_normalization(norm: str) -> type:
    """Noise-conditional normaliser class called `norm`, constructed as cls(num_features, num_classes, bias)."""
    classes = {
        "InstanceNorm++": ConditionalInstanceNorm2dPlus,
        "InstanceNorm": ConditionalInstanceNorm2d,
        "BatchNorm": ConditionalBatchNorm2d,
        "VarianceNorm": ConditionalVarianceNorm2d,
        "NoneNorm": ConditionalNoneNorm2d,
    }
    if norm not in classes:
        raise ValueError(
            f"config.model.normalization={norm!r} has no noise-conditional version; use one of {sorted(classes)}."
        )
    return classes[norm]


def _group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with min(num_groups, channels) groups and eps 1e-6."""
    return nn.GroupNorm(num_groups=min(num_groups, num_channels), num_channels=num_channels, eps=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Noise-conditional normalisers of NCSN (v1) and their unconditional counterparts


def _scale_shift(embedding: torch.Tensor, num_features: int, parts: int) -> tuple[torch.Tensor, ...]:
    """Split per-sample embeddings (B, parts * C) into `parts` tensors of shape (B, C, 1, 1)."""
    return tuple(part.reshape(-1, num_features, 1, 1) for part in embedding.chunk(parts, dim=-1))


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm (no affine) followed by a per-label scale gamma[y] (and shift beta[y] with bias)."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.embed = nn.Embedding(num_classes, num_features * 2 if bias else num_features)
        with torch.no_grad():
            self.embed.weight[:, :num_features].uniform_()
            self.embed.weight[:, num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        if self.bias:
            gamma, beta = _scale_shift(self.embed(y), self.num_features, 2)
            return gamma * h + beta
        (gamma,) = _scale_shift(self.embed(y), self.num_features, 1)
        return gamma * h


class ConditionalInstanceNorm2d(nn.Module):
    """InstanceNorm (no affine) followed by a per-label scale gamma[y] (and shift beta[y] with bias)."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.embed = nn.Embedding(num_classes, num_features * 2 if bias else num_features)
        with torch.no_grad():
            self.embed.weight[:, :num_features].uniform_()
            self.embed.weight[:, num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.instance_norm(x)
        if self.bias:
            gamma, beta = _scale_shift(self.embed(y), self.num_features, 2)
            return gamma * h + beta
        (gamma,) = _scale_shift(self.embed(y), self.num_features, 1)
        return gamma * h


class ConditionalVarianceNorm2d(nn.Module):
    """x / sqrt(Var_hw[x] + 1e-5) times a per-label scale gamma[y] (no shift, whatever `bias` says)."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = False):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = nn.Embedding(num_classes, num_features)
        with torch.no_grad():
            self.embed.weight.normal_(1.0, 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        var = torch.var(x, dim=(2, 3), keepdim=True)
        (gamma,) = _scale_shift(self.embed(y), self.num_features, 1)
        return gamma * (x / torch.sqrt(var + 1e-5))


class ConditionalNoneNorm2d(nn.Module):
    """No normalisation: a per-label scale gamma[y] (and shift beta[y] with bias) of the input."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = nn.Embedding(num_classes, num_features * 2 if bias else num_features)
        with torch.no_grad():
            self.embed.weight[:, :num_features].uniform_()
            self.embed.weight[:, num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.bias:
            gamma, beta = _scale_shift(self.embed(y), self.num_features, 2)
            return gamma * x + beta
        (gamma,) = _scale_shift(self.embed(y), self.num_features, 1)
        return gamma * x


class NoneNorm2d(nn.Module):
    """The identity (no parameters), with a normaliser's constructor signature."""

    def __init__(self, num_features: int, bias: bool = True):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ConditionalInstanceNorm2dPlus(nn.Module):
    """Conditional InstanceNorm++ (NCSN): gamma[y] (IN(x) + alpha[y] * normalised channel means) + beta[y].

    The embedding row of label y holds [gamma | alpha | beta] (bias=True) or [gamma | alpha] (bias=False).
    """

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.embed = nn.Embedding(num_classes, num_features * 3 if bias else num_features * 2)
        with torch.no_grad():
            self.embed.weight[:, : 2 * num_features].normal_(1.0, 0.02)
            self.embed.weight[:, 2 * num_features :].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        means = torch.mean(x, dim=(2, 3))
        m = torch.mean(means, dim=-1, keepdim=True)
        v = torch.var(means, dim=-1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = self.instance_norm(x)
        if self.bias:
            gamma, alpha, beta = _scale_shift(self.embed(y), self.num_features, 3)
            return gamma * (h + means[..., None, None] * alpha) + beta
        gamma, alpha = _scale_shift(self.embed(y), self.num_features, 2)
        return gamma * (h + means[..., None, None] * alpha)
