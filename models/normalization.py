"""Normalisation layers selected by config.model.normalization (score_sde_pytorch's models/normalization.py).

The networks of this package (NCSN++, DDPM++, DDPM) use GroupNorm directly; this module serves configs and
client code that ask for a normaliser by name.
"""

import functools

import torch
import torch.nn as nn


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

    Supported: 'GroupNorm' (32 groups, eps 1e-6 as in DDPM), 'InstanceNorm', 'InstanceNorm++', 'VarianceNorm',
    'BatchNorm'. Noise-conditional normalisers (NCSNv1/v2) are not part of this package.
    """
    norm = config.model.normalization
    if conditional:
        raise NotImplementedError(
            f"Conditional normalization {norm!r} (NCSNv1/v2) is not implemented; the NCSN++/DDPM++/DDPM "
            "networks are conditioned through the time embedding instead."
        )
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


def _group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with min(num_groups, channels) groups and eps 1e-6."""
    return nn.GroupNorm(num_groups=min(num_groups, num_channels), num_channels=num_channels, eps=1e-6)
