"""score_sde: the original DDPM network (Ho et al. 2020) trained with the continuous VP SDE on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    config.training.sde = "vpsde"
    config.training.continuous = True
    config.training.reduce_mean = True
    config.data.centered = True
    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    return config
