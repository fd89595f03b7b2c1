"""DDPM++ deepest (VP, NLL) + ST on CIFAR-10: k = 2, mixed and balanced mode."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import deepest_ddpmpp, vp_base


def get_config():
    config = deepest_ddpmpp(vp_base(get_default_configs))
    config.training.k = 2.0
    config.training.balanced = True
    return config
