"""NCSN++ / DDPM++ score network (Song et al. 2021), registered as 'ncsnpp', with the Soft Truncation options.

The module list `all_modules` is built in exactly score_sde_pytorch's order, so released checkpoints of
score_sde and of the Soft Truncation repository load strictly. Config fields (config.model unless noted):
nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, conditional, fir, fir_kernel,
skip_rescale, resblock_type ('ddpm' | 'biggan'), progressive ('none' | 'output_skip' | 'residual'),
progressive_input ('none' | 'input_skip' | 'residual'), progressive_combine ('sum' | 'cat'),
embedding_type ('fourier' | 'positional'), fourier_scale, init_scale, scale_by_sigma, nonlinearity,
sigma_min / sigma_max / num_scales (the `sigmas` buffer); config.data.image_size / num_channels / centered.

Soft Truncation options (optional; defaults give the score_sde network):
- lsgm (False) with embedding_dim: the positional embedding has width embedding_dim and the time MLP
  embedding_dim -> 4 embedding_dim -> 4 embedding_dim, independent of nf (e.g. nf 512, 128-wide embedding).
- attention (True): False removes the attention blocks at attn_resolutions (the middle block keeps its own).
- auxiliary_resblock (True): False removes the resampling blocks between resolutions (the network stays at
  the input resolution) and the extra skip of each level, so the decoder has num_res_blocks blocks per level
  instead of num_res_blocks + 1. Only defined for resblock_type 'biggan' without progressive paths (the
  original code crashes otherwise); attention then applies where image_size is in attn_resolutions.
- fourier_feature (False): input features [x, sin/cos(128 pi x), sin/cos(256 pi x)] before the first conv.
- sigma_embedding ('log'): 'uncsn' feeds the Fourier embedding u(sigma) (parametrization.uncsn_embedding_input)
  instead of log sigma: UNCSN++. configs.defaults.complete_config derives it from the Soft Truncation field
  training.unbounded_parametrization of a VE / RVE config; the network reads config.model and config.data only.
"""

import functools

import torch
import torch.nn as nn

from configs.defaults import complete_config

from . import layers, layerspp, utils

SIGMA_EMBEDDINGS = ("log", "uncsn")


@utils.register_model(name="ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ model (also DDPM++ with positional embedding and no FIR)."""

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
        dropout = m.dropout
        resamp_with_conv = m.resamp_with_conv
        self.num_resolutions = num_resolutions = len(ch_mult)
        image_size = config.data.image_size
        self.all_resolutions = [image_size // (2**i) for i in range(num_resolutions)]

        self.conditional = conditional = m.conditional
        fir = m.fir
        fir_kernel = tuple(m.fir_kernel)
        self.skip_rescale = skip_rescale = m.skip_rescale
        self.resblock_type = resblock_type = m.resblock_type.lower()
        self.progressive = progressive = m.progressive.lower()
        self.progressive_input = progressive_input = m.progressive_input.lower()
        self.embedding_type = embedding_type = m.embedding_type.lower()
        init_scale = m.init_scale
        combine_method = m.progressive_combine.lower()
        self.attention = attention = bool(m.attention)
        self.auxiliary_resblock = aux = bool(m.auxiliary_resblock)
        self.lsgm = bool(m.lsgm)
        self.fourier_feature = bool(m.fourier_feature)
        self.scale_by_sigma = bool(m.scale_by_sigma)
        self.centered = bool(config.data.centered)
        if m.sigma_embedding not in SIGMA_EMBEDDINGS:
            raise ValueError(f"config.model.sigma_embedding={m.sigma_embedding!r}; valid: {SIGMA_EMBEDDINGS}.")
        self.unbounded_sigma_embedding = embedding_type == "fourier" and m.sigma_embedding == "uncsn"
        self._check_options(config, aux)

        # Resolution of each level's features (constant without the resampling blocks).
        self.level_resolutions = self.all_resolutions if aux else [image_size] * num_resolutions
        self.level_attention = [attention and r in attn_resolutions for r in self.level_resolutions]

        modules = []
        # Time / noise-level embedding.
        if embedding_type == "fourier":
            modules.append(layerspp.GaussianFourierProjection(embedding_size=nf, scale=m.fourier_scale))
            embed_dim, temb_base = 2 * nf, nf
        elif embedding_type == "positional":
            embed_dim = int(m.embedding_dim) if self.lsgm else nf
            temb_base = embed_dim
        else:
            raise ValueError(f"model.embedding_type={m.embedding_type!r} is unknown; use 'fourier' or 'positional'.")
        self.positional_dim = embed_dim
        temb_dim = 4 * temb_base
        if conditional:
            modules.append(layers.dense(embed_dim, temb_dim))
            modules.append(layers.dense(temb_dim, temb_dim))
        if self.fourier_feature:
            modules.append(layerspp.FixedFourierProjection())

        AttnBlock = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale, skip_rescale=skip_rescale)
        Upsample = functools.partial(layerspp.Upsample, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
        Downsample = functools.partial(layerspp.Downsample, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
        combiner = functools.partial(layerspp.Combine, method=combine_method)
        if progressive == "output_skip":
            self.pyramid_upsample = layerspp.Upsample(fir=fir, fir_kernel=fir_kernel, with_conv=False)
        pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel, with_conv=True)
        if progressive_input == "input_skip":
            self.pyramid_downsample = layerspp.Downsample(fir=fir, fir_kernel=fir_kernel, with_conv=False)
        pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir, fir_kernel=fir_kernel, with_conv=True)
        if resblock_type == "ddpm":
            ResnetBlock = functools.partial(
                layerspp.ResnetBlockDDPMpp,
                act=act,
                dropout=dropout,
                init_scale=init_scale,
                skip_rescale=skip_rescale,
                temb_dim=temb_dim,
            )
        else:
            ResnetBlock = functools.partial(
                layerspp.ResnetBlockBigGANpp,
                act=act,
                dropout=dropout,
                fir=fir,
                fir_kernel=fir_kernel,
                init_scale=init_scale,
                skip_rescale=skip_rescale,
                temb_dim=temb_dim,
            )

        # Encoder.
        channels = config.data.num_channels
        input_pyramid_ch = channels
        modules.append(layerspp.conv3x3(channels * (5 if self.fourier_feature else 1), nf))
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.level_attention[i_level]:
                    modules.append(AttnBlock(channels=in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1 and aux:
                if resblock_type == "ddpm":
                    modules.append(Downsample(in_ch=in_ch))
                else:
                    modules.append(ResnetBlock(down=True, in_ch=in_ch))
                if progressive_input == "input_skip":
                    modules.append(combiner(dim1=input_pyramid_ch, dim2=in_ch))
                    if combine_method == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    modules.append(pyramid_downsample(in_ch=input_pyramid_ch, out_ch=in_ch))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        # Middle.
        in_ch = hs_c[-1]
        if not aux:
            hs_c.pop()
        modules.append(ResnetBlock(in_ch=in_ch))
        modules.append(AttnBlock(channels=in_ch))
        modules.append(ResnetBlock(in_ch=in_ch))

        # Decoder.
        self.num_up_blocks = num_res_blocks + 1 if aux else num_res_blocks
        pyramid_ch = 0
        for i_level in reversed(range(num_resolutions)):
            for _ in range(self.num_up_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(ResnetBlock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.level_attention[i_level]:
                modules.append(AttnBlock(channels=in_ch))
            if progressive != "none":
                if i_level == num_resolutions - 1:
                    modules.append(layerspp._group_norm(in_ch))
                    if progressive == "output_skip":
                        modules.append(layerspp.conv3x3(in_ch, channels, init_scale=init_scale))
                        pyramid_ch = channels
                    else:
                        modules.append(layerspp.conv3x3(in_ch, in_ch, bias=True))
                        pyramid_ch = in_ch
                elif progressive == "output_skip":
                    modules.append(layerspp._group_norm(in_ch))
                    modules.append(layerspp.conv3x3(in_ch, channels, bias=True, init_scale=init_scale))
                    pyramid_ch = channels
                else:
                    modules.append(pyramid_upsample(in_ch=pyramid_ch, out_ch=in_ch))
                    pyramid_ch = in_ch
            if i_level != 0 and aux:
                if resblock_type == "ddpm":
                    modules.append(Upsample(in_ch=in_ch))
                else:
                    modules.append(ResnetBlock(in_ch=in_ch, up=True))
        if hs_c:
            raise RuntimeError("NCSNpp: internal error, unused skip connections")

        if progressive != "output_skip":
            modules.append(layerspp._group_norm(in_ch))
            modules.append(layerspp.conv3x3(in_ch, channels, init_scale=init_scale))

        self.all_modules = nn.ModuleList(modules)

    def _check_options(self, config, aux: bool) -> None:
        """Clear errors for config values this network does not support."""
        m = config.model
        choices = {
            "resblock_type": (self.resblock_type, ("ddpm", "biggan")),
            "progressive": (self.progressive, ("none", "output_skip", "residual")),
            "progressive_input": (self.progressive_input, ("none", "input_skip", "residual")),
            "progressive_combine": (m.progressive_combine.lower(), ("sum", "cat")),
            "embedding_type": (self.embedding_type, ("fourier", "positional")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"config.model.{name}={value!r} is not supported; choose one of {allowed}.")
        if self.lsgm and self.embedding_type == "positional":
            dim = m.embedding_dim
            if not dim or int(dim) < 4 or int(dim) % 2:
                raise ValueError(
                    f"config.model.lsgm=True needs config.model.embedding_dim, an even width >= 4 of the "
                    f"positional time embedding (got {dim!r}); the Soft Truncation configs use 128."
                )
        if not aux and (
            self.resblock_type != "biggan" or self.progressive != "none" or self.progressive_input != "none"
        ):
            raise ValueError(
                "config.model.auxiliary_resblock=False is only defined for resblock_type=biggan with "
                "progressive='none' and progressive_input='none'; set auxiliary_resblock=True otherwise."
            )

    def _time_embedding(self, time_cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Input of the time MLP: Fourier features of log sigma (or u(sigma)), or sinusoids of the label."""
        if self.embedding_type == "fourier":
            if self.unbounded_sigma_embedding:
                s = utils.uncsn_embedding_input(time_cond)
            else:
                s = torch.log(time_cond)
            return self.all_modules[0](s.to(dtype))
        return layers.get_timestep_embedding(time_cond, self.positional_dim).to(dtype)

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        modules = iter(self.all_modules)
        temb = self._time_embedding(time_cond, x.dtype)
        if self.embedding_type == "fourier":
            next(modules)
        if self.conditional:
            temb = next(modules)(temb)
            temb = next(modules)(self.act(temb))
        else:
            temb = None

        if not self.centered:
            x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]

        # Encoder.
        input_pyramid = x if self.progressive_input != "none" else None
        h_in = next(modules)(x) if self.fourier_feature else x
        hs = [next(modules)(h_in)]
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self.level_attention[i_level]:
                    h = next(modules)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1 and self.auxiliary_resblock:
                if self.resblock_type == "ddpm":
                    h = next(modules)(hs[-1])
                else:
                    h = next(modules)(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(modules)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = layerspp._residual_sum(next(modules)(input_pyramid), h, self.skip_rescale)
                    h = input_pyramid
                hs.append(h)

        # Middle.
        h = hs[-1]
        if not self.auxiliary_resblock:
            hs.pop()
        h = next(modules)(h, temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        # Decoder.
        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_up_blocks):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.level_attention[i_level]:
                h = next(modules)(h)
            if self.progressive != "none":
                if i_level == self.num_resolutions - 1:
                    pyramid = self.act(next(modules)(h))
                    pyramid = next(modules)(pyramid)
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid)
                    pyramid_h = self.act(next(modules)(h))
                    pyramid = pyramid + next(modules)(pyramid_h)
                else:
                    pyramid = layerspp._residual_sum(next(modules)(pyramid), h, self.skip_rescale)
                    h = pyramid
            if i_level != 0 and self.auxiliary_resblock:
                if self.resblock_type == "ddpm":
                    h = next(modules)(h)
                else:
                    h = next(modules)(h, temb)

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.act(next(modules)(h))
            h = next(modules)(h)
        if next(modules, None) is not None:
            raise RuntimeError("NCSNpp: internal error, unused modules")

        if self.scale_by_sigma:
            if self.embedding_type == "fourier":
                used_sigmas = time_cond
            else:
                used_sigmas = self.sigmas[time_cond.long()]
            h = h / used_sigmas.to(h.dtype).reshape(-1, *([1] * (h.ndim - 1)))
        return h
