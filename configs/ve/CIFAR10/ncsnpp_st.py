"""NCSN++ (VE) + ST on CIFAR-10: k = 2, s_min = 1e-3, PC sampler."""

from configs.default_cifar10_configs import get_default_configs
from configs.st_presets import ve_base


def get_config():
    config = ve_base(get_default_configs)
    config.model.sigma_min = 0.001
    return config
