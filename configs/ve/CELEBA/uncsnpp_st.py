"""UNCSN++ (RVE) + ST on CelebA 64: reciprocal VE, s_min = 1e-3, s_max = 90, k = 2."""

from configs.default_celeba_configs import get_default_configs
from configs.st_presets import celeba_schedule, unbounded_ve, ve_base


def get_config():
    config = ve_base(get_default_configs)
    unbounded_ve(config)
    celeba_schedule(config)
    return config
