"""Baseline without ST: DDPM++ (VP) with variance weighting (score_sde's FID setting), uniform t on [eps, 1]."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import vp_base


def get_config():
    config = vp_base(get_default_configs)
    config.training.st = False
    config.training.importance_sampling = False
    return config
