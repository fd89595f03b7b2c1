"""UNCSN++ (RVE) + ST on CIFAR-10: reciprocal VE SDE with s_min = 1e-3, k = 2, PC sampler."""

from configs.default_cifar10_configs import get_default_configs
from configs.st_presets import unbounded_ve, ve_base


def get_config():
    return unbounded_ve(ve_base(get_default_configs))
