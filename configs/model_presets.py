"""The two network presets of score_sde (Song et al. 2021, Table 3): DDPM++ for VP/subVP and NCSN++ for VE/RVE.

Each preset sets every model field of the released score_sde / Soft Truncation configs; a config file calls one and
then overrides what differs, so the architecture of each experiment reads in a few lines.
"""

import ml_collections


def _set_unet(config: ml_collections.ConfigDict, name: str, num_res_blocks: int) -> ml_collections.ConfigDict:
    """The U-Net fields DDPM, DDPM++ and NCSN++ share in score_sde's configs (noise-predicting, EMA 0.9999)."""
    model = config.model
    model.name = name
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    config.data.centered = True
    return config


def set_ddpmpp(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DDPM++ (continuous): positional time embedding, noise-predicting output, no FIR, no progressive paths."""
    _set_unet(config, "ncsnpp", num_res_blocks=4)
    model = config.model
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3
    # Soft Truncation network options (defaults reproduce the score_sde layout)
    model.embedding_dim = 0  # used with lsgm=True: time-embedding width independent of nf
    model.lsgm = False
    model.auxiliary_resblock = True
    model.attention = True
    return config


def set_ncsnpp(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN++ (continuous): Gaussian Fourier embedding of sigma, output divided by sigma, FIR, residual input path."""
    set_ddpmpp(config)
    model = config.model
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.fir = True
    model.progressive_input = "residual"
    model.embedding_type = "fourier"
    config.data.centered = False
    return config


def set_ddpm(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The original DDPM network (Ho et al. 2020) as score_sde configures it for VP / sub-VP: 2 blocks, EMA 0.9999."""
    return _set_unet(config, "ddpm", num_res_blocks=2)


def set_ncsnpp_256(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN++ as score_sde configures it for 256 px: no dropout, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks per
    resolution, output_skip / input_skip progressive paths."""
    set_ncsnpp(config)
    model = config.model
    model.dropout = 0.0
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    return config


def set_ncsnpp_1024(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """NCSN++ as score_sde configures it for 1024 px: nf 16, ch_mult (1, 2, 4, 8, 16, 32, 32, 32), 1 block per
    resolution, EMA 0.9999, batch 8, snr 0.15, checkpoints evaluated from 1 in batches of 1024."""
    set_ncsnpp_256(config)
    model = config.model
    model.nf = 16
    model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    model.num_res_blocks = 1
    model.ema_rate = 0.9999
    config.data.image_size = 1024
    config.training.batch_size = 8
    config.sampling.snr = 0.15
    config.eval.begin_ckpt = 1
    config.eval.batch_size = 1024
    return config
