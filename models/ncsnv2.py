"""NCSN (v1) and NCSNv2 score networks (score_sde_pytorch's models/ncsnv2.py): dilated RefineNets.

Registered models (config.model.name):
- 'ncsn': NCSN (Song & Ermon 2019), conditioned on the noise level through noise-conditional normalisers
  (conditional InstanceNorm++ for model.normalization='InstanceNorm++'; one embedding row per noise level,
  model.num_scales rows). The output is not divided by sigma.
- 'ncsnv2_64' (images < 96 px), 'ncsnv2_128' (96-128 px), 'ncsnv2_256' (129-256 px): NCSNv2 (Song & Ermon 2020),
  unconditional normalisers; the output is divided by sigmas[label] (the `sigmas` buffer, float64 as in the
  original). `get_network(config)` picks the class for config.data.image_size.

Labels are noise-level indices (VE discrete training, `models.utils.get_score_fn` with continuous=False):
label 0 is sigma_max, label num_scales - 1 is sigma_min. As in score_sde_pytorch, 'ncsnv2_*' always divide by
sigma and 'ncsn' never does, whatever model.scale_by_sigma says (its configs set it accordingly).

Config fields: data.num_channels, data.image_size (28 px: NCSN's MNIST padding), data.centered; model.nf,
num_scales, sigma_min, sigma_max, normalization, nonlinearity, interpolation ('bilinear', the only mode).

Checkpoint compatibility: attribute names, registration order, parameter shapes and the float64 `sigmas` buffer are
those of score_sde_pytorch, so its state_dicts (and NCSNv2-repository ones, which use the same names) load
strictly. Where the original cannot run, this module computes what the original evidently means (the NCSNv2
repository's and the JAX score_sde's function): dilated 3x3 convolutions are padded by their dilation (the PyTorch
port pads by 1, and its dilated blocks then fail with a shape mismatch), bias-free convolutions are created without
touching the missing bias, NCSN uses a noise-conditional normaliser class (the port's unconditional one cannot
take the label) and its undilated blocks treat dilation=None as 1, and the number of input channels is read from
data.num_channels (the port reads data.channels, which score_sde's configs do not have). The sigma division is done
in the output's dtype (float32 for float32 inputs; the port's float64 result would break the float32 sampler).
"""

import functools

import torch
import torch.nn as nn

from configs.defaults import complete_config

from . import utils
from .layers import (
    ConditionalResidualBlock,
    CondRefineBlock,
    RefineBlock,
    ResidualBlock,
    get_act,
    ncsn_conv3x3,
)
from .normalization import conditional_normalization, get_normalization

CondResidualBlock = ConditionalResidualBlock
conv3x3 = ncsn_conv3x3


def get_network(config) -> functools.partial:
    """The NCSNv2 class for config.data.image_size (< 96, 96-128 or 129-256 px), bound to `config`."""
    size = config.data.image_size
    if size < 96:
        return functools.partial(NCSNv2, config=config)
    if size <= 128:
        return functools.partial(NCSNv2_128, config=config)
    if size <= 256:
        return functools.partial(NCSNv2_256, config=config)
    raise ValueError(f"data.image_size={size}: no NCSNv2 network is defined above 256 px.")


class _DilatedRefineNet(nn.Module):
    """Shared body of NCSN / NCSNv2: conv, residual stages (2 blocks each), RefineBlocks back up, norm, act, conv.

    STAGES: (attribute, input width, output width (multiples of nf), resample of the first block, dilation) in
    registration order. REFINES: (attribute, input widths, output width, start, end) in registration order.
    FORWARD_REFINES: the RefineBlock applied to each stage output, deepest stage first. ADJUST_PADDING_STAGE: the
    stage whose first block gets adjust_padding for 28 px images (64 px networks only).
    """

    conditional = False
    ADJUST_PADDING_STAGE: str | None = None
    STAGES: tuple = ()
    REFINES: tuple = ()
    FORWARD_REFINES: tuple = ()

    def __init__(self, config):
        super().__init__()
        config = complete_config(config)
        self.centered = bool(config.data.centered)
        self.nf = nf = config.model.nf
        self.act = act = get_act(config)
        self.config = config
        num_scales = config.model.num_scales
        interpolation = config.model.interpolation
        if interpolation != "bilinear":
            raise ValueError(f"model.interpolation={interpolation!r}: NCSN / NCSNv2 fuse with 'bilinear' only.")
        if self.conditional:
            self.norm = conditional_normalization(config.model.normalization)
        else:
            self.norm = get_normalization(config)
            self.register_buffer("sigmas", torch.tensor(utils.get_sigmas(config)))
        channels = config.data.num_channels

        self.begin_conv = nn.Conv2d(channels, nf, 3, stride=1, padding=1)
        # The original passes num_scales as the second positional argument of every final normaliser (it is the
        # `bias` flag of InstanceNorm++ and the number of classes of the conditional normalisers).
        self.normalizer = self.norm(nf, num_scales)
        self.end_conv = nn.Conv2d(nf, channels, 3, stride=1, padding=1)

        for name, width_in, width_out, resample, dilation in self.STAGES:
            pad = config.data.image_size == 28 and name == self.ADJUST_PADDING_STAGE
            blocks = [
                self._residual_block(width_in * nf, width_out * nf, resample, dilation, pad, num_scales, act),
                self._residual_block(width_out * nf, width_out * nf, None, dilation, False, num_scales, act),
            ]
            setattr(self, name, nn.ModuleList(blocks))
        for name, widths_in, width_out, start, end in self.REFINES:
            planes = [w * nf for w in widths_in]
            if self.conditional:
                block = CondRefineBlock(planes, width_out * nf, num_scales, self.norm, act=act, start=start, end=end)
            else:
                block = RefineBlock(planes, width_out * nf, act=act, start=start, end=end)
            setattr(self, name, block)

    def _residual_block(self, width_in, width_out, resample, dilation, adjust_padding, num_scales, act) -> nn.Module:
        """One residual block of a stage (dilation 1: the undilated, mean-pooling variant)."""
        if self.conditional:
            return ConditionalResidualBlock(
                width_in,
                width_out,
                num_scales,
                resample=resample,
                act=act,
                normalization=self.norm,
                adjust_padding=adjust_padding,
                dilation=dilation,
            )
        return ResidualBlock(
            width_in,
            width_out,
            resample=resample,
            act=act,
            normalization=self.norm,
            adjust_padding=adjust_padding,
            dilation=dilation,
        )

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Network output before any sigma scaling."""
        cond = (y,) if self.conditional else ()
        h = x if self.centered else 2 * x - 1.0
        h = self.begin_conv(h)
        layers = []
        for name, *_ in self.STAGES:
            for block in getattr(self, name):
                h = block(h, *cond)
            layers.append(h)
        ref = None
        for name, skip in zip(self.FORWARD_REFINES, reversed(layers)):
            inputs = [skip] if ref is None else [skip, ref]
            ref = getattr(self, name)(inputs, *cond, skip.shape[2:])
        h = self.act(self.normalizer(ref, *cond))
        return self.end_conv(h)


class _NCSNv2Base(_DilatedRefineNet):
    """NCSNv2 family: unconditional normalisers, output divided by sigmas[label]."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Score s(x, sigma_y) = network(x) / sigma_y for noise-level indices y (integer tensor of shape (B,))."""
        if y.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} takes noise-level indices (an integer tensor), got {y.dtype}: train and "
                "sample it as a discrete VE model (training.continuous=False)."
            )
        h = self._body(x, y)
        used_sigmas = self.sigmas[y].to(h.dtype).reshape(x.shape[0], *([1] * (x.ndim - 1)))
        return h / used_sigmas


@utils.register_model(name="ncsnv2_64")
class NCSNv2(_NCSNv2Base):
    """NCSNv2 for images below 96 px: 4 stages (nf, 2nf, 2nf dilated 2, 2nf dilated 4), 4 RefineBlocks."""

    ADJUST_PADDING_STAGE = "res4"
    STAGES = (
        ("res1", 1, 1, None, 1),
        ("res2", 1, 2, "down", 1),
        ("res3", 2, 2, "down", 2),
        ("res4", 2, 2, "down", 4),
    )
    REFINES = (
        ("refine1", (2,), 2, True, False),
        ("refine2", (2, 2), 2, False, False),
        ("refine3", (2, 2), 1, False, False),
        ("refine4", (1, 1), 1, False, True),
    )
    FORWARD_REFINES = ("refine1", "refine2", "refine3", "refine4")


@utils.register_model(name="ncsn")
class NCSN(_DilatedRefineNet):
    """NCSN (v1): the NCSNv2 (64 px) layout with noise-conditional normalisers everywhere; no sigma scaling."""

    conditional = True
    ADJUST_PADDING_STAGE = NCSNv2.ADJUST_PADDING_STAGE
    STAGES = NCSNv2.STAGES
    REFINES = NCSNv2.REFINES
    FORWARD_REFINES = NCSNv2.FORWARD_REFINES

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Network output for noise-level indices y (integer tensor of shape (B,))."""
        return self._body(x, y)


@utils.register_model(name="ncsnv2_128")
class NCSNv2_128(_NCSNv2Base):
    """NCSNv2 for 96-128 px: 5 stages (nf, 2nf, 2nf, 4nf dilated 2, 4nf dilated 4), 5 RefineBlocks."""

    STAGES = (
        ("res1", 1, 1, None, 1),
        ("res2", 1, 2, "down", 1),
        ("res3", 2, 2, "down", 1),
        ("res4", 2, 4, "down", 2),
        ("res5", 4, 4, "down", 4),
    )
    REFINES = (
        ("refine1", (4,), 4, True, False),
        ("refine2", (4, 4), 2, False, False),
        ("refine3", (2, 2), 2, False, False),
        ("refine4", (2, 2), 1, False, False),
        ("refine5", (1, 1), 1, False, True),
    )
    FORWARD_REFINES = ("refine1", "refine2", "refine3", "refine4", "refine5")


@utils.register_model(name="ncsnv2_256")
class NCSNv2_256(_NCSNv2Base):
    """NCSNv2 for 129-256 px: the 128 px network with one more 2nf stage (res31 / refine31) at 1/8 resolution."""

    STAGES = (
        ("res1", 1, 1, None, 1),
        ("res2", 1, 2, "down", 1),
        ("res3", 2, 2, "down", 1),
        ("res31", 2, 2, "down", 1),
        ("res4", 2, 4, "down", 2),
        ("res5", 4, 4, "down", 4),
    )
    REFINES = (
        ("refine1", (4,), 4, True, False),
        ("refine2", (4, 4), 2, False, False),
        ("refine3", (2, 2), 2, False, False),
        ("refine31", (2, 2), 2, False, False),
        ("refine4", (2, 2), 1, False, False),
        ("refine5", (1, 1), 1, False, True),
    )
    FORWARD_REFINES = ("refine1", "refine2", "refine31", "refine3", "refine4", "refine5")
