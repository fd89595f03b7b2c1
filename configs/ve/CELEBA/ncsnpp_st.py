"""NCSN++ (VE) + ST on CelebA 64: s_max = 90, k = 2."""

from configs.default_celeba_configs import get_default_configs
from configs.st_presets import celeba_schedule, ve_base


def get_config():
    config = ve_base(get_default_configs)
    celeba_schedule(config)
    return config
