"""DDPM++ deepest (VP, FID) + ST on CIFAR-10: k = 0.9, mixed mode (half importance-sampled likelihood, half
uniform time with weight 100)."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import deepest_ddpmpp, vp_base


def get_config():
    config = deepest_ddpmpp(vp_base(get_default_configs))
    config.training.k = 0.9
    config.training.ddpm_weight = 100.0
    config.training.importance_sampling = False
    return config
