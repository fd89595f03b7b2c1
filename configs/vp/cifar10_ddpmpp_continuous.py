"""score_sde: DDPM++ (VP, continuous) on CIFAR-10, variance weighting, PC sampler (Euler-Maruyama)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpmpp


def get_config():
    config = set_ddpmpp(get_default_configs())
    config.training.sde = "vpsde"
    config.training.continuous = True
    config.training.reduce_mean = True
    return config
