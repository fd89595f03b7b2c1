"""DDPM U-Net (Ho et al. 2020, score_sde_pytorch's port), registered as 'ddpm'.

Positional embedding of the label (width nf, MLP to 4 nf), GroupNorm(32) residual blocks, attention at
attn_resolutions, DDPM up/downsampling. With model.scale_by_sigma the output is divided by sigmas[label]
(discrete VE training). Module order matches score_sde, so its checkpoints load strictly.
"""

import functools

import torch
import torch.nn as nn

from configs.defaults import complete_config

from . import layers, utils


@utils.register_model(name="ddpm")
class DDPM(nn.Module):
    """DDPM model."""

    def __init__(self, config):
        super().__init__()
        self.config = config = complete_config(config)
        m = config.model
        self.act = act = layers.get_act(config)
        self.register_buffer("sigmas", torch.tensor(utils.get_sigmas(config)))

        self.nf = nf = m.nf
        ch_mult = tuple(m.ch_mult)
        self.num_res_blocks = num_res_blocks = m.num_res_blocks
        self.attn_resolutions = attn_resolutions = tuple(m.attn_resolutions)
        resamp_with_conv = m.resamp_with_conv
        self.num_resolutions = num_resolutions = len(ch_mult)
        self.all_resolutions = [config.data.image_size // (2**i) for i in range(num_resolutions)]
        self.level_attention = [r in attn_resolutions for r in self.all_resolutions]
        self.conditional = conditional = m.conditional
        self.centered = bool(config.data.centered)
        self.scale_by_sigma = bool(m.scale_by_sigma)
        if nf % 32:
            raise ValueError(f"config.model.nf={nf} must be a multiple of 32 for the DDPM model (GroupNorm(32)).")

        ResnetBlock = functools.partial(layers.ResnetBlockDDPM, act=act, temb_dim=4 * nf, dropout=m.dropout)
        modules = []
        if conditional:
            modules.append(layers.dense(nf, 4 * nf))
            modules.append(layers.dense(4 * nf, 4 * nf))

        channels = config.data.num_channels
        modules.append(layers.ddpm_conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.level_attention[i_level]:
                    modules.append(layers.AttnBlock(channels=in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                modules.append(layers.Downsample(channels=in_ch, with_conv=resamp_with_conv))
                hs_c.append(in_ch)

        in_ch = hs_c[-1]
        modules.append(ResnetBlock(in_ch=in_ch))
        modules.append(layers.AttnBlock(channels=in_ch))
        modules.append(ResnetBlock(in_ch=in_ch))

        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.level_attention[i_level]:
                modules.append(layers.AttnBlock(channels=in_ch))
            if i_level != 0:
                modules.append(layers.Upsample(channels=in_ch, with_conv=resamp_with_conv))

        modules.append(nn.GroupNorm(num_channels=in_ch, num_groups=32, eps=1e-6))
        modules.append(layers.ddpm_conv3x3(in_ch, channels, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        modules = iter(self.all_modules)
        if self.conditional:
            temb = layers.get_timestep_embedding(labels, self.nf).to(x.dtype)
            temb = next(modules)(temb)
            temb = next(modules)(self.act(temb))
        else:
            temb = None
        h = x if self.centered else 2 * x - 1.0

        hs = [next(modules)(h)]
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self.level_attention[i_level]:
                    h = next(modules)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(next(modules)(hs[-1]))

        h = hs[-1]
        h = next(modules)(h, temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.level_attention[i_level]:
                h = next(modules)(h)
            if i_level != 0:
                h = next(modules)(h)

        h = self.act(next(modules)(h))
        h = next(modules)(h)
        if self.scale_by_sigma:
            h = h / self.sigmas[labels.long()].to(h.dtype)[:, None, None, None]
        return h
